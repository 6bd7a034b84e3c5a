"""Copy one file into or out of a running guest through the QEMU guest agent (qemu-ga).

No shared folder, no network: the agent's file calls, with the data base64-encoded in chunks::

    guest-file-open  {"path": "/root/x", "mode": "wb"}     -> handle
    guest-file-write {"handle": h, "buf-b64": "..."}       (one per chunk)
    guest-file-close {"handle": h}

and ``guest-file-read {"handle": h, "count": n}`` the other way. The SHA-256 is computed on
both sides (``sha256sum`` in the guest) and compared. Works on both backends (QEMU-direct talks
to qemu-ga's socket; libvirt goes through ``virsh qemu-agent-command``).

Compared with a shared folder: nothing to configure at boot and no daemon, but every byte goes
through JSON + base64 over a slow serial channel (good for a config file, poor for gigabytes).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import HostError, InputError

__all__ = [
    "CHUNK",
    "CHUNK_LIBVIRT",
    "ChecksumMismatch",
    "FileCopy",
    "close_message",
    "copy_from_guest",
    "copy_to_guest",
    "guest_sha256",
    "open_message",
    "read_message",
    "write_message",
]

#: Bytes per guest-file-write/read (base64 makes it 4/3 bigger on the wire).
CHUNK = 256 * 1024
#: Through libvirt (virDomainQemuAgentCommand) big messages fail: measured here with libvirt 9.0,
#: 96 KiB chunks pass and 256 KiB ones make libvirt declare the agent unresponsive.
CHUNK_LIBVIRT = 48 * 1024


def _chunk(guest: Any, chunk: int | None) -> int:
    if chunk is not None:
        if chunk < 1:
            raise InputError(f"Tamaño de trozo no válido: {chunk}.", "Usa un número de bytes positivo.")
        return chunk
    return CHUNK_LIBVIRT if getattr(guest, "backend", "") == "libvirt" else CHUNK


class ChecksumMismatch(HostError):
    """The copy arrived different from the original."""


class _Agent(Protocol):
    def agent(self, command: str, **arguments: Any) -> Any: ...
    def run(self, command: Any, *, timeout: float = ..., check: bool = ...) -> Any: ...


@dataclass(frozen=True)
class FileCopy:
    """One copy through the agent: sizes, checksums on both sides, time and the messages used."""

    direction: str  # "al invitado" or "desde el invitado"
    host_path: Path
    guest_path: str
    size: int
    sha256_host: str
    sha256_guest: str
    seconds: float
    chunks: int
    commands: tuple[str, ...]
    backend: str = "qemu"

    @property
    def ok(self) -> bool:
        return self.sha256_host == self.sha256_guest

    @property
    def mb_per_s(self) -> float:
        return self.size / (1 << 20) / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        verdict = "coinciden" if self.ok else "NO coinciden"
        return (f"{self.direction}: {self.size} bytes en {self.chunks} trozo(s), {self.seconds:.2f} s "
                f"({self.mb_per_s:.2f} MiB/s)\n  sha256 anfitrión {self.sha256_host}\n"
                f"  sha256 invitado  {self.sha256_guest}  → {verdict}")


def open_message(path: str, mode: str) -> tuple[str, dict[str, Any]]:
    return ("guest-file-open", {"path": path, "mode": mode})


def write_message(handle: int, data: bytes) -> tuple[str, dict[str, Any]]:
    return ("guest-file-write", {"handle": handle, "buf-b64": base64.b64encode(data).decode()})


def read_message(handle: int, count: int = CHUNK) -> tuple[str, dict[str, Any]]:
    return ("guest-file-read", {"handle": handle, "count": count})


def close_message(handle: int) -> tuple[str, dict[str, Any]]:
    return ("guest-file-close", {"handle": handle})


def _shown(command: str, arguments: dict[str, Any]) -> str:
    shown = dict(arguments)
    if "buf-b64" in shown:
        shown["buf-b64"] = f"<{len(shown['buf-b64'])} caracteres base64>"
    return json.dumps({"execute": command, "arguments": shown}, ensure_ascii=False)


def _guest_path(path: str) -> str:
    if not path.startswith("/") or "\n" in path or "\0" in path:
        raise InputError(f"Ruta del invitado no válida: «{path}».", "Usa una ruta absoluta, p. ej. /root/datos.bin.")
    return path


def guest_sha256(guest: _Agent, path: str) -> str:
    result = guest.run(["sha256sum", path], timeout=120)
    if not result.ok:
        raise HostError(f"No se pudo calcular el sha256 de «{path}» en el invitado: {result.stderr.strip()}",
                        "¿Existe el fichero en el invitado?")
    return result.stdout.split()[0]


def copy_to_guest(guest: _Agent, source: str | os.PathLike[str], dest: str, *, chunk: int | None = None) -> FileCopy:
    """Copy a host file to ``dest`` in the guest (overwritten) and compare SHA-256 on both sides."""
    chunk = _chunk(guest, chunk)
    src = Path(source).expanduser()
    if not src.is_file():
        raise InputError(f"«{src}» no es un fichero del anfitrión.", "Indica un fichero que exista.")
    dest = _guest_path(dest)
    digest = hashlib.sha256()
    start = time.monotonic()
    command, arguments = open_message(dest, "wb")
    handle = guest.agent(command, **arguments)
    shown = [_shown(command, arguments)]
    chunks = 0
    try:
        with open(src, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
                command, arguments = write_message(handle, block)
                guest.agent(command, **arguments)
                if chunks == 0:
                    shown.append(_shown(command, arguments) + "  (× cada trozo)")
                chunks += 1
    finally:
        command, arguments = close_message(handle)
        guest.agent(command, **arguments)
        shown.append(_shown(command, arguments))
    seconds = time.monotonic() - start
    remote = guest_sha256(guest, dest)
    copy = FileCopy("al invitado", src, dest, src.stat().st_size, digest.hexdigest(), remote, seconds, chunks,
                    tuple(shown) + (f"sha256sum {dest}   (en el invitado)",), getattr(guest, "backend", "qemu"))
    if not copy.ok:
        raise ChecksumMismatch(f"La copia de «{src.name}» llegó distinta al invitado.", "Repite la copia.")
    return copy


def copy_from_guest(guest: _Agent, source: str, dest: str | os.PathLike[str], *, chunk: int | None = None,
                    overwrite: bool = False) -> FileCopy:
    """Copy ``source`` from the guest to a host file and compare SHA-256 on both sides.

    An existing host file is kept unless ``overwrite=True``; the copy goes to a temporary file
    next to it and takes its name only once complete and verified, so a failed copy loses nothing.
    """
    chunk = _chunk(guest, chunk)
    source = _guest_path(source)
    out = Path(dest).expanduser()
    if out.is_dir():
        out = out / Path(source).name
    if not out.parent.is_dir():
        raise InputError(f"La carpeta «{out.parent}» no existe en el anfitrión.",
                         "Copia a una carpeta que exista (o créala antes con mkdir -p).")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise InputError(f"Ya existe «{out}» en el anfitrión y no se sobrescribe.",
                         "Elige otro nombre de destino, bórralo antes o pasa overwrite=True.")
    if out.is_dir():
        raise InputError(f"«{out}» es una carpeta.", "Da como destino un fichero o una carpeta donde no exista ese nombre.")
    remote = guest_sha256(guest, source)
    digest = hashlib.sha256()
    start = time.monotonic()
    command, arguments = open_message(source, "rb")
    handle = guest.agent(command, **arguments)
    shown = [_shown(command, arguments)]
    chunks = size = 0
    partial = out.with_name(f".{out.name}.labkit-parcial")
    try:
        with open(partial, "wb") as f:
            while True:
                command, arguments = read_message(handle, chunk)
                answer = guest.agent(command, **arguments)
                if chunks == 0:
                    shown.append(_shown(command, arguments) + "  (hasta eof: true)")
                data = base64.b64decode(answer.get("buf-b64", ""))
                digest.update(data)
                f.write(data)
                size += len(data)
                chunks += 1
                if answer.get("eof") or not data:
                    break
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        command, arguments = close_message(handle)
        guest.agent(command, **arguments)
        shown.append(_shown(command, arguments))
    seconds = time.monotonic() - start
    copy = FileCopy("desde el invitado", out, source, size, digest.hexdigest(), remote, seconds, chunks,
                    (f"sha256sum {source}   (en el invitado)",) + tuple(shown), getattr(guest, "backend", "qemu"))
    if not copy.ok:
        partial.unlink(missing_ok=True)
        raise ChecksumMismatch(f"La copia de «{source}» llegó distinta al anfitrión.", "Repite la copia.")
    os.replace(partial, out)
    return copy

"""Virtual disks: qemu-img on the host, hot-plug into a running guest, and the guest's view.

Three layers, each usable alone::

    host side     create / info / check / convert / resize    (qemu-img, typed results)
    hot-plug      attach_messages / detach_messages ...       (pure QMP and virsh builders;
                  Guest.attach_disk / detach_disk / resize_disk / disks run them)
    guest side    load_disk_drivers / guest_block_devices / find_by_serial   (through guest.run)
    back on host  read_file_from_image (debugfs, no root), measure_growth (thin provisioning)

Every result carries the exact command it stands for (``.command`` or ``.commands``), built with
``shlex.join`` for display; commands are always run from argument lists.

The interface both guest backends implement (QEMU-direct :class:`labkit.guest.Guest` and
libvirt's ``LibvirtGuest``)::

    attach_disk(image, *, format=None, serial=None, readonly=False) -> AttachedDisk
    detach_disk(disk: AttachedDisk, *, timeout=15.0, force=False) -> AttachedDisk  (commands of the detach)
    resize_disk(disk: AttachedDisk, size) -> ResizeResult
    disks() -> list[AttachedDisk]

The guest names a hot-plugged disk by its own order (vda, vdb ...), so the guest side always
finds a disk by its serial number (``/sys/block/vd*/serial``), never by name.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from ..errors import HostError, InputError, ToolMissingError

__all__ = [
    "FORMATS",
    "MAX_SIZE",
    "SERIAL_PATTERN",
    "AttachedDisk",
    "CheckResult",
    "DiskInUseError",
    "GrowthPoint",
    "GuestBlockDevice",
    "ImageFile",
    "ImageInfo",
    "QemuImgError",
    "ResizeResult",
    "allocated_bytes",
    "attach_messages",
    "block_table",
    "check",
    "convert",
    "create",
    "detach_messages",
    "find_by_serial",
    "format_size",
    "guest_block_devices",
    "hotplug_names",
    "info",
    "load_disk_drivers",
    "measure_growth",
    "new_serial",
    "next_target",
    "parse_size",
    "qmp_text",
    "read_file_from_image",
    "resize",
    "resize_message",
    "virsh_attach_line",
    "virsh_detach_line",
    "virsh_resize_line",
]

QEMU_IMG = "qemu-img"
#: Formats a course image is created in; ``convert`` also writes the formats other hypervisors use.
FORMATS = ("raw", "qcow2")
CONVERT_FORMATS = ("raw", "qcow2", "vmdk", "vdi", "vhdx")
#: The biggest virtual disk this course creates (sparse files make even this cheap).
MAX_SIZE = 1 << 40  # 1 TiB
SERIAL_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,20}")
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}
_SIZE = re.compile(r"\s*(\d+(?:[.,]\d+)?)\s*(?:([KMGTPE])(?:I?B)?|(B))?\s*", re.IGNORECASE)
_SIZE_HINT = "Escribe un tamaño como «512M», «5G», «1.5G» o un número de bytes."
_LOCK = re.compile(r"lock|another process", re.IGNORECASE)


# --------------------------------------------------------------------------- errors


class QemuImgError(HostError):
    """qemu-img refused or failed."""

    def __init__(self, message: str, hint: str = "", *, command: str = "", stderr: str = "") -> None:
        super().__init__(message, hint)
        self.command = command
        self.stderr = stderr


class DiskInUseError(QemuImgError):
    """The image is open (and locked) by a running QEMU."""


# --------------------------------------------------------------------------- sizes


def parse_size(value: int | str, *, what: str = "Tamaño") -> int:
    """Bytes from 1073741824, "512M", "5G", "1.5G", "1,5G", "64MiB", "100K" (binary units, as qemu-img).

    Rounded up to whole 512-byte sectors. Refuses zero, negatives, nonsense and more than 1 TiB.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InputError(f"{what} no válido: {value!r}.", _SIZE_HINT)
    if isinstance(value, int):
        number = value
        if number < 0:
            raise InputError(f"{what} negativo: {value}.", "Un disco necesita un tamaño positivo, p. ej. «1G».")
    else:
        text = value.strip()
        if text.startswith("-"):
            raise InputError(f"{what} negativo: «{value}».", "Un disco necesita un tamaño positivo, p. ej. «1G».")
        m = _SIZE.fullmatch(text)
        if not m:
            raise InputError(f"{what} no válido: «{value}».", _SIZE_HINT)
        unit = (m.group(2) or "").upper()
        amount = float(m.group(1).replace(",", "."))
        if unit in ("P", "E") and amount > 0:
            raise InputError(f"{what} demasiado grande para este curso: «{value}».",
                             "Los discos del curso no pasan de 1 TiB; prueba con «1G» o «10G».")
        number = int(-(-amount * _UNITS[unit] // 1))  # ceil
    if number == 0:
        raise InputError(f"{what} no válido: 0 bytes; debe ser mayor que cero.", "Indica un tamaño como «64M» o «1G».")
    if number > MAX_SIZE:
        raise InputError(f"{what} demasiado grande para este curso: {format_size(number)}.",
                         "Los discos del curso no pasan de 1 TiB; prueba con «1G» o «10G».")
    return -(-number // 512) * 512


def format_size(size: int) -> str:
    """1536 -> "1.5 KiB", 67108864 -> "64 MiB" (binary units, at most one decimal)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            text = f"{value:.1f}".rstrip("0").rstrip(".") if unit != "B" else str(int(value))
            return f"{text} {unit}"
        value /= 1024
    raise AssertionError  # pragma: no cover


# --------------------------------------------------------------------------- qemu-img


def _qemu_img(args: Sequence[str]) -> tuple[subprocess.CompletedProcess[str], str]:
    binary = shutil.which(QEMU_IMG)
    if binary is None:
        raise ToolMissingError(QEMU_IMG, "qemu-utils")
    argv = [QEMU_IMG, *args]
    env = {**os.environ, "LC_ALL": "C"}
    # errors="replace": a path with bytes that are not UTF-8 comes back in qemu-img's JSON
    proc = subprocess.run([binary, *args], capture_output=True, text=True, errors="replace", env=env, check=False)
    return proc, shlex.join(argv)


def _fail(proc: subprocess.CompletedProcess[str], command: str, what: str, hint: str) -> QemuImgError:
    stderr = proc.stderr.strip()
    detail = stderr.replace("qemu-img: ", "").splitlines()[-1] if stderr else f"estado {proc.returncode}"
    if _LOCK.search(stderr):
        return DiskInUseError(
            f"{what}: la imagen está en uso. Una máquina virtual en marcha la tiene abierta y QEMU la "
            f"bloquea para que nadie más la modifique a la vez ({detail}).",
            hint, command=command, stderr=stderr)
    return QemuImgError(f"{what}: qemu-img dijo «{detail}».", hint or "Revisa la ruta y el formato de la imagen.",
                        command=command, stderr=stderr)


def _image_path(path: str | os.PathLike[str], *, must_exist: bool) -> Path:
    p = Path(path).expanduser()
    if "\n" in str(p) or "\0" in str(p):
        raise InputError(f"Nombre de imagen no válido: {str(p)!r}.",
                         "Quita el salto de línea o el byte nulo: QEMU no admite ninguno de los dos en una ruta.")
    if must_exist:
        if not p.exists():
            raise InputError(f"No existe la imagen «{p}».", "Comprueba la ruta o créala con create(ruta, «1G»).")
        if p.is_dir():
            raise InputError(f"«{p}» es una carpeta, no una imagen de disco.", "Indica el fichero de la imagen.")
        return p
    parent = p.parent if str(p.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise InputError(f"«{parent}» es un fichero, no una carpeta.", "Guarda la imagen en una carpeta que exista.")
    if not parent.is_dir():
        raise InputError(f"La carpeta «{parent}» no existe.",
                         f"Créala antes (mkdir -p {shlex.quote(str(parent))}) o elige una ruta en una carpeta que exista.")
    if p.is_dir():
        raise InputError(f"«{p}» es una carpeta.", "Indica un nombre de fichero para la imagen, p. ej. «disco.qcow2».")
    return p


def _format(value: str, allowed: Sequence[str]) -> str:
    fmt = str(value).lower()
    if fmt not in allowed:
        raise InputError(f"Formato de imagen no válido: «{value}».", "Usa " + ", ".join(f"«{f}»" for f in allowed) + ".")
    return fmt


@dataclass(frozen=True)
class ImageInfo:
    """What ``qemu-img info`` says about an image; ``command`` is the qemu-img call that produced it."""

    path: Path
    format: str
    virtual_size: int  # what the guest sees
    actual_size: int  # what the file really takes on the host's disk (allocated blocks)
    cluster_size: int | None = None  # qcow2 allocation unit
    dirty: bool = False  # qcow2 with lazy refcounts left open by a crashed QEMU
    corrupt: bool = False
    backing_file: str | None = None
    compat: str | None = None
    command: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def thin(self) -> bool:
        """True when the image takes less space on the host than the guest can fill."""
        return self.actual_size < self.virtual_size

    def summary(self) -> str:
        """A few Spanish lines for display."""
        lines = [f"imagen:          {self.path.name}",
                 f"formato:         {self.format}",
                 f"tamaño virtual:  {format_size(self.virtual_size)} ({self.virtual_size} bytes)",
                 f"ocupa en disco:  {format_size(self.actual_size)}"]
        if self.cluster_size:
            lines.append(f"clúster:         {format_size(self.cluster_size)}")
        if self.backing_file:
            lines.append(f"imagen base:     {self.backing_file}")
        if self.dirty or self.corrupt:
            lines.append(f"estado:          {'sucia ' if self.dirty else ''}{'corrupta' if self.corrupt else ''}".rstrip())
        return "\n".join(lines)


def _parse_info(data: Mapping[str, Any], path: Path, command: str) -> ImageInfo:
    specific = (data.get("format-specific") or {}).get("data") or {}
    return ImageInfo(
        path=path,
        format=str(data.get("format", "")),
        virtual_size=int(data.get("virtual-size", 0)),
        actual_size=int(data.get("actual-size", 0)),
        cluster_size=data.get("cluster-size"),
        dirty=bool(data.get("dirty-flag", False)),
        corrupt=bool(specific.get("corrupt", False)),
        backing_file=data.get("backing-filename"),
        compat=specific.get("compat"),
        command=command,
        raw=dict(data),
    )


def info(path: str | os.PathLike[str]) -> ImageInfo:
    """``qemu-img info --output=json``. An image in use is read with ``-U`` (shared, read-only look)."""
    p = _image_path(path, must_exist=True)
    proc, command = _qemu_img(["info", "--output=json", str(p)])
    if proc.returncode != 0 and _LOCK.search(proc.stderr):
        # a running QEMU holds the write lock: look without taking it (the numbers may lag a little)
        proc, command = _qemu_img(["info", "-U", "--output=json", str(p)])
    if proc.returncode != 0:
        raise _fail(proc, command, f"No se pudo leer «{p.name}»", "Comprueba que el fichero es una imagen de disco.")
    return _parse_info(json.loads(proc.stdout), p, command)


def create(path: str | os.PathLike[str], size: int | str, format: str = "qcow2", *, overwrite: bool = False,
           preallocation: str | None = None) -> ImageInfo:
    """``qemu-img create``: a new, empty image. Never overwrites an existing file unless ``overwrite=True``.

    ``preallocation``: None (thin: the file grows as the guest writes), "metadata" (qcow2),
    "falloc" or "full" (the space is taken on the host now).
    """
    fmt = _format(format, FORMATS)
    size_bytes = parse_size(size)
    p = _image_path(path, must_exist=False)
    if p.exists() and not overwrite:
        raise InputError(f"Ya existe «{p}»; no se sobrescribe.",
                         "Elige otro nombre, o pasa overwrite=True si de verdad quieres borrar su contenido.")
    if preallocation not in (None, "off", "metadata", "falloc", "full"):
        raise InputError(f"Preasignación no válida: «{preallocation}».", "Usa None, «metadata», «falloc» o «full».")
    if preallocation == "metadata" and fmt != "qcow2":
        raise InputError("«metadata» solo tiene sentido con qcow2.", "Usa «falloc» o «full» con raw.")
    options = ["-o", f"preallocation={preallocation}"] if preallocation else []
    proc, command = _qemu_img(["create", "-f", fmt, *options, str(p), str(size_bytes)])
    if proc.returncode != 0:
        raise _fail(proc, command, f"No se pudo crear «{p.name}»",
                    "Apaga la máquina que la usa o elige otro nombre." if _LOCK.search(proc.stderr) else "")
    return replace(info(p), command=command)


@dataclass(frozen=True)
class CheckResult:
    """``qemu-img check``: consistency of an image's metadata (qcow2; raw has none to check)."""

    path: Path
    format: str
    supported: bool
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    total_clusters: int | None = None
    allocated_clusters: int | None = None
    image_end_offset: int | None = None
    command: str = ""

    @property
    def ok(self) -> bool:
        return self.corruptions == 0 and self.leaks == 0 and self.check_errors == 0

    def summary(self) -> str:
        if not self.supported:
            return f"{self.path.name}: el formato {self.format} no tiene metadatos que comprobar."
        if self.ok:
            used = (f" ({self.allocated_clusters or 0} de {self.total_clusters} clústeres en uso)"
                    if self.total_clusters else "")
            return f"{self.path.name}: sin errores{used}."
        return (f"{self.path.name}: {self.corruptions} corrupciones, {self.leaks} fugas, "
                f"{self.check_errors} errores de comprobación.")


def check(path: str | os.PathLike[str]) -> CheckResult:
    """``qemu-img check --output=json``. Exit 2 (corruptions) and 3 (leaks) are results, not failures."""
    p = _image_path(path, must_exist=True)
    fmt = info(p).format
    args = ["check", "--output=json", "-f", fmt, str(p)]
    proc, command = _qemu_img(args)
    if proc.returncode != 0 and _LOCK.search(proc.stderr):
        proc, command = _qemu_img(["check", "-U", *args[1:]])
    if proc.returncode == 63 or "does not support checks" in proc.stderr:
        return CheckResult(p, fmt, supported=False, command=command)
    if proc.returncode not in (0, 2, 3) or not proc.stdout.strip():
        raise _fail(proc, command, f"No se pudo comprobar «{p.name}»", "")
    data = json.loads(proc.stdout)
    return CheckResult(p, fmt, True, corruptions=int(data.get("corruptions", 0)), leaks=int(data.get("leaks", 0)),
                       check_errors=int(data.get("check-errors", 0)), total_clusters=data.get("total-clusters"),
                       allocated_clusters=data.get("allocated-clusters"),
                       image_end_offset=data.get("image-end-offset"), command=command)


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], format: str, *,
            overwrite: bool = False) -> ImageInfo:
    """``qemu-img convert``: a copy of ``src`` in another format (sparse: unwritten areas stay holes)."""
    fmt = _format(format, CONVERT_FORMATS)
    s = _image_path(src, must_exist=True)
    d = _image_path(dst, must_exist=False)
    if d.exists() and not overwrite:
        raise InputError(f"Ya existe «{d}»; no se sobrescribe.",
                         "Elige otro nombre, o pasa overwrite=True si de verdad quieres reemplazarlo.")
    if d.resolve() == s.resolve():
        raise InputError("El origen y el destino son el mismo fichero.", "Indica otro nombre para la copia.")
    src_fmt = info(s).format  # explicit -f: never let qemu-img guess the format of a raw image
    proc, command = _qemu_img(["convert", "-f", src_fmt, "-O", fmt, str(s), str(d)])
    if proc.returncode != 0:
        raise _fail(proc, command, f"No se pudo convertir «{s.name}»",
                    "Apaga la máquina que la usa, o desconecta el disco, y repite." if _LOCK.search(proc.stderr) else "")
    return replace(info(d), command=command)


def resize(path: str | os.PathLike[str], size: int | str, *, shrink: bool = False) -> ImageInfo:
    """``qemu-img resize`` of an image that no QEMU has open. Shrinking needs ``shrink=True``.

    An image in use is refused by QEMU's lock: :class:`DiskInUseError` explains the live way
    (QMP ``block_resize`` / ``virsh blockresize``, i.e. ``guest.resize_disk(disk, size)``).
    """
    p = _image_path(path, must_exist=True)
    new = parse_size(size)
    current = info(p)
    if new < current.virtual_size and not shrink:
        raise InputError(f"«{size}» es menor que el tamaño actual ({format_size(current.virtual_size)}): "
                         "reducir un disco borra lo que haya al final.",
                         "Para ampliar, indica un tamaño mayor. Para reducir, encoge antes el sistema de "
                         "ficheros del invitado y pasa shrink=True.")
    args = ["resize", "-f", current.format, *(["--shrink"] if shrink else []), str(p), str(new)]
    proc, command = _qemu_img(args)
    if proc.returncode != 0:
        raise _fail(proc, command, f"No se pudo redimensionar «{p.name}»",
                    "Con la máquina en marcha, amplía el disco en caliente: guest.resize_disk(disco, tamaño) "
                    "(QMP block_resize; en libvirt, virsh blockresize <dominio> <disco> <tamaño>). "
                    "O apaga la máquina y repite qemu-img resize.")
    return replace(info(p), command=command)


def allocated_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes the file really occupies on the host (st_blocks × 512), holes excluded."""
    return os.stat(path).st_blocks * 512


# --------------------------------------------------------------------------- hot-plug (pure)


@dataclass(frozen=True)
class AttachedDisk:
    """A disk plugged into a running guest, on either backend.

    ``commands``: what was sent, for display (QMP messages on QEMU-direct, the ``virsh`` line on
    libvirt); ``virsh``: the equivalent ``virsh`` line; ``target``: libvirt's name (vdb ...),
    a hint only: the guest names disks in its own order, find them by ``serial``.
    """

    image: Path
    format: str
    serial: str
    node_name: str | None = None
    device_id: str | None = None
    readonly: bool = False
    target: str | None = None
    backend: str = "qemu"
    file_node: str | None = None
    commands: tuple[str, ...] = ()
    virsh: str | None = None
    hotplugged: bool = True


@dataclass(frozen=True)
class ResizeResult:
    """A live resize: sizes before and after, and what was sent."""

    disk: AttachedDisk
    old_size: int
    new_size: int
    commands: tuple[str, ...] = ()
    virsh: str | None = None


def new_serial() -> str:
    """A fresh serial number for a disk: "LK" + 8 hex digits (virtio-blk keeps up to 20 characters)."""
    return "LK" + uuid.uuid4().hex[:8].upper()


def check_serial(serial: str) -> str:
    if not SERIAL_PATTERN.fullmatch(str(serial)):
        raise InputError(f"Número de serie no válido: «{serial}».", "Usa hasta 20 letras, dígitos, «-» o «_».")
    return str(serial)


def hotplug_names(serial: str) -> tuple[str, str, str]:
    """(file node, format node, device id) for a disk, all derived from its serial."""
    s = check_serial(serial)
    return f"lkfile-{s}", f"lkfmt-{s}", f"lkdisk-{s}"


def attach_messages(image: str | os.PathLike[str], fmt: str, serial: str, *, readonly: bool = False,
                    bus: str = "pci") -> list[tuple[str, dict[str, Any]]]:
    """The QMP messages that plug a disk in: two ``blockdev-add`` (file, then format) and ``device_add``."""
    fmt = _format(fmt, FORMATS)
    file_node, node, device = hotplug_names(serial)
    return [
        ("blockdev-add", {"driver": "file", "node-name": file_node, "filename": str(image), "read-only": readonly}),
        ("blockdev-add", {"driver": fmt, "node-name": node, "file": file_node, "read-only": readonly}),
        ("device_add", {"driver": f"virtio-blk-{bus}", "id": device, "drive": node, "serial": serial}),
    ]


def detach_messages(disk: AttachedDisk) -> list[tuple[str, dict[str, Any]]]:
    """``device_del`` (the guest must let go: wait for DEVICE_DELETED), then ``blockdev-del`` × 2."""
    messages: list[tuple[str, dict[str, Any]]] = [("device_del", {"id": disk.device_id})]
    messages.append(("blockdev-del", {"node-name": disk.node_name}))
    if disk.file_node:
        messages.append(("blockdev-del", {"node-name": disk.file_node}))
    return messages


def resize_message(disk: AttachedDisk, size: int) -> tuple[str, dict[str, Any]]:
    return ("block_resize", {"node-name": disk.node_name, "size": int(size)})


def qmp_text(command: str, arguments: Mapping[str, Any] | None = None) -> str:
    """One QMP message as JSON text, as it travels on the socket."""
    msg: dict[str, Any] = {"execute": command}
    if arguments:
        msg["arguments"] = dict(arguments)
    return json.dumps(msg, ensure_ascii=False)


def next_target(used: Iterable[str]) -> str:
    """The next free libvirt-style virtio target name: vda, vdb ... vdz, vdaa ..."""
    taken = set(used)
    for i in range(702):
        name = "vd" + (chr(97 + i) if i < 26 else chr(96 + i // 26) + chr(97 + i % 26))
        if name not in taken:
            return name
    raise InputError("No quedan nombres de disco libres.", "Desconecta algún disco.")  # pragma: no cover


def virsh_attach_line(domain: str, image: str | os.PathLike[str], target: str, *, serial: str | None = None,
                      fmt: str | None = None, readonly: bool = False, mode: str = "live") -> str:
    """``virsh attach-disk``: ``mode`` "live" (the running VM only), "config" (the saved definition,
    from the next boot) or "persistent" (both, for a running VM)."""
    if mode not in ("live", "config", "persistent"):
        raise InputError(f"Modo no válido: «{mode}».", "Usa «live», «config» o «persistent».")
    argv = ["virsh", "attach-disk", domain, str(image), target, "--targetbus", "virtio"]
    if fmt:
        argv += ["--driver", "qemu", "--subdriver", fmt]
    if serial:
        argv += ["--serial", serial]
    if readonly:
        argv += ["--mode", "readonly"]
    argv.append(f"--{mode}")
    return shlex.join(argv)


def virsh_detach_line(domain: str, target: str, *, mode: str = "live") -> str:
    return shlex.join(["virsh", "detach-disk", domain, target, f"--{mode}"])


def virsh_resize_line(domain: str, target: str, size: int) -> str:
    return shlex.join(["virsh", "blockresize", domain, target, f"{size}B"])


# --------------------------------------------------------------------------- guest side


class _Runs(Protocol):
    def run(self, command: str, *, timeout: float = ..., check: bool = ...) -> Any: ...


@dataclass(frozen=True)
class GuestBlockDevice:
    """A virtio disk as the guest sees it (from sysfs)."""

    name: str  # vda, vdb ... (the guest's own order)
    serial: str
    size: int  # bytes
    readonly: bool
    mountpoint: str | None = None
    fstype: str | None = None

    @property
    def path(self) -> str:
        return f"/dev/{self.name}"


#: One guest command: every vd* disk (name|serial|512-byte sectors|ro), then /proc/mounts.
_LIST_SCRIPT = (
    'for d in /sys/block/vd*; do [ -e "$d" ] || continue; s=; '
    '[ -r "$d/serial" ] && read -r s < "$d/serial"; read -r z < "$d/size"; read -r ro < "$d/ro"; '
    'echo "${d##*/}|$s|$z|$ro"; done; echo "--"; cat /proc/mounts'
)


def parse_block_listing(text: str) -> list[GuestBlockDevice]:
    """Parse the output of the guest-side listing script (pure, unit-tested)."""
    disks_part, _, mounts_part = text.partition("--\n")
    mounts: dict[str, tuple[str, str]] = {}
    for line in mounts_part.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].startswith("/dev/"):
            mounts.setdefault(parts[0][5:], (parts[1], parts[2]))
    found = []
    for line in disks_part.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4 or not parts[2].isdigit():
            continue
        name, serial, sectors, ro = parts
        mount = mounts.get(name)
        found.append(GuestBlockDevice(name, serial.strip(), int(sectors) * 512, ro.strip() == "1",
                                      mount[0] if mount else None, mount[1] if mount else None))
    return sorted(found, key=lambda d: (len(d.name), d.name))


def load_disk_drivers(guest: _Runs, modules: Sequence[str] = ("virtio_blk",)) -> None:
    """``modprobe`` in the guest: this tiny guest has no udev, so nothing loads a driver for a new device."""
    guest.run(["modprobe", "-a", *modules], check=True, timeout=60)


def guest_block_devices(guest: _Runs) -> list[GuestBlockDevice]:
    """The guest's virtio disks, read from /sys/block (like ``lsblk``) in one guest command."""
    return parse_block_listing(guest.run(_LIST_SCRIPT, check=True).stdout)


def find_by_serial(guest: _Runs, serial: str, *, timeout: float = 15.0) -> GuestBlockDevice:
    """Wait until the guest shows a disk with this serial (hot-plug takes a moment) and return it."""
    deadline = time.monotonic() + timeout
    while True:
        for dev in guest_block_devices(guest):
            if dev.serial == serial:
                return dev
        if time.monotonic() > deadline:
            raise HostError(f"El invitado no muestra ningún disco con número de serie «{serial}».",
                            "¿Está cargado el controlador? Ejecuta «modprobe virtio_blk» en el invitado "
                            "(load_disk_drivers(g)) y mira dmesg.")
        time.sleep(0.1)


def ensure_not_mounted(guest: _Runs, disk: AttachedDisk) -> None:
    """Refuse to unplug a disk that the guest still has mounted (its data may not be written yet)."""
    from ..guest.runner import GuestError

    for dev in guest_block_devices(guest):
        if dev.serial == disk.serial and dev.mountpoint:
            raise GuestError(f"El disco «{disk.serial}» está montado en {dev.mountpoint} dentro del invitado.",
                            f"Desmóntalo antes: g.run(\"umount {dev.mountpoint}\"). Quitarlo montado "
                            "puede perder datos (force=True lo quita igualmente).")


def block_table(devices: Sequence[GuestBlockDevice]) -> str:
    """An ``lsblk``-like plain-text table (Spanish headings)."""
    rows = [("NOMBRE", "SERIE", "TAMAÑO", "RO", "SIST. FICH.", "MONTADO EN")]
    for d in devices:
        rows.append((d.name, d.serial or "—", format_size(d.size), "1" if d.readonly else "0",
                     d.fstype or "—", d.mountpoint or "—"))
    if len(rows) == 1:
        return "(el invitado no ve ningún disco virtio)"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# --------------------------------------------------------------------------- back on the host


@dataclass(frozen=True)
class ImageFile:
    """A file read from inside an image's file system, on the host, without mounting it."""

    image: Path
    path: str
    data: bytes
    commands: tuple[str, ...]

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")


def read_file_from_image(image: str | os.PathLike[str], path: str) -> ImageFile:
    """Read ``path`` from the ext2/3/4 file system inside ``image`` with ``debugfs`` (read-only, no root).

    A qcow2 image is first converted to a temporary raw copy (``qemu-img convert``): debugfs reads
    raw bytes. Do it with the disk detached (or the guest's writes may not be there yet).
    """
    if shutil.which("debugfs") is None:
        raise ToolMissingError("debugfs", "e2fsprogs")
    if not path.startswith("/") or any(c in path for c in '"\n\0'):
        raise InputError(f"Ruta no válida dentro del disco: «{path}».", "Usa una ruta absoluta, p. ej. «/hola.txt».")
    img = _image_path(image, must_exist=True)
    commands = []
    with tempfile.TemporaryDirectory(prefix="labkit-debugfs-") as tmp:
        source = img
        if info(img).format != "raw":
            raw = convert(img, Path(tmp) / (img.stem + ".raw"), "raw")
            commands.append(raw.command.replace(tmp, "/tmp/copia"))
            source = raw.path
        argv = ["debugfs", "-R", f'cat "{path}"', str(source)]
        proc = subprocess.run(argv, capture_output=True, check=False, env={**os.environ, "LC_ALL": "C"})
        commands.append(shlex.join(argv).replace(tmp, "/tmp/copia"))
    err = proc.stderr.decode(errors="replace")
    if proc.returncode != 0 or "not found" in err or "Bad magic" in err or "Couldn't find valid" in err:
        detail = [ln for ln in err.splitlines() if not ln.startswith("debugfs ")]
        raise HostError(f"No se pudo leer «{path}» de «{img.name}»: {' '.join(detail) or 'debugfs falló'}.",
                        "¿Tiene el disco un sistema ext2/ext4 y existe ese fichero? Desconecta el disco antes "
                        "de leerlo desde el anfitrión.")
    return ImageFile(img, path, proc.stdout, tuple(commands))


@dataclass(frozen=True)
class GrowthPoint:
    """One measurement of thin provisioning: after the guest wrote ``written`` bytes to a disk."""

    label: str
    written: int
    virtual_size: int
    actual_size: int


def measure_growth(guest: _Runs, disks: Mapping[str, AttachedDisk], *, step: int | str = "8M", steps: int = 6,
                   pattern: str = "/dev/zero") -> list[GrowthPoint]:
    """Write ``step`` more bytes to each disk per round (``dd`` in the guest, with fsync) and measure
    each image on the host after every round (``qemu-img info``: actual size vs virtual size)."""
    step_bytes = parse_size(step)
    if step_bytes % (1 << 20):
        raise InputError("El paso debe ser un número entero de MiB.", "Usa p. ej. «8M».")
    mib = step_bytes >> 20
    devices = {label: find_by_serial(guest, d.serial).path for label, d in disks.items()}
    points = []
    for label, disk in disks.items():
        i = info(disk.image)
        points.append(GrowthPoint(label, 0, i.virtual_size, i.actual_size))
    for k in range(1, steps + 1):
        for label, disk in disks.items():
            guest.run(["dd", f"if={pattern}", f"of={devices[label]}", "bs=1M", f"count={mib}",
                       f"seek={(k - 1) * mib}", "conv=fsync"], check=True, timeout=120)
            i = info(disk.image)
            points.append(GrowthPoint(label, k * step_bytes, i.virtual_size, i.actual_size))
    return points

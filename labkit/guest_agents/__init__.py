"""Small guest-side programs labkit ships as source and builds on the host.

``clipd.c`` is labkit's **minimal** clipboard agent (not spice-vdagent): it speaks the
standard VD-Agent protocol on ``com.redhat.spice.0`` but keeps the guest clipboard in a
file, because the busybox guest has no graphical session. It is compiled here with
``gcc -static -nostdlib`` (a ~9 KiB binary with no libc, raw x86-64 system calls), cached
under labkit's cache directory by the hash of its source, and copied into a running guest
through qemu-ga (so the initramfs does not change).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import SetupError, ToolMissingError

__all__ = ["CLIPD_SOURCE", "CLIPD_GUEST_PATH", "CLIP_DIR", "CFLAGS", "clipd_source", "build_clipd",
           "install_clipd", "start_clipd"]

CLIPD_SOURCE = "clipd.c"
#: Where the binary goes in the guest, and its files (see clipd.c).
CLIPD_GUEST_PATH = "/run/labkit-clipd"
CLIP_DIR = "/run/labkit-clip"
CFLAGS = ("-Os", "-static", "-nostdlib", "-fno-pie", "-no-pie", "-ffreestanding", "-fno-stack-protector",
          "-fno-asynchronous-unwind-tables", "-Wall", "-Wl,--gc-sections", "-s")


def clipd_source() -> str:
    """The C source of the minimal agent (to read it in the notebook)."""
    return resources.files(__name__).joinpath(CLIPD_SOURCE).read_text()


def build_clipd(cache: Path | None = None, *, cc: str = "gcc") -> Path:
    """Compile clipd.c once (cached by source hash) and return the binary's path."""
    from ..guest.cache import cache_root

    source = clipd_source()
    key = hashlib.sha256((source + " ".join(CFLAGS)).encode()).hexdigest()[:16]
    out_dir = (cache or cache_root()) / "agents"
    binary = out_dir / f"labkit-clipd-{key}"
    if binary.exists():
        return binary
    compiler = shutil.which(cc)
    if compiler is None:
        raise ToolMissingError(cc, "gcc", f"No se encuentra el compilador «{cc}»: hace falta para construir el "
                               "agente mínimo del portapapeles (labkit-clipd).")
    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / f"clipd-{key}.c"
    src.write_text(source)
    tmp = out_dir / f".labkit-clipd-{key}.tmp"
    proc = subprocess.run([compiler, *CFLAGS, "-o", str(tmp), str(src)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SetupError(f"gcc no pudo compilar el agente mínimo: {proc.stderr.strip()[:600]}",
                         "Comprueba que gcc funciona (gcc --version) y que el anfitrión es x86-64.")
    tmp.replace(binary)
    return binary


def install_clipd(guest: Any, *, binary: Path | None = None) -> str:
    """Copy the agent into a running guest through qemu-ga (``guest-exec`` with input data)."""
    data = Path(binary or build_clipd()).read_bytes()
    guest.run(f"cat > {CLIPD_GUEST_PATH} && chmod 755 {CLIPD_GUEST_PATH}", input=data, check=True)
    return CLIPD_GUEST_PATH


def start_clipd(guest: Any, *, timeout: float = 15.0) -> None:
    """Start the agent in the background (it opens com.redhat.spice.0) and wait for its "ready" line."""
    guest.run(f"mkdir -p {CLIP_DIR} && rm -f {CLIP_DIR}/log {CLIP_DIR}/clipboard && "
              f"(setsid {CLIPD_GUEST_PATH} </dev/null >/dev/null 2>&1 & echo $! > {CLIP_DIR}/pid)", check=True)
    script = (f"i=0; while [ $i -lt 300 ]; do grep -q '^ready' {CLIP_DIR}/log 2>/dev/null && exit 0; "
              f"grep -q '^error' {CLIP_DIR}/log 2>/dev/null && exit 2; i=$((i+1)); sleep 0.05; done; exit 1")
    result = guest.run(script, timeout=timeout)
    if not result.ok:
        log = guest.run(f"cat {CLIP_DIR}/log 2>/dev/null").stdout
        raise SetupError(f"El agente mínimo (labkit-clipd) no arrancó en el invitado. Registro: {log.strip()[:300]}",
                         "¿Tiene el invitado el puerto com.redhat.spice.0? Arráncalo con GuestSpec(vdagent=True).")

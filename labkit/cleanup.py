"""``labkit cleanup``: remove every labkit guest a crash left behind.

Four kinds of leftovers, all named with the ``labkit-`` prefix:

1. libvirt domains (``labkit-*``): destroyed, and undefined (with their NVRAM) if persistent;
2. QEMU processes started with ``-name labkit-...`` by the QEMU-direct runner;
3. runtime dirs (sockets, console logs) under labkit's runtime base and /run/labkit-libvirt.
4. work dirs of a ``labkit bench`` that was killed (with its test disk image), in /var/tmp.

A guest whose owner process (the notebook kernel or script that started it) is still
alive is left alone, unless ``everything=True`` (``labkit cleanup --all``).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import LabkitError
from .guest.spec import PREFIX

__all__ = ["NOTHING", "QemuProcess", "cleanup", "find_qemu_processes"]

NOTHING = "Nada que limpiar."


@dataclass(frozen=True)
class QemuProcess:
    """A QEMU process whose ``-name`` starts with ``labkit-``."""

    pid: int
    name: str
    owner: int | None  # the process that started it (None: unknown / reparented to init)
    libvirt: bool  # started by libvirtd (handled through the libvirt API, not here)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _libvirt_pids() -> set[int]:
    pids = set()
    for pidfile in Path("/run/libvirt/qemu").glob("*.pid"):
        try:
            pids.add(int(pidfile.read_text().strip()))
        except (OSError, ValueError):
            continue
    return pids


def _owners_from_runtime_dirs(bases: list[Path]) -> dict[int, int]:
    owners = {}
    for base in bases:
        for directory in base.glob(f"{PREFIX}*"):
            try:
                owners[int((directory / "qemu.pid").read_text())] = int((directory / "owner.pid").read_text())
            except (OSError, ValueError):
                continue
    return owners


def find_qemu_processes(bases: list[Path] | None = None) -> list[QemuProcess]:
    """Every running QEMU whose ``-name`` value starts with ``labkit-``."""
    from .guest.runner import runtime_base

    owners = _owners_from_runtime_dirs(bases if bases is not None else [runtime_base()])
    managed = _libvirt_pids()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        argv = _cmdline(pid)
        if not argv or not os.path.basename(argv[0]).startswith("qemu-system"):
            continue
        try:
            value = argv[argv.index("-name") + 1]
        except (ValueError, IndexError):
            continue
        # "-name guest=labkit-x,debug-threads=on" (libvirt) or "-name labkit-x,debug-threads=on"
        name = value.split(",")[0].removeprefix("guest=")
        if not name.startswith(PREFIX):
            continue
        owner = owners.get(pid)
        if owner is None:
            ppid = _ppid(pid)
            owner = ppid if ppid not in (None, 0, 1) else None
        found.append(QemuProcess(pid, name, owner, pid in managed))
    return found


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def cleanup(everything: bool = False, uri: str = "qemu:///system") -> list[str]:
    """Remove labkit guests left by a crash; returns one Spanish line per thing removed (or skipped)."""
    from .guest.libvirt import RUNTIME_DIR, connect, sweep_stale_domains
    from .guest.runner import _alive, runtime_base, sweep_stale

    lines: list[str] = []
    # 1. libvirt domains
    try:
        conn = connect(uri)
    except LabkitError as err:
        lines.append(f"libvirt: se omite ({err.message})")
    else:
        try:
            for name, what in sweep_stale_domains(conn, everything=everything):
                lines.append(f"Dominio libvirt {name}: {what}.")
        except LabkitError as err:
            lines.append(f"libvirt: {err.message}")
        finally:
            conn.close()
    # 2. QEMU processes of the QEMU-direct runner
    for proc in find_qemu_processes([runtime_base()]):
        if proc.libvirt:
            continue
        if not everything and proc.owner is not None and _alive(proc.owner):
            continue
        _kill(proc.pid)
        whose = f"su dueño {proc.owner} ya no existe" if proc.owner else "sin dueño"
        lines.append(f"Proceso QEMU {proc.pid} ({proc.name}, {whose}): terminado.")
    # 3. runtime dirs
    for base in (runtime_base(), RUNTIME_DIR):
        if base.is_dir():
            for directory in sweep_stale(base):
                lines.append(f"Directorio temporal {directory}: borrado.")
    # 4. work dirs of a killed ``labkit bench`` (its test disk image)
    from .bench.runner import sweep_stale_workdirs

    for directory in sweep_stale_workdirs():
        lines.append(f"Directorio de trabajo de labkit bench {directory}: borrado.")
    return lines

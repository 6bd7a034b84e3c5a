"""Host and guest side by side: the same facts read from the same files on both.

The host's files are read directly; the guest's come back through one agent
command that prints them. Both go through the same pure :func:`summarize`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SystemFacts", "ProcessFacts", "host_snapshot", "guest_snapshot", "summarize", "side_by_side",
           "guest_process", "VIRTIO_TYPES"]

FILES = ("/proc/sys/kernel/osrelease", "/proc/cpuinfo", "/proc/meminfo", "/sys/class/dmi/id/sys_vendor",
         "/sys/class/dmi/id/product_name")
DIRS = ("/sys/block", "/sys/bus/pci/devices", "/sys/bus/virtio/devices")
_MARK = "==> "

# virtio device ids (virtio spec, "Device Types")
VIRTIO_TYPES = {1: "red", 2: "bloque", 3: "consola/serie", 4: "entropía", 5: "balloon", 8: "SCSI", 9: "9p",
                16: "GPU", 18: "entrada", 19: "vsock", 26: "virtiofs"}


def host_snapshot(root: str = "/") -> dict[str, Any]:
    """The host's copies of FILES (text or None) and DIRS (sorted names)."""
    snap: dict[str, Any] = {}
    for f in FILES:
        try:
            snap[f] = Path(root, f.lstrip("/")).read_text(errors="replace")
        except OSError:
            snap[f] = None
    for d in DIRS:
        try:
            snap[d] = sorted(os.listdir(Path(root, d.lstrip("/"))))
        except OSError:
            snap[d] = []
    for dev in snap["/sys/bus/virtio/devices"]:
        try:
            snap[f"virtio:{dev}"] = Path(root, "sys/bus/virtio/devices", dev, "device").read_text().strip()
        except OSError:
            pass
    return snap


_GUEST_SCRIPT = "; ".join(
    [f"echo '{_MARK}{f}'; cat {f} 2>/dev/null" for f in FILES]
    + [f"echo '{_MARK}{d}/'; ls {d} 2>/dev/null" for d in DIRS]
    + ["for v in /sys/bus/virtio/devices/*; do [ -e $v/device ] && echo \"" + _MARK
       + "virtio:${v##*/}\" && cat $v/device; done; true"]
)


def parse_guest_dump(text: str) -> dict[str, Any]:
    """Split the guest script's output back into {path: text or list}."""
    snap: dict[str, Any] = {f: None for f in FILES}
    snap.update({d: [] for d in DIRS})
    key, lines = None, []

    def flush() -> None:
        if key is None:
            return
        if key.endswith("/"):
            snap[key[:-1]] = sorted(x for x in lines if x)
        elif key.startswith("virtio:"):
            snap[key] = "\n".join(lines).strip()
        else:
            snap[key] = "\n".join(lines) + "\n" if lines else None

    for line in text.splitlines():
        if line.startswith(_MARK):
            flush()
            key, lines = line[len(_MARK):], []
        else:
            lines.append(line)
    flush()
    return snap


def guest_snapshot(guest: Any) -> dict[str, Any]:
    """The same files as host_snapshot, read inside a running guest."""
    return parse_guest_dump(guest.run(_GUEST_SCRIPT, timeout=30).stdout)


@dataclass(frozen=True)
class SystemFacts:
    kernel: str
    cpu_model: str
    cpus: int
    hypervisor_flag: bool
    virtualization: str | None
    flags: int
    memory_mib: int
    block_devices: tuple[str, ...]
    pci_devices: int
    virtio_devices: tuple[str, ...]
    dmi: str


def summarize(snap: dict[str, Any]) -> SystemFacts:
    from ..host import parse_cpuinfo

    cpu = parse_cpuinfo(snap.get("/proc/cpuinfo") or "")
    m = re.search(r"^MemTotal:\s+(\d+) kB", snap.get("/proc/meminfo") or "", re.M)
    blocks = tuple(b for b in snap.get("/sys/block", []) if not b.startswith(("loop", "ram", "zram")))
    virtio = []
    for dev in snap.get("/sys/bus/virtio/devices", []):
        raw = snap.get(f"virtio:{dev}") or ""
        try:
            virtio.append(VIRTIO_TYPES.get(int(raw, 16), f"tipo {int(raw, 16)}"))
        except ValueError:
            virtio.append("?")
    dmi = " ".join(x.strip() for x in (snap.get("/sys/class/dmi/id/sys_vendor") or "",
                                       snap.get("/sys/class/dmi/id/product_name") or "") if x.strip())
    return SystemFacts(
        kernel=(snap.get("/proc/sys/kernel/osrelease") or "?").strip(),
        cpu_model=cpu.model_name or cpu.vendor or "?",
        cpus=cpu.cpus,
        hypervisor_flag=cpu.hypervisor,
        virtualization=cpu.virtualization,
        flags=len(cpu.flags),
        memory_mib=int(m.group(1)) // 1024 if m else 0,
        block_devices=blocks,
        pci_devices=len(snap.get("/sys/bus/pci/devices", [])),
        virtio_devices=tuple(sorted(virtio)),
        dmi=dmi or "(sin DMI)",
    )


def side_by_side(host: SystemFacts, guest: SystemFacts) -> str:
    """A two-column text table: what the host and the guest each see."""

    def yn(flag: bool) -> str:
        return "sí" if flag else "no"

    rows = [
        ("kernel", host.kernel, guest.kernel),
        ("modelo de CPU", host.cpu_model, guest.cpu_model),
        ("CPU", str(host.cpus), str(guest.cpus)),
        ("flag hypervisor", yn(host.hypervisor_flag), yn(guest.hypervisor_flag)),
        ("VT-x / AMD-V", host.virtualization or "no", guest.virtualization or "no"),
        ("flags de CPU", str(host.flags), str(guest.flags)),
        ("memoria (MiB)", str(host.memory_mib), str(guest.memory_mib)),
        ("discos", " ".join(host.block_devices) or "—", " ".join(guest.block_devices) or "—"),
        ("dispositivos PCI", str(host.pci_devices), str(guest.pci_devices)),
        ("dispositivos virtio", ", ".join(host.virtio_devices) or "—", ", ".join(guest.virtio_devices) or "—"),
        ("DMI (fabricante, modelo)", host.dmi, guest.dmi),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len("anfitrión"), *(len(r[1]) for r in rows))
    lines = [f"{'':<{w0}}  {'anfitrión':<{w1}}  invitado", "-" * (w0 + w1 + 14)]
    lines += [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class ProcessFacts:
    """The guest as the host sees it: one QEMU process with threads."""

    pid: int
    name: str
    threads: tuple[str, ...]
    rss_mib: float

    @property
    def vcpu_threads(self) -> tuple[str, ...]:
        return tuple(t for t in self.threads if t.startswith("CPU "))


def guest_process(pid: int, proc: str = "/proc") -> ProcessFacts:
    """Name, thread names (QEMU names vCPU threads "CPU n/KVM" or "CPU n/TCG") and RSS of a process."""
    base = Path(proc) / str(pid)
    name = (base / "comm").read_text().strip()
    threads = []
    for task in sorted((base / "task").iterdir(), key=lambda p: int(p.name)):
        try:
            threads.append((task / "comm").read_text().strip())
        except OSError:
            continue
    m = re.search(r"^VmRSS:\s+(\d+) kB", (base / "status").read_text(), re.M)
    return ProcessFacts(pid, name, tuple(threads), int(m.group(1)) / 1024 if m else 0.0)

"""GuestSpec -> QEMU argv: a pure function, unit-tested for KVM and TCG.

Every option value goes through :func:`qopt` (QEMU's own escaping: a comma
inside a value is written twice), so a path with a comma cannot inject an
option. Nothing here touches a file or starts a process.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .spec import AGENT_PORT, GuestSpec

__all__ = ["BootFiles", "Runtime", "qopt", "opts", "build_argv", "kernel_cmdline", "shell_line", "QEMU"]

QEMU = "qemu-system-x86_64"


def qopt(value: object) -> str:
    """Escape one QEMU option value: ``,`` becomes ``,,``."""
    text = str(value)
    if "\0" in text or "\n" in text:
        raise InputError(f"Valor no válido para QEMU: {text!r}.", "Quita los saltos de línea del valor.")
    return text.replace(",", ",,")


def opts(head: str, **values: object) -> str:
    """``head,key=value,...`` with every value escaped; ``True``/``False`` become on/off; None is left out."""
    parts = [head] if head else []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "on" if value else "off"
        parts.append(f"{key.replace('_', '-')}={qopt(value)}")
    return ",".join(parts)


@dataclass(frozen=True)
class BootFiles:
    """What to boot: the kernel (an ELF vmlinux boots through PVH; a bzImage also works) and initramfs."""

    kernel: Path
    initrd: Path


@dataclass(frozen=True)
class Runtime:
    """Where the process's sockets and logs go (a private temp dir)."""

    directory: Path
    console: str = "file"  # "file": console.log in directory; "stdio": the terminal

    @property
    def qmp(self) -> Path:
        return self.directory / "qmp.sock"

    @property
    def agent(self) -> Path:
        return self.directory / "qga.sock"

    @property
    def console_log(self) -> Path:
        return self.directory / "console.log"

    @property
    def pidfile(self) -> Path:
        return self.directory / "qemu.pid"

    def channel(self, name: str) -> Path:
        return self.directory / f"chan-{name}.sock"


def kernel_cmdline(spec: GuestSpec, accel: str, tsc_khz: int | None = None) -> str:
    """The guest kernel's command line: quiet, fast under TCG, and the user's extra options last."""
    parts = ["console=ttyS0", "quiet", "panic=-1", "cryptomgr.notests", "rodata=off", "mitigations=off"]
    if spec.machine == "microvm":
        parts.append("pci=off")  # microvm has no PCI bus: skip probing for one
    if accel == "tcg" and tsc_khz:
        # Without a reference timer (microvm has no PIT/HPET) TSC calibration can hang under TCG.
        parts.append(f"tsc_early_khz={int(tsc_khz)}")
    if spec.cmdline:
        parts.append(spec.cmdline)
    return " ".join(parts)


def _machine(spec: GuestSpec, accel: str) -> list[str]:
    if spec.machine == "microvm":
        machine = opts("microvm", x_option_roms=False, isa_serial=True, rtc=True, pit=False, pic=False)
    else:
        machine = opts(spec.machine)
    accel_opt = opts("kvm") if accel == "kvm" else opts("tcg", thread="multi" if spec.vcpus > 1 else "single")
    return ["-machine", machine, "-accel", accel_opt]


def _bus(spec: GuestSpec) -> str:
    return "device" if spec.machine == "microvm" else "pci"


def build_argv(spec: GuestSpec, accel: str, boot: BootFiles, runtime: Runtime, *,
               tsc_khz: int | None = None, binary: str = QEMU) -> list[str]:
    """The exact QEMU command line for ``spec`` under ``accel`` ("kvm" or "tcg")."""
    if accel not in ("kvm", "tcg"):
        raise InputError(f"Acelerador no válido para QEMU: «{accel}».", "Resuelve «auto» antes: kvm o tcg.")
    bus = _bus(spec)
    argv = [binary, "-name", opts(spec.name, debug_threads=True), *_machine(spec, accel)]
    if accel == "kvm":
        argv += ["-cpu", "host"]  # under TCG the default model is faster (see DESIGN.md)
    argv += ["-m", str(spec.memory), "-smp", str(spec.vcpus),
             "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
             # -kernel/-initrd/-append take their value verbatim (not an option list): no qopt
             "-kernel", str(boot.kernel), "-initrd", str(boot.initrd),
             "-append", kernel_cmdline(spec, accel, tsc_khz)]
    if runtime.console == "stdio":
        argv += ["-chardev", opts("stdio", id="console", signal=False)]
    else:
        argv += ["-chardev", opts("file", id="console", path=runtime.console_log)]
    argv += ["-serial", "chardev:console"]
    argv += ["-chardev", opts("socket", id="qmp", path=runtime.qmp, server=True, wait=False),
             "-mon", opts("", chardev="qmp", mode="control")]
    argv += ["-device", opts(f"virtio-serial-{bus}", id="vser0")]
    ports = [("qga", AGENT_PORT, runtime.agent)]
    ports += [(f"ch{i}", c.name, runtime.channel(c.name)) for i, c in enumerate(spec.channels)]
    for cid, name, path in ports:
        argv += ["-chardev", opts("socket", id=cid, path=path, server=True, wait=False),
                 "-device", opts("virtserialport", bus="vser0.0", chardev=cid, name=name)]
    for i, disk in enumerate(spec.disks):
        node = f"disk{i}"
        argv += ["-blockdev", opts("", driver="file", filename=disk.path, node_name=f"{node}-file",
                                   read_only=disk.readonly),
                 "-blockdev", opts("", driver=disk.format, file=f"{node}-file", node_name=node,
                                   read_only=disk.readonly),
                 "-device", opts(f"virtio-blk-{bus}", drive=node, id=node, serial=disk.serial or None)]
    return argv


def shell_line(argv: list[str]) -> str:
    """The argv as one shell-quoted line, for display only (never executed through a shell)."""
    return shlex.join(argv)

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
from .spec import AGENT_PORT, VDAGENT_PORT, GuestSpec, ShareSpec, UsbSpec, has_usb, needs_shared_memory

__all__ = ["BootFiles", "Runtime", "qopt", "opts", "build_argv", "kernel_cmdline", "shell_line", "QEMU",
           "share_args", "usb_device_args", "usb_device_props", "shared_memory_args", "VIRTIOFSD", "XHCI_ID",
           "SANDBOX"]

#: The virtiofs daemon that ships with QEMU 7.2 on Debian 12 (the C one; later: the Rust virtiofsd).
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
#: The id of the xHCI controller (its bus is ``xhci.0``).
XHCI_ID = "xhci"

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

    @property
    def vnc(self) -> Path:
        return self.directory / "vnc.sock"

    def virtiofs(self, tag: str) -> Path:
        return self.directory / f"vfs-{tag}.sock"


#: QEMU's seccomp filter, as libvirt turns it on: no obsolete system calls, no setuid, no fork/exec,
#: no changes to scheduling or CPU affinity. ``-sandbox`` is only added when the QEMU binary has it.
SANDBOX = opts("on", obsolete="deny", elevateprivileges="deny", spawn="deny", resourcecontrol="deny")


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
               tsc_khz: int | None = None, binary: str = QEMU, sandbox: bool = False) -> list[str]:
    """The exact QEMU command line for ``spec`` under ``accel`` ("kvm" or "tcg"); ``sandbox``: add
    ``-sandbox`` (:data:`SANDBOX`, QEMU's seccomp filter) when this QEMU supports it."""
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
    if spec.vdagent:
        argv += vdagent_args("vser0.0")
    if spec.vnc:
        argv += ["-vnc", "unix:" + qopt(runtime.vnc)]  # a local socket only, never TCP
    for i, disk in enumerate(spec.disks):
        node = f"disk{i}"
        argv += ["-blockdev", opts("", driver="file", filename=disk.path, node_name=f"{node}-file",
                                   read_only=disk.readonly),
                 "-blockdev", opts("", driver=disk.format, file=f"{node}-file", node_name=node,
                                   read_only=disk.readonly),
                 "-device", opts(f"virtio-blk-{bus}", drive=node, id=node, serial=disk.serial or None)]
    if needs_shared_memory(spec):
        if spec.machine == "microvm":
            argv[argv.index("-machine") + 1] += ",memory-backend=mem"
        argv += shared_memory_args(spec)
    for i, share in enumerate(spec.shares):
        argv += share_args(share, i, bus, runtime)
    if has_usb(spec):
        argv += ["-device", opts("qemu-xhci", id=XHCI_ID)]
        for i, usb in enumerate(spec.usb):
            argv += usb_device_args(usb, i)
    if spec.machine == "q35":  # pcie.0 takes no hot-plug: empty root ports for attach_disk/share/USB
        for port in hotplug_ports(spec):
            argv += ["-device", opts("pcie-root-port", id=port, chassis=int(port[len(PORT_PREFIX):]))]
    if sandbox:
        argv += ["-sandbox", SANDBOX]
    return argv


#: Empty PCIe root ports a q35 guest gets at boot (QEMU direct), one per hot-plugged PCI device.
HOTPLUG_PORTS = 4
PORT_PREFIX = "lkport"


def hotplug_ports(spec: GuestSpec) -> list[str]:
    """The ids of the empty ``pcie-root-port`` devices of a q35 guest (none on pc or microvm)."""
    return [f"{PORT_PREFIX}{i}" for i in range(1, HOTPLUG_PORTS + 1)] if spec.machine == "q35" else []


def shared_memory_args(spec: GuestSpec) -> list[str]:
    """Guest RAM as a shared memfd (virtiofsd maps it): ``-object memory-backend-memfd,share=on`` and
    ``-numa node,memdev=mem`` (microvm has no NUMA: ``-machine memory-backend=mem`` is added instead)."""
    argv = ["-object", opts("memory-backend-memfd", id="mem", size=f"{spec.memory}M", share=True)]
    if spec.machine != "microvm":
        argv += ["-numa", opts("node", memdev="mem")]
    return argv


def share_args(share: ShareSpec, index: int, bus: str, runtime: Runtime | None) -> list[str]:
    """One shared folder: ``-fsdev local`` + ``virtio-9p`` or a vhost-user socket + ``vhost-user-fs``."""
    if share.kind == "9p":
        # -fsdev and virtio-9p spell their options with "_" (security_model, mount_tag): no opts() renaming
        fsdev = f"local,id=fs{index},path={qopt(share.path)},security_model={share.security_model}"
        if share.readonly:
            fsdev += ",readonly=on"
        return ["-fsdev", fsdev,
                "-device", f"virtio-9p-{bus},id=share{index},fsdev=fs{index},mount_tag={qopt(share.tag)}"]
    path = runtime.virtiofs(share.tag) if runtime is not None else Path(f"/run/vfs-{share.tag}.sock")
    return ["-chardev", opts("socket", id=f"vfs{index}", path=path),
            "-device", opts(f"vhost-user-fs-{bus}", id=f"share{index}", chardev=f"vfs{index}", tag=share.tag)]


def usb_device_props(usb: UsbSpec, index: int, *, bus: str = f"{XHCI_ID}.0") -> dict[str, object]:
    """The ``device_add`` / ``-device`` properties of one USB device (the storage's drive node is
    ``usbdisk{index}``)."""
    ident = f"usb{index}"
    if usb.kind == "storage":
        return {"driver": "usb-storage", "id": ident, "bus": bus, "drive": f"usbdisk{index}",
                "serial": usb.serial or None, "removable": True}
    if usb.kind == "host":
        props: dict[str, object] = {"driver": "usb-host", "id": ident, "bus": bus}
        if usb.hostbus is not None and usb.hostaddr is not None:
            props.update(hostbus=usb.hostbus, hostaddr=usb.hostaddr)
        else:
            props.update(vendorid=f"0x{usb.vendorid:04x}", productid=f"0x{usb.productid:04x}")
        return props
    return {"driver": {"keyboard": "usb-kbd", "tablet": "usb-tablet", "mouse": "usb-mouse"}[usb.kind],
            "id": ident, "bus": bus}


def usb_device_args(usb: UsbSpec, index: int) -> list[str]:
    """``-blockdev`` (storage only) and ``-device`` for one USB device on the xHCI bus."""
    argv: list[str] = []
    if usb.kind == "storage":
        fmt = "qcow2" if str(usb.image).endswith(".qcow2") else "raw"
        argv += ["-blockdev", opts("", driver="file", filename=usb.image, node_name=f"usbdisk{index}-file",
                                   read_only=usb.readonly),
                 "-blockdev", opts("", driver=fmt, file=f"usbdisk{index}-file", node_name=f"usbdisk{index}",
                                   read_only=usb.readonly)]
    props = usb_device_props(usb, index)
    driver = str(props.pop("driver"))
    argv += ["-device", opts(driver, **props)]
    return argv


def vdagent_args(bus: str = "vser0.0", *, clipboard: bool = True, mouse: bool = False) -> list[str]:
    """QEMU's own VD-Agent (no SPICE client needed) on the port spice-vdagent opens."""
    return ["-chardev", opts("qemu-vdagent", id="vdagent", name="vdagent", clipboard=clipboard, mouse=mouse),
            "-device", opts("virtserialport", bus=bus, chardev="vdagent", name=VDAGENT_PORT)]


def shell_line(argv: list[str]) -> str:
    """The argv as one shell-quoted line, for display only (never executed through a shell)."""
    return shlex.join(argv)

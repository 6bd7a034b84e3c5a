"""GuestSpec -> libvirt domain XML: a pure function, the twin of :func:`labkit.guest.argv.build_argv`.

The document is built with :mod:`xml.etree.ElementTree` (never a string
template), so a path or name with ``<``, ``&`` or quotes cannot change its
structure. It describes the same machine as the QEMU argv: direct kernel boot
with the same kernel command line, the serial console into a file, the guest
agent port ``org.qemu.guest_agent.0`` and every extra channel as a virtio-serial
port backed by a unix socket, virtio disks with their serial numbers, no
default devices (no USB controller, no balloon, no display), and the guest
destroyed (not restarted) when it powers off, reboots or crashes.

Differences with the QEMU-direct machine, on purpose:

- ``microvm`` is not offered: libvirt 9.0 lists it in ``domcapabilities`` but
  its QEMU driver places every device on PCI, which microvm lacks. A microvm
  spec becomes ``q35`` here (:func:`libvirt_machine` says so, and why).
- libvirt has no ``-accel tcg,thread=...`` knob; QEMU's default is used.
- libvirt itself connects to the agent socket (a QEMU socket chardev serves one
  client), so the libvirt runner talks to qemu-ga through libvirt.

Nothing here touches a file or talks to libvirt.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .argv import BootFiles, Runtime, kernel_cmdline
from .spec import AGENT_PORT, VDAGENT_PORT, GuestSpec, ShareSpec, UsbSpec, has_usb, needs_shared_memory

__all__ = [
    "METADATA_NS",
    "METADATA_PREFIX",
    "LibvirtRuntime",
    "Owner",
    "DomainDisk",
    "disk_element",
    "filesystem_element",
    "filesystem_xml",
    "usb_element",
    "usb_xml",
    "usb_hostdev_xml",
    "ACCESS_MODES",
    "disk_target",
    "disk_xml",
    "vdagent_channel",
    "domain_tree",
    "domain_xml",
    "libvirt_machine",
    "parse_disks",
    "parse_owner",
]

#: Free PCIe root ports a q35 domain gets, so that disks can be hot-plugged (one each).
HOTPLUG_PORTS = 4

def boot_pcie_devices(spec: GuestSpec) -> int:
    """PCIe devices a q35 domain has at boot, each on a root port: virtio-serial (the agent),
    one per disk and per shared folder, and the USB controller."""
    return 1 + len(spec.disks) + len(spec.shares) + int(has_usb(spec))


#: The namespace of labkit's own element in ``<metadata>`` (who started the domain).
METADATA_NS = "https://labkit.invalid/xmlns/libvirt/owner/1"
METADATA_PREFIX = "labkit"


@dataclass(frozen=True)
class LibvirtRuntime(Runtime):
    """Where a libvirt domain's console file and channel sockets go.

    The directory must be writable by the user libvirt runs QEMU as (``libvirt-qemu`` on
    Debian): QEMU creates the sockets (``mode='bind'``) and writes the console.

    The paths (console.log, qga.sock, chan-<name>.sock, vnc.sock...) are the QEMU-direct
    runner's :class:`~labkit.guest.argv.Runtime`: one layout for both backends.
    """


@dataclass(frozen=True)
class Owner:
    """The process that started a domain: when it is gone, the domain is stale."""

    pid: int
    start_time: int = 0  # /proc/<pid>/stat field 22, to tell a reused pid apart
    runtime: str = ""  # the runtime dir, removed with the domain


def libvirt_machine(machine: str) -> tuple[str, str]:
    """The machine type libvirt is given for a spec's ``machine``, and why (Spanish)."""
    if machine == "microvm":
        return "q35", ("libvirt 9.0 no admite microvm (sus dispositivos van siempre en PCI y microvm no "
                       "tiene PCI): se usa q35")
    return machine, f"máquina {machine}"


def disk_target(index: int) -> str:
    """vda, vdb, ... vdz, vdaa: the name libvirt is given (the guest chooses its own; match by serial)."""
    if index < 0:
        raise InputError(f"Índice de disco no válido: {index}.", "Usa un índice desde 0.")
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return "vd" + letters


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    element = ET.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrib.items()})
    if text is not None:
        element.text = text
    return element


def _channel(devices: ET.Element, path: Path, name: str) -> None:
    channel = _sub(devices, "channel", type="unix")
    _sub(channel, "source", mode="bind", path=str(path))
    _sub(channel, "target", type="virtio", name=name)


def vdagent_channel(devices: ET.Element, *, clipboard: bool = True, mouse: bool = False) -> ET.Element:
    """QEMU's qemu-vdagent chardev as libvirt writes it (libvirt >= 8.4): ``-chardev qemu-vdagent``."""
    channel = _sub(devices, "channel", type="qemu-vdagent")
    source = _sub(channel, "source")
    _sub(source, "clipboard", copypaste="yes" if clipboard else "no")
    _sub(source, "mouse", mode="client" if mouse else "server")
    _sub(channel, "target", type="virtio", name=VDAGENT_PORT)
    return channel


def disk_element(image: str | Path, fmt: str, target: str, *, serial: str | None = None,
                 readonly: bool = False) -> ET.Element:
    """A virtio ``<disk>``: the same element at boot and for ``attachDeviceFlags`` (virsh attach-device)."""
    element = ET.Element("disk", {"type": "file", "device": "disk"})
    _sub(element, "driver", name="qemu", type=fmt)
    _sub(element, "source", file=str(image))
    _sub(element, "target", dev=target, bus="virtio")
    if serial:
        _sub(element, "serial", serial)
    if readonly:
        _sub(element, "readonly")
    return element


#: 9p security model -> libvirt ``accessmode`` (libvirt has no mapped-file).
ACCESS_MODES = {"mapped-xattr": "mapped", "passthrough": "passthrough", "none": "squash"}
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


def filesystem_element(share: ShareSpec, *, virtiofsd: str | None = VIRTIOFSD) -> ET.Element:
    """``<filesystem type='mount'>``: 9p (``<driver type='path'>`` + accessmode) or virtiofs
    (``<driver type='virtiofs'>``, accessmode passthrough, libvirt starts virtiofsd as root)."""
    if share.kind == "9p":
        if share.security_model not in ACCESS_MODES:
            raise InputError(f"libvirt no ofrece el modelo 9p «{share.security_model}».",
                             "Usa «mapped-xattr» (accessmode='mapped'), «passthrough» o «none» (squash).")
        element = ET.Element("filesystem", {"type": "mount", "accessmode": ACCESS_MODES[share.security_model]})
        _sub(element, "driver", type="path")
    else:
        element = ET.Element("filesystem", {"type": "mount", "accessmode": "passthrough"})
        _sub(element, "driver", type="virtiofs", queue="1024")
        if virtiofsd:
            _sub(element, "binary", path=virtiofsd)
    _sub(element, "source", dir=str(share.path))
    _sub(element, "target", dir=share.tag)
    if share.readonly:
        _sub(element, "readonly")
    return element


def filesystem_xml(share: ShareSpec, *, virtiofsd: str | None = VIRTIOFSD) -> str:
    return ET.tostring(filesystem_element(share, virtiofsd=virtiofsd), encoding="unicode")


def usb_element(usb: UsbSpec, index: int) -> ET.Element:
    """One USB device for libvirt: a ``<disk bus='usb'>`` (storage), an ``<input bus='usb'>``
    (keyboard, tablet, mouse) or a ``<hostdev mode='subsystem' type='usb'>`` (a real device)."""
    if usb.kind == "storage":
        fmt = "qcow2" if str(usb.image).endswith(".qcow2") else "raw"
        element = ET.Element("disk", {"type": "file", "device": "disk"})
        _sub(element, "driver", name="qemu", type=fmt)
        _sub(element, "source", file=str(usb.image))
        _sub(element, "target", dev=usb_target(index), bus="usb", removable="on")
        if usb.serial:
            _sub(element, "serial", usb.serial)
        if usb.readonly:
            _sub(element, "readonly")
        _sub(element, "alias", name=f"ua-usb{index}")
        return element
    if usb.kind == "host":
        return usb_hostdev_element(usb)
    element = ET.Element("input", {"type": {"keyboard": "keyboard", "tablet": "tablet", "mouse": "mouse"}[usb.kind],
                                   "bus": "usb"})
    _sub(element, "alias", name=f"ua-usb{index}")
    return element


def usb_target(index: int) -> str:
    """sda, sdb ...: libvirt's name for a USB disk (the guest names it in its own order)."""
    return "s" + disk_target(index)[1:]


def usb_xml(usb: UsbSpec, index: int) -> str:
    return ET.tostring(usb_element(usb, index), encoding="unicode")


def usb_hostdev_element(usb: UsbSpec) -> ET.Element:
    """``<hostdev mode='subsystem' type='usb'>`` by vendor/product id (and bus/device when given)."""
    element = ET.Element("hostdev", {"mode": "subsystem", "type": "usb", "managed": "yes"})
    source = _sub(element, "source")
    if usb.vendorid is not None and usb.productid is not None:
        _sub(source, "vendor", id=f"0x{usb.vendorid:04x}")
        _sub(source, "product", id=f"0x{usb.productid:04x}")
    if usb.hostbus is not None and usb.hostaddr is not None:
        _sub(source, "address", bus=str(usb.hostbus), device=str(usb.hostaddr))
    return element


def usb_hostdev_xml(usb: UsbSpec) -> str:
    return ET.tostring(usb_hostdev_element(usb), encoding="unicode")


def disk_xml(image: str | Path, fmt: str, target: str, *, serial: str | None = None, readonly: bool = False) -> str:
    return ET.tostring(disk_element(image, fmt, target, serial=serial, readonly=readonly), encoding="unicode")


@dataclass(frozen=True)
class DomainDisk:
    """A file-backed disk as a domain's XML lists it."""

    target: str
    source: str
    format: str
    serial: str
    readonly: bool


def parse_disks(xml: str) -> list[DomainDisk]:
    """The file-backed disks of a domain XML (e.g. ``virDomainGetXMLDesc`` of a running guest)."""
    found = []
    for disk in ET.fromstring(xml).iter("disk"):
        source, target = disk.find("source"), disk.find("target")
        if source is None or target is None or source.get("file") is None:
            continue
        driver = disk.find("driver")
        found.append(DomainDisk(target.get("dev", ""), source.get("file", ""),
                                driver.get("type", "raw") if driver is not None else "raw",
                                (disk.findtext("serial") or "").strip(), disk.find("readonly") is not None))
    return found


def domain_tree(spec: GuestSpec, accel: str, boot: BootFiles, runtime: LibvirtRuntime, *,
                tsc_khz: int | None = None, owner: Owner | None = None, emulator: str | None = None) -> ET.Element:
    """The domain as an ElementTree element (see :func:`domain_xml`)."""
    if accel not in ("kvm", "tcg"):
        raise InputError(f"Acelerador no válido para libvirt: «{accel}».", "Resuelve «auto» antes: kvm o tcg.")
    machine, _why = libvirt_machine(spec.machine)
    domain = ET.Element("domain", {"type": "kvm" if accel == "kvm" else "qemu"})
    _sub(domain, "name", spec.name)
    if owner is not None:
        metadata = _sub(domain, "metadata")
        ET.register_namespace(METADATA_PREFIX, METADATA_NS)
        ET.SubElement(metadata, f"{{{METADATA_NS}}}owner",
                      {"pid": str(owner.pid), "start": str(owner.start_time), "runtime": owner.runtime})
    _sub(domain, "memory", str(spec.memory), unit="MiB")
    if needs_shared_memory(spec):  # virtiofs: virtiofsd maps the guest RAM
        backing = _sub(domain, "memoryBacking")
        _sub(backing, "source", type="memfd")
        _sub(backing, "access", mode="shared")
    _sub(domain, "vcpu", str(spec.vcpus))
    os_ = _sub(domain, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine=machine)
    _sub(os_, "kernel", str(boot.kernel))
    _sub(os_, "initrd", str(boot.initrd))
    # the same kernel command line as the QEMU-direct guest; q35 has PCI, so never "pci=off"
    _sub(os_, "cmdline", kernel_cmdline(_as_machine(spec, machine), accel, tsc_khz))
    features = _sub(domain, "features")
    _sub(features, "acpi")  # hot-plug (attach-disk, attach-device) needs ACPI and the APIC
    _sub(features, "apic")
    if accel == "kvm":
        _sub(domain, "cpu", mode="host-passthrough", check="none")  # = -cpu host
    # under TCG the default CPU model is kept: -cpu max makes the kernel ~7x slower (DESIGN.md)
    _sub(domain, "on_poweroff", "destroy")
    _sub(domain, "on_reboot", "destroy")  # = -no-reboot
    _sub(domain, "on_crash", "destroy")
    devices = _sub(domain, "devices")
    if emulator:
        _sub(devices, "emulator", emulator)
    for i, disk in enumerate(spec.disks):
        devices.append(disk_element(disk.path, disk.format, disk_target(i), serial=disk.serial or None,
                                    readonly=disk.readonly))
    if machine == "q35":  # PCIe devices hot-plug into root ports: leave a few free for attach-disk
        _sub(devices, "controller", type="pci", index="0", model="pcie-root")
        # libvirt puts the boot devices on these ports too: one each, then HOTPLUG_PORTS free ones
        for i in range(1, boot_pcie_devices(spec) + HOTPLUG_PORTS + 1):
            _sub(devices, "controller", type="pci", index=str(i), model="pcie-root-port")
    for share in spec.shares:
        devices.append(filesystem_element(share))
    if has_usb(spec):
        _sub(devices, "controller", type="usb", index="0", model="qemu-xhci")
        for i, usb in enumerate(spec.usb):
            devices.append(usb_element(usb, i))
    else:
        _sub(devices, "controller", type="usb", model="none")  # = -nodefaults
    _sub(devices, "controller", type="virtio-serial", index="0")
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(runtime.console_log))
    _sub(serial, "target", port="0")
    _channel(devices, runtime.agent, AGENT_PORT)
    for channel in spec.channels:
        _channel(devices, runtime.channel(channel.name), channel.name)
    if spec.vdagent:
        vdagent_channel(devices)
    if spec.vnc:  # a unix socket only, never TCP
        _sub(devices, "graphics", type="vnc", socket=str(runtime.vnc))
    _sub(devices, "memballoon", model="none")  # = -nodefaults
    return domain


def _as_machine(spec: GuestSpec, machine: str) -> GuestSpec:
    if spec.machine == machine:
        return spec
    from dataclasses import replace

    return replace(spec, machine=machine)


def domain_xml(spec: GuestSpec, accel: str, boot: BootFiles, runtime: LibvirtRuntime, *,
               tsc_khz: int | None = None, owner: Owner | None = None, emulator: str | None = None) -> str:
    """The libvirt domain XML for ``spec`` under ``accel`` ("kvm" -> ``type='kvm'``, "tcg" -> ``type='qemu'``)."""
    tree = domain_tree(spec, accel, boot, runtime, tsc_khz=tsc_khz, owner=owner, emulator=emulator)
    ET.indent(tree, "  ")
    return ET.tostring(tree, encoding="unicode") + "\n"


def parse_owner(xml: str) -> Owner | None:
    """The owner recorded in a domain's XML (as returned by libvirt), or None."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    element = root.find(f"metadata/{{{METADATA_NS}}}owner")
    if element is None:
        # virDomainGetMetadata returns the element alone, without its namespace
        element = root if root.tag in (f"{{{METADATA_NS}}}owner", "owner") else None
    if element is None:
        return None
    try:
        return Owner(int(element.get("pid", "")), int(element.get("start", "0") or 0), element.get("runtime", ""))
    except ValueError:
        return None

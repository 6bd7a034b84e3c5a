"""USB: the host's devices (sysfs), passthrough builders, and emulated devices hot-plugged live.

Layers, as in :mod:`labkit.devices.disks`::

    host side     host_devices (from /sys/bus/usb/devices, like lsusb; with /dev/bus/usb access)
    builders      qemu_host_args / libvirt_hostdev_xml / virsh lines     (pure, for real devices)
                  attach_messages / detach_messages                      (pure QMP for emulated ones)
    guest side    load_usb_drivers / guest_usb_devices / find_usb_disk   (through guest.run)

Both guest backends implement::

    attach_usb(kind, *, image=None, serial=None, readonly=False) -> AttachedUsb
    detach_usb(device: AttachedUsb) -> AttachedUsb (with the commands of the detach)
    usb_devices() -> list[AttachedUsb]

kind: "storage" (a USB stick backed by an image file), "keyboard", "tablet", "mouse", or "host"
(a real device: ``hostbus``/``hostaddr`` or ``vendorid``/``productid``).

QEMU-direct hot-plugs the xHCI controller itself when the guest has none (``device_add
qemu-xhci``, on a ``pc`` machine). libvirt cannot hot-plug a USB controller: start the domain
with ``GuestSpec(usb_controller=True)`` (``<controller type='usb' model='qemu-xhci'/>``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import HostError
from ..guest.argv import XHCI_ID, opts, usb_device_props
from ..guest.domxml import usb_hostdev_xml
from ..guest.spec import UsbSpec

__all__ = [
    "DEV_USB",
    "SYSFS_USB",
    "AttachedUsb",
    "GuestUsbDevice",
    "HostUsbDevice",
    "HostUsbReport",
    "attach_messages",
    "detach_messages",
    "explain_qemu_error",
    "find_usb_disk",
    "guest_usb_devices",
    "host_devices",
    "libvirt_hostdev_xml",
    "load_usb_drivers",
    "qemu_host_args",
    "udev_rule",
    "usb_table",
    "virsh_hostdev_lines",
    "xhci_message",
]

SYSFS_USB = Path("/sys/bus/usb/devices")
DEV_USB = Path("/dev/bus/usb")
_SPEEDS = {"1.5": "1.5 Mb/s (low speed, USB 1.x)", "12": "12 Mb/s (full speed, USB 1.x)",
           "480": "480 Mb/s (high speed, USB 2.0)", "5000": "5 Gb/s (SuperSpeed, USB 3.0)",
           "10000": "10 Gb/s (SuperSpeed+, USB 3.1)", "20000": "20 Gb/s (USB 3.2)"}


# --------------------------------------------------------------------------- host side


@dataclass(frozen=True)
class HostUsbDevice:
    """One USB device of the host, as sysfs describes it (what ``lsusb`` prints)."""

    sysfs_name: str  # "1-2", "usb1" (a root hub)
    bus: int
    devnum: int
    vendor_id: int
    product_id: int
    manufacturer: str = ""
    product: str = ""
    serial: str = ""
    speed: str = ""  # Mb/s, as sysfs says ("480")
    device_class: int = 0
    node: str = ""  # /dev/bus/usb/BBB/DDD
    openable: bool = False
    reason: str = ""  # why it cannot be opened

    @property
    def is_hub(self) -> bool:
        return self.device_class == 9

    @property
    def ids(self) -> str:
        return f"{self.vendor_id:04x}:{self.product_id:04x}"

    @property
    def name(self) -> str:
        return " ".join(p for p in (self.manufacturer, self.product) if p) or "(sin nombre)"

    def lsusb_line(self) -> str:
        return f"Bus {self.bus:03d} Device {self.devnum:03d}: ID {self.ids} {self.name}"

    def as_spec(self, *, by: str = "address") -> UsbSpec:
        if by == "address":
            return UsbSpec("host", hostbus=self.bus, hostaddr=self.devnum)
        return UsbSpec("host", vendorid=self.vendor_id, productid=self.product_id)


@dataclass(frozen=True)
class HostUsbReport:
    """All host USB devices, or why there are none (no USB bus is a fact, not an error)."""

    devices: tuple[HostUsbDevice, ...]
    bus_present: bool
    explanation: str

    @property
    def passthrough_candidates(self) -> list[HostUsbDevice]:
        return [d for d in self.devices if not d.is_hub]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def _access(node: Path) -> tuple[bool, str]:
    if not node.exists():
        return False, f"no existe {node} (¿está montado /dev y cargado usbfs?)"
    if os.access(node, os.R_OK | os.W_OK):
        return True, ""
    st = node.stat()
    return False, (f"{node} tiene permisos {oct(st.st_mode & 0o777)} (dueño uid {st.st_uid}, grupo gid {st.st_gid}) "
                   "y tu usuario no puede abrirlo en lectura/escritura: QEMU fallará con «Permission denied»")


def host_devices(sysfs: str | os.PathLike[str] = SYSFS_USB, dev: str | os.PathLike[str] = DEV_USB) -> HostUsbReport:
    """The host's USB devices from sysfs (``busnum``, ``devnum``, ``idVendor``...), like ``lsusb``,
    with whether ``/dev/bus/usb/BBB/DDD`` can be opened. A host without USB says so."""
    root = Path(sysfs)
    if not root.is_dir():
        return HostUsbReport((), False, f"Este anfitrión no tiene bus USB ({root} no existe): es una máquina "
                             "virtual o un contenedor sin controlador USB. No hay dispositivos reales que pasar "
                             "al invitado; los USB emulados (teclado, tableta, memoria) sí funcionan.")
    found = []
    for entry in sorted(root.iterdir()):
        if ":" in entry.name:  # interfaces (1-2:1.0) are not devices
            continue
        vendor = _read(entry / "idVendor")
        if not vendor:
            continue
        try:
            bus, devnum = int(_read(entry / "busnum")), int(_read(entry / "devnum"))
            vid, pid = int(vendor, 16), int(_read(entry / "idProduct"), 16)
            dclass = int(_read(entry / "bDeviceClass") or "0", 16)
        except ValueError:
            continue
        node = Path(dev) / f"{bus:03d}" / f"{devnum:03d}"
        openable, reason = _access(node)
        found.append(HostUsbDevice(entry.name, bus, devnum, vid, pid, _read(entry / "manufacturer"),
                                   _read(entry / "product"), _read(entry / "serial"), _read(entry / "speed"),
                                   dclass, str(node), openable, reason))
    found.sort(key=lambda d: (d.bus, d.devnum))
    if not found:
        return HostUsbReport((), True, "Hay bus USB pero ningún dispositivo conectado.")
    hubs = sum(d.is_hub for d in found)
    return HostUsbReport(tuple(found), True, f"{len(found)} dispositivo(s) USB ({hubs} concentrador(es)).")


def udev_rule(device: HostUsbDevice, group: str = "plugdev") -> str:
    """A udev rule that lets ``group`` open the device (the usual passthrough fix)."""
    return (f'SUBSYSTEM=="usb", ATTR{{idVendor}}=="{device.vendor_id:04x}", '
            f'ATTR{{idProduct}}=="{device.product_id:04x}", MODE="0660", GROUP="{group}"')


def fix_hint(device: HostUsbDevice, user: str = "$USER", group: str = "plugdev") -> str:
    """What to do when the device node cannot be opened (Spanish)."""
    return (f"Crea /etc/udev/rules.d/50-labkit-usb.rules con:\n  {udev_rule(device, group)}\n"
            f"recarga (sudo udevadm control --reload && sudo udevadm trigger), añade tu usuario al grupo "
            f"(sudo usermod -aG {group} {user}) y vuelve a entrar en la sesión. Con libvirt no hace falta: "
            "libvirt da el permiso al usuario de QEMU al conectar el dispositivo (managed).")


def qemu_host_args(device: HostUsbDevice | UsbSpec, *, by: str = "address") -> list[str]:
    """``-device qemu-xhci,id=xhci -device usb-host,bus=xhci.0,hostbus=B,hostaddr=D`` (``by="address"``:
    this port, this plug-in) or ``vendorid=0x....,productid=0x....`` (``by="id"``: that model, wherever)."""
    spec = device.as_spec(by=by) if isinstance(device, HostUsbDevice) else device
    props = usb_device_props(spec, 0)
    props.pop("id")
    driver = str(props.pop("driver"))
    return ["-device", opts("qemu-xhci", id=XHCI_ID), "-device", opts(driver, **props)]


def libvirt_hostdev_xml(device: HostUsbDevice | UsbSpec, *, by: str = "id") -> str:
    """``<hostdev mode='subsystem' type='usb' managed='yes'>`` with vendor/product (``by="id"``)
    or bus/device (``by="address"``)."""
    spec = device.as_spec(by=by) if isinstance(device, HostUsbDevice) else device
    return usb_hostdev_xml(spec)


def virsh_hostdev_lines(domain: str, xml_file: str = "usb.xml") -> list[str]:
    return [shlex.join(["virsh", "attach-device", domain, xml_file, "--live"]),
            shlex.join(["virsh", "detach-device", domain, xml_file, "--live"])]


# --------------------------------------------------------------------------- emulated hot-plug (pure)


@dataclass(frozen=True)
class AttachedUsb:
    """A USB device plugged into a running guest, on either backend."""

    kind: str
    device_id: str  # QEMU id (usbN) or libvirt alias (ua-usbN)
    image: Path | None = None
    serial: str = ""
    readonly: bool = False
    backend: str = "qemu"
    commands: tuple[str, ...] = ()
    virsh: str = ""
    xml: str = ""


def xhci_message() -> tuple[str, dict[str, Any]]:
    return ("device_add", {"driver": "qemu-xhci", "id": XHCI_ID})


def attach_messages(usb: UsbSpec, index: int, *, fmt: str = "raw") -> list[tuple[str, dict[str, Any]]]:
    """QMP that plugs an emulated USB device into the xHCI bus (storage: two ``blockdev-add`` first)."""
    messages: list[tuple[str, dict[str, Any]]] = []
    if usb.kind == "storage":
        messages += [("blockdev-add", {"driver": "file", "node-name": f"usbdisk{index}-file",
                                       "filename": str(usb.image), "read-only": usb.readonly}),
                     ("blockdev-add", {"driver": fmt, "node-name": f"usbdisk{index}",
                                       "file": f"usbdisk{index}-file", "read-only": usb.readonly})]
    props = {k: v for k, v in usb_device_props(usb, index).items() if v is not None}
    messages.append(("device_add", props))
    return messages


def detach_messages(device: AttachedUsb) -> list[tuple[str, dict[str, Any]]]:
    messages: list[tuple[str, dict[str, Any]]] = [("device_del", {"id": device.device_id})]
    if device.kind == "storage":
        index = device.device_id.removeprefix("usb")
        messages += [("blockdev-del", {"node-name": f"usbdisk{index}"}),
                     ("blockdev-del", {"node-name": f"usbdisk{index}-file"})]
    return messages


def explain_qemu_error(message: str, spec: UsbSpec | None = None) -> str:
    """QEMU's words about a USB device, explained in Spanish."""
    text = message.strip()
    if "libusb" in text or "failed to init" in text or "/sys/bus/usb" in text:
        why = "QEMU no pudo iniciar libusb: este anfitrión no tiene bus USB (o /dev/bus/usb no existe)."
    elif "Permission denied" in text or "Operation not permitted" in text:
        why = "el dispositivo existe pero QEMU no puede abrir su nodo en /dev/bus/usb (permisos: regla udev)."
    elif "failed to find host usb device" in text or "No such device" in text or "could not" in text.lower():
        why = ("no hay ningún dispositivo USB del anfitrión en ese bus y esa dirección (lsusb dice «Bus 001 Device "
               "003» → hostbus=1, hostaddr=3; la dirección cambia cada vez que se reconecta: por ids "
               "vendorid/productid no cambia).")
    elif "Bus" in text and "not found" in text:
        why = "el invitado no tiene controlador USB con ese nombre (añade -device qemu-xhci,id=xhci)."
    elif "not found" in text:
        why = "no hay ningún dispositivo con ese bus/dirección: revisa lsusb (la dirección cambia al reconectarlo)."
    else:
        why = "QEMU rechazó el dispositivo."
    where = ""
    if spec is not None and spec.hostbus is not None:
        where = f" (hostbus={spec.hostbus}, hostaddr={spec.hostaddr})"
    return f"QEMU dijo «{text}»{where}: {why}"


# --------------------------------------------------------------------------- guest side


class _Runs(Protocol):
    def run(self, command: Any, *, timeout: float = ..., check: bool = ...) -> Any: ...


@dataclass(frozen=True)
class GuestUsbDevice:
    """A USB device as the guest sees it (its own /sys/bus/usb/devices)."""

    name: str  # 1-1, usb1 ...
    ids: str  # vendor:product
    product: str
    manufacturer: str
    serial: str
    speed: str
    disk: str = ""  # sdX when it is a storage device


USB_DRIVERS = ("xhci_pci", "usb_storage", "sd_mod", "usbhid", "hid_generic")

_LIST_SCRIPT = (
    'for d in /sys/bus/usb/devices/*; do [ -r "$d/idVendor" ] || continue; '
    'p=; m=; s=; read -r p < "$d/product" 2>/dev/null; read -r m < "$d/manufacturer" 2>/dev/null; '
    'read -r s < "$d/serial" 2>/dev/null; '
    'echo "${d##*/}|$(cat $d/idVendor):$(cat $d/idProduct)|$p|$m|$s|$(cat $d/speed)"; done; echo "--"; '
    'for b in /sys/block/sd*; do [ -e "$b" ] || continue; x=$(readlink -f "$b/device"); '
    'while [ "$x" != / ] && [ ! -r "$x/idVendor" ]; do x=${x%/*}; [ -z "$x" ] && x=/; done; '
    'echo "${b##*/}|${x##*/}"; done'
)


def parse_usb_listing(text: str) -> list[GuestUsbDevice]:
    devices_part, _, disks_part = text.partition("--\n")
    disks = {}
    for line in disks_part.splitlines():
        if "|" in line:
            disk, dev = line.strip().split("|", 1)
            disks[dev] = disk
    found = []
    for line in devices_part.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 6:
            continue
        found.append(GuestUsbDevice(parts[0], parts[1], parts[2], parts[3], parts[4], parts[5],
                                    disks.get(parts[0], "")))
    return found


def load_usb_drivers(guest: _Runs, modules: Sequence[str] = USB_DRIVERS) -> None:
    """``modprobe`` the xHCI, storage and HID drivers (no udev in this guest: nothing loads them)."""
    guest.run(["modprobe", "-a", *modules], check=True, timeout=60)


def guest_usb_devices(guest: _Runs) -> list[GuestUsbDevice]:
    """The guest's USB devices (ids, product names, speed) and which sd* disk each one is."""
    return parse_usb_listing(guest.run(_LIST_SCRIPT, check=True).stdout)


def find_usb_disk(guest: _Runs, serial: str, *, timeout: float = 20.0) -> GuestUsbDevice:
    """Wait until a USB device with this serial shows a /dev/sd* disk in the guest."""
    deadline = time.monotonic() + timeout
    while True:
        for dev in guest_usb_devices(guest):
            if dev.serial == serial and dev.disk:
                return dev
        if time.monotonic() > deadline:
            raise HostError(f"El invitado no muestra ninguna memoria USB con número de serie «{serial}».",
                            "¿Están cargados xhci_pci, usb_storage y sd_mod? (load_usb_drivers(g)); mira dmesg.")
        time.sleep(0.2)


def usb_table(devices: Sequence[GuestUsbDevice]) -> str:
    """An ``lsusb``-like table of the guest's USB devices (Spanish headings)."""
    rows = [("DISPOSITIVO", "ID", "PRODUCTO", "VELOCIDAD", "DISCO")]
    for d in devices:
        rows.append((d.name, d.ids, d.product or "—", f"{d.speed} Mb/s", d.disk or "—"))
    if len(rows) == 1:
        return "(el invitado no ve ningún dispositivo USB)"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def qmp_lines(messages: Sequence[tuple[str, dict[str, Any]]]) -> tuple[str, ...]:
    return tuple(json.dumps({"execute": c, "arguments": a}, ensure_ascii=False) for c, a in messages)


def _index_of(device_id: str) -> int:
    m = re.search(r"(\d+)$", device_id)
    return int(m.group(1)) if m else 0

"""What a guest is, as data: frozen dataclasses checked at construction.

A :class:`GuestSpec` says nothing about processes or sockets; the builders in
:mod:`labkit.guest.argv` turn it into a QEMU command line, and the runners
start it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ..errors import InputError

__all__ = ["GuestSpec", "DiskSpec", "ChannelSpec", "ShareSpec", "UsbSpec", "labkit_name", "parse_memory", "ACCELERATORS", "MACHINES", "PREFIX",
           "AGENT_PORT", "SHARE_KINDS", "SECURITY_MODELS", "USB_KINDS"]

PREFIX = "labkit-"
ACCELERATORS = ("auto", "kvm", "tcg")
MACHINES = ("microvm", "q35", "pc")
AGENT_PORT = "org.qemu.guest_agent.0"
#: The port spice-vdagent (and labkit's minimal agent) opens: SPICE's spicevmc or QEMU's qemu-vdagent.
VDAGENT_PORT = "com.redhat.spice.0"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_PORT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,30}$")
SHARE_KINDS = ("9p", "virtiofs")
#: virtio-9p security models (QEMU ``-fsdev local,security_model=...``), safest default first.
SECURITY_MODELS = ("mapped-xattr", "mapped-file", "passthrough", "none")
USB_KINDS = ("storage", "keyboard", "tablet", "mouse", "host")
_UNITS = {"": 1, "M": 1, "MB": 1, "MIB": 1, "G": 1024, "GB": 1024, "GIB": 1024, "T": 1 << 20, "TB": 1 << 20,
          "TIB": 1 << 20}


def labkit_name(value: object, what: str = "invitado") -> str:
    """A valid guest/domain name, always with the ``labkit-`` prefix (so cleanup can find it)."""
    if not isinstance(value, str):
        raise InputError(f"Nombre de {what} no válido: {value!r} no es un texto.",
                         "Usa un texto con letras, dígitos, «.», «-» o «_», p. ej. name=\"prueba\".")
    name = value
    if not _NAME.fullmatch(name):
        raise InputError(f"Nombre de {what} no válido: «{value}».",
                         "Usa solo letras, dígitos, «.», «-» o «_» (sin espacios ni «/»).")
    return name if name.startswith(PREFIX) else PREFIX + name


def parse_memory(value: int | str) -> int:
    """Memory in MiB from 256, "256", "256M", "1G", "1.5G"; refuses 0, negatives and nonsense."""
    if isinstance(value, bool):
        raise InputError(f"Memoria no válida: {value!r}.", "Indica MiB (256) o un tamaño como «512M» o «1G».")
    if isinstance(value, int):
        mib = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:[.,]\d+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = m.group(2).upper() if m else None
        if not m or unit not in _UNITS:
            raise InputError(f"Memoria no válida: «{value}».", "Usa MiB (256) o un tamaño como «512M» o «1G».")
        mib = int(float(m.group(1).replace(",", ".")) * _UNITS[unit])
    if mib < 64:
        raise InputError(f"Memoria insuficiente: {mib} MiB.", "Un invitado necesita al menos 64 MiB; usa 256.")
    if mib > 64 * 1024:
        raise InputError(f"Memoria excesiva: {mib} MiB.", "Para este curso basta con 256 MiB–2 GiB.")
    return mib


def _positive_int(value: object, what: str, hint: str) -> int:
    if isinstance(value, bool):
        raise InputError(f"{what} no válido: {value!r}.", hint)
    try:
        number = int(str(value).strip())
    except ValueError:
        raise InputError(f"{what} no válido: «{value}».", hint) from None
    if number < 1:
        raise InputError(f"{what} no válido: {number}.", hint)
    return number


@dataclass(frozen=True)
class DiskSpec:
    """A disk image attached at boot (virtio-blk). The guest finds it by ``serial``."""

    path: str
    format: str = "raw"
    serial: str = ""
    readonly: bool = False

    def __post_init__(self) -> None:
        if self.format not in ("raw", "qcow2"):
            raise InputError(f"Formato de disco no válido: «{self.format}».", "Usa «raw» o «qcow2».")
        if not self.path:
            raise InputError("Falta la ruta del disco.", "Indica el fichero de la imagen.")
        if "\n" in str(self.path) or "\0" in str(self.path):
            raise InputError(f"Ruta de disco no válida: {str(self.path)!r}.",
                             "QEMU no admite saltos de línea en una ruta: renombra la imagen.")
        if self.serial and not re.fullmatch(r"[A-Za-z0-9_-]{1,20}", self.serial):
            raise InputError(f"Número de serie no válido: «{self.serial}».",
                             "Usa hasta 20 letras, dígitos, «-» o «_».")


@dataclass(frozen=True)
class ChannelSpec:
    """A named virtio-serial port; the host side is a unix socket."""

    name: str

    def __post_init__(self) -> None:
        if not _PORT.fullmatch(self.name):
            raise InputError(f"Nombre de canal no válido: «{self.name}».",
                             "Usa letras, dígitos, «.», «-» o «_», como org.example.canal.0.")
        if self.name == AGENT_PORT:
            raise InputError(f"«{AGENT_PORT}» ya lo usa el agente.", "Elige otro nombre de canal.")
        if self.name == VDAGENT_PORT:
            raise InputError(f"«{VDAGENT_PORT}» es el puerto del agente SPICE.",
                             "Para él usa GuestSpec(vdagent=True); elige otro nombre para tu canal.")


@dataclass(frozen=True)
class ShareSpec:
    """A host directory shared with the guest: virtio-9p (``kind="9p"``) or virtiofs.

    ``tag`` is the name the guest mounts (``mount -t 9p TAG`` / ``mount -t virtiofs TAG``);
    ``security_model`` only applies to 9p (``mapped-xattr`` by default: the guest's owners and
    modes are kept in extended attributes, QEMU never needs root). The path is checked (exists,
    is a directory, not ``/`` nor a whole home, no symlink leading out) when the guest starts:
    :func:`labkit.devices.shares.check_share_path`.
    """

    path: str
    tag: str = ""
    kind: str = "9p"
    readonly: bool = False
    security_model: str = "mapped-xattr"
    allow_home: bool = False  # explicit consent to share a whole home directory
    allow_symlinks: bool = False  # accept symlinks that point outside the share

    def __post_init__(self) -> None:
        if not self.path or "\0" in str(self.path) or "\n" in str(self.path):
            raise InputError("Falta la ruta de la carpeta compartida (o no es válida).",
                             "Indica una carpeta del anfitrión, p. ej. /srv/compartida.")
        # absolute now: QEMU, virtiofsd and libvirt do not share this process's working directory
        object.__setattr__(self, "path", os.path.abspath(os.path.expanduser(str(self.path))))
        if self.kind not in SHARE_KINDS:
            raise InputError(f"Tipo de carpeta compartida no válido: «{self.kind}».", "Usa «9p» o «virtiofs».")
        if self.security_model not in SECURITY_MODELS:
            raise InputError(f"Modelo de seguridad 9p no válido: «{self.security_model}».",
                             "Usa «mapped-xattr» (recomendado), «mapped-file», «passthrough» o «none».")
        tag = self.tag or re.sub(r"[^A-Za-z0-9_.-]", "_", self.path.rstrip("/").rsplit("/", 1)[-1] or "share")
        tag = tag.lstrip("_.-")[:31] or "share"
        if not _TAG.fullmatch(tag):
            raise InputError(f"Etiqueta de montaje no válida: «{self.tag}».",
                             "Usa hasta 31 letras, dígitos, «.», «-» o «_», p. ej. «compartida».")
        object.__setattr__(self, "tag", tag)


@dataclass(frozen=True)
class UsbSpec:
    """A USB device on the guest's xHCI controller: emulated (``storage`` backed by an image file,
    ``keyboard``, ``tablet``, ``mouse``) or a real host device (``host``: by ``hostbus``+``hostaddr``
    or by ``vendorid``+``productid``)."""

    kind: str
    image: str = ""
    serial: str = ""
    readonly: bool = False
    hostbus: int | None = None
    hostaddr: int | None = None
    vendorid: int | None = None
    productid: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in USB_KINDS:
            raise InputError(f"Tipo de dispositivo USB no válido: «{self.kind}».",
                             "Usa «storage», «keyboard», «tablet», «mouse» o «host».")
        if self.kind == "storage" and not self.image:
            raise InputError("Una memoria USB necesita una imagen de disco.", "Indica image=ruta (cree una con create()).")
        if self.serial and not re.fullmatch(r"[A-Za-z0-9_-]{1,20}", self.serial):
            raise InputError(f"Número de serie no válido: «{self.serial}».", "Usa hasta 20 letras, dígitos, «-» o «_».")
        if self.kind == "host":
            by_addr = self.hostbus is not None and self.hostaddr is not None
            by_id = self.vendorid is not None and self.productid is not None
            if not (by_addr or by_id):
                raise InputError("Un dispositivo USB del anfitrión se indica por bus y dirección o por ids.",
                                 "Usa hostbus=1, hostaddr=3 (lo que dice lsusb) o vendorid=0x320f, productid=0x5055.")
            for name in ("hostbus", "hostaddr", "vendorid", "productid"):
                value = getattr(self, name)
                limit = 0xFFFF if name in ("vendorid", "productid") else 255
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                          or not 0 <= value <= limit):
                    raise InputError(f"{name} no válido: {value!r}.", f"Usa un entero entre 0 y {limit}.")


def _device_tuple(value: object, slot: str, kind: type) -> tuple:
    """The devices given for ``slot`` as a tuple of ``kind``; a clear error for anything else."""
    items = (value,) if isinstance(value, kind) else value
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise InputError(f"{slot}= debe ser una lista de {kind.__name__}, no {value!r}.",
                         f"Escribe p. ej. {slot}=[{kind.__name__}(...)] (una lista, aunque sea de uno).")
    items = tuple(items)
    wrong = [x for x in items if not isinstance(x, kind)]
    if wrong:
        raise InputError(f"En {slot}= hay algo que no es un {kind.__name__}: {wrong[0]!r}.",
                         f"Crea cada elemento con {kind.__name__}(...).")
    return items


@dataclass(frozen=True)
class GuestSpec:
    """A guest: name (always ``labkit-`` prefixed), memory (MiB), vCPUs, accelerator, machine,
    extra kernel command line, and the devices attached at boot."""

    name: str = "labkit-guest"
    memory: int | str = 256
    vcpus: int = 1
    accel: str = "auto"
    machine: str = "microvm"
    cmdline: str = ""
    disks: tuple[DiskSpec, ...] = field(default=())
    channels: tuple[ChannelSpec, ...] = field(default=())
    shares: tuple[ShareSpec, ...] = field(default=())
    usb: tuple[UsbSpec, ...] = field(default=())
    usb_controller: bool = False  # an xHCI controller at boot even with no USB device (libvirt hot-plug)
    shared_memory: bool = False  # a shared memory backend (memfd) even with no virtiofs share (hot-plug)
    #: QEMU's qemu-vdagent chardev (clipboard on, mouse off) on the port com.redhat.spice.0 (issue 6)
    vdagent: bool = False
    #: QEMU's VNC server on a unix socket in the runtime dir, never TCP: it feeds QEMU's clipboard (issue 6)
    vnc: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", labkit_name(self.name))
        object.__setattr__(self, "memory", parse_memory(self.memory))
        object.__setattr__(self, "vcpus", _positive_int(self.vcpus, "Número de vCPU",
                                                        "Indica un entero entre 1 y 64, p. ej. 1 o 2."))
        if self.vcpus > 64:
            raise InputError(f"Demasiadas vCPU: {self.vcpus}.", "Usa entre 1 y 64.")
        if isinstance(self.accel, str):
            object.__setattr__(self, "accel", self.accel.strip().lower())
        if self.accel not in ACCELERATORS:
            raise InputError(f"Acelerador no válido: «{self.accel}».", "Usa «auto», «kvm» o «tcg».")
        if self.machine not in MACHINES:
            raise InputError(f"Tipo de máquina no válido: «{self.machine}».", "Usa «microvm», «q35» o «pc».")
        if not isinstance(self.cmdline, str):
            raise InputError(f"La línea de órdenes del kernel debe ser un texto, no {self.cmdline!r}.",
                             "Escribe las opciones separadas por espacios, p. ej. cmdline=\"loglevel=7\".")
        if "\n" in self.cmdline or "\0" in self.cmdline:
            raise InputError("La línea de órdenes del kernel no puede tener saltos de línea.",
                             "Escribe las opciones separadas por espacios.")
        for slot, kind in (("disks", DiskSpec), ("channels", ChannelSpec), ("shares", ShareSpec), ("usb", UsbSpec)):
            object.__setattr__(self, slot, _device_tuple(getattr(self, slot), slot, kind))
        tags = [s.tag for s in self.shares]
        if len(set(tags)) != len(tags):
            raise InputError("Hay carpetas compartidas con la misma etiqueta.", "Da a cada una un tag distinto.")
        if (self.usb or self.usb_controller) and self.machine == "microvm":
            raise InputError("Una máquina microvm no tiene bus PCI ni USB.",
                             "Usa GuestSpec(machine=\"pc\") o «q35» para dispositivos USB.")
        names = [c.name for c in self.channels]
        if len(set(names)) != len(names):
            raise InputError("Hay canales con el mismo nombre.", "Cada canal necesita un nombre distinto.")


def needs_shared_memory(spec: GuestSpec) -> bool:
    """virtiofs maps guest memory into virtiofsd: the RAM must be a shared (memfd) backend."""
    return spec.shared_memory or any(s.kind == "virtiofs" for s in spec.shares)


def has_usb(spec: GuestSpec) -> bool:
    return bool(spec.usb) or spec.usb_controller

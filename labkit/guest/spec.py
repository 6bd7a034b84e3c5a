"""What a guest is, as data: frozen dataclasses checked at construction.

A :class:`GuestSpec` says nothing about processes or sockets; the builders in
:mod:`labkit.guest.argv` turn it into a QEMU command line, and the runners
start it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import InputError

__all__ = ["GuestSpec", "DiskSpec", "ChannelSpec", "parse_memory", "ACCELERATORS", "MACHINES", "PREFIX",
           "AGENT_PORT"]

PREFIX = "labkit-"
ACCELERATORS = ("auto", "kvm", "tcg")
MACHINES = ("microvm", "q35", "pc")
AGENT_PORT = "org.qemu.guest_agent.0"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_PORT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_UNITS = {"": 1, "M": 1, "MB": 1, "MIB": 1, "G": 1024, "GB": 1024, "GIB": 1024}


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
    shares: tuple = field(default=())  # filled by the shared-folder issue
    usb: tuple = field(default=())  # filled by the USB issue

    def __post_init__(self) -> None:
        name = str(self.name)
        if not _NAME.fullmatch(name):
            raise InputError(f"Nombre de invitado no válido: «{self.name}».",
                             "Usa solo letras, dígitos, «.», «-» o «_» (sin espacios ni «/»).")
        if not name.startswith(PREFIX):
            name = PREFIX + name
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "memory", parse_memory(self.memory))
        object.__setattr__(self, "vcpus", _positive_int(self.vcpus, "Número de vCPU",
                                                        "Indica un entero entre 1 y 64, p. ej. 1 o 2."))
        if self.vcpus > 64:
            raise InputError(f"Demasiadas vCPU: {self.vcpus}.", "Usa entre 1 y 64.")
        if self.accel not in ACCELERATORS:
            raise InputError(f"Acelerador no válido: «{self.accel}».", "Usa «auto», «kvm» o «tcg».")
        if self.machine not in MACHINES:
            raise InputError(f"Tipo de máquina no válido: «{self.machine}».", "Usa «microvm», «q35» o «pc».")
        if "\n" in self.cmdline or "\0" in self.cmdline:
            raise InputError("La línea de órdenes del kernel no puede tener saltos de línea.",
                             "Escribe las opciones separadas por espacios.")
        object.__setattr__(self, "disks", tuple(self.disks))
        object.__setattr__(self, "channels", tuple(self.channels))
        names = [c.name for c in self.channels]
        if len(set(names)) != len(names):
            raise InputError("Hay canales con el mismo nombre.", "Cada canal necesita un nombre distinto.")

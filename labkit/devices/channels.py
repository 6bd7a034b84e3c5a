"""virtio-serial channels: named byte pipes between host and guest, and the SPICE desktop setup.

A ``virtserialport`` named ``org.example.x`` appears in the guest as
``/sys/class/virtio-ports/vportNpM/name`` (and, with udev or labkit's ``labkit-ports``, as
``/dev/virtio-ports/org.example.x``); on the host it is a unix socket QEMU serves
(``-chardev socket,server=on`` / libvirt ``<channel type='unix'>``). :class:`Channel` is the
host end. Two rules of the device:

- a guest **write** blocks until a host client is connected: connect first, then let the
  guest write;
- bytes the host sends before the guest opens the port wait (QEMU does not read the socket
  while the guest side is closed), so the host may send first.

The SPICE part (:func:`spice_qemu_args`, :func:`desktop_domain_xml`, :func:`spice_checklist`)
is for real desktop guests: pure builders, nothing is started.
"""

from __future__ import annotations

import shlex
import socket
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import HostError, InputError
from ..guest.argv import opts, qopt
from ..guest.spec import VDAGENT_PORT

__all__ = [
    "Channel",
    "ChannelError",
    "ChannelRoundTrip",
    "CheckItem",
    "guest_ports",
    "round_trip",
    "spice_qemu_args",
    "spice_devices",
    "desktop_domain_xml",
    "spice_checklist",
    "SPICE_PORT",
    "VDAGENT_PORT",
]

SPICE_PORT = 5930


class ChannelError(HostError):
    """A channel could not be opened, or nothing arrived in time."""


class Channel:
    """The host end of a virtio-serial port (a unix socket served by QEMU).

        with guest.channel("org.example.x") as ch:
            ch.send("hola\\n")
            print(ch.recv_line(timeout=10))
    """

    def __init__(self, path: str | Path, name: str = "", *, timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.name = name or self.path.stem
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""

    def connect(self) -> "Channel":
        """Connect to QEMU's socket (retrying while QEMU creates it)."""
        deadline = time.monotonic() + self.timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
                self._sock = sock
                return self
            except (FileNotFoundError, ConnectionRefusedError) as err:
                sock.close()
                if time.monotonic() > deadline:
                    raise ChannelError(f"No se pudo abrir el canal «{self.name}» ({self.path}).",
                                       "¿Tiene el invitado ese canal (GuestSpec(channels=...)) y está en marcha? "
                                       "QEMU sirve un solo cliente por canal: cierra otras conexiones.") from err
                time.sleep(0.02)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self) -> "Channel":
        return self if self.connected else self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _need(self) -> socket.socket:
        if self._sock is None:
            raise ChannelError(f"El canal «{self.name}» no está conectado.", "Llama antes a connect().")
        return self._sock

    def send(self, data: str | bytes) -> int:
        """Send text (UTF-8) or bytes to the guest; returns the number of bytes."""
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        self._need().sendall(raw)
        return len(raw)

    def _fill(self, deadline: float) -> bool:
        sock = self._need()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return False
        if not chunk:
            raise ChannelError(f"QEMU cerró el canal «{self.name}».", "¿Se ha parado el invitado?")
        self._buf += chunk
        return True

    def recv(self, size: int = 65536, *, timeout: float | None = None) -> bytes:
        """Up to ``size`` bytes (waits for at least one); raises ChannelError on timeout."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self._buf:
            if not self._fill(deadline):
                raise ChannelError(f"No llegó nada por «{self.name}» en {timeout or self.timeout:g} s.",
                                   "¿Ha escrito el invitado en /dev/virtio-ports/" + self.name + "?")
        data, self._buf = self._buf[:size], self._buf[size:]
        return data

    def recv_until(self, separator: bytes = b"\n", *, timeout: float | None = None) -> bytes:
        """Bytes up to and including ``separator``."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while separator not in self._buf:
            if not self._fill(deadline):
                raise ChannelError(f"No llegó una línea completa por «{self.name}» a tiempo "
                                   f"(recibido: {self._buf[:80]!r}).",
                                   "El invitado debe terminar lo que escribe con un salto de línea.")
        idx = self._buf.index(separator) + len(separator)
        data, self._buf = self._buf[:idx], self._buf[idx:]
        return data

    def recv_line(self, *, timeout: float | None = None) -> str:
        """One line of text, without its newline."""
        return self.recv_until(b"\n", timeout=timeout).decode("utf-8", errors="replace").rstrip("\n")

    def __repr__(self) -> str:
        state = "conectado" if self.connected else "cerrado"
        return f"<Channel {self.name} ({state}) {self.path}>"


# --------------------------------------------------------------------------- guest side


def guest_ports(guest: Any) -> dict[str, str]:
    """Port name -> sysfs device (vport0p1 ...), as the guest kernel lists them."""
    out = guest.run("for p in /sys/class/virtio-ports/vport*; do [ -r $p/name ] && "
                    "printf '%s %s\\n' \"${p##*/}\" \"$(cat $p/name)\"; done; true").stdout
    ports = {}
    for line in out.splitlines():
        dev, _, name = line.partition(" ")
        if name:
            ports[name] = dev
    return dict(sorted(ports.items()))


@dataclass(frozen=True)
class ChannelRoundTrip:
    """Text sent both ways through one channel, with what arrived and how long it took."""

    name: str
    backend: str
    host_sent: str
    guest_received: str
    guest_sent: str
    host_received: str
    to_guest_seconds: float
    to_host_seconds: float

    @property
    def ok(self) -> bool:
        return self.host_sent == self.guest_received and self.guest_sent == self.host_received

    def __str__(self) -> str:
        mark = lambda ok: "✔" if ok else "✘"  # noqa: E731
        return "\n".join([
            f"Canal {self.name} ({self.backend})",
            f"  anfitrión → invitado: {self.host_sent!r} → {self.guest_received!r} "
            f"{mark(self.host_sent == self.guest_received)}",
            f"  invitado → anfitrión: {self.guest_sent!r} → {self.host_received!r} "
            f"{mark(self.guest_sent == self.host_received)}",
        ])


def round_trip(guest: Any, name: str, host_text: str = "hola, invitado", guest_text: str = "hola, anfitrión",
               *, timeout: float = 15.0) -> ChannelRoundTrip:
    """One line each way through channel ``name`` of a running guest (either backend).

    Host -> guest: the host sends first (the bytes wait in the socket), then the guest reads
    one line with the shell's ``read``. Guest -> host: the host end is connected *before* the
    guest writes (otherwise the guest's write would block).
    """
    if "\n" in host_text or "\n" in guest_text:
        raise InputError("Cada texto debe ser una sola línea.", "Quita los saltos de línea.")
    port = f"/dev/virtio-ports/{name}"
    with guest.channel(name, timeout=timeout) as ch:
        start = time.monotonic()
        ch.send(host_text + "\n")
        got = guest.run(f'read -r line < {shlex.quote(port)} && printf "%s" "$line"', timeout=timeout)
        to_guest = time.monotonic() - start
        start = time.monotonic()
        guest.run(f"printf '%s\\n' {shlex.quote(guest_text)} > {shlex.quote(port)}", timeout=timeout, check=True)
        back = ch.recv_line(timeout=timeout)
        to_host = time.monotonic() - start
    return ChannelRoundTrip(name, getattr(guest, "backend", "?"), host_text, got.stdout, guest_text, back,
                            to_guest, to_host)


# --------------------------------------------------------------------------- SPICE, for desktop guests


def spice_qemu_args(*, port: int = SPICE_PORT, address: str = "127.0.0.1", video: str = "qxl-vga",
                    bus: str = "pci") -> list[str]:
    """The QEMU options a desktop guest needs for SPICE with clipboard sharing (argv fragment).

    SPICE listens on ``address`` only (loopback: no password, reachable from this host only);
    ``spicevmc`` carries the agent protocol between the SPICE client and the guest's
    spice-vdagent, on the port ``com.redhat.spice.0``.
    """
    if not 1 <= int(port) <= 65535:
        raise InputError(f"Puerto no válido: {port}.", "Usa un puerto TCP libre, p. ej. 5930.")
    return ["-spice", opts("", addr=address, port=int(port), disable_ticketing=True),
            "-device", opts(video),
            "-device", opts(f"virtio-serial-{bus}", id="vser1"),
            "-chardev", opts("spicevmc", id="vdagent", name="vdagent"),
            "-device", opts("virtserialport", bus="vser1.0", chardev="vdagent", name=qopt(VDAGENT_PORT))]


def spice_devices(*, port: int = SPICE_PORT, address: str = "127.0.0.1") -> list[ET.Element]:
    """The libvirt ``<devices>`` children for SPICE + the agent channel (``<graphics>``, ``<video>``, ``<channel>``)."""
    graphics = ET.Element("graphics", {"type": "spice", "port": str(int(port)), "autoport": "no",
                                       "listen": address})
    ET.SubElement(graphics, "listen", {"type": "address", "address": address})
    ET.SubElement(graphics, "image", {"compression": "off"})
    video = ET.Element("video")
    ET.SubElement(video, "model", {"type": "qxl", "vram": "65536", "heads": "1", "primary": "yes"})
    channel = ET.Element("channel", {"type": "spicevmc"})
    ET.SubElement(channel, "target", {"type": "virtio", "name": VDAGENT_PORT})
    return [graphics, video, channel]


def desktop_domain_xml(name: str = "escritorio", image: str = "/var/lib/libvirt/images/escritorio.qcow2", *,
                       memory_mib: int = 2048, vcpus: int = 2, port: int = SPICE_PORT,
                       address: str = "127.0.0.1") -> str:
    """A complete libvirt domain for a desktop guest with SPICE and the clipboard channel (not started)."""
    domain = ET.Element("domain", {"type": "kvm"})
    ET.SubElement(domain, "name").text = name
    ET.SubElement(domain, "memory", {"unit": "MiB"}).text = str(int(memory_mib))
    ET.SubElement(domain, "vcpu").text = str(int(vcpus))
    os_ = ET.SubElement(domain, "os")
    ET.SubElement(os_, "type", {"arch": "x86_64", "machine": "q35"}).text = "hvm"
    ET.SubElement(os_, "boot", {"dev": "hd"})
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    ET.SubElement(domain, "cpu", {"mode": "host-passthrough", "check": "none"})
    devices = ET.SubElement(domain, "devices")
    disk = ET.SubElement(devices, "disk", {"type": "file", "device": "disk"})
    ET.SubElement(disk, "driver", {"name": "qemu", "type": "qcow2"})
    ET.SubElement(disk, "source", {"file": str(image)})
    ET.SubElement(disk, "target", {"dev": "vda", "bus": "virtio"})
    ET.SubElement(devices, "controller", {"type": "virtio-serial", "index": "0"})
    ET.SubElement(devices, "input", {"type": "tablet", "bus": "usb"})
    devices.extend(spice_devices(port=port, address=address))
    ET.indent(domain, "  ")
    return ET.tostring(domain, encoding="unicode") + "\n"


@dataclass(frozen=True)
class CheckItem:
    where: str  # "anfitrión", "VM", "invitado"
    what: str
    how: str
    done: bool | None = None  # None: cannot be checked from here


def spice_checklist(host_tools: dict[str, bool] | None = None) -> list[CheckItem]:
    """What a real desktop needs for a shared clipboard (SPICE path), with this host's tools checked."""
    import shutil

    tools = host_tools if host_tools is not None else {
        "remote-viewer": shutil.which("remote-viewer") is not None,
        "virt-viewer": shutil.which("virt-viewer") is not None,
    }
    client = tools.get("remote-viewer") or tools.get("virt-viewer")
    return [
        CheckItem("VM", "Gráficos SPICE en 127.0.0.1 (no VNC)",
                  "<graphics type='spice' listen='127.0.0.1'> o -spice addr=127.0.0.1,port=5930,disable-ticketing=on"),
        CheckItem("VM", "Controlador virtio-serial y canal spicevmc «com.redhat.spice.0»",
                  "<channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>"),
        CheckItem("VM", "Vídeo QXL (o virtio-gpu) para que el escritorio cambie de tamaño", "<video><model type='qxl'/>"),
        CheckItem("invitado", "spice-vdagent instalado y su servicio activo (Linux)",
                  "apt install spice-vdagent; systemctl status spice-vdagentd"),
        CheckItem("invitado", "Una sesión gráfica X11 o Wayland abierta (el agente de sesión vive en ella)",
                  "el portapapeles es de la sesión: en una consola de texto no hay nada que compartir"),
        CheckItem("invitado", "En Windows: spice-guest-tools (vdagent.exe + drivers virtio)",
                  "https://www.spice-space.org/download.html"),
        CheckItem("anfitrión", "Un cliente SPICE: remote-viewer / virt-viewer (o virt-manager)",
                  "apt install virt-viewer; remote-viewer spice://127.0.0.1:5930", client),
    ]

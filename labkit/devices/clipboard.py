"""A shared clipboard between the host and a running guest, through QEMU's ``qemu-vdagent``.

::

    host "clipboard"          QEMU                                       guest
    RFBClient  --VNC unix-->  VNC server <-> QEMU clipboard <-> qemu-vdagent chardev
                              (ClientCutText /                 (VD-Agent protocol)
                               Extended Clipboard)                  |
                                                   virtio-serial port com.redhat.spice.0
                                                                    |
                                                     labkit-clipd (minimal agent) <-> /run/labkit-clip/clipboard

Standard parts: RFB (RFC 6143 + the Extended Clipboard extension), QEMU's clipboard and
``qemu-vdagent``, the VD-Agent protocol, virtio-serial. labkit's parts: the small RFB client
(:mod:`labkit.rfb`) standing in for a desktop's VNC viewer, and the minimal guest agent
(:mod:`labkit.guest_agents`, ``clipd.c``) standing in for spice-vdagent.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from typing import Any

from .. import vdagent
from ..errors import HostError, InputError
from ..guest_agents import CLIP_DIR, install_clipd, start_clipd
from ..rfb import RFBClient

__all__ = ["ClipboardLink", "ClipboardError", "Transfer", "TraceEntry", "parse_trace"]


class ClipboardError(HostError):
    """The text did not get to the other side."""


@dataclass(frozen=True)
class TraceEntry:
    """One chunk the guest agent sent ("out") or received ("in"), decoded with :mod:`labkit.vdagent`."""

    direction: str  # "in" (QEMU -> guest) or "out" (guest -> QEMU)
    port: int
    message: vdagent.Message
    raw: bytes

    def __str__(self) -> str:
        arrow = "QEMU → invitado" if self.direction == "in" else "invitado → QEMU"
        return f"{arrow}: {vdagent.describe(self.message)}"


def parse_trace(log: str) -> list[TraceEntry]:
    """The agent's log (``in <hex>`` / ``out <hex>`` lines, one chunk each) as decoded messages."""
    decoders = {"in": vdagent.StreamDecoder(), "out": vdagent.StreamDecoder()}
    pending: dict[str, bytearray] = {"in": bytearray(), "out": bytearray()}
    entries = []
    for line in log.splitlines():
        direction, _, hexdata = line.partition(" ")
        if direction not in decoders:
            continue
        raw = bytes.fromhex(hexdata.strip())
        pending[direction] += raw
        for port, message in decoders[direction].feed(raw):
            entries.append(TraceEntry(direction, port, message, bytes(pending[direction])))
            pending[direction].clear()
    return entries


@dataclass(frozen=True)
class Transfer:
    """One copy-and-paste between host and guest."""

    direction: str  # "anfitrión → invitado" or "invitado → anfitrión"
    sent: str
    received: str
    seconds: float
    messages: tuple[TraceEntry, ...]  # the VD-Agent messages of this transfer, as the guest saw them
    vnc: tuple[str, ...]  # the RFB messages of this transfer, as the host saw them

    @property
    def ok(self) -> bool:
        return self.sent == self.received

    def __str__(self) -> str:
        lines = [f"{self.direction}: {self.sent!r} → {self.received!r} {'✔' if self.ok else '✘'}",
                 "  RFB (anfitrión ↔ QEMU):"]
        lines += [f"    {line}" for line in self.vnc]
        lines.append("  VD-Agent (QEMU ↔ invitado, por com.redhat.spice.0):")
        lines += [f"    {entry}" for entry in self.messages]
        return "\n".join(lines)


class ClipboardLink:
    """Copy and paste text between the host (a VNC client of QEMU) and the guest (labkit's minimal agent).

        spec = GuestSpec(vdagent=True, vnc=True)
        with Guest(spec) as g, ClipboardLink(g) as link:
            link.host_copy("hola")        # arrives in the guest's clipboard file
            link.guest_copy("adiós")      # arrives at the host's VNC client
    """

    def __init__(self, guest: Any, *, timeout: float = 15.0) -> None:
        spec = guest.spec
        if not (getattr(spec, "vdagent", False) and getattr(spec, "vnc", False)):
            raise InputError("El invitado no tiene el agente de QEMU o el servidor VNC local.",
                             "Arráncalo con GuestSpec(vdagent=True, vnc=True).")
        self.guest = guest
        self.timeout = timeout
        self.vnc: RFBClient | None = None
        self.host_text = ""  # what the host's clipboard holds (last copied or pasted)
        self._trace_seen = 0
        self._vnc_seen = 0

    def start(self) -> "ClipboardLink":
        """Install and start the guest agent, then connect the host's VNC client (in this order:
        QEMU's clipboard only reaches the agent once the agent has announced its capabilities)."""
        install_clipd(self.guest)
        start_clipd(self.guest, timeout=self.timeout)
        self.vnc = RFBClient(self.guest.vnc_socket, timeout=self.timeout).connect()
        self._trace_seen = len(self.trace())
        self._vnc_seen = len(self.vnc.log)
        return self

    def close(self) -> None:
        if self.vnc is not None:
            self.vnc.close()
            self.vnc = None
        if self.guest.running:
            try:
                self.guest.run(f"kill $(cat {CLIP_DIR}/pid) 2>/dev/null; true", timeout=10)
            except HostError:
                pass

    def __enter__(self) -> "ClipboardLink":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ reading
    def trace(self) -> list[TraceEntry]:
        """Every VD-Agent message the guest agent sent or received so far."""
        return parse_trace(self.guest.run(f"cat {CLIP_DIR}/log 2>/dev/null; true").stdout)

    def guest_clipboard(self) -> str:
        """What the guest's clipboard holds now."""
        return self.guest.run(f"cat {CLIP_DIR}/clipboard 2>/dev/null; true").stdout

    def _new(self) -> tuple[tuple[TraceEntry, ...], tuple[str, ...]]:
        trace = self.trace()
        assert self.vnc is not None
        new = tuple(trace[self._trace_seen:]), tuple(self.vnc.log[self._vnc_seen:])
        self._trace_seen, self._vnc_seen = len(trace), len(self.vnc.log)
        return new

    # ------------------------------------------------------------ copying
    def host_copy(self, text: str) -> Transfer:
        """The host copies ``text``; wait until it is the guest's clipboard."""
        if self.vnc is None:
            raise ClipboardError("El enlace no está en marcha.", "Usa «with ClipboardLink(guest) as link:».")
        if not text:
            raise InputError("No hay texto que copiar.", "Escribe algo.")
        start = time.monotonic()
        self.vnc.send_text(text)
        self.host_text = text
        got = ""
        while time.monotonic() - start < self.timeout:
            got = self.guest_clipboard()
            if got == text:
                break
            time.sleep(0.05)
        seconds = time.monotonic() - start
        messages, vnc = self._new()
        if got != text:
            raise ClipboardError(f"El texto no llegó al invitado en {self.timeout:g} s (tiene {got!r}).",
                                 "Mira link.trace(): ¿llegó CLIPBOARD_GRAB al agente?")
        return Transfer("anfitrión → invitado", text, got, seconds, messages, vnc)

    def guest_copy(self, text: str) -> Transfer:
        """The guest copies ``text`` (written to the agent's FIFO); wait until the host's VNC client has it."""
        if self.vnc is None:
            raise ClipboardError("El enlace no está en marcha.", "Usa «with ClipboardLink(guest) as link:».")
        if not text:
            raise InputError("No hay texto que copiar.", "Escribe algo.")
        start = time.monotonic()
        self.guest.run(f"printf '%s' {shlex.quote(text)} > {CLIP_DIR}/copy", check=True, timeout=self.timeout)
        got = self.vnc.wait_text(self.timeout)
        seconds = time.monotonic() - start
        self.host_text = got
        time.sleep(0.05)  # let the agent log its last answer
        messages, vnc = self._new()
        return Transfer("invitado → anfitrión", text, got, seconds, messages, vnc)

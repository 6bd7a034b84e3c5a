"""A minimal RFB (VNC) client: just enough to read and write QEMU's clipboard.

QEMU keeps one clipboard of its own (``ui/clipboard.c``). Its peers are the VNC server
(one per connected client), the GTK display and the ``qemu-vdagent`` chardev. So a VNC
client on a **local unix socket** (``-vnc unix:PATH``; never TCP here) can play the part of
the host's desktop clipboard:

- host -> QEMU: ``ClientCutText`` (RFC 6143 §7.5.6), the plain message: type 6, 3 padding
  bytes, ``u32`` length, the text. QEMU passes the bytes through as they are.
- QEMU -> host: QEMU's VNC server only *sends* the clipboard to clients that announced the
  **Extended Clipboard** pseudo-encoding (0xC0A1E5CE): its ``ServerCutText`` then carries a
  negative length and ``u32 flags`` (format bits + CAPS/REQUEST/PEEK/NOTIFY/PROVIDE). The
  server NOTIFYs "there is text", the client REQUESTs it, the server PROVIDEs it as zlib data
  holding ``u32 size`` (big-endian) + the text.

Everything here is synchronous with timeouts (safe in a notebook cell). The message builders
(:func:`client_cut_text`, :func:`extended_cut_text`, :func:`set_encodings`) are pure.
"""

from __future__ import annotations

import socket
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from .errors import HostError

__all__ = [
    "RFBClient",
    "RFBError",
    "ServerInit",
    "CLIPBOARD_EXT",
    "CB_TEXT",
    "CB_CAPS",
    "CB_REQUEST",
    "CB_PEEK",
    "CB_NOTIFY",
    "CB_PROVIDE",
    "client_cut_text",
    "extended_cut_text",
    "provide_text",
    "parse_provide",
    "set_encodings",
]

CLIPBOARD_EXT = 0xC0A1E5CE  # the Extended Clipboard pseudo-encoding
CB_TEXT = 1 << 0
CB_CAPS = 1 << 24
CB_REQUEST = 1 << 25
CB_PEEK = 1 << 26
CB_NOTIFY = 1 << 27
CB_PROVIDE = 1 << 28

_SET_ENCODINGS = 2
_CLIENT_CUT_TEXT = 6
_SERVER_CUT_TEXT = 3
_BELL = 2


class RFBError(HostError):
    """The VNC server did not speak RFB as expected."""


@dataclass(frozen=True)
class ServerInit:
    width: int
    height: int
    name: str


def set_encodings(encodings: list[int]) -> bytes:
    """SetEncodings (RFC 6143 §7.5.2); pseudo-encodings are signed 32-bit values on the wire."""
    return struct.pack(">BxH", _SET_ENCODINGS, len(encodings)) + b"".join(
        struct.pack(">i", e - (1 << 32) if e >= 1 << 31 else e) for e in encodings)


def client_cut_text(text: str | bytes) -> bytes:
    """The plain ClientCutText message (QEMU takes the bytes as they are: send UTF-8)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return struct.pack(">BxxxI", _CLIENT_CUT_TEXT, len(data)) + data


def extended_cut_text(flags: int, payload: bytes = b"") -> bytes:
    """An Extended Clipboard ClientCutText: negative length, ``u32 flags``, payload."""
    return struct.pack(">BxxxiI", _CLIENT_CUT_TEXT, -(4 + len(payload)), flags) + payload


def provide_text(text: str) -> bytes:
    """The zlib payload of a PROVIDE with text: ``u32 size`` + UTF-8 text + NUL (the extension's format)."""
    data = text.encode("utf-8") + b"\0"
    return zlib.compress(struct.pack(">I", len(data)) + data)


def parse_provide(payload: bytes) -> str:
    """The text of a PROVIDE payload (QEMU sends it without the final NUL; accept both)."""
    raw = zlib.decompress(payload)
    (size,) = struct.unpack_from(">I", raw)
    return raw[4:4 + size].rstrip(b"\0").decode("utf-8", errors="replace")


class RFBClient:
    """Connect to QEMU's VNC unix socket, do the RFB 3.8 handshake (security "None") and exchange text.

        with RFBClient(guest.vnc_socket) as vnc:
            vnc.send_text("hola")            # the host "copies"
            print(vnc.wait_text(timeout=10))  # the guest copied something: the host "pastes"
    """

    def __init__(self, path: str | Path, *, timeout: float = 10.0, extended: bool = True) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.extended = extended
        self.server: ServerInit | None = None
        self.server_caps: int | None = None  # flags of the server's Extended Clipboard CAPS
        self.log: list[str] = []  # what was exchanged, one line per message
        self._sock: socket.socket | None = None
        self._buf = b""
        self._texts: list[str] = []

    # ------------------------------------------------------------ connection
    def connect(self) -> "RFBClient":
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(self.path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as err:
                sock.close()
                if time.monotonic() > deadline:
                    raise RFBError(f"No hay servidor VNC en {self.path}.",
                                   "Arranca el invitado con GuestSpec(vnc=True).") from err
                time.sleep(0.02)
        self._sock = sock
        version = self._read(12, deadline)
        if not version.startswith(b"RFB "):
            raise RFBError(f"Saludo RFB inesperado: {version!r}.", "¿Es un socket VNC de QEMU?")
        self._sock.sendall(b"RFB 003.008\n")
        (count,) = self._read(1, deadline)
        if count == 0:
            (length,) = struct.unpack(">I", self._read(4, deadline))
            raise RFBError(f"El servidor VNC rechazó la conexión: {self._read(length, deadline).decode(errors='replace')}",
                           "Mira las opciones -vnc de QEMU.")
        types = self._read(count, deadline)
        if 1 not in types:
            raise RFBError(f"El servidor VNC exige autenticación (tipos {list(types)}).",
                           "Este cliente solo habla el tipo «None»: usa -vnc unix:RUTA sin password.")
        self._sock.sendall(b"\x01")
        (result,) = struct.unpack(">I", self._read(4, deadline))
        if result != 0:
            raise RFBError("El servidor VNC no aceptó la seguridad «None».", "Mira las opciones -vnc de QEMU.")
        self._sock.sendall(b"\x01")  # ClientInit: shared
        width, height = struct.unpack(">HH", self._read(4, deadline))
        self._read(16, deadline)  # pixel format
        (length,) = struct.unpack(">I", self._read(4, deadline))
        self.server = ServerInit(width, height, self._read(length, deadline).decode(errors="replace"))
        self.log.append(f"RFB 3.8, seguridad None, escritorio «{self.server.name}» {width}x{height}")
        encodings = [0] + ([CLIPBOARD_EXT] if self.extended else [])
        self._sock.sendall(set_encodings(encodings))
        if self.extended:
            self.log.append("-> SetEncodings [Raw, Extended Clipboard 0xC0A1E5CE]")
            self._pump(deadline, until=lambda: self.server_caps is not None)
        return self

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self) -> "RFBClient":
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ clipboard
    def send_text(self, text: str) -> None:
        """The host copies ``text``: a plain ClientCutText (QEMU's clipboard then belongs to VNC)."""
        if self._sock is None:
            raise RFBError("El cliente VNC no está conectado.", "Llama antes a connect().")
        self._sock.sendall(client_cut_text(text))
        self.log.append(f"-> ClientCutText {text!r}")

    def wait_text(self, timeout: float | None = None) -> str:
        """Wait for text from QEMU's clipboard (the guest copied): NOTIFY -> REQUEST -> PROVIDE."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._pump(deadline, until=lambda: bool(self._texts))
        return self._texts.pop(0)

    # ------------------------------------------------------------ wire
    def _read(self, n: int, deadline: float) -> bytes:
        assert self._sock is not None
        while len(self._buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                raise TimeoutError from None
            if not chunk:
                raise RFBError("El servidor VNC cerró la conexión.", "¿Sigue en marcha el invitado?")
            self._buf += chunk
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def _pump(self, deadline: float, until) -> None:
        try:
            while not until():
                self._message(deadline)
        except TimeoutError:
            raise RFBError("No llegó nada del portapapeles de QEMU a tiempo.",
                           "¿Está el agente del invitado en marcha y ha copiado algo?") from None

    def _message(self, deadline: float) -> None:
        (kind,) = self._read(1, deadline)
        if kind == _BELL:
            return
        if kind != _SERVER_CUT_TEXT:
            raise RFBError(f"Mensaje RFB no esperado: tipo {kind}.", "Este cliente solo entiende el portapapeles.")
        self._read(3, deadline)
        (length,) = struct.unpack(">i", self._read(4, deadline))
        if length >= 0:
            text = self._read(length, deadline).decode("latin-1")
            self.log.append(f"<- ServerCutText {text!r}")
            self._texts.append(text)
            return
        body = self._read(-length, deadline)
        (flags,) = struct.unpack_from(">I", body)
        payload = body[4:]
        if flags & CB_CAPS:
            self.server_caps = flags
            self.log.append(f"<- ServerCutText ext CAPS flags=0x{flags:08x}")
        elif flags & CB_NOTIFY:
            self.log.append(f"<- ServerCutText ext NOTIFY{' TEXT' if flags & CB_TEXT else ''}")
            if flags & CB_TEXT:
                assert self._sock is not None
                self._sock.sendall(extended_cut_text(CB_REQUEST | CB_TEXT))
                self.log.append("-> ClientCutText ext REQUEST TEXT")
        elif flags & CB_PROVIDE:
            text = parse_provide(payload) if flags & CB_TEXT else ""
            self.log.append(f"<- ServerCutText ext PROVIDE TEXT {text!r}")
            self._texts.append(text)
        elif flags & CB_REQUEST:
            self.log.append("<- ServerCutText ext REQUEST (no hay nada que dar)")
        else:
            self.log.append(f"<- ServerCutText ext flags=0x{flags:08x}")

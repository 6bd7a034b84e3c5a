"""The VD-Agent protocol (SPICE's guest agent protocol), encoded and decoded: pure, no I/O.

This is the protocol ``spice-vdagent`` (Linux) and ``vdagent.exe`` (Windows) speak on the
virtio-serial port ``com.redhat.spice.0``; QEMU's ``qemu-vdagent`` chardev speaks it too,
without any SPICE client. The layout is spice-protocol's ``spice/vd_agent.h``; every integer
is little-endian and every struct is packed::

    VDIChunkHeader   u32 port (1 = client, 2 = server)   u32 size (bytes of message that follow)
    VDAgentMessage   u32 protocol (= 1)   u32 type   u64 opaque   u32 size   u8 data[size]

A message larger than one chunk is split over several chunks (QEMU cuts at 1024 bytes,
spice-vdagent at ``VD_AGENT_MAX_DATA_SIZE`` = 2048); :class:`StreamDecoder` reassembles them.

The clipboard messages this module knows (without the ``CLIPBOARD_SELECTION`` capability,
i.e. without the leading selection byte + 3 reserved bytes, and without ``GRAB_SERIAL``)::

    VD_AGENT_ANNOUNCE_CAPABILITIES   u32 request   u32 caps[]   (bit n of caps = capability n)
    VD_AGENT_CLIPBOARD_GRAB          u32 types[]                ("I own the clipboard: I have these types")
    VD_AGENT_CLIPBOARD_REQUEST       u32 type                   ("send me the data of this type")
    VD_AGENT_CLIPBOARD               u32 type   u8 data[]       (the data; UTF-8 text, no NUL)
    VD_AGENT_CLIPBOARD_RELEASE       (empty)                    ("I no longer own it")

With ``CLIPBOARD_SELECTION`` negotiated by both sides, each of these starts with
``u8 selection; u8 reserved[3]`` (0 = CLIPBOARD, 1 = PRIMARY, 2 = SECONDARY): pass
``selection=`` to the builders and ``with_selection=True`` to :func:`decode_clipboard`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from .errors import InputError

__all__ = [
    "PROTOCOL",
    "CLIENT_PORT",
    "SERVER_PORT",
    "MAX_DATA_SIZE",
    "CHUNK_HEADER",
    "MESSAGE_HEADER",
    "MsgType",
    "Cap",
    "ClipboardType",
    "Message",
    "Clipboard",
    "VDAgentProtocolError",
    "encode_message",
    "encode_chunks",
    "decode_message",
    "decode_clipboard",
    "announce_capabilities",
    "decode_capabilities",
    "clipboard_grab",
    "clipboard_request",
    "clipboard_data",
    "clipboard_release",
    "caps_bits",
    "StreamDecoder",
    "iter_messages",
    "describe",
    "hexdump",
]

PROTOCOL = 1
CLIENT_PORT = 1  # VDP_CLIENT_PORT
SERVER_PORT = 2  # VDP_SERVER_PORT
MAX_DATA_SIZE = 2048  # VD_AGENT_MAX_DATA_SIZE
CHUNK_HEADER = struct.Struct("<II")  # VDIChunkHeader: port, size
MESSAGE_HEADER = struct.Struct("<IIQI")  # VDAgentMessage: protocol, type, opaque, size


class VDAgentProtocolError(InputError):
    """Bytes that are not a well-formed VD-Agent message."""


class MsgType(enum.IntEnum):
    """``VD_AGENT_*`` message types (vd_agent.h)."""

    MOUSE_STATE = 1
    MONITORS_CONFIG = 2
    REPLY = 3
    CLIPBOARD = 4
    DISPLAY_CONFIG = 5
    ANNOUNCE_CAPABILITIES = 6
    CLIPBOARD_GRAB = 7
    CLIPBOARD_REQUEST = 8
    CLIPBOARD_RELEASE = 9
    FILE_XFER_START = 10
    FILE_XFER_STATUS = 11
    FILE_XFER_DATA = 12
    CLIENT_DISCONNECTED = 13
    MAX_CLIPBOARD = 14
    AUDIO_VOLUME_SYNC = 15
    GRAPHICS_DEVICE_INFO = 16


class Cap(enum.IntEnum):
    """``VD_AGENT_CAP_*`` capability bit numbers (vd_agent.h)."""

    MOUSE_STATE = 0
    MONITORS_CONFIG = 1
    REPLY = 2
    CLIPBOARD = 3
    DISPLAY_CONFIG = 4
    CLIPBOARD_BY_DEMAND = 5
    CLIPBOARD_SELECTION = 6
    SPARSE_MONITORS_CONFIG = 7
    GUEST_LINEEND_LF = 8
    GUEST_LINEEND_CRLF = 9
    MAX_CLIPBOARD = 10
    AUDIO_VOLUME_SYNC = 11
    MONITORS_CONFIG_POSITION = 12
    FILE_XFER_DISABLED = 13
    FILE_XFER_DETAILED_ERRORS = 14
    GRAPHICS_DEVICE_INFO = 15
    CLIPBOARD_NO_RELEASE_ON_REGRAB = 16
    CLIPBOARD_GRAB_SERIAL = 17


class ClipboardType(enum.IntEnum):
    """``VD_AGENT_CLIPBOARD_*`` data types (vd_agent.h)."""

    NONE = 0
    UTF8_TEXT = 1
    IMAGE_PNG = 2
    IMAGE_BMP = 3
    IMAGE_TIFF = 4
    IMAGE_JPG = 5
    FILE_LIST = 6


def _name(kind: type[enum.IntEnum], value: int) -> str:
    try:
        return kind(value).name
    except ValueError:
        return str(value)


@dataclass(frozen=True)
class Message:
    """One ``VDAgentMessage`` (its header fields and its data)."""

    type: int
    data: bytes = b""
    opaque: int = 0
    protocol: int = PROTOCOL

    @property
    def type_name(self) -> str:
        return "VD_AGENT_" + _name(MsgType, self.type)


@dataclass(frozen=True)
class Clipboard:
    """The body of a clipboard message, decoded."""

    selection: int | None = None
    types: tuple[int, ...] = ()  # GRAB
    type: int | None = None  # REQUEST, CLIPBOARD
    data: bytes = b""  # CLIPBOARD

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- encoding


def encode_message(message: Message) -> bytes:
    """``VDAgentMessage`` header + data (no chunk header)."""
    return MESSAGE_HEADER.pack(message.protocol, int(message.type), message.opaque, len(message.data)) + message.data


def encode_chunks(message: Message, *, port: int = CLIENT_PORT, chunk_size: int = MAX_DATA_SIZE) -> bytes:
    """The bytes written on the virtio-serial port: the message cut into chunks, each with its header."""
    if chunk_size < 1:
        raise InputError(f"Tamaño de trozo no válido: {chunk_size}.", "Usa un entero positivo, p. ej. 2048.")
    body = encode_message(message)
    out = bytearray()
    for offset in range(0, len(body), chunk_size):
        piece = body[offset:offset + chunk_size]
        out += CHUNK_HEADER.pack(port, len(piece)) + piece
    return bytes(out)


def caps_bits(caps: Iterable[int]) -> int:
    """A capability set as the bit mask of ``caps[0]``."""
    mask = 0
    for cap in caps:
        if not 0 <= int(cap) < 32:
            raise InputError(f"Capacidad fuera de caps[0]: {cap}.", "Usa valores de vdagent.Cap.")
        mask |= 1 << int(cap)
    return mask


def _selection_prefix(selection: int | None) -> bytes:
    return b"" if selection is None else struct.pack("<B3x", selection)


def announce_capabilities(caps: Iterable[int], *, request: bool = True) -> Message:
    """``VD_AGENT_ANNOUNCE_CAPABILITIES``: ``u32 request`` + ``u32 caps[1]``."""
    return Message(MsgType.ANNOUNCE_CAPABILITIES, struct.pack("<II", int(bool(request)), caps_bits(caps)))


def clipboard_grab(types: Iterable[int] = (ClipboardType.UTF8_TEXT,), *, selection: int | None = None,
                   serial: int | None = None) -> Message:
    """``VD_AGENT_CLIPBOARD_GRAB``: [selection], [serial], ``u32 types[]``."""
    body = _selection_prefix(selection) + (b"" if serial is None else struct.pack("<I", serial))
    body += b"".join(struct.pack("<I", int(t)) for t in types)
    return Message(MsgType.CLIPBOARD_GRAB, body)


def clipboard_request(type: int = ClipboardType.UTF8_TEXT, *, selection: int | None = None) -> Message:
    """``VD_AGENT_CLIPBOARD_REQUEST``: [selection], ``u32 type``."""
    return Message(MsgType.CLIPBOARD_REQUEST, _selection_prefix(selection) + struct.pack("<I", int(type)))


def clipboard_data(data: str | bytes, type: int = ClipboardType.UTF8_TEXT, *,
                   selection: int | None = None) -> Message:
    """``VD_AGENT_CLIPBOARD``: [selection], ``u32 type``, the data (text as UTF-8, without a NUL)."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    return Message(MsgType.CLIPBOARD, _selection_prefix(selection) + struct.pack("<I", int(type)) + raw)


def clipboard_release(*, selection: int | None = None) -> Message:
    """``VD_AGENT_CLIPBOARD_RELEASE``: [selection] only."""
    return Message(MsgType.CLIPBOARD_RELEASE, _selection_prefix(selection))


# --------------------------------------------------------------------------- decoding


def decode_message(data: bytes) -> Message:
    """One complete ``VDAgentMessage`` (header + exactly ``size`` bytes of data)."""
    if len(data) < MESSAGE_HEADER.size:
        raise VDAgentProtocolError(f"Mensaje VD-Agent demasiado corto: {len(data)} bytes (la cabecera tiene 20).",
                                   "Junta los trozos (StreamDecoder) antes de decodificar.")
    protocol, mtype, opaque, size = MESSAGE_HEADER.unpack_from(data)
    body = data[MESSAGE_HEADER.size:]
    if len(body) != size:
        raise VDAgentProtocolError(f"El mensaje dice {size} bytes de datos y trae {len(body)}.",
                                   "Junta los trozos (StreamDecoder) antes de decodificar.")
    return Message(mtype, bytes(body), opaque, protocol)


def decode_capabilities(message: Message) -> tuple[bool, tuple[Cap | int, ...]]:
    """(request, capabilities) of an ``ANNOUNCE_CAPABILITIES`` message."""
    if message.type != MsgType.ANNOUNCE_CAPABILITIES or len(message.data) < 8 or len(message.data) % 4:
        raise VDAgentProtocolError("No es un ANNOUNCE_CAPABILITIES válido.", "Mira el tipo y el tamaño del mensaje.")
    request, *words = struct.unpack(f"<{len(message.data) // 4}I", message.data)
    caps: list[Cap | int] = []
    for w, word in enumerate(words):
        for bit in range(32):
            if word >> bit & 1:
                n = w * 32 + bit
                caps.append(Cap(n) if n in Cap._value2member_map_ else n)
    return bool(request), tuple(caps)


def decode_clipboard(message: Message, *, with_selection: bool = False, with_serial: bool = False) -> Clipboard:
    """The body of GRAB / REQUEST / CLIPBOARD / RELEASE (flags = the capabilities both sides negotiated)."""
    data = message.data
    selection = None
    if with_selection:
        if len(data) < 4:
            raise VDAgentProtocolError("Falta el byte de selección.", "¿Se negoció CLIPBOARD_SELECTION?")
        selection, data = data[0], data[4:]
    if message.type == MsgType.CLIPBOARD_GRAB:
        if with_serial:
            data = data[4:]
        if len(data) % 4:
            raise VDAgentProtocolError("Una lista de tipos debe tener múltiplos de 4 bytes.", "Revisa el mensaje.")
        return Clipboard(selection, types=struct.unpack(f"<{len(data) // 4}I", data))
    if message.type in (MsgType.CLIPBOARD_REQUEST, MsgType.CLIPBOARD):
        if len(data) < 4:
            raise VDAgentProtocolError("Falta el tipo de datos del portapapeles.", "Revisa el mensaje.")
        (ctype,) = struct.unpack_from("<I", data)
        return Clipboard(selection, type=ctype, data=bytes(data[4:]) if message.type == MsgType.CLIPBOARD else b"")
    if message.type == MsgType.CLIPBOARD_RELEASE:
        return Clipboard(selection)
    raise VDAgentProtocolError(f"{message.type_name} no es un mensaje de portapapeles.", "Usa decode_message.")


@dataclass
class StreamDecoder:
    """Feed it the bytes read from the port, in any pieces; it yields whole messages.

    It keeps (port, message) pairs; chunks of one message must come in order (the protocol
    does not interleave messages on one port).
    """

    _buf: bytearray = field(default_factory=bytearray)
    _partial: bytearray = field(default_factory=bytearray)
    _expected: int = 0
    _port: int = 0

    def feed(self, data: bytes) -> list[tuple[int, Message]]:
        self._buf += data
        out: list[tuple[int, Message]] = []
        while len(self._buf) >= CHUNK_HEADER.size:
            port, size = CHUNK_HEADER.unpack_from(self._buf)
            if len(self._buf) < CHUNK_HEADER.size + size:
                break
            payload = bytes(self._buf[CHUNK_HEADER.size:CHUNK_HEADER.size + size])
            del self._buf[:CHUNK_HEADER.size + size]
            if not self._partial:
                if len(payload) < MESSAGE_HEADER.size:
                    raise VDAgentProtocolError(f"Primer trozo de {len(payload)} bytes: no cabe la cabecera.",
                                               "El flujo está desalineado; vuelve a abrir el puerto.")
                self._expected = MESSAGE_HEADER.size + MESSAGE_HEADER.unpack_from(payload)[3]
                self._port = port
            self._partial += payload
            if len(self._partial) > self._expected:
                self._partial.clear()
                raise VDAgentProtocolError("Un trozo va más allá del final de su mensaje.",
                                           "El flujo está desalineado; vuelve a abrir el puerto.")
            if len(self._partial) == self._expected:
                out.append((self._port, decode_message(bytes(self._partial))))
                self._partial.clear()
        return out

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a whole message."""
        return len(self._buf) + len(self._partial)


def iter_messages(data: bytes) -> Iterator[tuple[int, Message]]:
    """Every (port, message) in a complete byte stream."""
    decoder = StreamDecoder()
    yield from decoder.feed(data)
    if decoder.pending:
        raise VDAgentProtocolError(f"Sobran {decoder.pending} bytes al final del flujo.", "Falta el resto del mensaje.")


# --------------------------------------------------------------------------- showing


def describe(message: Message, *, with_selection: bool = False) -> str:
    """One readable line: ``VD_AGENT_CLIPBOARD_GRAB types=[UTF8_TEXT]``."""
    head = message.type_name
    try:
        if message.type == MsgType.ANNOUNCE_CAPABILITIES:
            request, caps = decode_capabilities(message)
            names = ", ".join(c.name if isinstance(c, Cap) else str(c) for c in caps)
            return f"{head} request={int(request)} caps=[{names}]"
        if message.type in (MsgType.CLIPBOARD_GRAB, MsgType.CLIPBOARD_REQUEST, MsgType.CLIPBOARD,
                            MsgType.CLIPBOARD_RELEASE):
            body = decode_clipboard(message, with_selection=with_selection)
            sel = "" if body.selection is None else f" selection={body.selection}"
            if message.type == MsgType.CLIPBOARD_GRAB:
                return f"{head}{sel} types=[{', '.join(_name(ClipboardType, t) for t in body.types)}]"
            if message.type == MsgType.CLIPBOARD_REQUEST:
                return f"{head}{sel} type={_name(ClipboardType, body.type or 0)}"
            if message.type == MsgType.CLIPBOARD:
                return f"{head}{sel} type={_name(ClipboardType, body.type or 0)} data={body.text!r}"
            return f"{head}{sel}"
    except VDAgentProtocolError as err:
        return f"{head} (mal formado: {err.message})"
    return f"{head} size={len(message.data)}"


def hexdump(data: bytes, *, width: int = 16) -> str:
    """Bytes as hex rows (offset, hex, ASCII), to see the layout byte by byte."""
    rows = []
    for offset in range(0, len(data), width):
        row = data[offset:offset + width]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        rows.append(f"{offset:04x}  {row.hex(' '):<{width * 3 - 1}}  {text}")
    return "\n".join(rows)

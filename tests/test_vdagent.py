"""The VD-Agent protocol module against spice-protocol's vd_agent.h layout (packed, little-endian)."""

from __future__ import annotations

import struct
import zlib

import pytest

from labkit import rfb, vdagent
from labkit.devices.clipboard import parse_trace
from labkit.vdagent import Cap, ClipboardType, Message, MsgType


def test_enum_values_match_vd_agent_h():
    # enum { VD_AGENT_MOUSE_STATE = 1, ... } and VD_AGENT_CAP_* bit numbers, as in vd_agent.h
    assert (MsgType.CLIPBOARD, MsgType.ANNOUNCE_CAPABILITIES, MsgType.CLIPBOARD_GRAB,
            MsgType.CLIPBOARD_REQUEST, MsgType.CLIPBOARD_RELEASE) == (4, 6, 7, 8, 9)
    assert MsgType.GRAPHICS_DEVICE_INFO == 16
    assert (Cap.CLIPBOARD_BY_DEMAND, Cap.CLIPBOARD_SELECTION, Cap.CLIPBOARD_GRAB_SERIAL) == (5, 6, 17)
    assert (ClipboardType.NONE, ClipboardType.UTF8_TEXT, ClipboardType.FILE_LIST) == (0, 1, 6)
    assert (vdagent.CLIENT_PORT, vdagent.SERVER_PORT, vdagent.MAX_DATA_SIZE) == (1, 2, 2048)
    assert vdagent.CHUNK_HEADER.size == 8 and vdagent.MESSAGE_HEADER.size == 20  # packed structs


def test_grab_on_the_wire_byte_by_byte():
    wire = vdagent.encode_chunks(vdagent.clipboard_grab([ClipboardType.UTF8_TEXT]))
    expected = (struct.pack("<II", 1, 24)            # VDIChunkHeader: port=client, size=20+4
                + struct.pack("<IIQI", 1, 7, 0, 4)    # VDAgentMessage: protocol, GRAB, opaque, size
                + struct.pack("<I", 1))               # types[0] = UTF8_TEXT
    assert wire == expected
    # the exact bytes labkit-clipd logged in a real guest for the same message
    assert wire.hex() == "0100000018000000010000000700000000000000000000000400000001000000"


def test_announce_capabilities_layout_and_decode():
    msg = vdagent.announce_capabilities([Cap.CLIPBOARD_BY_DEMAND], request=True)
    assert msg.data == struct.pack("<II", 1, 1 << 5)
    assert vdagent.decode_capabilities(msg) == (True, (Cap.CLIPBOARD_BY_DEMAND,))
    # QEMU 7.2's answer as seen in the guest: request=0, BY_DEMAND | SELECTION | GRAB_SERIAL (mouse=off)
    qemu = bytes.fromhex("010000001c000000010000000600000000000000000000000800000000000000"
                         "60000200")
    [(port, answer)] = vdagent.iter_messages(qemu)
    request, caps = vdagent.decode_capabilities(answer)
    assert port == 1 and not request
    assert caps == (Cap.CLIPBOARD_BY_DEMAND, Cap.CLIPBOARD_SELECTION, Cap.CLIPBOARD_GRAB_SERIAL)


def test_clipboard_data_request_release_roundtrip():
    data = vdagent.clipboard_data("hola ñ")
    assert data.data == struct.pack("<I", 1) + "hola ñ".encode()
    body = vdagent.decode_clipboard(vdagent.decode_message(vdagent.encode_message(data)))
    assert body.type == ClipboardType.UTF8_TEXT and body.text == "hola ñ"
    req = vdagent.decode_clipboard(vdagent.clipboard_request())
    assert req.type == ClipboardType.UTF8_TEXT and req.data == b""
    assert vdagent.clipboard_release().data == b""


def test_selection_prefix_and_serial():
    grab = vdagent.clipboard_grab([1], selection=1, serial=7)
    assert grab.data == bytes([1, 0, 0, 0]) + struct.pack("<II", 7, 1)
    body = vdagent.decode_clipboard(grab, with_selection=True, with_serial=True)
    assert body.selection == 1 and body.types == (1,)


def test_stream_decoder_reassembles_chunks_fed_byte_by_byte():
    text = "x" * 5000
    wire = vdagent.encode_chunks(vdagent.clipboard_data(text), chunk_size=1024)
    assert wire.count(struct.pack("<I", 1)) >= 5  # several chunk headers
    decoder = vdagent.StreamDecoder()
    out = []
    for i in range(len(wire)):
        out += decoder.feed(wire[i:i + 1])
    assert len(out) == 1 and vdagent.decode_clipboard(out[0][1]).text == text and decoder.pending == 0


def test_malformed_input_is_refused():
    with pytest.raises(vdagent.VDAgentProtocolError):
        vdagent.decode_message(b"\x01\x00")
    with pytest.raises(vdagent.VDAgentProtocolError):
        vdagent.decode_message(struct.pack("<IIQI", 1, 4, 0, 10) + b"abc")
    with pytest.raises(vdagent.VDAgentProtocolError):
        list(vdagent.iter_messages(struct.pack("<II", 1, 30) + b"short"))


def test_describe_and_hexdump():
    assert vdagent.describe(vdagent.clipboard_grab()) == "VD_AGENT_CLIPBOARD_GRAB types=[UTF8_TEXT]"
    assert vdagent.describe(vdagent.clipboard_data("a")) == "VD_AGENT_CLIPBOARD type=UTF8_TEXT data='a'"
    assert vdagent.describe(Message(MsgType.MOUSE_STATE, b"\0" * 16)) == "VD_AGENT_MOUSE_STATE size=16"
    assert vdagent.hexdump(b"AB\x00").startswith("0000  41 42 00")


def test_parse_trace_of_an_agent_log():
    log = ("out " + vdagent.encode_chunks(vdagent.announce_capabilities([5])).hex() + "\nready\n"
           "in " + vdagent.encode_chunks(vdagent.clipboard_grab()).hex() + "\n")
    entries = parse_trace(log)
    assert [e.direction for e in entries] == ["out", "in"]
    assert str(entries[1]) == "QEMU → invitado: VD_AGENT_CLIPBOARD_GRAB types=[UTF8_TEXT]"


def test_rfb_messages():
    assert rfb.client_cut_text("hé") == b"\x06\x00\x00\x00\x00\x00\x00\x03h\xc3\xa9"
    assert rfb.set_encodings([0, rfb.CLIPBOARD_EXT]) == b"\x02\x00\x00\x02\x00\x00\x00\x00\xc0\xa1\xe5\xce"
    ext = rfb.extended_cut_text(rfb.CB_REQUEST | rfb.CB_TEXT)
    assert ext == b"\x06\x00\x00\x00" + struct.pack(">iI", -4, (1 << 25) | 1)
    assert rfb.parse_provide(rfb.provide_text("ñ")) == "ñ"
    assert rfb.parse_provide(zlib.compress(struct.pack(">I", 2) + b"ok")) == "ok"  # QEMU: no NUL

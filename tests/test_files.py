"""Agent file copy: the qemu-ga messages (pure) and the copy logic against a fake agent."""

from __future__ import annotations

import base64
import hashlib

import pytest

from labkit.devices import files
from labkit.errors import InputError


class FakeGuest:
    """qemu-ga's file calls over a dict (enough to test chunking and checksums)."""

    backend = "fake"

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.handles: dict[int, list] = {}
        self.calls: list[str] = []

    def agent(self, command, **a):
        self.calls.append(command)
        if command == "guest-file-open":
            h = 1000 + len(self.handles)
            if "w" in a["mode"]:
                self.files[a["path"]] = b""
            self.handles[h] = [a["path"], 0]
            return h
        if command == "guest-file-write":
            self.files[self.handles[a["handle"]][0]] += base64.b64decode(a["buf-b64"])
            return {"count": 0}
        if command == "guest-file-read":
            path, pos = self.handles[a["handle"]]
            data = self.files[path][pos:pos + a["count"]]
            self.handles[a["handle"]][1] += len(data)
            return {"count": len(data), "buf-b64": base64.b64encode(data).decode(),
                    "eof": pos + len(data) >= len(self.files[path])}
        if command == "guest-file-close":
            return {}
        raise AssertionError(command)

    def run(self, command, **_):
        class R:
            ok = True
            stderr = ""
        r = R()
        r.stdout = hashlib.sha256(self.files[command[1]]).hexdigest() + "  " + command[1]
        return r


def test_round_trip_in_chunks(tmp_path):
    data = bytes(range(256)) * 5000
    (tmp_path / "in.bin").write_bytes(data)
    g = FakeGuest()
    up = files.copy_to_guest(g, tmp_path / "in.bin", "/root/x.bin", chunk=100_000)
    assert up.ok and up.chunks == 13 and g.files["/root/x.bin"] == data
    assert up.commands[0] == '{"execute": "guest-file-open", "arguments": {"path": "/root/x.bin", "mode": "wb"}}'
    assert "caracteres base64" in up.commands[1]
    down = files.copy_from_guest(g, "/root/x.bin", tmp_path / "out.bin", chunk=100_000)
    assert down.ok and (tmp_path / "out.bin").read_bytes() == data
    assert down.sha256_host == hashlib.sha256(data).hexdigest()
    assert "coinciden" in down.summary()


def test_messages():
    assert files.open_message("/x", "rb") == ("guest-file-open", {"path": "/x", "mode": "rb"})
    assert files.write_message(7, b"hola") == ("guest-file-write", {"handle": 7, "buf-b64": "aG9sYQ=="})
    assert files.read_message(7, 10) == ("guest-file-read", {"handle": 7, "count": 10})
    assert files.close_message(7) == ("guest-file-close", {"handle": 7})


def test_refuses_bad_paths(tmp_path):
    with pytest.raises(InputError):
        files.copy_to_guest(FakeGuest(), tmp_path / "missing", "/root/x")
    (tmp_path / "a").write_text("x")
    with pytest.raises(InputError):
        files.copy_to_guest(FakeGuest(), tmp_path / "a", "relativa.txt")


def test_copy_from_guest_keeps_an_existing_host_file(tmp_path):
    g = FakeGuest()
    g.files["/root/x.bin"] = b"nuevo"
    mine = tmp_path / "mio.txt"
    mine.write_bytes(b"no me pises")
    with pytest.raises(InputError, match="no se sobrescribe"):
        files.copy_from_guest(g, "/root/x.bin", mine)
    assert mine.read_bytes() == b"no me pises"
    files.copy_from_guest(g, "/root/x.bin", mine, overwrite=True)
    assert mine.read_bytes() == b"nuevo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mio.txt"]  # no partial file left

"""The initramfs container: newc cpio archives, written and read."""

from __future__ import annotations

import gzip
import stat
import zlib
from pathlib import Path
from typing import IO

from ..errors import SetupError

__all__ = ["CpioWriter", "list_cpio", "read_cpio"]

# --------------------------------------------------------------------------- cpio (newc)


class CpioWriter:
    """A newc ("070701") archive, what the kernel unpacks as initramfs. Deterministic."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name_b = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
                  0, 0, rdev[0], rdev[1], len(name_b), 0)
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + name_b + b"\0" * (-(len(header) + len(name_b)) % 4))
        self._out.write(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str, mode: int = 0o755) -> None:
        name = name.strip("/")
        if not name or name in self._dirs:
            return
        self.dir(name.rsplit("/", 1)[0] if "/" in name else "")
        self._dirs.add(name)
        self._entry(name, stat.S_IFDIR | mode)

    def _parent(self, name: str) -> str:
        name = name.strip("/")
        if "/" in name:
            self.dir(name.rsplit("/", 1)[0])
        return name

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(self._parent(name), stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(self._parent(name), stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(self._parent(name), stat.S_IFCHR | mode, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)


def list_cpio(path: Path) -> dict[str, int]:
    """{name: mode} of a newc cpio (plain or gzip). Raises SetupError when it is truncated."""
    return {name: mode for name, mode, _data in read_cpio(path)}


def read_cpio(path: Path) -> list[tuple[str, int, bytes]]:
    """(name, mode, data) of each entry of a newc cpio (plain or gzip); SetupError if damaged."""
    hint = "Reconstrúyelo: labkit guest build --rebuild"
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise SetupError(f"El initramfs {path} está dañado ({err}).", hint) from err
    entries = []
    pos = 0
    while True:
        if pos + 110 > len(data) or data[pos: pos + 6] != b"070701":
            raise SetupError(f"El initramfs {path} está truncado o dañado (byte {pos}).", hint)
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_end = pos + 110 + namesize
        name = data[pos + 110: name_end - 1].decode()
        pos = name_end + (-name_end % 4)
        if name == "TRAILER!!!":
            return entries
        if pos + size > len(data):
            raise SetupError(f"El initramfs {path} está truncado ({name}).", hint)
        entries.append((name, mode, data[pos: pos + size]))
        pos += size + (-size % 4)

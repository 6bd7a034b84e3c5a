"""Seeing TCG translate: a 64 KiB "BIOS" with six real-mode instructions, run once by QEMU with
``-d in_asm,op,out_asm``; the log shows, per translation block, the guest instructions, the TCG
intermediate ops and the host (x86-64) code QEMU generated for them.

The program ends by writing to an ``isa-debug-exit`` port, so QEMU exits by itself (bounded: a
timeout kills it anyway). No kernel, no firmware: only our instructions are translated.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ToolMissingError

__all__ = [
    "PROGRAM",
    "Block",
    "Translation",
    "bios_image",
    "parse_info_jit",
    "parse_log",
    "translate",
    "translation_argv",
]

#: (assembly, machine code, Spanish comment); loaded at F000:0000 (physical 0xF0000)
PROGRAM: tuple[tuple[str, bytes, str], ...] = (
    ("mov ax, 0x1234", b"\xb8\x34\x12", "AX = 0x1234"),
    ("add ax, 0x0042", b"\x05\x42\x00", "AX = AX + 0x42 (y los indicadores: acarreo, cero...)"),
    ("mov bx, ax", b"\x89\xc3", "BX = AX"),
    ("shl bx, 1", b"\xd1\xe3", "BX = BX · 2"),
    ("mov al, 0x00", b"\xb0\x00", "AL = 0: el código de salida"),
    ("out 0xf4, al", b"\xe6\xf4", "escribe en el puerto 0xf4 (isa-debug-exit): QEMU termina"),
)
_EXIT_PORT = 0xF4


def bios_image(path: Path) -> Path:
    """64 KiB mapped just below 4 GiB: the program at offset 0, and at the reset vector
    (offset 0xFFF0, where an x86 CPU starts) a far jump to it."""
    code = b"".join(c for _a, c, _n in PROGRAM) + b"\xf4"  # hlt, never reached
    img = bytearray(b"\xf4" * 0x10000)
    img[: len(code)] = code
    img[0xFFF0:0xFFF5] = b"\xea\x00\x00\x00\xf0"  # jmp far F000:0000
    path.write_bytes(bytes(img))
    return path


def translation_argv(bios: Path, log: Path, binary: str = "qemu-system-x86_64") -> list[str]:
    return [binary, "-name", "labkit-bench-tcg-log", "-machine", "pc", "-accel", "tcg", "-nodefaults",
            "-no-user-config", "-display", "none", "-bios", str(bios), "-m", "16",
            "-device", f"isa-debug-exit,iobase={_EXIT_PORT:#x},iosize=1",
            "-d", "in_asm,op,out_asm", "-D", str(log)]


@dataclass(frozen=True)
class Block:
    """One translation block: its guest address and the three views of it."""

    address: int
    guest: tuple[str, ...]
    ops: tuple[str, ...]
    host: tuple[str, ...]


@dataclass(frozen=True)
class Translation:
    argv: tuple[str, ...]
    blocks: tuple[Block, ...]
    exit_status: int | None
    log_lines: int

    def block(self, address: int = 0xF0000) -> Block | None:
        return next((b for b in self.blocks if b.address == address), None)


_IN = re.compile(r"^IN:")
_OP = re.compile(r"^OP:")
_OUT = re.compile(r"^OUT: \[size=\d+\]")
_ADDR = re.compile(r"^(0x[0-9a-f]+):")


def parse_log(text: str) -> list[Block]:
    """Split a ``-d in_asm,op,out_asm`` log into blocks (IN: guest code, OP: TCG ops, OUT: host code)."""
    blocks: list[Block] = []
    section, cur = None, {"IN": [], "OP": [], "OUT": []}
    addr = None

    def flush() -> None:
        nonlocal addr
        if addr is not None:
            blocks.append(Block(addr, tuple(cur["IN"]), tuple(cur["OP"]), tuple(cur["OUT"])))
        addr = None
        for k in cur:
            cur[k] = []

    for raw in text.splitlines():
        line = raw.rstrip()
        if _IN.match(line):
            flush()
            section = "IN"
            continue
        if _OP.match(line):
            section = "OP"
            continue
        if _OUT.match(line):
            section = "OUT"
            continue
        if not line.strip() or set(line.strip()) == {"-"}:
            if section == "OUT" and not line.strip():
                section = None
            continue
        if section == "IN":
            m = _ADDR.match(line)
            if m and addr is None:
                addr = int(m.group(1), 16)
            cur["IN"].append(line)
        elif section in ("OP", "OUT"):
            cur[section].append(line.strip() if section == "OP" else line)
    flush()
    return blocks


def translate(timeout: float = 20.0, binary: str = "qemu-system-x86_64") -> Translation:
    """Run the program under TCG with translation logging; returns the parsed blocks."""
    if shutil.which(binary) is None:
        raise ToolMissingError(binary, "qemu-system-x86")
    with tempfile.TemporaryDirectory(prefix="labkit-bench-tcg-") as tmp:
        bios, log = bios_image(Path(tmp) / "bios.bin"), Path(tmp) / "tcg.log"
        argv = translation_argv(bios, log, binary)
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False)
            status: int | None = done.returncode
        except subprocess.TimeoutExpired:
            status = None  # subprocess.run killed it
        text = log.read_text(errors="replace") if log.exists() else ""
    return Translation(tuple(argv), tuple(parse_log(text)), status, len(text.splitlines()))


def parse_info_jit(text: str) -> dict[str, float]:
    """The numbers of ``info jit``: "TB count 1234", "TB avg target size 17 max=...", ... -> {name: value}."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^\s*([A-Za-z][A-Za-z /()-]*?)\s{2,}(-?\d+(?:\.\d+)?)", line)
        if m:
            values.setdefault(m.group(1).strip(), float(m.group(2)))
    return values

"""Small real-mode guest programs for the teaching VMM (:mod:`labkit.kvmapi`).

Each program is a list of documented lines (assembly, machine code, a Spanish
comment) so a notebook can print its listing; the bytes were checked against
``objdump -D -b binary -mi8086``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import InputError

SERIAL_PORT = 0x3F8  # COM1's data register (a 16550 UART): write = send, read = receive

__all__ = ["SERIAL_PORT", "Line", "Program", "hello_program", "sum_program", "loop_program", "mmio_program", "spin_program"]


@dataclass(frozen=True)
class Line:
    """One line of a listing: Intel-syntax assembly, its machine code, a comment."""

    asm: str
    code: bytes
    comment: str = ""
    label: str = ""

    @property
    def is_data(self) -> bool:
        return self.asm.startswith("db ")


@dataclass(frozen=True)
class Program:
    """A real-mode guest program: documented lines of machine code loaded at ``origin``."""

    name: str
    lines: tuple[Line, ...]
    origin: int = 0x1000
    instructions: int | None = None  # how many it executes, when that is known in advance
    description: str = ""

    @property
    def code(self) -> bytes:
        return b"".join(line.code for line in self.lines)

    @property
    def labels(self) -> dict[str, int]:
        """Guest address of every label."""
        out, addr = {}, self.origin
        for line in self.lines:
            if line.label:
                out[line.label] = addr
            addr += len(line.code)
        return out

    def listing(self) -> str:
        """The program as an assembler listing: address, bytes, instruction, comment."""
        rows, addr = [], self.origin
        for line in self.lines:
            long_data = line.is_data and len(line.code) > 6
            hexcode = (line.code[:5] if long_data else line.code).hex(" ").upper() + (" …" if long_data else "")
            label = f"{line.label}:" if line.label else ""
            rows.append(f"{addr:04x}  {hexcode:<20} {label:<12} {line.asm:<26} ; {line.comment}".rstrip(" ;"))
            addr += len(line.code)
        return "\n".join(rows)


def _le16(v: int) -> bytes:
    return struct.pack("<H", v)


def _le32(v: int) -> bytes:
    return struct.pack("<I", v)


def hello_program(message: str = "Hola desde el invitado\n") -> Program:
    """Write ``message`` to the serial port one byte at a time (``out dx, al``), then HLT."""
    raw = message.encode()
    if b"\0" in raw:
        raise InputError("El mensaje no puede contener el byte 0: marca el final.", "Quita el carácter \\0.")
    org = 0x1000
    msg = org + 15  # the code below is 15 bytes long
    lines = (
        Line("mov dx, 0x3f8", b"\xba" + _le16(SERIAL_PORT), "DX = puerto de datos del UART COM1"),
        Line(f"mov si, {msg:#x}", b"\xbe" + _le16(msg), "SI = dirección del mensaje"),
        Line("lodsb", b"\xac", "AL = byte en DS:SI; SI = SI + 1", label="siguiente"),
        Line("test al, al", b"\x84\xc0", "¿es el 0 del final?"),
        Line("jz fin", b"\x74\x03", "sí: a fin"),
        Line("out dx, al", b"\xee", "envía AL al puerto: salida de VM (KVM_EXIT_IO)"),
        Line("jmp siguiente", b"\xeb\xf8", "a por el siguiente byte"),
        Line("hlt", b"\xf4", "detiene la CPU: salida de VM (KVM_EXIT_HLT)", label="fin"),
        Line(f"db {message!r}, 0", raw + b"\0", "el mensaje, terminado en 0", label="mensaje"),
    )
    # 2 instructions to start; 5 per byte (lodsb test jz out jmp); 4 at the end (lodsb test jz hlt)
    return Program("hola", lines, org, 6 + 5 * len(raw),
                   "Escribe un mensaje en el puerto serie, byte a byte, y se detiene.")


def sum_program() -> Program:
    """Read two decimal numbers from the serial port, print their sum in decimal, HLT.

    Numbers end at any non-digit (e.g. ``"1234 5678\\n"``); when the input runs
    out the port reads 0, which also ends a number. 32-bit arithmetic (the
    ``0x66`` prefix turns a 16-bit instruction into its 32-bit form).
    """
    lines = (
        Line("mov dx, 0x3f8", b"\xba" + _le16(SERIAL_PORT), "DX = puerto serie"),
        Line("call leer_numero", b"\xe8\x2c\x00", "EAX = primer número"),
        Line("mov ebx, eax", b"\x66\x89\xc3", "guárdalo en EBX"),
        Line("call leer_numero", b"\xe8\x26\x00", "EAX = segundo número"),
        Line("add eax, ebx", b"\x66\x01\xd8", "EAX = la suma"),
        Line("mov ecx, 10", b"\x66\xb9" + _le32(10), "vamos a dividir entre 10"),
        Line("xor di, di", b"\x31\xff", "DI = cuántas cifras"),
        Line("xor edx, edx", b"\x66\x31\xd2", "EDX:EAX = el número", label="dividir"),
        Line("div ecx", b"\x66\xf7\xf1", "EAX = cociente, EDX = resto (la última cifra)"),
        Line("push dx", b"\x52", "guarda la cifra (salen al revés)"),
        Line("inc di", b"\x47", ""),
        Line("test eax, eax", b"\x66\x85\xc0", "¿queda algo?"),
        Line("jnz dividir", b"\x75\xf3", ""),
        Line("mov dx, 0x3f8", b"\xba" + _le16(SERIAL_PORT), "DX = puerto serie otra vez"),
        Line("pop ax", b"\x58", "cifras en orden", label="escribir"),
        Line("add al, '0'", b"\x04\x30", "cifra -> carácter ASCII"),
        Line("out dx, al", b"\xee", "salida de VM (KVM_EXIT_IO, out)"),
        Line("dec di", b"\x4f", ""),
        Line("jnz escribir", b"\x75\xf9", ""),
        Line("mov al, 10", b"\xb0\x0a", "'\\n'"),
        Line("out dx, al", b"\xee", ""),
        Line("hlt", b"\xf4", "fin (KVM_EXIT_HLT)"),
        Line("xor ecx, ecx", b"\x66\x31\xc9", "ECX = 0, el número que se lee", label="leer_numero"),
        Line("in al, dx", b"\xec", "AL = byte del puerto: salida de VM (KVM_EXIT_IO, in)", label="otro"),
        Line("sub al, '0'", b"\x2c\x30", "carácter -> cifra"),
        Line("cmp al, 9", b"\x3c\x09", ""),
        Line("ja fin_numero", b"\x77\x0d", "no era una cifra: se acabó el número"),
        Line("imul ecx, ecx, 10", b"\x66\x6b\xc9\x0a", "ECX = ECX * 10 ..."),
        Line("movzx eax, al", b"\x66\x0f\xb6\xc0", ""),
        Line("add ecx, eax", b"\x66\x01\xc1", "... + cifra"),
        Line("jmp otro", b"\xeb\xec", ""),
        Line("mov eax, ecx", b"\x66\x89\xc8", "devuelve el número en EAX", label="fin_numero"),
        Line("ret", b"\xc3", ""),
    )
    return Program("suma", lines, 0x1000, None,
                   "Lee dos números del puerto serie y escribe su suma en decimal.")


def loop_program(iterations: int) -> Program:
    """Count ECX down from ``iterations`` to 0 (``dec``/``jnz``), then HLT: 2 instructions a turn."""
    if not 1 <= iterations < 2**32:
        raise InputError("El número de vueltas debe estar entre 1 y 4294967295 (cabe en ECX).",
                         "Elige otro número de vueltas.")
    lines = (
        Line(f"mov ecx, {iterations}", b"\x66\xb9" + _le32(iterations), "ECX = vueltas"),
        Line("dec ecx", b"\x66\x49", "ECX = ECX - 1", label="otra"),
        Line("jnz otra", b"\x75\xfc", "repite mientras ECX != 0"),
        Line("hlt", b"\xf4", "fin (KVM_EXIT_HLT)"),
    )
    return Program("bucle", lines, 0x1000, 2 * iterations + 2,
                   f"Un bucle de {iterations} vueltas sin E/S: solo cuenta.")


def mmio_program() -> Program:
    """Store 'H' (grey on black) in the first cell of VGA text memory, 0xb8000: no RAM there."""
    lines = (
        Line("mov ax, 0xb800", b"\xb8\x00\xb8", "segmento de la memoria de texto VGA"),
        Line("mov es, ax", b"\x8e\xc0", "ES:0 = dirección física 0xb8000"),
        Line("mov word [es:0], 0x0748", b"\x26\xc7\x06\x00\x00\x48\x07",
             "'H' gris sobre negro: no hay RAM ahí -> KVM_EXIT_MMIO"),
        Line("hlt", b"\xf4", "fin (KVM_EXIT_HLT)"),
    )
    return Program("mmio", lines, 0x1000, 4, "Escribe en la memoria de vídeo: una salida MMIO.")


def spin_program() -> Program:
    """``jmp $``: a guest that never stops (for the time limit)."""
    return Program("bucle-infinito", (Line("jmp $", b"\xeb\xfe", "salta a sí misma, para siempre", "aqui"),),
                   0x1000, None, "Un bucle sin fin: nunca llega a HLT.")

"""Machines without an agent: firmware, option ROMs and standalone programs.

:class:`labkit.Guest` boots labkit's own Linux and talks to it through qemu-ga.
A :class:`Machine` boots anything else a PC can boot (the BIOS alone, a UEFI
shell, memtest86+, the iPXE network ROM, an ISO image) and can only *watch* it:
its serial console, SeaBIOS's debug port, and its screen::

    spec = MachineSpec(name="labkit-bios")          # q35, 256 MiB, SeaBIOS, no disks
    with Machine(spec) as m:
        m.wait_for("No bootable device", source="debugcon")
        print(m.screen_text())                      # the VGA text screen, as text
        png = m.screendump()                        # the same screen, as a PNG

Same shape as the guest engine: a frozen :class:`MachineSpec` (data), a pure
:func:`build_machine_argv` (unit-tested) and a runner that owns the process.
Same guarantees too: QEMU dies with the Python process that started it
(parent-death signal), its sockets, logs and UEFI variable store live in a
private runtime dir removed by :meth:`Machine.stop`, and a dir left by a killed
notebook kernel is swept by the next start. A network card, if any, uses QEMU's
user-mode network with ``restrict=on``: the guest gets DHCP from QEMU and
nothing else; no packet leaves it.

The demos of notebook 08 are in :func:`demo`: SeaBIOS, OVMF's UEFI shell,
memtest86+ and iPXE, each with the marker that says it has come up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
import time
import weakref
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from re import Pattern
from typing import Any

from .errors import HostError, InputError, ToolMissingError
from .guest.argv import QEMU, SANDBOX, opts, shell_line
from .guest.runner import spawn_qemu, terminate_qemu, choose_accel, runtime_base, sweep_stale, sandbox_supported
from .guest.spec import ACCELERATORS, labkit_name, parse_memory

__all__ = [
    "MachineSpec",
    "DriveSpec",
    "UefiFirmware",
    "MachineRuntime",
    "Machine",
    "Mark",
    "MachineError",
    "MachineStartError",
    "MarkerTimeout",
    "build_machine_argv",
    "strip_ansi",
    "decode_vga_text",
    "png_size",
    "ppm_to_png",
    "key_sequence",
    "Demo",
    "DEMOS",
    "demo",
    "find_ovmf",
    "find_memtest",
    "find_nic_rom",
    "MACHINE_TYPES",
    "VGA_MODELS",
    "SOURCES",
]

MACHINE_TYPES = ("q35", "pc")
VGA_MODELS = ("std", "cirrus", "virtio", "none")
SOURCES = ("serial", "debugcon", "screen")
_DEVICE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,40}$")
_BOOT = re.compile(r"^[a-p]{1,8}$")
SEABIOS_DEBUG_PORT = 0x402  # where QEMU's SeaBIOS (and OVMF's debug builds) print their log
VGA_TEXT_ADDRESS = 0xB8000  # colour text mode: 80x25 cells of (character, attribute)


class MachineError(HostError):
    """Something went wrong with a machine (firmware, ROM or program) run by QEMU."""


class MachineStartError(MachineError):
    """QEMU did not start, or its QMP socket never answered."""


class MarkerTimeout(MachineError):
    """The awaited text did not appear in time."""


# ---------------------------------------------------------------- the spec (data)
@dataclass(frozen=True)
class DriveSpec:
    """A disk or CD-ROM image attached at boot (``-drive``). Read-only unless told otherwise."""

    path: str
    format: str = "raw"
    media: str = "disk"  # disk | cdrom
    interface: str = "ide"  # ide (AHCI on q35) | virtio | floppy
    readonly: bool = True

    def __post_init__(self) -> None:
        if not self.path:
            raise InputError("Falta la ruta de la imagen.", "Indica el fichero de la imagen (disco o ISO).")
        if self.format not in ("raw", "qcow2"):
            raise InputError(f"Formato de imagen no válido: «{self.format}».", "Usa «raw» o «qcow2».")
        if self.media not in ("disk", "cdrom"):
            raise InputError(f"Tipo de medio no válido: «{self.media}».", "Usa «disk» o «cdrom».")
        if self.interface not in ("ide", "virtio", "floppy"):
            raise InputError(f"Interfaz no válida: «{self.interface}».", "Usa «ide», «virtio» o «floppy».")
        if self.media == "cdrom" and self.interface != "ide":
            raise InputError("Un CD-ROM va en la interfaz «ide».", "Quita interface= o usa interface=\"ide\".")


@dataclass(frozen=True)
class UefiFirmware:
    """UEFI firmware in two flash chips: the code (read-only) and a template of the variable
    store, which the runner copies into the machine's private dir (the firmware writes to it)."""

    code: str
    vars_template: str


@dataclass(frozen=True)
class MachineSpec:
    """A PC without an agent: board, memory, firmware and what to boot, as data.

    ``bios`` replaces SeaBIOS (``-bios``); ``uefi`` boots UEFI firmware from flash instead;
    ``kernel``/``append``/``initrd`` boot a program that speaks the Linux boot protocol
    (memtest86+ does); ``nic`` adds a network card of that model on a user-mode network
    with ``restrict=on``; ``boot`` is QEMU's boot order (``c`` disk, ``d`` CD-ROM, ``n``
    network) and ``boot_strict`` keeps the firmware from trying devices not in it; ``serial`` and
    ``debugcon`` send COM1 and SeaBIOS's debug port (0x402) to files.
    """

    name: str = "labkit-machine"
    machine: str = "q35"
    memory: int | str = 256
    accel: str = "auto"
    bios: str | None = None
    uefi: UefiFirmware | None = None
    kernel: str | None = None
    append: str = ""
    initrd: str | None = None
    drives: tuple[DriveSpec, ...] = field(default=())
    nic: str | None = None
    boot: str | None = None
    boot_menu: bool = False
    boot_strict: bool = False
    vga: str = "std"
    serial: bool = True
    debugcon: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", labkit_name(self.name, "máquina"))
        object.__setattr__(self, "memory", parse_memory(self.memory))
        if self.machine not in MACHINE_TYPES:
            raise InputError(f"Tipo de máquina no válido: «{self.machine}».",
                             "Usa «q35» (PC moderno, PCIe) o «pc» (i440FX, de 1996): las dos tienen BIOS y VGA.")
        if self.accel not in ACCELERATORS:
            raise InputError(f"Acelerador no válido: «{self.accel}».", "Usa «auto», «kvm» o «tcg».")
        if self.vga not in VGA_MODELS:
            raise InputError(f"Tarjeta gráfica no válida: «{self.vga}».", "Usa " + ", ".join(VGA_MODELS) + ".")
        if self.bios and self.uefi:
            raise InputError("Se han pedido a la vez una BIOS (bios=) y un firmware UEFI (uefi=).",
                             "Elige uno: la máquina arranca con un solo firmware.")
        if (self.append or self.initrd) and not self.kernel:
            raise InputError("append= e initrd= solo tienen sentido con kernel=.", "Indica también kernel=.")
        for label, value in (("bios", self.bios), ("kernel", self.kernel), ("initrd", self.initrd),
                             ("append", self.append)):
            if value is not None and ("\n" in value or "\0" in value):
                raise InputError(f"{label}= no puede tener saltos de línea.", "Revisa el valor.")
        if self.nic is not None and not _DEVICE.fullmatch(self.nic):
            raise InputError(f"Modelo de tarjeta de red no válido: «{self.nic}».",
                             "Usa un modelo de QEMU como virtio-net-pci, e1000 o rtl8139.")
        if self.boot is not None and not _BOOT.fullmatch(self.boot):
            raise InputError(f"Orden de arranque no válido: «{self.boot}».",
                             "Usa letras de QEMU: c (disco), d (CD-ROM), n (red), p. ej. «dc» o «n».")
        if self.boot_strict and not self.boot:
            raise InputError("boot_strict= necesita un orden de arranque (boot=).", "Indica boot=, p. ej. «n».")
        object.__setattr__(self, "drives", tuple(self.drives))


# ---------------------------------------------------------------- the pure builder
@dataclass(frozen=True)
class MachineRuntime:
    """Where a running machine keeps its files (a private temp dir)."""

    directory: Path

    @property
    def qmp(self) -> Path:
        return self.directory / "qmp.sock"

    @property
    def serial_log(self) -> Path:
        return self.directory / "serial.log"

    @property
    def debugcon_log(self) -> Path:
        return self.directory / "debugcon.log"

    @property
    def uefi_vars(self) -> Path:
        return self.directory / "uefi-vars.fd"

    @property
    def stderr(self) -> Path:
        return self.directory / "qemu.stderr"

    def log(self, source: str) -> Path:
        return self.serial_log if source == "serial" else self.debugcon_log


def build_machine_argv(spec: MachineSpec, accel: str, runtime: MachineRuntime, *, binary: str = QEMU,
                       sandbox: bool = False) -> list[str]:
    """The exact QEMU command line for ``spec`` under ``accel`` ("kvm" or "tcg"). No I/O.
    ``sandbox``: add ``-sandbox`` (QEMU's seccomp filter), as labkit's guests do, where QEMU has it.

    Values that QEMU parses as ``key=value`` lists go through :func:`qopt` (``,`` -> ``,,``);
    ``-bios``, ``-kernel``, ``-initrd`` and ``-append`` take their argument verbatim.
    """
    if accel not in ("kvm", "tcg"):
        raise InputError(f"Acelerador no válido para QEMU: «{accel}».", "Resuelve «auto» antes: kvm o tcg.")
    argv = [binary, "-name", opts(spec.name, debug_threads=True), "-machine", opts(spec.machine),
            "-accel", opts("kvm") if accel == "kvm" else opts("tcg", thread="single")]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    argv += ["-m", str(spec.memory), "-nodefaults", "-no-user-config", "-display", "none", "-vga", spec.vga]
    if spec.bios:
        argv += ["-bios", spec.bios]
    if spec.uefi:
        argv += ["-drive", opts("", **{"if": "pflash"}, format="raw", unit=0, readonly=True, file=spec.uefi.code),
                 "-drive", opts("", **{"if": "pflash"}, format="raw", unit=1, file=runtime.uefi_vars)]
    if spec.kernel:
        argv += ["-kernel", spec.kernel]
        if spec.initrd:
            argv += ["-initrd", spec.initrd]
        if spec.append:
            argv += ["-append", spec.append]
    if spec.serial:
        argv += ["-chardev", opts("file", id="serial0", path=runtime.serial_log), "-serial", "chardev:serial0"]
    if spec.debugcon:
        argv += ["-chardev", opts("file", id="debugcon", path=runtime.debugcon_log),
                 "-device", opts("isa-debugcon", iobase=hex(SEABIOS_DEBUG_PORT), chardev="debugcon")]
    argv += ["-chardev", opts("socket", id="qmp", path=runtime.qmp, server=True, wait=False),
             "-mon", opts("", chardev="qmp", mode="control")]
    for i, drive in enumerate(spec.drives):
        argv += ["-drive", opts("", file=drive.path, format=drive.format, media=drive.media,
                                **{"if": drive.interface}, index=i if drive.interface == "ide" else None,
                                readonly=drive.readonly)]
    if spec.nic:
        argv += ["-netdev", opts("user", id="net0", restrict=True), "-device", opts(spec.nic, netdev="net0")]
    if spec.boot or spec.boot_menu:
        argv += ["-boot", opts("", order=spec.boot, menu=True if spec.boot_menu else None,
                               strict=True if spec.boot_strict else None)]
    if sandbox:
        argv += ["-sandbox", SANDBOX]
    return argv


# ---------------------------------------------------------------- pure helpers
_ANSI = re.compile(r"\x1b(?:\[[0-9;?=]*[A-Za-z]|[()][A-Za-z0-9]|[=>78])")


def strip_ansi(text: str) -> str:
    """Terminal text as a person reads it: no escape sequences, no ``\\r``, no NULs."""
    return _ANSI.sub("", text).replace("\r", "").replace("\0", "")


def decode_vga_text(data: bytes, columns: int = 80, rows: int = 25) -> str:
    """The characters of a VGA text-mode buffer (code page 437), one line per row,
    trailing spaces and empty last lines removed; attribute bytes are ignored."""
    lines = []
    for r in range(rows):
        cells = data[r * columns * 2:(r + 1) * columns * 2:2]
        text = bytes(max(c, 32) for c in cells).decode("cp437")
        lines.append(text.rstrip())
    return "\n".join(lines).rstrip("\n")


def ppm_to_png(data: bytes) -> bytes:
    """Convert a binary PPM (P6, 8 bits per channel, what QEMU's screendump writes) to PNG."""
    m = re.match(rb"P6\s+(\d+)\s+(\d+)\s+(\d+)\s", data)
    if not m or int(m.group(3)) != 255:
        raise MachineError("La captura no es un PPM de 8 bits.", "Repite la captura; si persiste, mira qemu.stderr.")
    width, height = int(m.group(1)), int(m.group(2))
    pixels = data[m.end():]
    stride = width * 3
    if len(pixels) < stride * height:
        raise MachineError("La captura PPM está incompleta.", "Repite la captura.")
    raw = b"".join(b"\0" + pixels[y * stride:(y + 1) * stride] for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
            + chunk(b"IEND", b""))


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG, checking its signature and IHDR chunk (CRC included)."""
    if len(data) < 33 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise MachineError("La captura no es un PNG válido.", "Repite la captura; si persiste, mira qemu.stderr.")
    length = struct.unpack(">I", data[8:12])[0]
    chunk = data[12:16 + length]
    if struct.unpack(">I", data[16 + length:20 + length])[0] != zlib.crc32(chunk):
        raise MachineError("La captura PNG está dañada (CRC).", "Repite la captura.")
    return struct.unpack(">II", data[16:24])


_SHIFTED = {"_": "minus", ":": "semicolon", "+": "equal", ">": "dot", "<": "comma", "?": "slash",
            '"': "apostrophe", "|": "backslash", "{": "bracket_left", "}": "bracket_right", "~": "grave_accent",
            "!": "1", "@": "2", "#": "3", "$": "4", "%": "5", "^": "6", "&": "7", "*": "8", "(": "9", ")": "0"}
_PLAIN = {" ": "spc", "\n": "ret", "\t": "tab", "-": "minus", "=": "equal", ".": "dot", ",": "comma",
          "/": "slash", ";": "semicolon", "'": "apostrophe", "\\": "backslash", "[": "bracket_left",
          "]": "bracket_right", "`": "grave_accent"}


def key_sequence(text: str) -> list[list[str]]:
    """QMP ``send-key`` qcodes for typing ``text`` on a US keyboard: one chord per character."""
    chords = []
    for ch in text:
        if "a" <= ch <= "z" or "0" <= ch <= "9":
            chords.append([ch])
        elif "A" <= ch <= "Z":
            chords.append(["shift", ch.lower()])
        elif ch in _PLAIN:
            chords.append([_PLAIN[ch]])
        elif ch in _SHIFTED:
            chords.append(["shift", _SHIFTED[ch]])
        else:
            raise InputError(f"No sé teclear «{ch}» con un teclado virtual de EE. UU.",
                             "Usa letras sin tilde, dígitos y signos ASCII.")
    return chords


# ---------------------------------------------------------------- the runner
@dataclass(frozen=True)
class Mark:
    """A marker seen: what, where, and how many seconds after QEMU was started."""

    marker: str
    source: str
    seconds: float


class Machine:
    """A machine run by QEMU directly, watched through its consoles and screen.

    Use it as a context manager, or call :meth:`start` / :meth:`stop`.
    """

    def __init__(self, spec: MachineSpec, *, start_timeout: float = 20.0, binary: str = QEMU) -> None:
        self.spec = spec
        self.start_timeout = start_timeout
        self._binary = binary
        self.accel: str | None = None
        self.accel_reason = ""
        self.argv: list[str] = []
        self.marks: list[Mark] = []
        self._proc: Any = None
        self._runtime: MachineRuntime | None = None
        self._qmp: Any = None
        self._finalizer: Any = None
        self._started = 0.0
        self._cursor = {"serial": 0, "debugcon": 0}
        self._last: dict[str, str] = {}
        self._png: bool | None = None  # does this QEMU write PNG screendumps? (None: not asked yet)

    # ------------------------------------------------------------ lifecycle
    @property
    def pid(self) -> int | None:
        """PID of the QEMU process (setpriv execs QEMU, so the child's pid is QEMU's)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _check_files(self) -> None:
        spec = self.spec
        files = [("la BIOS", spec.bios), ("el programa (kernel=)", spec.kernel), ("el initrd", spec.initrd)]
        if spec.uefi:
            files += [("el código UEFI", spec.uefi.code), ("la plantilla de variables UEFI", spec.uefi.vars_template)]
        files += [("la imagen", d.path) for d in spec.drives]
        for what, path in files:
            if path and not Path(path).is_file():
                raise InputError(f"No existe {what}: {path}.", "Revisa la ruta o instala el paquete que lo trae.")

    def start(self) -> Machine:
        if self.running:
            return self
        if shutil.which(self._binary) is None:
            raise ToolMissingError(self._binary, "qemu-system-x86")
        self._check_files()
        self.accel, self.accel_reason = choose_accel(self.spec.accel)
        sweep_stale()
        directory = Path(tempfile.mkdtemp(prefix=f"{self.spec.name}-", dir=runtime_base()))
        (directory / "owner.pid").write_text(str(os.getpid()))
        runtime = MachineRuntime(directory)
        try:
            if self.spec.uefi:
                shutil.copyfile(self.spec.uefi.vars_template, runtime.uefi_vars)
                runtime.uefi_vars.chmod(0o600)
            self.argv = build_machine_argv(self.spec, self.accel, runtime, binary=self._binary,
                                           sandbox=sandbox_supported(self._binary))
            with open(runtime.stderr, "wb") as stderr:
                self._started = time.monotonic()
                proc = spawn_qemu(self.argv, stderr, interactive=False)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        (directory / "qemu.pid").write_text(str(proc.pid))
        self._proc, self._runtime = proc, runtime
        self._finalizer = weakref.finalize(self, terminate_qemu, proc, directory)
        self._cursor = {"serial": 0, "debugcon": 0}
        self.marks = []
        try:
            self._connect(self._started + self.start_timeout)
        except BaseException:  # a failed start, or Ctrl-C / a notebook interrupt meanwhile
            self._stop_process()
            raise
        return self

    def _connect(self, deadline: float) -> None:
        from qemu.qmp import QMPClient

        from .guest.aio import run_sync

        assert self._runtime is not None
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self.running:
                raise MachineStartError("QEMU terminó al arrancar.\n" + self._stderr_tail(),
                                        "Lee el mensaje de QEMU de arriba: suele ser un fichero o una opción.")
            if self._runtime.qmp.exists():
                client = QMPClient(self.spec.name)
                try:
                    run_sync(client.connect(str(self._runtime.qmp)), timeout=5)
                    self._qmp = client
                    return
                except Exception as err:  # noqa: BLE001 - retried until the deadline
                    last = err
            time.sleep(0.02)
        raise MachineStartError(f"QEMU no abrió su socket QMP en {self.start_timeout:g} s ({last}).",
                                "El equipo puede estar muy cargado: sube start_timeout.")

    def _stderr_tail(self) -> str:
        try:
            assert self._runtime is not None
            lines = self._runtime.stderr.read_text(errors="replace").strip().splitlines()[-8:]
        except (OSError, AssertionError):
            return ""
        return "QEMU dijo:\n  " + "\n  ".join(lines) if lines else ""

    def _stop_process(self) -> None:
        if self._runtime is not None:
            for source in ("serial", "debugcon"):
                self._last[source] = self._read(source)
        if self._qmp is not None:
            from .guest.aio import run_sync

            try:
                run_sync(self._qmp.disconnect(), timeout=5)
            except Exception:  # noqa: BLE001, S110 - the process is going away anyway
                pass
            self._qmp = None
        if self._finalizer is not None:
            self._finalizer()  # terminate + remove the private dir, exactly once
            self._finalizer = None
        self._runtime = None

    def stop(self) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL) and remove its private dir. Safe to call twice."""
        self._stop_process()

    def __enter__(self) -> Machine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ watching it
    def _need_running(self) -> MachineRuntime:
        if self._runtime is None or not self.running:
            raise MachineError("La máquina no está en marcha.", "Arráncala con start() o con «with Machine(...)».")
        return self._runtime

    def _read(self, source: str) -> str:
        if self._runtime is None:
            return self._last.get(source, "")
        try:
            return self._runtime.log(source).read_bytes().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def console(self, source: str = "serial", *, raw: bool = False, tail: int | None = None) -> str:
        """What the machine printed on COM1 (``serial``) or on port 0x402 (``debugcon``),
        without terminal escape sequences unless ``raw``; ``tail`` keeps the last lines."""
        if source not in ("serial", "debugcon"):
            raise InputError(f"Consola no válida: «{source}».", "Usa «serial» o «debugcon» (o screen_text()).")
        text = self._read(source)
        if not raw:
            text = strip_ansi(text)
        if tail is not None:
            text = "\n".join(text.rstrip("\n").splitlines()[-tail:])
        return text

    def _vga_text(self) -> str:
        runtime = self._need_running()
        dump = runtime.directory / "vga-text.bin"
        self.qmp("pmemsave", val=VGA_TEXT_ADDRESS, size=80 * 25 * 2, filename=str(dump))
        try:
            return decode_vga_text(dump.read_bytes())
        finally:
            dump.unlink(missing_ok=True)

    def screen_text(self) -> str:
        """The VGA screen as text, read from the text-mode buffer at 0xB8000 (QMP ``pmemsave``).

        Only for text mode (BIOS, iPXE, memtest86+ under BIOS); a graphical screen (UEFI) has
        no characters to read: use :meth:`screendump`.
        """
        width, height = png_size(self.screendump())
        if (width, height) not in ((720, 400), (640, 400)):
            raise MachineError(f"La pantalla está en modo gráfico ({width}x{height}): no hay texto que leer.",
                               "Usa screendump() para ver la imagen, o console() para la consola serie.")
        return self._vga_text()

    def screendump(self) -> bytes:
        """The screen as a PNG: QMP ``screendump`` with ``format: png`` (QEMU >= 7.1); older QEMU
        only writes PPM, which is converted here."""
        runtime = self._need_running()
        path = runtime.directory / "screen.img"
        try:
            if self._png is not False:
                try:
                    self.qmp("screendump", filename=str(path), format="png")
                    self._png = True
                    return path.read_bytes()
                except MachineError as err:
                    if self._png or "format" not in err.message:
                        raise
                    self._png = False  # QEMU < 7.1: no format argument
            self.qmp("screendump", filename=str(path))
            return ppm_to_png(path.read_bytes())
        finally:
            path.unlink(missing_ok=True)

    def wait_for(self, marker: str | Pattern[str], timeout: float = 60.0, *, source: str = "serial") -> float:
        """Wait until ``marker`` (text or compiled regex) appears; return the seconds since QEMU started.

        On ``serial`` and ``debugcon`` each match consumes the text up to it (as ``expect`` does),
        so waiting twice for a prompt waits for a *new* prompt. ``screen`` looks at the VGA text
        screen as it is now.
        """
        return self._await(marker, timeout, source)[0]

    def _await(self, marker: str | Pattern[str], timeout: float, source: str) -> tuple[float, int]:
        """(seconds since start, where the match starts in the cleaned text)."""
        if source not in SOURCES:
            raise InputError(f"Origen no válido: «{source}».", "Usa «serial», «debugcon» o «screen».")
        self._need_running()
        pattern = marker if isinstance(marker, re.Pattern) else re.compile(re.escape(marker))
        label = pattern.pattern if isinstance(marker, re.Pattern) else str(marker)
        deadline = time.monotonic() + timeout
        poll = 0.25 if source == "screen" else 0.05
        while True:
            now = time.monotonic()
            if source == "screen":
                found = pattern.search(self._vga_text())
            else:
                found = pattern.search(strip_ansi(self._read(source)), self._cursor[source])
                if found:
                    self._cursor[source] = found.end()
            if found:
                mark = Mark(label, source, now - self._started)
                self.marks.append(mark)
                return mark.seconds, found.start()
            if not self.running:
                raise MachineError(f"QEMU terminó antes de que apareciera «{label}».\n" + self._stderr_tail(),
                                   "Mira console() o el mensaje de QEMU.")
            if now > deadline:
                seen = (self._vga_text() if source == "screen" else self.console(source, tail=8)).strip()
                raise MarkerTimeout(f"«{label}» no apareció en {source} en {timeout:g} s. Lo último:\n{seen[-800:]}",
                                    "Con TCG todo va más lento: sube timeout; o revisa la máquina y el marcador.")
            time.sleep(poll)

    def send_line(self, line: str, prompt: str | Pattern[str], timeout: float = 30.0, *,
                  source: str = "serial") -> str:
        """Type ``line`` and Enter, wait for the next ``prompt`` on ``source`` and return what the
        machine printed in between (without the echo of the line itself)."""
        if source not in ("serial", "debugcon"):
            raise InputError("send_line() lee la respuesta de «serial» o «debugcon».", "Usa source=\"serial\".")
        begin = self._cursor[source]
        self.type_text(line + "\n")
        _, end = self._await(prompt, timeout, source)
        lines = strip_ansi(self._read(source))[begin:end].splitlines()
        while lines and (not lines[0].strip() or lines[0].rstrip().endswith(line)):
            lines.pop(0)
        return "\n".join(lines).rstrip()

    # ------------------------------------------------------------ acting on it
    def qmp(self, command: str, **arguments: Any) -> Any:
        """Send a QMP command to QEMU (e.g. "query-status") and return its answer."""
        self._need_running()
        from qemu.qmp import ExecuteError

        from .guest.aio import run_sync

        try:
            return run_sync(self._qmp.execute(command, arguments or None), timeout=30)
        except ExecuteError as err:
            raise MachineError(f"QEMU rechazó «{command}»: {err.error.error.desc}",
                               "Revisa el nombre y los argumentos en la referencia de QMP.") from err

    def press(self, *keys: str, hold_ms: int = 80) -> None:
        """Press a chord of QEMU key codes at once, e.g. ``press("esc")`` or ``press("ctrl", "b")``."""
        if not keys:
            raise InputError("No se ha indicado ninguna tecla.", "Por ejemplo: press(\"esc\").")
        self.qmp("send-key", keys=[{"type": "qcode", "data": k} for k in keys], **{"hold-time": hold_ms})

    def type_text(self, text: str, *, delay: float = 0.05) -> None:
        """Type ``text`` on the machine's keyboard (PS/2), one key at a time; ``\\n`` is Enter."""
        for chord in key_sequence(text):
            self.press(*chord)
            time.sleep(delay)

    def command_line(self) -> str:
        """The exact QEMU argv, shell-quoted, for display."""
        return shell_line(self.argv)

    def __repr__(self) -> str:
        state = "en marcha" if self.running else "parada"
        return f"<Machine {self.spec.name} ({state}, acelerador {self.accel or '?'})>"


# ---------------------------------------------------------------- what Debian ships, and the demos
_FIRMWARE_DIRS = ("/usr/share/qemu/firmware", "/etc/qemu/firmware")
_OVMF_PAIRS = (
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),  # Debian 12, Ubuntu 22.04+
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),  # older Debian/Ubuntu
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),  # Fedora
    ("/usr/share/edk2/x64/OVMF_CODE.4m.fd", "/usr/share/edk2/x64/OVMF_VARS.4m.fd"),  # Arch
    ("/usr/share/qemu/ovmf-x86_64-code.bin", "/usr/share/qemu/ovmf-x86_64-vars.bin"),  # openSUSE
)


def _descriptor_firmware(dirs: Iterable[str]) -> UefiFirmware | None:
    """A plain x86_64 UEFI build (no Secure Boot, no SMM) from QEMU's firmware descriptors
    (docs/interop/firmware.json), the distribution-independent way to find it."""
    paths = sorted((p for d in dirs if Path(d).is_dir() for p in Path(d).glob("*.json")), key=lambda p: p.name)
    for path in paths:
        try:
            desc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        mapping = desc.get("mapping", {})
        features = set(desc.get("features", []))
        archs = {t.get("architecture") for t in desc.get("targets", [])}
        if ("uefi" not in desc.get("interface-types", []) or mapping.get("device") != "flash"
                or "x86_64" not in archs or features & {"secure-boot", "requires-smm", "amd-sev", "intel-tdx"}):
            continue
        code = mapping.get("executable", {}).get("filename")
        template = mapping.get("nvram-template", {}).get("filename")
        if code and template and Path(code).is_file() and Path(template).is_file():
            return UefiFirmware(code, template)
    return None


def find_ovmf(dirs: Iterable[str] = _FIRMWARE_DIRS, pairs: Sequence[tuple[str, str]] = _OVMF_PAIRS) -> UefiFirmware:
    """OVMF (EDK II for QEMU, without Secure Boot), from QEMU's descriptors or known paths."""
    found = _descriptor_firmware(dirs)
    if found:
        return found
    for code, template in pairs:
        if Path(code).is_file() and Path(template).is_file():
            return UefiFirmware(code, template)
    raise ToolMissingError("OVMF_CODE.fd", "ovmf", "No se encuentra el firmware UEFI para QEMU (OVMF).")


def find_memtest(candidates: Sequence[str] = ("/usr/lib/memtest86+/memtest86+x64.iso", "/boot/memtest86+x64.bin",
                                              "/boot/memtest86+.bin")) -> str:
    """memtest86+ for BIOS machines: its bootable ISO (Debian 12, v6) or else the image that
    boots with ``-kernel`` (Linux boot protocol; older Debian ships only that)."""
    for path in candidates:
        if Path(path).is_file():
            return path
    raise ToolMissingError("memtest86+x64.iso", "memtest86+", "No se encuentra memtest86+.")


def find_nic_rom(model: str = "virtio-net-pci",
                 dirs: Sequence[str] = ("/usr/share/qemu", "/usr/lib/ipxe/qemu", "/usr/share/ipxe/qemu",
                                        "/usr/share/qemu-efi")) -> str:
    """The iPXE option ROM QEMU loads into a network card of ``model``."""
    rom = {"virtio-net-pci": "efi-virtio.rom", "e1000": "efi-e1000.rom", "e1000e": "efi-e1000e.rom",
           "rtl8139": "efi-rtl8139.rom"}.get(model)
    if rom is None:
        raise InputError(f"No sé qué ROM usa la tarjeta «{model}».", "Usa virtio-net-pci, e1000, e1000e o rtl8139.")
    for directory in dirs:
        if (Path(directory) / rom).is_file():
            return str(Path(directory) / rom)
    raise ToolMissingError(rom, "ipxe-qemu", f"No se encuentra la ROM de red de iPXE ({rom}).")


@dataclass(frozen=True)
class Demo:
    """One of notebook 08's machines: what it is, how to boot it, and the text that says it is up."""

    key: str
    title: str
    spec: MachineSpec
    marker: str
    source: str
    package: str
    timeout: float = 90.0
    skip: tuple[tuple[str, str, str], ...] = ()  # (text, source, key): press key when text shows

    def reach(self, m: Machine) -> float:
        """Wait for the marker on a started machine, pressing the keys that skip a countdown
        on the way (the marker shows up anyway if a key comes late); returns the seconds."""
        for text, source, key in self.skip:
            m.wait_for(text, self.timeout, source=source)
            m.press(key)
        return m.wait_for(self.marker, self.timeout, source=self.source)


DEMOS = ("seabios", "ovmf", "memtest", "ipxe")


def demo(key: str, *, machine: str = "q35", memory: int | str = 128, accel: str = "auto") -> Demo:
    """The demo ``key`` (one of :data:`DEMOS`) on the given board; raises ToolMissingError
    (with the Debian package to install) when its firmware or program is not here."""
    base: dict[str, Any] = {"machine": machine, "memory": memory, "accel": accel, "name": f"labkit-08-{key}"}
    if key == "seabios":
        return Demo(key, "SeaBIOS, la BIOS de QEMU, sin nada que arrancar", MachineSpec(**base),
                    "No bootable device", "debugcon", "seabios")
    if key == "ovmf":
        return Demo(key, "OVMF: firmware UEFI (EDK II) y su intérprete de órdenes",
                    MachineSpec(**base, uefi=find_ovmf()), "Shell>", "serial", "ovmf",
                    skip=(("Press ESC in", "serial", "esc"),))
    if key == "memtest":
        program = find_memtest()
        boot: dict[str, Any] = ({"drives": (DriveSpec(program, media="cdrom"),), "boot": "d"}
                                if program.endswith(".iso") else {"kernel": program})
        return Demo(key, "memtest86+, un programa que arranca sin sistema operativo",
                    MachineSpec(**base, **boot), "Status: Testing", "screen", "memtest86+",
                    skip=(("to start testing", "screen", "ret"),))
    if key == "ipxe":
        find_nic_rom("virtio-net-pci")
        return Demo(key, "iPXE, el arranque por red de la tarjeta virtio-net",
                    MachineSpec(**base, nic="virtio-net-pci", boot="n", boot_strict=True),
                    "No bootable device", "debugcon", "ipxe-qemu")
    raise InputError(f"No hay ninguna demostración «{key}».", "Elige una de: " + ", ".join(DEMOS) + ".")

"""A minimal VMM over /dev/kvm, in readable Python (the course's notebook 02).

What a virtual machine monitor such as QEMU does with KVM, reduced to the bone,
after Josh Triplett's «Using the KVM API» (LWN, 2015):

1. open ``/dev/kvm`` and check ``KVM_GET_API_VERSION`` (always 12);
2. ``KVM_CREATE_VM`` gives a file descriptor for a new, empty machine;
3. guest RAM is ordinary memory of this process (``mmap``), lent to the VM
   with ``KVM_SET_USER_MEMORY_REGION``;
4. ``KVM_CREATE_VCPU`` adds a virtual CPU; its ``struct kvm_run`` (the page the
   kernel and the VMM share) is ``mmap``-ed from the vCPU descriptor;
5. registers are set with ``KVM_SET_SREGS``/``KVM_SET_REGS``;
6. ``KVM_RUN`` in a loop: each return is a *VM exit* the VMM must handle
   (I/O on a port, MMIO, HLT ...) before going back in: :func:`vmm_loop`.

The guests are tiny real-mode programs written out as documented machine code
(:class:`Program`, :func:`hello_program`, :func:`sum_program`,
:func:`loop_program`); every exit is recorded (:class:`Exit`) so a notebook can
show the conversation between the VMM and KVM, and :func:`time_instructions`
measures how long one guest instruction takes (hardware VT-x/AMD-V: well under
a nanosecond; emulated, as on PVM: hundreds of nanoseconds).

Struct layouts and ioctl numbers come from ``include/uapi/linux/kvm.h`` and
``arch/x86/include/uapi/asm/kvm.h``; each ioctl number is computed the way the
kernel's ``_IO``/``_IOR``/``_IOW``/``_IOWR`` macros do it, so the arithmetic is
visible, and ``tests/test_kvmapi.py`` checks them against the header.

A guest that never stops must not hang the notebook. :meth:`Vm.run` runs the
vCPU in this process, under a deadline: ``signal.setitimer`` sends SIGALRM, a
signal makes ``KVM_RUN`` return early (``EINTR``) and the handler turns it into
:class:`GuestTimeoutError`. Signal handlers can only be installed from the main
thread (where notebook cells and pytest run); from any other thread,
:func:`run` runs the guest in a child process (``python -m labkit.kvmapi``)
with a time limit instead, the way :func:`run_check` always does.

Errors (all :class:`~labkit.errors.HostError`, Spanish message + hint)::

    KvmError                 KVM refused or failed
     ├── KvmUnavailableError /dev/kvm missing, not allowed, or not KVM
     ├── GuestTimeoutError   the guest did not stop in time (``.run``: what it did)
     └── VmExitError         an exit the VMM cannot handle (``.run``: what it did)
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

from .errors import HostError, InputError
from .kvmprograms import (SERIAL_PORT, Line, Program, hello_program, loop_program, mmio_program, spin_program,
                          sum_program)

__all__ = [
    # the machine
    "Vm",
    "vmm_loop",
    "run",
    "run_or_recorded",
    "time_or_recorded",
    "recorded",
    "device_info",
    # what a run leaves
    "Exit",
    "Run",
    "Timing",
    "time_instructions",
    # guest programs
    "Line",
    "Program",
    "hello_program",
    "sum_program",
    "loop_program",
    "mmio_program",
    "spin_program",
    # errors
    "KvmError",
    "KvmUnavailableError",
    "GuestTimeoutError",
    "VmExitError",
    # the host probe's view (labkit.host)
    "KvmInfo",
    "RunCheck",
    "kvm_info",
    "run_check",
    "ioc",
]

# ---------------------------------------------------------------- ioctl numbers

KVMIO = 0xAE
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def ioc(direction: int, nr: int, size: int = 0) -> int:
    """The kernel's ``_IOC(dir, KVMIO, nr, size)``."""
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


# ---------------------------------------------------------------- struct layouts
# Written once, field by field as in the kernel headers (x86_64); the tests
# compare every offset with the header's values.

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class KvmUserspaceMemoryRegion(ctypes.Structure):
    """``struct kvm_userspace_memory_region`` (include/uapi/linux/kvm.h)."""

    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class KvmRegs(ctypes.Structure):
    """``struct kvm_regs`` (arch/x86/include/uapi/asm/kvm.h): the general registers."""

    _fields_ = [(name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class KvmSegment(ctypes.Structure):
    """``struct kvm_segment``: a segment register with its hidden part (base, limit ...)."""

    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8),
                ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8)]


class KvmDtable(ctypes.Structure):
    """``struct kvm_dtable``: GDTR/IDTR."""

    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class KvmSregs(ctypes.Structure):
    """``struct kvm_sregs``: segment, control and descriptor-table registers."""

    _fields_ = ([(s, KvmSegment) for s in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")]
                + [("gdt", KvmDtable), ("idt", KvmDtable)]
                + [(c, u64) for c in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")]
                + [("interrupt_bitmap", u64 * 4)])  # (KVM_NR_INTERRUPTS + 63) / 64


class _ExitIo(ctypes.Structure):       # KVM_EXIT_IO
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]  # the bytes live at kvm_run + data_offset


class _ExitMmio(ctypes.Structure):     # KVM_EXIT_MMIO
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _ExitFailEntry(ctypes.Structure):  # KVM_EXIT_FAIL_ENTRY
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _ExitInternal(ctypes.Structure):   # KVM_EXIT_INTERNAL_ERROR
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _ExitInfo(ctypes.Union):
    _fields_ = [("hw", u64), ("fail_entry", _ExitFailEntry), ("io", _ExitIo),
                ("mmio", _ExitMmio), ("internal", _ExitInternal), ("padding", ctypes.c_char * 256)]


class KvmRun(ctypes.Structure):
    """``struct kvm_run``: the page shared by the kernel and the VMM (x86 part)."""

    _anonymous_ = ("exit",)
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
                ("flags", u16), ("cr8", u64), ("apic_base", u64),
                ("exit", _ExitInfo),  # the anonymous union: run.io, run.mmio ...
                ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64),
                ("s", ctypes.c_char * 2048)]  # SYNC_REGS_SIZE_BYTES


KVM_GET_API_VERSION = ioc(_IOC_NONE, 0x00)
KVM_CREATE_VM = ioc(_IOC_NONE, 0x01)
KVM_GET_VCPU_MMAP_SIZE = ioc(_IOC_NONE, 0x04)
KVM_GET_SUPPORTED_CPUID = ioc(_IOC_READ | _IOC_WRITE, 0x05, 8)  # struct kvm_cpuid2
KVM_CREATE_VCPU = ioc(_IOC_NONE, 0x41)
KVM_SET_USER_MEMORY_REGION = ioc(_IOC_WRITE, 0x46, ctypes.sizeof(KvmUserspaceMemoryRegion))
KVM_RUN = ioc(_IOC_NONE, 0x80)
KVM_GET_REGS = ioc(_IOC_READ, 0x81, ctypes.sizeof(KvmRegs))
KVM_SET_REGS = ioc(_IOC_WRITE, 0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS = ioc(_IOC_READ, 0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS = ioc(_IOC_WRITE, 0x84, ctypes.sizeof(KvmSregs))

KVM_API_VERSION = 12
# exit_reason values (include/uapi/linux/kvm.h)
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1

EXIT_NAMES = {v: k[len("KVM_EXIT_"):] for k, v in list(globals().items())
              if k.startswith("KVM_EXIT_") and not k.startswith("KVM_EXIT_IO_")}

DEBUG_PORT = 0xE9    # the Bochs/QEMU "debugcon" port: write a byte, it shows up
OUTPUT_PORTS = (SERIAL_PORT, DEBUG_PORT)

EMULATED_NS = 20.0  # ns per instruction; hardware runs the timing loop far below this


# ---------------------------------------------------------------- errors

class KvmError(HostError):
    """KVM refused or failed to do what the VMM asked."""

    def __init__(self, message: str, hint: str = "", run: Run | None = None) -> None:
        super().__init__(message, hint)
        self.run = run  # what the guest did before the failure, when there was a run


class KvmUnavailableError(KvmError):
    """/dev/kvm is missing, not allowed for this user, or not a KVM device."""


class GuestTimeoutError(KvmError):
    """The guest did not stop (HLT) within the time limit."""


class VmExitError(KvmError):
    """KVM_RUN came back for a reason this VMM cannot handle."""


def _unavailable(device: str, err: OSError) -> KvmUnavailableError:
    if err.errno == errno.ENOENT:
        return KvmUnavailableError(
            f"No existe {device}: el núcleo no ofrece KVM (módulo sin cargar, CPU sin VT-x/AMD-V, "
            "o desactivado en la BIOS/UEFI).",
            "Mira el veredicto con `labkit doctor` (cuaderno 05). Sin KVM, este cuaderno enseña una "
            "ejecución grabada y QEMU usa TCG.")
    if err.errno in (errno.EACCES, errno.EPERM):
        return KvmUnavailableError(
            f"Tu usuario no puede abrir {device} (permiso denegado).",
            "Entra en el grupo kvm: `sudo usermod -aG kvm $USER` y vuelve a iniciar sesión "
            "(o `newgrp kvm` en ese terminal).")
    if err.errno in (errno.ENOTTY, errno.EINVAL, errno.EISDIR, errno.ENXIO, errno.ENODEV):
        return KvmUnavailableError(
            f"{device} no es el dispositivo de KVM: no responde a KVM_GET_API_VERSION "
            f"({err.strerror}).",
            "La ruta debe ser el dispositivo de caracteres /dev/kvm (10:232) que crea el módulo kvm.")
    return KvmUnavailableError(f"No se puede usar {device}: {err.strerror or err}.",
                               "Ejecuta `labkit doctor` para ver qué falla.")


# ---------------------------------------------------------------- what a run leaves

@dataclass(frozen=True)
class Exit:
    """One return of KVM_RUN: why the guest stopped and what it wanted."""

    reason: str               # "IO", "MMIO", "HLT", "SHUTDOWN" ... (KVM_EXIT_<reason>)
    address: int | None       # I/O port for IO, guest physical address for MMIO
    direction: str | None     # "out"/"in" for IO, "write"/"read" for MMIO
    size: int | None          # bytes per access
    data: bytes               # what the guest wrote, or what the VMM answered
    t: float                  # seconds since the run started

    def describe(self) -> str:
        """One line in Spanish, e.g. ``IO   out  puerto 0x3f8  1 B  48 'H'``."""
        if self.reason == "IO":
            where = f"puerto {self.address:#x}"
        elif self.reason == "MMIO":
            where = f"dirección {self.address:#x}"
        else:
            where = ""
        text = ""
        if self.data:
            shown = "".join(chr(b) if 32 <= b < 127 else "." for b in self.data)
            text = f"{self.data.hex(' ')} '{shown}'" if len(self.data) <= 8 else f"{len(self.data)} bytes"
        size = f"{self.size} B" if self.size else ""
        return f"{self.reason:<8} {self.direction or '':<5} {where:<18} {size:<4} {text}".rstrip()


@dataclass(frozen=True)
class Run:
    """What a guest program did: its output, every exit, and how long it took."""

    program: str
    output: bytes
    exits: tuple[Exit, ...]
    elapsed: float                 # seconds from the first KVM_RUN to the last return
    instructions: int | None = None  # guest instructions executed, when the program knows
    stdin: bytes = b""
    recorded: str | None = None    # None: live; otherwise where it was recorded

    @property
    def text(self) -> str:
        """The output as text (UTF-8)."""
        return self.output.decode("utf-8", "replace")

    @property
    def live(self) -> bool:
        return self.recorded is None

    @property
    def counts(self) -> Counter[str]:
        """How many exits of each reason, e.g. ``Counter({'IO': 23, 'HLT': 1})``."""
        return Counter(e.reason for e in self.exits)

    @property
    def ns_per_instruction(self) -> float | None:
        """Elapsed time over instructions, exits included (see :func:`time_instructions`)."""
        if not self.instructions:
            return None
        return self.elapsed * 1e9 / self.instructions

    def summary(self) -> str:
        """A few Spanish lines: live or recorded, output, exits by reason."""
        counts = ", ".join(f"{n} × {r}" for r, n in self.counts.most_common()) or "ninguna"
        head = ("en vivo, con /dev/kvm" if self.live
                else f"GRABADA {self.recorded}; no es en vivo")
        lines = [f"Ejecución de «{self.program}» ({head})",
                 f"  salida del invitado: {self.text!r}",
                 f"  salidas de VM (exits): {len(self.exits)} = {counts}"]
        if self.instructions:
            lines.append(f"  instrucciones del invitado: {self.instructions}")
        return "\n".join(lines)

    def table(self, limit: int | None = None) -> str:
        """The exits, one per line (time last, so lines keep their shape run after run)."""
        rows = [f"{'n':>3}  {'motivo':<8} {'dir':<5} {'puerto/dirección':<18} {'tam':<4} datos"]
        shown = self.exits if limit is None or len(self.exits) <= limit else self.exits[:limit - 1]
        for i, e in enumerate(shown, 1):
            rows.append(f"{i:>3}  {e.describe():<52} t={e.t * 1e6:.1f} µs")
        if len(shown) < len(self.exits):
            last = self.exits[-1]
            rows.append(f"...  ({len(self.exits) - len(shown) - 1} más)")
            rows.append(f"{len(self.exits):>3}  {last.describe():<52} t={last.t * 1e6:.1f} µs")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["output"] = self.output.decode("latin-1")
        d["stdin"] = self.stdin.decode("latin-1")
        d["exits"] = [[e.reason, e.address, e.direction, e.size, e.data.hex(), e.t] for e in self.exits]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Run:
        exits = tuple(Exit(r, a, di, s, bytes.fromhex(h), t) for r, a, di, s, h, t in d["exits"])
        return cls(d["program"], d["output"].encode("latin-1"), exits, d["elapsed"],
                   d.get("instructions"), d.get("stdin", "").encode("latin-1"), d.get("recorded"))


# ---------------------------------------------------------------- the machine

class Vm:
    """A virtual machine with one vCPU and ``mem_size`` bytes of RAM at guest address 0.

    Built only with ioctls on /dev/kvm; use it as a context manager (it owns
    three file descriptors and two memory mappings)::

        with Vm() as vm:
            vm.load(hello_program())
            print(vm.run().text)
    """

    def __init__(self, device: str = "/dev/kvm", mem_size: int = 0x10000) -> None:
        self.device = device
        self.kvm_fd = self.vm_fd = self.vcpu_fd = -1
        self.memory: mmap.mmap | None = None
        self.run_map: mmap.mmap | None = None
        self.kvm_run: KvmRun | None = None
        self.output = bytearray()
        self.exits: list[Exit] = []
        self.stdin = bytearray()
        self.program: Program | None = None
        self.started = 0.0
        try:
            self._create(mem_size)
        except BaseException:
            self.close()
            raise

    def _create(self, mem_size: int) -> None:
        try:
            self.kvm_fd = os.open(self.device, os.O_RDWR | os.O_CLOEXEC)
            # KVM_GET_API_VERSION: which KVM API this kernel speaks (12 since Linux 2.6.22)
            version = fcntl.ioctl(self.kvm_fd, KVM_GET_API_VERSION)
        except OSError as err:
            raise _unavailable(self.device, err) from err
        if version != KVM_API_VERSION:
            raise KvmUnavailableError(f"{self.device} habla la API de KVM {version}, no la {KVM_API_VERSION}.",
                                      "Ese núcleo no es compatible con este VMM.")
        try:
            # KVM_CREATE_VM: a new, empty machine (no memory, no CPU); returns its descriptor
            self.vm_fd = fcntl.ioctl(self.kvm_fd, KVM_CREATE_VM, 0)
            # guest RAM: ordinary anonymous memory of this process ...
            self.memory = mmap.mmap(-1, mem_size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            region = KvmUserspaceMemoryRegion(slot=0, flags=0, guest_phys_addr=0, memory_size=mem_size,
                                              userspace_addr=_address_of(self.memory))
            # ... KVM_SET_USER_MEMORY_REGION: lent to the VM as guest physical 0..mem_size
            fcntl.ioctl(self.vm_fd, KVM_SET_USER_MEMORY_REGION, region)
            # KVM_CREATE_VCPU: virtual CPU number 0; returns its descriptor
            self.vcpu_fd = fcntl.ioctl(self.vm_fd, KVM_CREATE_VCPU, 0)
            # KVM_GET_VCPU_MMAP_SIZE: how big the vCPU's shared area (struct kvm_run + pages) is
            size = fcntl.ioctl(self.kvm_fd, KVM_GET_VCPU_MMAP_SIZE)
            self.run_map = mmap.mmap(self.vcpu_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.kvm_run = KvmRun.from_buffer(self.run_map)
        except OSError as err:
            raise KvmError(f"KVM no pudo crear la máquina virtual ({err.strerror or err}).",
                           "Mira los mensajes del núcleo (`dmesg`) y ejecuta `labkit doctor`.") from err

    # -- registers
    def get_regs(self) -> KvmRegs:
        regs = KvmRegs()
        fcntl.ioctl(self.vcpu_fd, KVM_GET_REGS, regs)  # KVM_GET_REGS: read RAX ... RIP, RFLAGS
        return regs

    def set_regs(self, regs: KvmRegs) -> None:
        fcntl.ioctl(self.vcpu_fd, KVM_SET_REGS, regs)  # KVM_SET_REGS: write them

    def get_sregs(self) -> KvmSregs:
        sregs = KvmSregs()
        fcntl.ioctl(self.vcpu_fd, KVM_GET_SREGS, sregs)  # KVM_GET_SREGS: segments, CR0..CR4, EFER
        return sregs

    def set_sregs(self, sregs: KvmSregs) -> None:
        fcntl.ioctl(self.vcpu_fd, KVM_SET_SREGS, sregs)  # KVM_SET_SREGS: write them

    def load(self, program: Program, stack: int = 0x8000) -> None:
        """Copy the program into guest RAM and point the vCPU at it (16-bit real mode)."""
        assert self.memory is not None
        end = program.origin + len(program.code)
        if end > len(self.memory):
            raise InputError(f"El programa acaba en {end:#x}, más allá de la RAM del invitado ({len(self.memory):#x}).",
                             "Usa un programa más corto o crea la VM con más memoria: Vm(mem_size=...).")
        self.memory[program.origin:end] = program.code
        sregs = self.get_sregs()          # after reset: real mode, CS = 0xf000 (the BIOS entry)
        sregs.cs.base, sregs.cs.selector = 0, 0   # CS:IP = 0:origin instead
        self.set_sregs(sregs)
        regs = KvmRegs(rip=program.origin, rsp=stack, rflags=0x2)  # bit 1 of RFLAGS is always 1
        self.set_regs(regs)
        self.program = program

    def run(self, stdin: bytes | str = b"", timeout: float | None = 5.0, max_exits: int = 100_000) -> Run:
        """Run the loaded program until HLT (or shutdown); ``stdin`` feeds the serial port.

        ``timeout`` (seconds) stops a guest that never halts with
        :class:`GuestTimeoutError`; it needs the main thread (see the module doc).
        """
        self.stdin = bytearray(stdin.encode() if isinstance(stdin, str) else stdin)
        given = bytes(self.stdin)
        self.output, self.exits = bytearray(), []
        self.started = time.perf_counter()
        program = self.program
        name = program.name if program else "?"
        try:
            with _deadline(timeout):
                elapsed = vmm_loop(self, max_exits)
        except _Deadline:
            partial = self._partial(name, given, time.perf_counter() - self.started)
            raise GuestTimeoutError(
                f"El invitado «{name}» no se detuvo en {timeout:g} s ({len(self.exits)} salidas de VM hasta "
                "entonces): un bucle sin fin, o un KVM que no avanza.",
                "Revisa el programa (¿llega a HLT?). La máquina se ha detenido; puedes seguir usando "
                "el cuaderno.", partial) from None
        except VmExitError as err:
            err.run = self._partial(name, given, time.perf_counter() - self.started)
            raise
        instructions = program.instructions if program else None
        return Run(name, bytes(self.output), tuple(self.exits), elapsed, instructions, given)

    def _partial(self, name: str, given: bytes, elapsed: float) -> Run:
        return Run(name, bytes(self.output), tuple(self.exits), elapsed, None, given)

    def fds(self) -> list[tuple[int, str]]:
        """This process's descriptors for the VM, as ``/proc/self/fd`` shows them."""
        out = []
        for fd in (self.kvm_fd, self.vm_fd, self.vcpu_fd):
            try:
                out.append((fd, os.readlink(f"/proc/self/fd/{fd}")))
            except OSError:
                out.append((fd, "?"))
        return out

    def close(self) -> None:
        self.kvm_run = None
        for m in (self.run_map, self.memory):
            if m is not None:
                try:
                    m.close()
                except BufferError:  # a view still points into it (e.g. a traceback): the GC will close it
                    pass
        self.run_map = self.memory = None
        for attr in ("vcpu_fd", "vm_fd", "kvm_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "kvm_fd", -1) >= 0:
            try:
                self.close()
            except Exception:  # interpreter shutdown: the OS closes the descriptors anyway
                pass


def vmm_loop(vm: Vm, max_exits: int = 100_000) -> float:
    """The VMM: enter the guest, see why it came back, play the device, go back in.

    Returns the seconds between the first KVM_RUN and the last return.
    """
    run = vm.kvm_run                      # struct kvm_run, shared with the kernel (mmap)
    while len(vm.exits) < max_exits:
        try:
            fcntl.ioctl(vm.vcpu_fd, KVM_RUN, 0)  # KVM_RUN: run the guest until the next exit
        except InterruptedError:          # a signal arrived (EINTR): not the guest's doing
            continue
        t = time.perf_counter() - vm.started
        reason = run.exit_reason
        if reason == KVM_EXIT_IO:         # IN/OUT on a port nobody emulates inside the kernel
            io = run.io
            n = io.size * io.count        # the data sits inside the shared area, at data_offset
            where = slice(io.data_offset, io.data_offset + n)
            if io.direction == KVM_EXIT_IO_OUT:
                data = bytes(vm.run_map[where])
                if io.port in OUTPUT_PORTS:   # our "serial port": keep what the guest prints
                    vm.output += data
            elif io.port == SERIAL_PORT:  # IN: answer with the next input bytes (0 when none left)
                data = bytes(vm.stdin[:n]).ljust(n, b"\0")
                del vm.stdin[:n]
                vm.run_map[where] = data  # KVM copies it into AL/AX/EAX when the guest resumes
            else:                         # IN from a port with no device: all ones
                data = b"\xff" * n
                vm.run_map[where] = data
            vm.exits.append(Exit("IO", io.port, "out" if io.direction else "in", io.size, data, t))
        elif reason == KVM_EXIT_MMIO:     # a load/store to guest-physical memory with no RAM
            m = run.mmio
            if m.is_write:
                data = bytes(m.data[:m.len])
            else:                         # no device there: the bus reads as all ones
                data = b"\xff" * m.len
                ctypes.memmove(m.data, data, m.len)
            vm.exits.append(Exit("MMIO", m.phys_addr, "write" if m.is_write else "read", m.len, data, t))
        elif reason == KVM_EXIT_HLT:      # the guest executed HLT: it is done
            vm.exits.append(Exit("HLT", None, None, None, b"", t))
            return t
        elif reason == KVM_EXIT_SHUTDOWN:  # triple fault: a real PC would reset
            vm.exits.append(Exit("SHUTDOWN", None, None, None, b"", t))
            return t
        else:                             # FAIL_ENTRY, INTERNAL_ERROR ...: nothing to emulate
            vm.exits.append(Exit(EXIT_NAMES.get(reason, str(reason)), None, None, None, b"", t))
            raise _exit_error(run)
    raise VmExitError(f"El invitado hizo {max_exits} salidas de VM sin detenerse.",
                      "Sube max_exits si el programa de verdad hace tanta E/S.")


def _exit_error(run: KvmRun) -> VmExitError:
    reason = run.exit_reason
    if reason == KVM_EXIT_FAIL_ENTRY:
        code = run.fail_entry.hardware_entry_failure_reason
        return VmExitError(
            f"KVM no pudo entrar en el invitado (KVM_EXIT_FAIL_ENTRY, motivo del hardware {code:#x}): "
            "el estado de la vCPU no es válido para VT-x/AMD-V.",
            "Revisa los registros de segmento y de control que pone Vm.load().")
    if reason == KVM_EXIT_INTERNAL_ERROR:
        sub = run.internal.suberror
        what = {1: "no supo emular una instrucción", 2: "excepciones simultáneas inesperadas",
                3: "salida inesperada al entregar un evento"}.get(sub, f"subcódigo {sub}")
        return VmExitError(
            f"Error interno de KVM (KVM_EXIT_INTERNAL_ERROR): {what}.",
            "Suele ser código del invitado que el emulador de KVM no entiende: revisa el programa.")
    name = EXIT_NAMES.get(reason, f"desconocida ({reason})")
    return VmExitError(f"Salida de VM que este VMM no sabe atender: KVM_EXIT_{name}.",
                       "Este VMM mínimo solo atiende IO, MMIO, HLT y SHUTDOWN.")


class _Deadline(Exception):
    """Raised by the SIGALRM handler while the guest runs too long."""


@contextmanager
def _deadline(seconds: float | None) -> Iterator[None]:
    """Raise :class:`_Deadline` in the main thread after ``seconds`` (setitimer + SIGALRM).

    A signal makes a blocked ``KVM_RUN`` return with EINTR; CPython then runs
    the handler, whose exception leaves the ioctl call.
    """
    if not seconds:
        yield
        return
    if threading.current_thread() is not threading.main_thread():
        raise KvmError("El límite de tiempo del VMM solo funciona en el hilo principal.",
                       "Usa kvmapi.run(...), que desde otro hilo ejecuta el invitado en un proceso hijo.")

    def expired(signum: int, frame: object) -> None:
        raise _Deadline()

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)


def _address_of(buf: mmap.mmap) -> int:
    """The host virtual address of an mmap (what KVM needs as userspace_addr)."""
    view = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(view)
    finally:
        del view  # release the buffer export so the mmap can be closed later


# ---------------------------------------------------------------- running

def run(program: Program, stdin: bytes | str = b"", device: str = "/dev/kvm", timeout: float = 5.0) -> Run:
    """Run ``program`` in a fresh VM and return what it did.

    In the main thread the VMM runs here, in this process; elsewhere in a child
    process (a signal-based time limit needs the main thread).
    """
    if threading.current_thread() is not threading.main_thread():
        return _run_in_child(program, stdin, device, timeout)
    with Vm(device) as vm:
        vm.load(program)
        return vm.run(stdin, timeout=timeout)


def _run_in_child(program: Program, stdin: bytes | str, device: str, timeout: float) -> Run:
    raw = stdin.encode() if isinstance(stdin, str) else stdin
    spec = json.dumps({"name": program.name, "code": program.code.hex(), "origin": program.origin,
                       "instructions": program.instructions, "stdin": raw.hex(),
                       "device": device, "timeout": timeout})
    argv = [sys.executable, "-m", "labkit.kvmapi", "--run", spec]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 10, check=False)
    except subprocess.TimeoutExpired as err:
        raise GuestTimeoutError(f"El invitado «{program.name}» no se detuvo en {timeout:g} s.",
                                "Revisa el programa (¿llega a HLT?).") from err
    try:
        answer = json.loads(proc.stdout)
    except ValueError as err:
        raise KvmError("El proceso hijo del VMM falló sin respuesta.",
                       (proc.stderr.strip().splitlines() or ["sin salida"])[-1]) from err
    if "error" in answer:
        cls = {c.__name__: c for c in (KvmError, KvmUnavailableError, GuestTimeoutError, VmExitError)}
        partial = Run.from_dict(answer["run"]) if answer.get("run") else None
        raise cls.get(answer["error"], KvmError)(answer["message"], answer["hint"], partial)
    return Run.from_dict(answer)


def _child_run(spec: dict) -> dict:
    lines = (Line("(código)", bytes.fromhex(spec["code"])),)
    program = Program(spec["name"], lines, spec["origin"], spec["instructions"])
    try:
        return run(program, bytes.fromhex(spec["stdin"]), spec["device"], spec["timeout"]).to_dict()
    except KvmError as err:
        return {"error": type(err).__name__, "message": err.message, "hint": err.hint,
                "run": err.run.to_dict() if err.run else None}


# ---------------------------------------------------------------- timing

@dataclass(frozen=True)
class Timing:
    """How long one guest instruction takes, measured with :func:`loop_program`."""

    iterations: int
    instructions: int          # extra instructions of the long loop over the 1-turn loop
    loop_seconds: float        # best run of the long loop
    empty_seconds: float       # best run of the 1-turn loop: the fixed cost of a KVM_RUN round
    ns_per_instruction: float
    exits: int                 # exits the VMM saw during the long loop (HLT at least)
    recorded: str | None = None

    @property
    def emulated(self) -> bool:
        """Hardware runs ``dec``/``jnz`` at well under 1 ns; emulation takes hundreds."""
        return self.ns_per_instruction > EMULATED_NS

    def explain(self) -> str:
        """What the number means, in Spanish."""
        head = (f"{self.instructions} instrucciones en {self.loop_seconds - self.empty_seconds:.3f} s "
                f"(descontado el coste fijo de una ejecución vacía, {self.empty_seconds * 1e3:.2f} ms): "
                f"{self.ns_per_instruction:.1f} ns por instrucción; el VMM vio {self.exits} salida(s) de VM.")
        if self.recorded:
            head = f"[medida GRABADA {self.recorded}; no es en vivo]\n" + head
        if self.emulated:
            return head + (
                f"\nMás de {EMULATED_NS:.0f} ns: estas instrucciones se EMULAN, no las ejecuta el hardware. "
                "Es lo que pasa, por ejemplo, con KVM paravirtual (kvm_pvm): el modo real del invitado lo "
                "interpreta el emulador de instrucciones de KVM, una a una.")
        return head + (
            f"\nMenos de {EMULATED_NS:.0f} ns: las ejecuta la CPU física en modo invitado (VT-x/AMD-V), "
            "varias por ciclo de reloj; KVM solo interviene en las salidas.")


def time_instructions(iterations: int = 200_000, repeats: int = 3, device: str = "/dev/kvm",
                      timeout: float = 30.0, min_seconds: float = 0.0) -> Timing:
    """Time ``loop_program(iterations)`` against ``loop_program(1)``; best of ``repeats`` each.

    With ``min_seconds``, the loop grows tenfold until it runs at least that
    long beyond the empty run (hardware VT-x/AMD-V needs millions of turns to
    be measurable; emulation, a few thousand).
    """
    def best(n: int) -> tuple[float, int]:
        times, exits = [], 0
        for _ in range(repeats):
            r = run(loop_program(n), device=device, timeout=timeout)
            times.append(r.elapsed)
            exits = len(r.exits)
        return min(times), exits

    empty, _ = best(1)
    loop, exits = best(iterations)
    while loop - empty < min_seconds and iterations * 10 < 2**32:
        iterations *= 10
        loop, exits = best(iterations)
    instructions = 2 * (iterations - 1)
    ns = max(loop - empty, 0.0) * 1e9 / max(instructions, 1)
    return Timing(iterations, instructions, loop, empty, ns, exits)


# ---------------------------------------------------------------- without /dev/kvm

_WHERE = "con este mismo VMM, en una máquina con kvm_pvm (KVM paravirtual)"

# Real runs of this module's programs, kept for hosts where /dev/kvm cannot be used.
# Regenerate with: python -m labkit.kvmapi --record
_RECORDED: dict = {
    "hola": {"program": "hola", "output": "Hola desde el invitado\n", "stdin": "", "elapsed": 0.0004529, "instructions": 121,
             "exits": [
                 ["IO", 0x3f8, "out", 1, "48", 0.0001405],
                 ["IO", 0x3f8, "out", 1, "6f", 0.0001701],
                 ["IO", 0x3f8, "out", 1, "6c", 0.0001847],
                 ["IO", 0x3f8, "out", 1, "61", 0.0002010],
                 ["IO", 0x3f8, "out", 1, "20", 0.0002139],
                 ["IO", 0x3f8, "out", 1, "64", 0.0002262],
                 ["IO", 0x3f8, "out", 1, "65", 0.0002388],
                 ["IO", 0x3f8, "out", 1, "73", 0.0002516],
                 ["IO", 0x3f8, "out", 1, "64", 0.0002652],
                 ["IO", 0x3f8, "out", 1, "65", 0.0002783],
                 ["IO", 0x3f8, "out", 1, "20", 0.0002907],
                 ["IO", 0x3f8, "out", 1, "65", 0.0003043],
                 ["IO", 0x3f8, "out", 1, "6c", 0.0003183],
                 ["IO", 0x3f8, "out", 1, "20", 0.0003306],
                 ["IO", 0x3f8, "out", 1, "69", 0.0003424],
                 ["IO", 0x3f8, "out", 1, "6e", 0.0003538],
                 ["IO", 0x3f8, "out", 1, "76", 0.0003661],
                 ["IO", 0x3f8, "out", 1, "69", 0.0003776],
                 ["IO", 0x3f8, "out", 1, "74", 0.0003905],
                 ["IO", 0x3f8, "out", 1, "61", 0.0004034],
                 ["IO", 0x3f8, "out", 1, "64", 0.0004165],
                 ["IO", 0x3f8, "out", 1, "6f", 0.0004283],
                 ["IO", 0x3f8, "out", 1, "0a", 0.0004408],
                 ["HLT", None, None, None, "", 0.0004529],
             ]},
    "suma": {"program": "suma", "output": "6912\n", "stdin": "1234 5678\n", "elapsed": 0.0003178, "instructions": None,
             "exits": [
                 ["IO", 0x3f8, "in", 1, "31", 0.0000839],
                 ["IO", 0x3f8, "in", 1, "32", 0.0001197],
                 ["IO", 0x3f8, "in", 1, "33", 0.0001350],
                 ["IO", 0x3f8, "in", 1, "34", 0.0001488],
                 ["IO", 0x3f8, "in", 1, "20", 0.0001617],
                 ["IO", 0x3f8, "in", 1, "35", 0.0001773],
                 ["IO", 0x3f8, "in", 1, "36", 0.0001905],
                 ["IO", 0x3f8, "in", 1, "37", 0.0002036],
                 ["IO", 0x3f8, "in", 1, "38", 0.0002165],
                 ["IO", 0x3f8, "in", 1, "0a", 0.0002294],
                 ["IO", 0x3f8, "out", 1, "36", 0.0002596],
                 ["IO", 0x3f8, "out", 1, "39", 0.0002734],
                 ["IO", 0x3f8, "out", 1, "31", 0.0002854],
                 ["IO", 0x3f8, "out", 1, "32", 0.0002972],
                 ["IO", 0x3f8, "out", 1, "0a", 0.0003082],
                 ["HLT", None, None, None, "", 0.0003178],
             ]},
    "mmio": {"program": "mmio", "output": "", "stdin": "", "elapsed": 0.0000817, "instructions": 4,
             "exits": [
                 ["MMIO", 0xb8000, "write", 2, "4807", 0.0000633],
                 ["HLT", None, None, None, "", 0.0000817],
             ]},
    "tiempo": {"iterations": 200000, "instructions": 399998, "loop_seconds": 0.169097, "empty_seconds": 0.0000589,
               "ns_per_instruction": 422.6, "exits": 1},
}


def recorded(name: str) -> Run | Timing:
    """A run recorded on a real /dev/kvm: "hola", "suma", "mmio" (a :class:`Run`) or "tiempo" (:class:`Timing`)."""
    if name not in _RECORDED:
        raise KeyError(f"no recording named {name!r}; there are: {', '.join(_RECORDED)}")
    d = dict(_RECORDED[name])
    if name == "tiempo":
        return Timing(**d, recorded=_WHERE)
    return replace(Run.from_dict(d), recorded=_WHERE)


_explained: set[str] = set()


def _explain_once(what: str, err: KvmError) -> None:
    if err.message in _explained:
        print(f"{what} (sin acceso a KVM): se muestra una ejecución grabada.")
    else:
        _explained.add(err.message)
        print(f"{what}: {err}")


def run_or_recorded(program: Program, stdin: bytes | str = b"", device: str = "/dev/kvm",
                    timeout: float = 5.0) -> Run:
    """:func:`run` live; if /dev/kvm cannot be used, say why and return the recorded run.

    The explanation (with the fix) is printed the first time; the result's
    ``recorded`` field says where it was recorded, and ``summary()`` shows it.
    """
    try:
        return run(program, stdin, device, timeout)
    except KvmUnavailableError as err:
        _explain_once("No se puede ejecutar en vivo", err)
        try:
            rec = recorded(program.name)
        except KeyError:
            raise err from None
        if isinstance(rec, Run) and rec.stdin != (stdin.encode() if isinstance(stdin, str) else stdin):
            print(f"(La grabación es con la entrada {rec.stdin!r}, no con la tuya.)")
        return rec  # type: ignore[return-value]


def time_or_recorded(iterations: int = 200_000, device: str = "/dev/kvm") -> Timing:
    """:func:`time_instructions` live (at least 20 ms of loop); if /dev/kvm cannot be used,
    say why and return the recorded timing."""
    try:
        return time_instructions(iterations, device=device, min_seconds=0.02)
    except KvmUnavailableError as err:
        _explain_once("No se puede medir en vivo", err)
        return recorded("tiempo")  # type: ignore[return-value]


def device_info(path: str = "/dev/kvm") -> str:
    """``ls -l``-style line for the KVM device, plus whether this user can open it."""
    try:
        st = os.stat(path)
    except OSError as err:
        return f"{path}: {_unavailable(path, err).message}"
    kind = (f"dispositivo de caracteres {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            if stat.S_ISCHR(st.st_mode) else "NO es un dispositivo de caracteres")
    try:
        import grp
        import pwd
        owner, group = pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name
    except (KeyError, ImportError):
        owner, group = str(st.st_uid), str(st.st_gid)
    access = "sí" if os.access(path, os.R_OK | os.W_OK) else "no"
    return (f"{stat.filemode(st.st_mode)} {owner} {group} {path}  ({kind}; "
            f"¿puede abrirlo tu usuario para leer y escribir? {access})")


# ---------------------------------------------------------------- the host probe's view

@dataclass(frozen=True)
class KvmInfo:
    """What /dev/kvm answered."""

    api_version: int
    cpuid_signature: str | None  # leaf 0x40000000 as KVM offers it to guests
    vcpu_offers_vmx: bool  # leaf 1 ECX bit 5: nested VT-x possible
    vcpu_offers_svm: bool  # leaf 0x80000001 ECX bit 2: nested AMD-V possible
    cpuid_entries: int


_CPUID_ENTRY = struct.Struct("<10I")  # function, index, flags, eax, ebx, ecx, edx, pad[3]
_MAX_CPUID = 256


def _cpuid_leaves(fd: int) -> dict[tuple[int, int], tuple[int, int, int, int]]:
    buf = bytearray(8 + _MAX_CPUID * _CPUID_ENTRY.size)
    struct.pack_into("<II", buf, 0, _MAX_CPUID, 0)
    fcntl.ioctl(fd, KVM_GET_SUPPORTED_CPUID, buf, True)
    (count,) = struct.unpack_from("<I", buf, 0)
    leaves = {}
    for i in range(count):
        f, idx, _flags, a, b, c, d, *_ = _CPUID_ENTRY.unpack_from(buf, 8 + i * _CPUID_ENTRY.size)
        leaves[(f, idx)] = (a, b, c, d)
    return leaves


def kvm_info(device: str = "/dev/kvm") -> KvmInfo:
    """Open /dev/kvm and ask it for its API version and supported CPUID.

    Raises OSError when the device cannot be opened or does not answer.
    """
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
        try:
            leaves = _cpuid_leaves(fd)
        except OSError:
            leaves = {}
    finally:
        os.close(fd)
    sig = None
    if (0x40000000, 0) in leaves:
        _, b, c, d = leaves[(0x40000000, 0)]
        sig = struct.pack("<III", b, c, d).rstrip(b"\0").decode("ascii", "replace")
    vmx = bool(leaves.get((1, 0), (0, 0, 0, 0))[2] & (1 << 5))
    svm = bool(leaves.get((0x80000001, 0), (0, 0, 0, 0))[2] & (1 << 2))
    return KvmInfo(version, sig, vmx, svm, len(leaves))


@dataclass(frozen=True)
class RunCheck:
    """Timing of real-mode code run through KVM_RUN (the doctor's functional check)."""

    ok: bool
    instructions: int
    seconds: float
    ns_per_instruction: float | None
    error: str | None = None

    @property
    def looks_emulated(self) -> bool:
        """Hardware runs this loop at well under 5 ns an instruction."""
        return self.ns_per_instruction is not None and self.ns_per_instruction > EMULATED_NS


def run_check(device: str = "/dev/kvm", iterations: int = 200_000, timeout: float = 20.0) -> RunCheck:
    """Time ``2 * iterations`` real-mode instructions run through KVM_RUN.

    Runs in a child process so that a KVM that never returns is stopped after
    ``timeout`` seconds instead of hanging the caller.
    """
    argv = [sys.executable, "-m", "labkit.kvmapi", device, str(iterations)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return RunCheck(False, 2 * iterations, timeout, None, f"KVM_RUN no terminó en {timeout:.0f} s")
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        err = (proc.stderr.strip().splitlines() or ["sin salida"])[-1]
        return RunCheck(False, 2 * iterations, 0.0, None, err)
    return RunCheck(**data)


def _check(device: str, iterations: int) -> RunCheck:
    try:
        t = time_instructions(iterations, device=device)
    except KvmError as err:
        cause = err.__cause__
        text = f"{type(cause).__name__}: {cause}" if isinstance(cause, OSError) else err.message
        return RunCheck(False, 2 * iterations, 0.0, None, text)
    return RunCheck(True, 2 * iterations, t.loop_seconds, t.ns_per_instruction)


def _record() -> dict:
    """Run the shipped programs and print them as the ``_RECORDED`` literal."""
    out = {"hola": run(hello_program()).to_dict(),
           "suma": run(sum_program(), "1234 5678\n").to_dict(),
           "mmio": run(mmio_program()).to_dict(),
           "tiempo": {k: v for k, v in asdict(time_instructions()).items() if k != "recorded"}}
    for d in out.values():
        d.pop("recorded", None)
    return out


def _main(argv: list[str]) -> int:
    if argv[:1] == ["--run"]:
        print(json.dumps(_child_run(json.loads(argv[1]))))
        return 0
    if argv[:1] == ["--record"]:
        print(json.dumps(_record(), ensure_ascii=False))
        return 0
    device = argv[0] if argv else "/dev/kvm"
    iterations = int(argv[1]) if len(argv) > 1 else 200_000
    print(json.dumps(asdict(_check(device, iterations))))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))

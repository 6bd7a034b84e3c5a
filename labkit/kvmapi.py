"""A minimal view of the KVM API (/dev/kvm ioctls), for probing and teaching.

Only what the host probe needs lives here for now: the API version, the CPUID
that KVM can offer its guests, and a tiny functional check that runs real-mode
code through ``KVM_RUN`` and times it. The numbers come from
``include/uapi/linux/kvm.h``; each ioctl number is computed the way the
kernel's ``_IO``/``_IOR``/``_IOW``/``_IOWR`` macros do it, so the arithmetic
is visible.

The functional check runs in a child process (``python -m labkit.kvmapi``)
with a time limit: a KVM that hangs on real-mode code must not hang the
notebook that asked.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import mmap
import os
import struct
import subprocess
import sys
import time
from dataclasses import dataclass

__all__ = [
    "KvmInfo",
    "RunCheck",
    "kvm_info",
    "run_check",
    "ioc",
]

KVMIO = 0xAE
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def ioc(direction: int, nr: int, size: int = 0) -> int:
    """The kernel's ``_IOC(dir, KVMIO, nr, size)``."""
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


KVM_GET_API_VERSION = ioc(_IOC_NONE, 0x00)
KVM_CREATE_VM = ioc(_IOC_NONE, 0x01)
KVM_GET_VCPU_MMAP_SIZE = ioc(_IOC_NONE, 0x04)
KVM_GET_SUPPORTED_CPUID = ioc(_IOC_READ | _IOC_WRITE, 0x05, 8)  # struct kvm_cpuid2
KVM_CREATE_VCPU = ioc(_IOC_NONE, 0x41)
KVM_SET_USER_MEMORY_REGION = ioc(_IOC_WRITE, 0x46, 32)
KVM_RUN = ioc(_IOC_NONE, 0x80)
KVM_GET_REGS = ioc(_IOC_READ, 0x81, 144)
KVM_SET_REGS = ioc(_IOC_WRITE, 0x82, 144)
KVM_GET_SREGS = ioc(_IOC_READ, 0x83, 312)
KVM_SET_SREGS = ioc(_IOC_WRITE, 0x84, 312)

KVM_EXIT_HLT = 5
_CPUID_ENTRY = struct.Struct("<10I")  # function, index, flags, eax, ebx, ecx, edx, pad[3]
_MAX_CPUID = 256


@dataclass(frozen=True)
class KvmInfo:
    """What /dev/kvm answered."""

    api_version: int
    cpuid_signature: str | None  # leaf 0x40000000 as KVM offers it to guests
    vcpu_offers_vmx: bool  # leaf 1 ECX bit 5: nested VT-x possible
    vcpu_offers_svm: bool  # leaf 0x80000001 ECX bit 2: nested AMD-V possible
    cpuid_entries: int


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


# ---------------------------------------------------------------- KVM_RUN check

@dataclass(frozen=True)
class RunCheck:
    """Timing of real-mode code run through KVM_RUN."""

    ok: bool
    instructions: int
    seconds: float
    ns_per_instruction: float | None
    error: str | None = None

    @property
    def looks_emulated(self) -> bool:
        """Hardware runs this loop at well under 5 ns an instruction."""
        return self.ns_per_instruction is not None and self.ns_per_instruction > 20.0


def _loop_code(iterations: int) -> bytes:
    # 16-bit real mode: mov ecx, N ; l: dec ecx ; jnz l ; hlt
    return (b"\x66\xb9" + struct.pack("<I", iterations) + b"\x66\x49" + b"\x75\xfc" + b"\xf4")


def _run_once(kvm_fd: int, iterations: int) -> float:
    vm = fcntl.ioctl(kvm_fd, KVM_CREATE_VM, 0)
    mem = mmap.mmap(-1, 0x10000, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    vcpu = run = None
    try:
        code = _loop_code(iterations)
        mem[0x1000:0x1000 + len(code)] = code
        cbuf = ctypes.c_char.from_buffer(mem)
        addr = ctypes.addressof(cbuf)
        del cbuf
        region = struct.pack("<IIQQQ", 0, 0, 0, 0x10000, addr)
        fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)
        vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
        size = fcntl.ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE)
        run = mmap.mmap(vcpu, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        sregs = bytearray(312)
        fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs, True)
        struct.pack_into("<Q", sregs, 0, 0)  # cs.base = 0
        struct.pack_into("<H", sregs, 12, 0)  # cs.selector = 0
        fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
        regs = bytearray(144)
        struct.pack_into("<QQ", regs, 128, 0x1000, 0x2)  # rip, rflags
        fcntl.ioctl(vcpu, KVM_SET_REGS, bytes(regs))
        start = time.perf_counter()
        fcntl.ioctl(vcpu, KVM_RUN, 0)
        elapsed = time.perf_counter() - start
        (reason,) = struct.unpack_from("<I", run, 8)
        if reason != KVM_EXIT_HLT:
            raise OSError(f"salida inesperada de KVM_RUN: exit_reason={reason}")
        return elapsed
    finally:
        if run is not None:
            run.close()
        if vcpu is not None:
            os.close(vcpu)
        os.close(vm)
        mem.close()


def _measure(device: str, iterations: int) -> RunCheck:
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        base = min(_run_once(fd, 1) for _ in range(3))
        loop = min(_run_once(fd, iterations) for _ in range(3))
    finally:
        os.close(fd)
    instructions = 2 * iterations
    ns = max(loop - base, 0.0) * 1e9 / instructions
    return RunCheck(True, instructions, loop, ns)


def run_check(device: str = "/dev/kvm", iterations: int = 200_000, timeout: float = 20.0) -> RunCheck:
    """Time ``2 * iterations`` real-mode instructions run through KVM_RUN.

    Runs in a child process so that a KVM that never returns is stopped after
    ``timeout`` seconds instead of hanging the caller.
    """
    argv = [sys.executable, "-m", "labkit.kvmapi", device, str(iterations)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return RunCheck(False, 2 * iterations, timeout, None, f"KVM_RUN no terminó en {timeout:.0f} s")
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        err = (proc.stderr.strip().splitlines() or ["sin salida"])[-1]
        return RunCheck(False, 2 * iterations, 0.0, None, err)
    return RunCheck(**data)


def _main(argv: list[str]) -> int:
    device = argv[0] if argv else "/dev/kvm"
    iterations = int(argv[1]) if len(argv) > 1 else 200_000
    try:
        result = _measure(device, iterations)
    except OSError as err:
        result = RunCheck(False, 2 * iterations, 0.0, None, f"{type(err).__name__}: {err}")
    print(json.dumps(result.__dict__))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))

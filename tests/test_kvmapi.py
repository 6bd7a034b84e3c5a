"""labkit.kvmapi: the minimal VMM over /dev/kvm.

Layouts and numbers are checked against the values in the kernel's
``include/uapi/linux/kvm.h`` and ``arch/x86/include/uapi/asm/kvm.h`` (written
out here by hand from the header, and, where gcc and the headers are
installed, compiled from them). The guest programs are checked against their
documented listings (by decoding their jumps here and with ``objdump``). Live
tests run real guests when /dev/kvm is usable.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest

from labkit import kvmapi as k
from labkit.errors import HostError, LabkitError

KVM_USABLE = os.access("/dev/kvm", os.R_OK | os.W_OK)
live = pytest.mark.skipif(not KVM_USABLE, reason="needs a usable /dev/kvm")


# --------------------------------------------------------------------------- numbers and layouts

def test_ioctl_numbers_match_the_kernel_header():
    # _IO(KVMIO, nr) = 0xAE00 | nr; _IOR/_IOW add the direction (2/1 << 30) and sizeof << 16
    assert k.KVM_GET_API_VERSION == 0xAE00
    assert k.KVM_CREATE_VM == 0xAE01
    assert k.KVM_GET_VCPU_MMAP_SIZE == 0xAE04
    assert k.KVM_GET_SUPPORTED_CPUID == 0xC008AE05
    assert k.KVM_CREATE_VCPU == 0xAE41
    assert k.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert k.KVM_RUN == 0xAE80
    assert k.KVM_GET_REGS == 0x8090AE81
    assert k.KVM_SET_REGS == 0x4090AE82
    assert k.KVM_GET_SREGS == 0x8138AE83
    assert k.KVM_SET_SREGS == 0x4138AE84


def test_exit_reasons_match_the_kernel_header():
    assert (k.KVM_EXIT_UNKNOWN, k.KVM_EXIT_EXCEPTION, k.KVM_EXIT_IO, k.KVM_EXIT_HYPERCALL) == (0, 1, 2, 3)
    assert (k.KVM_EXIT_DEBUG, k.KVM_EXIT_HLT, k.KVM_EXIT_MMIO, k.KVM_EXIT_IRQ_WINDOW_OPEN) == (4, 5, 6, 7)
    assert (k.KVM_EXIT_SHUTDOWN, k.KVM_EXIT_FAIL_ENTRY, k.KVM_EXIT_INTR) == (8, 9, 10)
    assert k.KVM_EXIT_INTERNAL_ERROR == 17 and k.KVM_EXIT_SYSTEM_EVENT == 24
    assert (k.KVM_EXIT_IO_IN, k.KVM_EXIT_IO_OUT) == (0, 1)
    assert k.EXIT_NAMES[2] == "IO" and k.EXIT_NAMES[5] == "HLT" and k.EXIT_NAMES[17] == "INTERNAL_ERROR"


def off(struct, path: str) -> int:
    """Offset of a dotted field path inside a ctypes structure."""
    total, typ = 0, struct
    for name in path.split("."):
        f = getattr(typ, name)
        total += f.offset
        typ = {n: t for n, t, *_ in typ._fields_}[name]
    return total


# (struct, field, offset, size of the whole struct), from the x86_64 header
LAYOUTS = {
    k.KvmUserspaceMemoryRegion: (32, {"slot": 0, "flags": 4, "guest_phys_addr": 8, "memory_size": 16,
                                      "userspace_addr": 24}),
    k.KvmRegs: (144, {"rax": 0, "rbx": 8, "rcx": 16, "rdx": 24, "rsi": 32, "rdi": 40, "rsp": 48,
                      "rbp": 56, "r8": 64, "r15": 120, "rip": 128, "rflags": 136}),
    k.KvmSegment: (24, {"base": 0, "limit": 8, "selector": 12, "type": 14, "present": 15, "dpl": 16,
                        "db": 17, "s": 18, "l": 19, "g": 20, "avl": 21, "unusable": 22, "padding": 23}),
    k.KvmDtable: (16, {"base": 0, "limit": 8, "padding": 10}),
    k.KvmSregs: (312, {"cs": 0, "ds": 24, "es": 48, "fs": 72, "gs": 96, "ss": 120, "tr": 144, "ldt": 168,
                       "gdt": 192, "idt": 208, "cr0": 224, "cr2": 232, "cr3": 240, "cr4": 248, "cr8": 256,
                       "efer": 264, "apic_base": 272, "interrupt_bitmap": 280,
                       "cs.selector": 12, "idt.limit": 216}),
    k.KvmRun: (2352, {"request_interrupt_window": 0, "immediate_exit": 1, "exit_reason": 8,
                      "ready_for_interrupt_injection": 12, "if_flag": 13, "flags": 14, "cr8": 16,
                      "apic_base": 24,
                      "io.direction": 32, "io.size": 33, "io.port": 34, "io.count": 36, "io.data_offset": 40,
                      "mmio.phys_addr": 32, "mmio.data": 40, "mmio.len": 48, "mmio.is_write": 52,
                      "fail_entry.hardware_entry_failure_reason": 32, "fail_entry.cpu": 40,
                      "internal.suberror": 32, "internal.ndata": 36, "internal.data": 40,
                      "kvm_valid_regs": 288, "kvm_dirty_regs": 296, "s": 304}),
}


@pytest.mark.parametrize("struct", list(LAYOUTS), ids=lambda s: s.__name__)
def test_struct_layouts_match_the_kernel_header(struct):
    size, fields = LAYOUTS[struct]
    assert ctypes.sizeof(struct) == size
    for path, expected in fields.items():
        if struct is k.KvmRun and "." in path:   # the union is anonymous: run.io ...
            path = "exit." + path
        assert off(struct, path) == expected, path


C_NAMES = {
    k.KvmUserspaceMemoryRegion: "struct kvm_userspace_memory_region", k.KvmRegs: "struct kvm_regs",
    k.KvmSegment: "struct kvm_segment", k.KvmDtable: "struct kvm_dtable", k.KvmSregs: "struct kvm_sregs",
    k.KvmRun: "struct kvm_run",
}


@pytest.mark.skipif(shutil.which("cc") is None or not os.path.exists("/usr/include/linux/kvm.h"),
                    reason="needs a C compiler and the kernel headers (linux-libc-dev)")
def test_struct_layouts_match_the_installed_header_compiled(tmp_path):
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include <linux/kvm.h>', 'int main(void) {']
    for struct, (_, fields) in LAYOUTS.items():
        c = C_NAMES[struct]
        lines.append(f'printf("%s %zu\\n", "{struct.__name__}", sizeof({c}));')
        for path in fields:
            lines.append(f'printf("%s.%s %zu\\n", "{struct.__name__}", "{path}", offsetof({c}, {path}));')
    lines.append("return 0; }")
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    subprocess.run(["cc", "-o", str(tmp_path / "layout"), str(src)], check=True)
    out = subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True, check=True).stdout
    compiled = dict(line.rsplit(" ", 1) for line in out.splitlines())
    for struct, (_, fields) in LAYOUTS.items():
        assert int(compiled[struct.__name__]) == ctypes.sizeof(struct)
        for path in fields:
            ours = off(struct, ("exit." + path) if struct is k.KvmRun and "." in path else path)
            assert int(compiled[f"{struct.__name__}.{path}"]) == ours, path


# --------------------------------------------------------------------------- guest programs

PROGRAMS = {
    "hola": k.hello_program(),
    "hola-otro": k.hello_program("¡Otro mensaje!\n"),
    "suma": k.sum_program(),
    "bucle": k.loop_program(1000),
    "mmio": k.mmio_program(),
    "bucle-infinito": k.spin_program(),
}
BRANCHES = {"jz": 2, "jnz": 2, "ja": 2, "jmp": 2, "call": 3}
BRANCH_COUNT = {"hola": 2, "hola-otro": 2, "suma": 6, "bucle": 1, "mmio": 0, "bucle-infinito": 1}


def code_lines(p: k.Program):
    addr = p.origin
    for line in p.lines:
        yield addr, line
        addr += len(line.code)


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_branches_land_on_their_labels(name):
    p = PROGRAMS[name]
    labels = p.labels
    seen = 0
    for addr, line in code_lines(p):
        op, _, target = line.asm.partition(" ")
        if op in BRANCHES:
            n = BRANCHES[op]
            assert len(line.code) == n
            rel = int.from_bytes(line.code[1:], "little", signed=True)
            dest = labels[target] if target != "$" else addr
            assert addr + n + rel == dest, f"{line.asm} at {addr:#x}"
            seen += 1
    assert seen == BRANCH_COUNT[name]


def test_hello_program_is_what_its_listing_says():
    p = k.hello_program("Hi\n")
    assert p.code[:3] == b"\xba\xf8\x03"            # mov dx, 0x3f8
    assert p.code[0x0B] == 0xEE                      # out dx, al
    assert p.code[0x0E] == 0xF4                      # hlt
    assert p.code[15:] == b"Hi\n\0"                  # the message, after 15 bytes of code
    assert p.labels == {"siguiente": 0x1006, "fin": 0x100E, "mensaje": 0x100F}
    assert p.code[3:6] == b"\xbe\x0f\x10"            # mov si, 0x100f: SI points at the message
    assert p.instructions == 6 + 5 * 3
    assert "out dx, al" in p.listing() and "KVM_EXIT_IO" in p.listing()
    with pytest.raises(ValueError):
        k.hello_program("a\0b")


def test_sum_and_loop_programs_have_the_documented_size_and_opcodes():
    s = k.sum_program()
    assert len(s.code) == 0x4D
    assert s.labels == {"dividir": 0x1017, "escribir": 0x1027, "leer_numero": 0x1032, "otro": 0x1035,
                        "fin_numero": 0x1049}
    assert s.code.count(b"\xee") == 2 and s.code[0x35] == 0xEC and s.code[0x31] == 0xF4
    loop = k.loop_program(0x01020304)
    assert loop.code == b"\x66\xb9\x04\x03\x02\x01\x66\x49\x75\xfc\xf4"
    assert loop.instructions == 2 * 0x01020304 + 2
    with pytest.raises(ValueError):
        k.loop_program(0)
    assert k.mmio_program().code[-1] == 0xF4 and k.spin_program().code == b"\xeb\xfe"


SYNONYMS = {"jz": "je", "jnz": "jne", "lodsb": "lods"}
REGS = re.compile(r"\b(e?[abcd]x|[abcd][lh]|e?[sd]i|e?[sb]p|[cdefgs]s)\b")


def numbers(text: str) -> list[int]:
    text = re.sub(r"'(.)'", lambda m: str(ord(m.group(1))), text)
    return [int(n, 0) for n in re.findall(r"\b(?:0x[0-9a-f]+|\d+)\b", text)]


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils (objdump)")
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_listing_matches_objdump(name, tmp_path):
    p = PROGRAMS[name]
    code = b"".join(line.code for line in p.lines if not line.is_data)
    (tmp_path / "code.bin").write_bytes(code)
    out = subprocess.run(["objdump", "-D", "-b", "binary", "-mi8086", "-M", "intel",
                          f"--adjust-vma={p.origin:#x}", str(tmp_path / "code.bin")],
                         capture_output=True, text=True, check=True).stdout
    disasm = []
    for line in out.splitlines():
        m = re.match(r"\s+([0-9a-f]+):\t([0-9a-f ]+?)\s*\t(\S+)\s*(.*)$", line)
        if m:
            disasm.append((int(m.group(1), 16), bytes.fromhex(m.group(2)), m.group(3), m.group(4)))
    ours = [(addr, line) for addr, line in code_lines(p) if not line.is_data]
    assert len(disasm) == len(ours)
    labels = p.labels
    for (addr, line), (d_addr, d_bytes, d_op, d_args) in zip(ours, disasm):
        op, _, args = line.asm.partition(" ")
        assert (addr, line.code) == (d_addr, d_bytes), line.asm
        assert SYNONYMS.get(op, op) == d_op, line.asm
        if op in BRANCHES:
            assert int(d_args, 16) == (addr if args == "$" else labels[args]), line.asm
        elif op not in SYNONYMS:
            assert REGS.findall(args.lower()) == REGS.findall(d_args.lower()), line.asm
            assert numbers(args) == numbers(d_args.replace("WORD PTR ", "")), line.asm


# --------------------------------------------------------------------------- the VMM loop, without KVM

class FakeVcpu:
    """Plays KVM: each KVM_RUN writes the next scripted exit into a kvm_run buffer."""

    def __init__(self, script):
        self.buf = bytearray(8192)
        self.run = k.KvmRun.from_buffer(self.buf)
        self.script = list(script)
        self.calls = 0

    def ioctl(self, fd, request, arg=0, *rest):
        assert request == k.KVM_RUN
        self.calls += 1
        step = self.script.pop(0)
        if step == "EINTR":
            raise InterruptedError(errno.EINTR, "Interrupted system call")
        step(self.run, self.buf)
        return 0

    def vm(self, stdin=b""):
        return SimpleNamespace(kvm_run=self.run, run_map=self.buf, vcpu_fd=-1, exits=[], output=bytearray(),
                               stdin=bytearray(stdin), started=time.perf_counter())


def out_byte(port: int, value: int):
    def step(run, buf):
        run.exit_reason = k.KVM_EXIT_IO
        run.io.direction, run.io.size, run.io.port, run.io.count, run.io.data_offset = 1, 1, port, 1, 4096
        buf[4096] = value
    return step


def in_byte(run, buf):
    run.exit_reason = k.KVM_EXIT_IO
    run.io.direction, run.io.size, run.io.port, run.io.count, run.io.data_offset = 0, 1, k.SERIAL_PORT, 1, 4096


def reason(r: int, **fields):
    def step(run, buf):
        run.exit_reason = r
        for name, value in fields.items():
            obj, attr = name.split("__")
            setattr(getattr(run, obj), attr, value)
    return step


def test_loop_handles_io_both_ways_and_stops_at_hlt(monkeypatch):
    fake = FakeVcpu([out_byte(0x3F8, ord("A")), "EINTR", out_byte(0xE9, ord("B")), out_byte(0x80, 1),
                     in_byte, in_byte, reason(k.KVM_EXIT_HLT)])
    monkeypatch.setattr(k, "fcntl", fake)
    vm = fake.vm(stdin=b"x")
    k.vmm_loop(vm)
    assert vm.output == b"AB"                        # port 0x80 (POST codes) is not output
    assert [e.reason for e in vm.exits] == ["IO"] * 5 + ["HLT"]
    assert [(e.direction, e.address, e.data) for e in vm.exits[3:5]] == [("in", 0x3F8, b"x"), ("in", 0x3F8, b"\0")]
    assert fake.buf[4096] == 0                       # the last IN got 0: no input left
    assert fake.calls == 7                           # EINTR: back into KVM_RUN, not an exit


def test_loop_answers_mmio_reads_and_records_writes(monkeypatch):
    def write(run, buf):
        run.exit_reason = k.KVM_EXIT_MMIO
        run.mmio.phys_addr, run.mmio.len, run.mmio.is_write = 0xB8000, 2, 1
        run.mmio.data[0], run.mmio.data[1] = 0x48, 0x07

    def read(run, buf):
        run.exit_reason = k.KVM_EXIT_MMIO
        run.mmio.phys_addr, run.mmio.len, run.mmio.is_write = 0xFEE00000, 4, 0

    fake = FakeVcpu([write, read, reason(k.KVM_EXIT_SHUTDOWN)])
    monkeypatch.setattr(k, "fcntl", fake)
    vm = fake.vm()
    k.vmm_loop(vm)
    assert [(e.reason, e.direction, e.address, e.data) for e in vm.exits] == [
        ("MMIO", "write", 0xB8000, b"\x48\x07"), ("MMIO", "read", 0xFEE00000, b"\xff" * 4),
        ("SHUTDOWN", None, None, b"")]
    assert bytes(fake.run.mmio.data[:4]) == b"\xff" * 4


@pytest.mark.parametrize("step, words", [
    (reason(k.KVM_EXIT_FAIL_ENTRY, fail_entry__hardware_entry_failure_reason=0x21), ["KVM_EXIT_FAIL_ENTRY", "0x21"]),
    (reason(k.KVM_EXIT_INTERNAL_ERROR, internal__suberror=1), ["KVM_EXIT_INTERNAL_ERROR", "emular"]),
    (reason(k.KVM_EXIT_DEBUG), ["KVM_EXIT_DEBUG"]),
])
def test_loop_explains_exits_it_cannot_handle(monkeypatch, step, words):
    fake = FakeVcpu([out_byte(0x3F8, 65), step])
    monkeypatch.setattr(k, "fcntl", fake)
    vm = fake.vm()
    with pytest.raises(k.VmExitError) as info:
        k.vmm_loop(vm)
    assert isinstance(info.value, HostError) and info.value.hint
    for w in words:
        assert w in info.value.message
    assert len(vm.exits) == 2                        # the failing exit is recorded too


def test_loop_stops_after_max_exits(monkeypatch):
    fake = FakeVcpu([out_byte(0x3F8, 65)] * 5)
    monkeypatch.setattr(k, "fcntl", fake)
    with pytest.raises(k.VmExitError, match="3 salidas"):
        k.vmm_loop(fake.vm(), max_exits=3)


def test_vmm_loop_is_short_enough_to_show():
    import inspect
    assert len(inspect.getsource(k.vmm_loop).splitlines()) <= 60


# --------------------------------------------------------------------------- without /dev/kvm

def test_missing_device_is_explained_in_spanish(tmp_path):
    path = str(tmp_path / "kvm")
    with pytest.raises(k.KvmUnavailableError) as info:
        k.run(k.hello_program(), device=path)
    err = info.value
    assert isinstance(err, LabkitError) and isinstance(err.__cause__, FileNotFoundError)
    assert err.message.startswith(f"No existe {path}")
    assert "labkit doctor" in err.hint


def test_regular_file_is_not_kvm(tmp_path):
    path = tmp_path / "kvm"
    path.write_text("no soy KVM")
    with pytest.raises(k.KvmUnavailableError, match="no es el dispositivo de KVM") as info:
        k.Vm(str(path))
    assert "/dev/kvm (10:232)" in info.value.hint


def test_permission_denied_says_how_to_join_the_kvm_group(monkeypatch):
    def denied(path, flags, *a):
        raise PermissionError(errno.EACCES, "Permission denied", path)
    monkeypatch.setattr(k.os, "open", denied)
    with pytest.raises(k.KvmUnavailableError, match="permiso denegado") as info:
        k.Vm("/dev/kvm")
    assert "usermod -aG kvm" in info.value.hint


def test_run_or_recorded_falls_back_to_a_labelled_recording(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(k, "_explained", set())
    r = k.run_or_recorded(k.hello_program(), device=str(tmp_path / "kvm"))
    printed = capsys.readouterr().out
    assert "No se puede ejecutar en vivo" in printed and "Qué hacer" in printed
    assert not r.live and "GRABADA" in r.summary()
    k.run_or_recorded(k.hello_program(), device=str(tmp_path / "kvm"))
    assert "Qué hacer" not in capsys.readouterr().out      # the full explanation only once
    assert r.text == "Hola desde el invitado\n"
    s = k.run_or_recorded(k.sum_program(), "1 2\n", device=str(tmp_path / "kvm"))
    assert "La grabación es con la entrada" in capsys.readouterr().out
    assert s.text == "6912\n"


def test_recordings_are_consistent():
    hola = k.recorded("hola")
    assert hola.output == b"Hola desde el invitado\n"
    assert [e.reason for e in hola.exits] == ["IO"] * 23 + ["HLT"]
    assert b"".join(e.data for e in hola.exits) == hola.output
    assert hola.instructions == k.hello_program().instructions
    suma = k.recorded("suma")
    assert suma.stdin == b"1234 5678\n" and suma.text == f"{1234 + 5678}\n"
    assert k.recorded("mmio").exits[0].address == 0xB8000
    t = k.recorded("tiempo")
    assert t.emulated and t.recorded and "GRABADA" in t.explain()
    times = [e.t for e in hola.exits]
    assert times == sorted(times) and hola.elapsed == times[-1]
    with pytest.raises(KeyError):
        k.recorded("nada")


def test_run_survives_a_round_trip_through_json():
    r = k.recorded("suma")
    again = k.Run.from_dict(json.loads(json.dumps(r.to_dict())))
    assert again == r


def test_timing_says_which_kind_of_execution_it_saw():
    hw = k.Timing(100, 198, 1e-4, 5e-5, 0.3, 1)
    emu = k.Timing(100, 198, 1e-1, 5e-5, 430.0, 1)
    assert not hw.emulated and "VT-x/AMD-V" in hw.explain()
    assert emu.emulated and "EMULAN" in emu.explain()


def test_device_info_for_a_missing_device(tmp_path):
    assert "No existe" in k.device_info(str(tmp_path / "kvm"))


# --------------------------------------------------------------------------- live, on /dev/kvm

@live
def test_hello_prints_its_message_with_one_exit_per_byte():
    msg = "Hola, KVM\n"
    r = k.run(k.hello_program(msg))
    assert r.live and r.text == msg
    assert [e.reason for e in r.exits] == ["IO"] * len(msg) + ["HLT"]
    assert all((e.direction, e.address, e.size) == ("out", 0x3F8, 1) for e in r.exits[:-1])
    assert b"".join(e.data for e in r.exits) == msg.encode()
    assert r.elapsed == r.exits[-1].t > 0


@live
@pytest.mark.parametrize("a, b", [(1234, 5678), (0, 0), (4_000_000_000, 294_967_295), (7, 35)])
def test_sum_program_adds_what_it_reads(a, b):
    r = k.run(k.sum_program(), f"{a} {b}\n")
    assert r.text == f"{a + b}\n"
    reads = [e for e in r.exits if e.direction == "in"]
    assert b"".join(e.data for e in reads) == f"{a} {b}\n".encode()
    assert r.counts["HLT"] == 1


@live
def test_mmio_write_to_video_memory_is_an_exit():
    r = k.run(k.mmio_program())
    assert [(e.reason, e.direction, e.address, e.size, e.data) for e in r.exits] == [
        ("MMIO", "write", 0xB8000, 2, b"H\x07"), ("HLT", None, None, None, b"")]


@live
def test_a_guest_that_never_halts_is_stopped_and_the_process_goes_on():
    start = time.perf_counter()
    with pytest.raises(k.GuestTimeoutError) as info:
        k.run(k.spin_program(), timeout=0.5)
    assert 0.4 < time.perf_counter() - start < 5
    assert "no se detuvo" in info.value.message and info.value.hint
    assert info.value.run is not None and info.value.run.exits == ()
    assert k.run(k.hello_program("sigo vivo\n")).text == "sigo vivo\n"  # the next run works


@live
def test_from_another_thread_the_guest_runs_in_a_child_process():
    box = {}

    def work():
        box["sum"] = k.run(k.sum_program(), "20 22\n")
        try:
            k.run(k.spin_program(), timeout=0.5)
        except k.GuestTimeoutError as err:
            box["err"] = err

    t = threading.Thread(target=work)
    t.start()
    t.join(60)
    assert box["sum"].text == "42\n" and box["sum"].counts["IO"] == 6 + 3  # "20 22\n" in, "42\n" out
    assert isinstance(box["err"], k.GuestTimeoutError)


@live
def test_vm_registers_and_descriptors():
    with k.Vm() as vm:
        vm.load(k.loop_program(5))
        regs = vm.get_regs()
        assert (regs.rip, regs.rflags) == (0x1000, 0x2)
        assert vm.get_sregs().cs.base == 0
        r = vm.run()
        assert vm.get_regs().rcx == 0               # the loop counted ECX down to 0
        assert vm.get_regs().rip == 0x100B          # just after the HLT
        kinds = [target for _, target in vm.fds()]
        assert kinds[1] == "anon_inode:kvm-vm" and kinds[2].startswith("anon_inode:kvm-vcpu")
    assert r.counts == {"HLT": 1} and vm.vcpu_fd == -1


@live
def test_time_instructions_measures_something_plausible():
    t = k.time_instructions(20_000, repeats=2)
    assert t.instructions == 2 * (20_000 - 1)
    assert 0 < t.ns_per_instruction < 100_000
    assert t.loop_seconds > t.empty_seconds and t.exits >= 1
    assert ("EMULAN" in t.explain()) == t.emulated


def test_time_or_recorded_falls_back_to_the_recorded_timing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(k, "_explained", set())
    t = k.time_or_recorded(device=str(tmp_path / "kvm"))
    assert "No se puede medir en vivo" in capsys.readouterr().out
    assert t.recorded and t.ns_per_instruction > k.EMULATED_NS


@live
def test_time_instructions_grows_the_loop_until_it_is_measurable():
    t = k.time_instructions(100, repeats=1, min_seconds=0.005)
    assert t.iterations > 100 and str(t.iterations).strip("0") == "1"
    assert t.loop_seconds - t.empty_seconds >= 0.005


@live
def test_a_program_larger_than_guest_ram_is_refused_in_spanish():
    from labkit.errors import InputError
    with k.Vm(mem_size=0x1000) as vm, pytest.raises(InputError, match="más allá de la RAM"):
        vm.load(k.hello_program())

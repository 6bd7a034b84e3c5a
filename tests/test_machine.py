"""labkit.machine: the spec, the pure argv builder, the helpers, and real machines under TCG."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest

from labkit.errors import InputError, ToolMissingError
from labkit.machine import (
    DEMOS,
    DriveSpec,
    Machine,
    MachineError,
    MachineRuntime,
    MachineSpec,
    MarkerTimeout,
    UefiFirmware,
    build_machine_argv,
    decode_vga_text,
    demo,
    find_memtest,
    find_nic_rom,
    find_ovmf,
    key_sequence,
    png_size,
    ppm_to_png,
    strip_ansi,
)

RT = MachineRuntime(Path("/run/lab,kit/m"))


def _after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


# ---------------------------------------------------------------- spec
def test_spec_defaults_and_prefix():
    spec = MachineSpec(name="bios")
    assert spec.name == "labkit-bios"
    assert (spec.machine, spec.memory, spec.vga, spec.accel) == ("q35", 256, "std", "auto")
    assert MachineSpec(memory="1G").memory == 1024


@pytest.mark.parametrize("kwargs, words", [
    ({"name": "a b"}, "Nombre"),
    ({"machine": "microvm"}, "Tipo de máquina"),
    ({"accel": "hvf"}, "Acelerador"),
    ({"vga": "qxl"}, "Tarjeta gráfica"),
    ({"bios": "/x.bin", "uefi": UefiFirmware("/c", "/v")}, "a la vez"),
    ({"append": "console=ttyS0"}, "kernel="),
    ({"kernel": "/k", "append": "a\nb"}, "saltos de línea"),
    ({"nic": "e1000,netdev=x"}, "tarjeta de red"),
    ({"boot": "x;"}, "Orden de arranque"),
    ({"boot_strict": True}, "boot="),
    ({"memory": 0}, "Memoria"),
])
def test_spec_rejects(kwargs, words):
    with pytest.raises(InputError) as err:
        MachineSpec(**kwargs)
    assert words in err.value.message


def test_drive_spec_rejects():
    with pytest.raises(InputError):
        DriveSpec("")
    with pytest.raises(InputError):
        DriveSpec("/x.iso", media="tape")
    with pytest.raises(InputError):
        DriveSpec("/x.iso", media="cdrom", interface="virtio")
    with pytest.raises(InputError):
        DriveSpec("/x.img", format="vmdk")


# ---------------------------------------------------------------- argv builder
def test_argv_tcg_minimal():
    argv = build_machine_argv(MachineSpec(name="m"), "tcg", RT)
    assert argv[:3] == ["qemu-system-x86_64", "-name", "labkit-m,debug-threads=on"]
    assert _after(argv, "-machine") == ["q35"]
    assert _after(argv, "-accel") == ["tcg,thread=single"]
    assert "-cpu" not in argv  # the default model is faster under TCG
    assert _after(argv, "-m") == ["256"]
    for flag in ("-nodefaults", "-no-user-config"):
        assert flag in argv
    assert _after(argv, "-display") == ["none"] and _after(argv, "-vga") == ["std"]
    # commas in the runtime path are doubled inside key=value option lists
    assert _after(argv, "-chardev") == [
        "file,id=serial0,path=/run/lab,,kit/m/serial.log",
        "file,id=debugcon,path=/run/lab,,kit/m/debugcon.log",
        "socket,id=qmp,path=/run/lab,,kit/m/qmp.sock,server=on,wait=off",
    ]
    assert _after(argv, "-serial") == ["chardev:serial0"]
    assert _after(argv, "-device") == ["isa-debugcon,iobase=0x402,chardev=debugcon"]
    assert _after(argv, "-mon") == ["chardev=qmp,mode=control"]
    for flag in ("-netdev", "-boot", "-bios", "-kernel", "-drive"):
        assert flag not in argv


def test_argv_kvm_uses_host_cpu():
    argv = build_machine_argv(MachineSpec(machine="pc", memory=128), "kvm", RT)
    assert _after(argv, "-accel") == ["kvm"] and _after(argv, "-cpu") == ["host"]
    assert _after(argv, "-machine") == ["pc"] and _after(argv, "-m") == ["128"]


def test_argv_rejects_unresolved_accel():
    with pytest.raises(InputError):
        build_machine_argv(MachineSpec(), "auto", RT)


def test_argv_uefi_flash_pair():
    spec = MachineSpec(uefi=UefiFirmware("/fw/CODE,1.fd", "/fw/VARS.fd"))
    drives = _after(build_machine_argv(spec, "tcg", RT), "-drive")
    assert drives == ["if=pflash,format=raw,unit=0,readonly=on,file=/fw/CODE,,1.fd",
                      "if=pflash,format=raw,unit=1,file=/run/lab,,kit/m/uefi-vars.fd"]


def test_argv_kernel_paths_are_verbatim():
    """-bios, -kernel, -initrd and -append take their argument as is (QEMU does not split it)."""
    spec = MachineSpec(kernel="/b/mem,test.bin", initrd="/b/i,rd", append="console=ttyS0,115200")
    argv = build_machine_argv(spec, "tcg", RT)
    assert _after(argv, "-kernel") == ["/b/mem,test.bin"]
    assert _after(argv, "-initrd") == ["/b/i,rd"]
    assert _after(argv, "-append") == ["console=ttyS0,115200"]
    assert _after(build_machine_argv(MachineSpec(bios="/f/bios,x.bin"), "tcg", RT), "-bios") == ["/f/bios,x.bin"]


def test_argv_drives_nic_and_boot():
    spec = MachineSpec(drives=(DriveSpec("/isos/a,b.iso", media="cdrom"),
                               DriveSpec("/d/disk.qcow2", format="qcow2", interface="virtio", readonly=False)),
                       nic="virtio-net-pci", boot="dn", boot_menu=True, boot_strict=True)
    argv = build_machine_argv(spec, "tcg", RT)
    assert _after(argv, "-drive") == [
        "file=/isos/a,,b.iso,format=raw,media=cdrom,if=ide,index=0,readonly=on",
        "file=/d/disk.qcow2,format=qcow2,media=disk,if=virtio,readonly=off",
    ]
    assert _after(argv, "-netdev") == ["user,id=net0,restrict=on"]
    assert "virtio-net-pci,netdev=net0" in _after(argv, "-device")
    assert _after(argv, "-boot") == ["order=dn,menu=on,strict=on"]


def test_argv_without_consoles():
    argv = build_machine_argv(MachineSpec(serial=False, debugcon=False, vga="none"), "tcg", RT)
    assert "-serial" not in argv and "isa-debugcon" not in " ".join(argv)
    assert _after(argv, "-vga") == ["none"]
    assert len(_after(argv, "-chardev")) == 1  # only QMP


def test_every_nic_is_restricted():
    for model in ("e1000", "rtl8139", "virtio-net-pci"):
        argv = build_machine_argv(MachineSpec(nic=model), "tcg", RT)
        assert all("restrict=on" in n for n in _after(argv, "-netdev"))


# ---------------------------------------------------------------- pure helpers
def test_strip_ansi():
    raw = "\x1b[2J\x1b[01;01H\x1b[=3h\x1b[1m\x1b[33m\x1b[40mShell> \x1b[0m\x1b[37m\x1b[40m\r\nok\x00"
    assert strip_ansi(raw) == "Shell> \nok"


def test_decode_vga_text():
    rows = ["SeaBIOS (version x)", "", "No bootable device."]
    data = bytearray()
    for r in range(25):
        text = rows[r] if r < len(rows) else ""
        for c in range(80):
            data += bytes([ord(text[c]) if c < len(text) else 0x20, 0x07])
    data[2 * 80 * 2 + 2 * 79] = 0x00  # a NUL cell is a blank
    data[5 * 80 * 2] = 0xB3  # code page 437 box drawing
    assert decode_vga_text(bytes(data)) == "SeaBIOS (version x)\n\nNo bootable device.\n\n\n│"


def _png(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def test_png_size():
    assert png_size(_png(720, 400)) == (720, 400)
    with pytest.raises(MachineError):
        png_size(b"P6\n720 400\n255\n")
    broken = bytearray(_png(720, 400))
    broken[20] ^= 1
    with pytest.raises(MachineError):
        png_size(bytes(broken))


def test_ppm_to_png():
    ppm = b"P6\n2 1\n255\n" + bytes([255, 0, 0, 0, 0, 255])
    png = ppm_to_png(ppm)
    assert png_size(png) == (2, 1)
    idat = png.index(b"IDAT")
    length = struct.unpack(">I", png[idat - 4:idat])[0]
    assert zlib.decompress(png[idat + 4:idat + 4 + length]) == b"\0" + ppm[-6:]
    assert png.endswith(b"IEND\xaeB`\x82")
    with pytest.raises(MachineError):
        ppm_to_png(b"P6\n2 1\n255\n\0")
    with pytest.raises(MachineError):
        ppm_to_png(b"P3\n2 1\n255\n")


def test_key_sequence():
    assert key_sequence("pci\n") == [["p"], ["c"], ["i"], ["ret"]]
    assert key_sequence("Ab -:") == [["shift", "a"], ["b"], ["spc"], ["minus"], ["shift", "semicolon"]]
    with pytest.raises(InputError):
        key_sequence("ñ")


# ---------------------------------------------------------------- finding firmware
def _descriptor(path: Path, code: Path, template: Path, features: list[str]) -> None:
    path.write_text(json.dumps({
        "interface-types": ["uefi"],
        "mapping": {"device": "flash", "executable": {"filename": str(code), "format": "raw"},
                    "nvram-template": {"filename": str(template), "format": "raw"}},
        "targets": [{"architecture": "x86_64", "machines": ["pc-q35-*"]}],
        "features": features,
    }))


def test_find_ovmf_prefers_a_plain_descriptor(tmp_path):
    files = {n: tmp_path / n for n in ("SB_CODE.fd", "SB_VARS.fd", "CODE.fd", "VARS.fd")}
    for f in files.values():
        f.write_bytes(b"\0")
    desc = tmp_path / "firmware"
    desc.mkdir()
    _descriptor(desc / "40-secure.json", files["SB_CODE.fd"], files["SB_VARS.fd"], ["secure-boot", "requires-smm"])
    _descriptor(desc / "60-plain.json", files["CODE.fd"], files["VARS.fd"], ["acpi-s3"])
    (desc / "10-broken.json").write_text("{")
    fw = find_ovmf(dirs=[str(desc)], pairs=())
    assert fw == UefiFirmware(str(files["CODE.fd"]), str(files["VARS.fd"]))


def test_find_ovmf_falls_back_to_known_paths_then_fails(tmp_path):
    code, template = tmp_path / "OVMF_CODE.fd", tmp_path / "OVMF_VARS.fd"
    code.write_bytes(b"\0")
    template.write_bytes(b"\0")
    assert find_ovmf(dirs=[str(tmp_path / "none")], pairs=[(str(code), str(template))]).code == str(code)
    with pytest.raises(ToolMissingError) as err:
        find_ovmf(dirs=[], pairs=[(str(tmp_path / "x"), str(template))])
    assert err.value.package == "ovmf" and "apt-get install ovmf" in err.value.hint


def test_find_memtest_and_nic_rom(tmp_path):
    iso = tmp_path / "memtest86+x64.iso"
    iso.write_bytes(b"\0")
    assert find_memtest([str(tmp_path / "nope.bin"), str(iso)]) == str(iso)
    with pytest.raises(ToolMissingError) as err:
        find_memtest([str(tmp_path / "nope.bin")])
    assert err.value.package == "memtest86+"
    (tmp_path / "efi-e1000.rom").write_bytes(b"\0")
    assert find_nic_rom("e1000", dirs=[str(tmp_path)]) == str(tmp_path / "efi-e1000.rom")
    with pytest.raises(ToolMissingError) as err:
        find_nic_rom("virtio-net-pci", dirs=[str(tmp_path)])
    assert err.value.package == "ipxe-qemu"
    with pytest.raises(InputError):
        find_nic_rom("ne2k_isa")


def test_demo_unknown_key():
    with pytest.raises(InputError) as err:
        demo("windows95")
    assert "seabios" in err.value.hint


# ---------------------------------------------------------------- real machines under TCG
def _qemu_pids(name: str) -> set[int]:
    out = subprocess.run(["pgrep", "-f", f"qemu-system-x86_64 -name {name}"], capture_output=True, text=True,
                         check=False)
    return {int(p) for p in out.stdout.split()}


def _tcg_demo(key: str):
    try:
        d = demo(key, accel="tcg")
    except ToolMissingError as err:
        pytest.skip(f"falta el paquete {err.package}: {err.message}")
    return d


# seconds to the marker under TCG here (measured: 0.2, 5, 0.6, 7.5) with a wide margin for a busy host
BOUNDS = {"seabios": 30, "ovmf": 60, "memtest": 45, "ipxe": 60}


@pytest.mark.integration
@pytest.mark.parametrize("key", DEMOS)
def test_demo_reaches_its_marker(key):
    d = _tcg_demo(key)
    m = Machine(d.spec)
    with m:
        assert m.accel == "tcg" and "explícitamente" in m.accel_reason
        assert m.command_line().startswith(f"qemu-system-x86_64 -name {d.spec.name},")
        seconds = d.reach(m)
        assert 0 < seconds < BOUNDS[key]
        assert m.marks[-1].marker == d.marker and m.marks[-1].source == d.source
        width, height = png_size(m.screendump())
        assert width >= 640 and height >= 400
        directory = m._runtime.directory
        pid = m.pid
        assert pid in _qemu_pids(d.spec.name)
    assert not m.running and not directory.exists()
    assert pid not in _qemu_pids(d.spec.name)


@pytest.mark.integration
def test_seabios_screen_and_debug_log():
    d = _tcg_demo("seabios")
    with Machine(d.spec) as m:
        d.reach(m)
        screen = m.screen_text()
        assert screen.startswith("SeaBIOS (version") and "No bootable device." in screen
        log = m.console("debugcon")
        assert "Running on QEMU (q35)" in log and "PCI: init bdf=00:01.0 id=1234:1111" in log
        assert m.qmp("query-status")["status"] == "running"
        with pytest.raises(MarkerTimeout) as err:
            m.wait_for("texto que nunca sale", 0.3, source="debugcon")
        assert "No bootable device" in err.value.message  # the last lines are shown
    assert "No bootable device" in m.console("debugcon")  # still readable after stop


@pytest.mark.integration
def test_ovmf_shell_answers_a_command():
    d = _tcg_demo("ovmf")
    with Machine(d.spec) as m:
        d.reach(m)
        out = m.send_line("pci", "Shell>", 60)
        assert "Host/PCI bridge" in out and "Vendor 1234 Device 1111" in out
        assert not out.startswith("Shell>") and "pci" not in out.splitlines()[0]
        with pytest.raises(MachineError) as err:
            m.screen_text()  # UEFI draws a graphical screen
        assert "modo gráfico" in err.value.message


@pytest.mark.integration
def test_missing_file_and_bad_option_fail_cleanly(tmp_path):
    with pytest.raises(InputError):
        Machine(MachineSpec(name="labkit-test-nofile", accel="tcg", kernel=str(tmp_path / "no"))).start()
    from labkit.guest.runner import runtime_base

    before = set(runtime_base().glob("labkit-test-badnic-*"))
    m = Machine(MachineSpec(name="labkit-test-badnic", accel="tcg", nic="no-such-nic"))
    with pytest.raises(MachineError) as err:
        m.start()
    assert "QEMU dijo" in err.value.message and "no-such-nic" in err.value.message
    assert not m.running and m._runtime is None
    assert set(runtime_base().glob("labkit-test-badnic-*")) == before


def _orphan_script() -> str:
    return textwrap.dedent("""
        import time
        from labkit.machine import Machine, MachineSpec
        m = Machine(MachineSpec(name="labkit-test-orphan", accel="tcg")).start()
        print(m.pid, m._runtime.directory, flush=True)
        time.sleep(600)
    """)


@pytest.mark.integration
def test_kill_9_of_the_owner_leaves_nothing():
    from labkit.guest.runner import sweep_stale

    proc = subprocess.Popen([sys.executable, "-c", _orphan_script()], stdout=subprocess.PIPE, text=True)
    try:
        pid_text, directory = proc.stdout.readline().split()
        qemu_pid = int(pid_text)
        assert qemu_pid in _qemu_pids("labkit-test-orphan")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    while qemu_pid in _qemu_pids("labkit-test-orphan") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_pid not in _qemu_pids("labkit-test-orphan"), "QEMU survived its owner"
    sweep_stale()
    assert not Path(directory).exists()


@pytest.mark.integration
def test_screendump_falls_back_to_ppm_on_old_qemu():
    """QEMU before 7.1 has no screendump format: the PPM it writes is converted to PNG."""
    d = _tcg_demo("seabios")
    with Machine(d.spec) as m:
        d.reach(m)
        m._png = False  # behave as with an old QEMU
        assert png_size(m.screendump()) == (720, 400)


def test_sandbox_only_when_asked():
    from labkit.guest.argv import SANDBOX

    assert "-sandbox" not in build_machine_argv(MachineSpec(), "tcg", RT)
    argv = build_machine_argv(MachineSpec(), "tcg", RT, sandbox=True)
    assert argv[-2:] == ["-sandbox", SANDBOX]

"""GuestSpec validation and the pure QEMU argv builder (KVM and TCG)."""

from pathlib import Path

import pytest

from labkit.errors import InputError
from labkit.guest import ChannelSpec, DiskSpec, GuestSpec, build_argv, kernel_cmdline, qopt
from labkit.guest.agent import decode_exec_status, make_command
from labkit.guest.argv import BootFiles, Runtime, opts, shell_line
from labkit.guest.runner import host_tsc_khz

BOOT = BootFiles(Path("/cache/vmlinux"), Path("/cache/initramfs.cpio"))
RT = Runtime(Path("/run/labkit/g1"))


def _after(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


@pytest.mark.parametrize("value,mib", [(256, 256), ("256", 256), ("512M", 512), ("1G", 1024), ("1.5G", 1536),
                                       ("1,5G", 1536), ("2GiB", 2048)])
def test_memory_parsing(value, mib):
    assert GuestSpec(memory=value).memory == mib


@pytest.mark.parametrize("kwargs,text", [
    ({"memory": 0}, "insuficiente"),
    ({"memory": "abc"}, "no válida"),
    ({"memory": "-5G"}, "no válida"),
    ({"vcpus": "abc"}, "vCPU"),
    ({"vcpus": 0}, "vCPU"),
    ({"name": "a/b"}, "Nombre"),
    ({"name": "con espacios"}, "Nombre"),
    ({"accel": "hvf"}, "Acelerador"),
    ({"machine": "virt"}, "máquina"),
    ({"cmdline": "a\nb"}, "saltos de línea"),
])
def test_bad_values_are_refused_at_construction(kwargs, text):
    with pytest.raises(InputError) as err:
        GuestSpec(**kwargs)
    assert text in err.value.message
    assert err.value.hint


def test_names_are_prefixed_once():
    assert GuestSpec(name="demo").name == "labkit-demo"
    assert GuestSpec(name="labkit-demo").name == "labkit-demo"


def test_channel_and_disk_validation():
    with pytest.raises(InputError):
        ChannelSpec("org.qemu.guest_agent.0")
    with pytest.raises(InputError):
        ChannelSpec("mal nombre")
    with pytest.raises(InputError):
        GuestSpec(channels=(ChannelSpec("a"), ChannelSpec("a")))
    with pytest.raises(InputError):
        DiskSpec("/x.img", format="vmdk")
    with pytest.raises(InputError):
        DiskSpec("/x.img", serial="tiene espacios")


def test_qopt_doubles_commas():
    assert qopt("/tmp/a,b") == "/tmp/a,,b"
    assert opts("file", id="c", path="/x,y", server=True, wait=False) == "file,id=c,path=/x,,y,server=on,wait=off"
    with pytest.raises(InputError):
        qopt("a\nb")


def test_tcg_argv():
    spec = GuestSpec(name="t", memory="512M", vcpus=2)
    argv = build_argv(spec, "tcg", BOOT, RT, tsc_khz=2596146)
    assert argv[0] == "qemu-system-x86_64"
    assert _after(argv, "-accel") == ["tcg,thread=multi"]
    assert "-cpu" not in argv  # the default model is faster under TCG
    assert _after(argv, "-m") == ["512"] and _after(argv, "-smp") == ["2"]
    assert _after(argv, "-kernel") == ["/cache/vmlinux"]
    assert "tsc_early_khz=2596146" in _after(argv, "-append")[0]
    assert _after(argv, "-name") == ["labkit-t,debug-threads=on"]
    assert "virtio-serial-device,id=vser0" in argv  # microvm: virtio-mmio
    assert "virtserialport,bus=vser0.0,chardev=qga,name=org.qemu.guest_agent.0" in argv
    assert any(a.startswith("socket,id=qmp,path=/run/labkit/g1/qmp.sock,server=on,wait=off") for a in argv)
    assert "-no-reboot" in argv and "-nodefaults" in argv


def test_kvm_argv_q35_with_disk_and_channel():
    spec = GuestSpec(name="k", machine="q35", disks=(DiskSpec("/img/a,b.qcow2", "qcow2", serial="DATA1"),),
                     channels=(ChannelSpec("org.labkit.chat"),))
    argv = build_argv(spec, "kvm", BOOT, RT, tsc_khz=123)
    assert _after(argv, "-accel") == ["kvm"]
    assert _after(argv, "-cpu") == ["host"]
    assert _after(argv, "-machine") == ["q35"]
    assert "tsc_early_khz" not in _after(argv, "-append")[0]  # KVM has kvmclock
    assert "driver=file,filename=/img/a,,b.qcow2,node-name=disk0-file,read-only=off" in argv
    assert "virtio-blk-pci,drive=disk0,id=disk0,serial=DATA1" in argv
    assert "virtio-serial-pci,id=vser0" in argv
    assert "virtserialport,bus=vser0.0,chardev=ch0,name=org.labkit.chat" in argv


def test_build_argv_refuses_auto():
    with pytest.raises(InputError):
        build_argv(GuestSpec(), "auto", BOOT, RT)


def test_cmdline_keeps_user_options_last():
    line = kernel_cmdline(GuestSpec(cmdline="loglevel=7"), "tcg", 1000)
    assert line.startswith("console=ttyS0") and line.endswith("loglevel=7")


def test_shell_line_quotes_for_display():
    assert shell_line(["qemu", "-append", "a b"]) == "qemu -append 'a b'"


def test_agent_messages():
    assert make_command("guest-ping") == b'{"execute": "guest-ping"}\n'
    assert b'"arguments": {"pid": 5}' in make_command("guest-exec-status", pid=5)
    st = decode_exec_status({"exited": True, "exitcode": 3, "out-data": "aG9sYQo="})
    assert st.exited and st.exit_code == 3 and st.stdout == b"hola\n" and st.stderr == b""


def test_tsc_khz_from_bogomips():
    assert host_tsc_khz("flags\t: fpu tsc\nbogomips\t: 5192.29\n") == 2596145
    assert host_tsc_khz("Features: fp\nBogoMIPS: 50.00\n") is None  # no TSC (ARM)


def test_kernel_and_initrd_paths_are_verbatim():
    """QEMU reads -kernel/-initrd as plain file names: doubling a comma would break the path."""
    boot = BootFiles(Path("/a,b/vmlinux"), Path("/a,b/initrd"))
    argv = build_argv(GuestSpec(), "tcg", boot, RT)
    assert _after(argv, "-kernel") == ["/a,b/vmlinux"] and _after(argv, "-initrd") == ["/a,b/initrd"]

"""labkit.hostos: the host-OS and accelerator tables, WSL detection and this host's summary."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest

from labkit import hostos


def test_tables_cover_the_accelerators_of_qemus_docs():
    names = [a.name for a in hostos.ACCELERATORS]
    assert names[:6] == ["kvm", "xen", "hvf", "whpx", "nvmm", "tcg"]
    assert [a.name for a in hostos.ACCELERATORS if not a.current] == ["hax"]
    assert hostos.accelerator("kvm").host_os == "Linux"
    assert hostos.accelerator("whpx").host_os.startswith("Windows")
    assert hostos.accelerator("hvf").host_os == "macOS"
    assert hostos.accelerator("nvmm").host_os == "NetBSD"
    assert hostos.accelerator("nope") is None
    # every accelerator named in the host table is a known one (or a described variant of one)
    for host in hostos.HOST_SYSTEMS:
        for accel in host.accelerators:
            assert hostos.accelerator(accel.split()[0]) is not None, accel
    kvm_hosts = {h.name for h in hostos.HOST_SYSTEMS if h.kvm.startswith("sí")}
    assert kvm_hosts == {"Linux", "Windows 11 + WSL2"}


def test_formatted_tables():
    accels = hostos.format_accelerators().splitlines()
    assert accels[0].split()[:3] == ["-accel", "qué", "es"] and set(accels[1]) == {"-"}
    assert any(line.startswith("hax") and "(retirado)" in line for line in accels)
    hosts = hostos.format_hosts().splitlines()
    assert len(hosts) == 2 + len(hostos.HOST_SYSTEMS)
    assert hosts[2].startswith("Linux") and "kvm, xen, tcg" in hosts[2]
    assert all(len(line) <= len(hosts[1]) for line in hosts)
    notes = hostos.host_notes()
    assert "nestedVirtualization=true" in notes and "pkg install qemu" in notes


@pytest.mark.parametrize("proc_version, env, expected", [
    ("Linux version 5.15.153.1-microsoft-standard-WSL2 (root@...)", {}, True),
    ("Linux version 6.1.0-56-amd64 (debian-kernel@lists.debian.org)", {}, False),
    ("Linux version 6.1.0-56-amd64", {"WSL_DISTRO_NAME": "Ubuntu"}, True),
])
def test_detect_wsl(proc_version, env, expected):
    assert hostos.detect_wsl(proc_version, env) is expected


def _report(verdict="kvm-pvm", accelerator="tcg", in_vm=True):
    return SimpleNamespace(verdict=verdict, accelerator=accelerator, reason="porque sí", in_vm=in_vm)


def test_explain_this_host():
    host = hostos.this_host(_report(), compiled=["tcg", "kvm"])
    text = hostos.explain_this_host(host)
    assert "QEMU trae compilados (-accel help): tcg, kvm" in text
    assert "Veredicto de labkit: kvm-pvm → se usará tcg" in text and "Por qué: porque sí" in text
    assert "Kernel-based Virtual Machine" in text
    bare = hostos.explain_this_host(hostos.this_host(_report("kvm", "kvm", False), compiled=[]))
    assert "No se encuentra qemu-system-x86_64" in bare and "máquina virtual" not in bare


def test_try_argv():
    argv = hostos.try_argv("whpx", "/usr/bin/qemu-system-x86_64")
    assert argv == ["/usr/bin/qemu-system-x86_64", "-machine", "none", "-accel", "whpx", "-display", "none",
                    "-nodefaults", "-monitor", "stdio"]


def test_try_accelerator_without_qemu():
    result = hostos.try_accelerator("kvm", binary="qemu-system-no-existe")
    assert not result.ok and "qemu-system-x86" in result.message
    assert str(result).startswith("-accel kvm   → falla")


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 no está instalado")
def test_try_accelerator_with_real_qemu():
    assert hostos.try_accelerator("tcg").ok
    hvf = hostos.try_accelerator("hvf")  # macOS only: never compiled into a Linux QEMU
    assert not hvf.ok and "invalid accelerator hvf" in hvf.message

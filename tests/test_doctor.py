"""labkit doctor (CLI and formatting) and the /dev/kvm ioctls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from labkit import cli, doctor, host, kvmapi

HERE = Path(__file__).parent
PVM_TREE = HERE / "fixtures" / "hosts" / "pvm-sandbox"
KVM_USABLE = os.access("/dev/kvm", os.R_OK | os.W_OK)


def test_ioctl_numbers_match_linux_headers():
    # values from include/uapi/linux/kvm.h as compiled on x86_64
    assert kvmapi.KVM_GET_API_VERSION == 0xAE00
    assert kvmapi.KVM_CREATE_VM == 0xAE01
    assert kvmapi.KVM_GET_SUPPORTED_CPUID == 0xC008AE05
    assert kvmapi.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert kvmapi.KVM_RUN == 0xAE80
    assert kvmapi.KVM_GET_REGS == 0x8090AE81
    assert kvmapi.KVM_SET_SREGS == 0x4138AE84


@pytest.mark.skipif(not KVM_USABLE, reason="needs a usable /dev/kvm")
def test_live_kvm_api():
    info = kvmapi.kvm_info()
    assert info.api_version == 12
    assert info.cpuid_entries > 0


@pytest.mark.skipif(not KVM_USABLE, reason="needs a usable /dev/kvm")
def test_live_kvm_run_executes_the_loop():
    r = kvmapi.run_check(iterations=20_000)
    assert r.ok, r.error
    assert r.instructions == 40_000
    assert r.ns_per_instruction is not None and r.ns_per_instruction > 0


def test_run_check_reports_a_missing_device(tmp_path):
    r = kvmapi.run_check(str(tmp_path / "kvm"), iterations=10)
    assert not r.ok
    assert "FileNotFoundError" in r.error


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "labkit.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "NO_COLOR": "1"})


def test_doctor_text_lists_every_check_and_verdict():
    r = host.probe(str(PVM_TREE))
    text = doctor.format_report(r)
    for c in r.checks:
        assert c.title in text
    assert "Veredicto: kvm-pvm" in text
    assert "\033[" not in text  # no colour unless asked
    assert "\033[" in doctor.format_report(r, color=True)


def test_doctor_json_on_saved_tree():
    proc = _run("doctor", "--json", "--root", str(PVM_TREE))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["verdict"] == "kvm-pvm"
    assert data["accelerator"] == "tcg"
    assert {c["id"] for c in data["checks"]} >= {"hw-virt", "kvm-device", "kvm-access", "vhost-net", "tun",
                                                 "iommu", "secure-guest", "kvm-module", "nested", "firmware"}


def test_doctor_bad_arguments_exit_2():
    proc = _run("doctor", "--no-such-option")
    assert proc.returncode == 2
    assert "argumentos no reconocidos" in proc.stderr


def test_doctor_missing_root_exit_2(tmp_path):
    proc = _run("doctor", "--root", str(tmp_path / "nada"))
    assert proc.returncode == 2
    assert "no existe" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_doctor_exit_1_when_qemu_missing(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text("")
    (tmp_path / host.MANIFEST).write_text(json.dumps({"qemu": False}))
    assert cli.main(["doctor", "--root", str(tmp_path)]) == 1


def test_doctor_save_then_read(tmp_path, capsys):
    dest = tmp_path / "diag"
    assert cli.main(["doctor", "--save", str(dest), "--root", str(PVM_TREE)]) == 0
    assert (dest / host.MANIFEST).is_file()
    assert cli.main(["doctor", "--root", str(dest), "--json"]) == 0
    out = capsys.readouterr().out
    assert '"verdict": "kvm-pvm"' in out
    # a second save into the same folder is refused, not overwritten
    assert cli.main(["doctor", "--save", str(dest)]) == 2


def test_doctor_on_this_machine():
    proc = _run("doctor", "--functional")
    assert proc.returncode in (0, 1)
    assert "Veredicto:" in proc.stdout
    if os.path.exists("/sys/module/kvm_pvm"):
        assert "Veredicto: kvm-pvm   Acelerador: tcg" in proc.stdout
        assert "emuladas" in proc.stdout  # KVM_RUN through PVM is emulated, and the check says so

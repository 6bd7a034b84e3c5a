"""Unit tests of the host probe: cpuinfo parsing and bad input (fixture trees live in test_host_fixtures)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from labkit import host
from labkit.errors import InputError

INTEL = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 140
model name\t: 11th Gen Intel(R) Core(TM) i7-1165G7 @ 2.80GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic lm vmx ept vpid hypervisor_not
vmx flags\t: vnmi preemption_timer invvpid ept_x_only ept_ad ept_1gb flexpriority tsc_offset vtpr mtf vapic ept vpid unrestricted_guest

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: 11th Gen Intel(R) Core(TM) i7-1165G7 @ 2.80GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic lm vmx ept vpid hypervisor_not
"""

ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1

processor\t: 1
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
"""


def test_parse_intel_cpuinfo():
    cpu = host.parse_cpuinfo(INTEL)
    assert cpu.architecture == "x86_64"
    assert cpu.vendor == "GenuineIntel"
    assert cpu.model_name.startswith("11th Gen Intel")
    assert cpu.virtualization == "VT-x"
    assert "ept" in cpu.vmx_flags and "unrestricted_guest" in cpu.vmx_flags
    assert cpu.cpus == 2
    assert not cpu.hypervisor  # "hypervisor_not" must not count as the flag


def test_parse_amd_and_hypervisor():
    text = INTEL.replace("GenuineIntel", "AuthenticAMD").replace(" vmx ", " svm ").replace("hypervisor_not", "hypervisor")
    cpu = host.parse_cpuinfo(text)
    assert cpu.virtualization == "AMD-V"
    assert cpu.hypervisor


def test_parse_aarch64_cpuinfo():
    cpu = host.parse_cpuinfo(ARM)
    assert cpu.architecture == "aarch64"
    assert cpu.vendor == "ARM"
    assert "asimd" in cpu.flags
    assert cpu.virtualization is None
    assert cpu.vmx_flags is None
    assert cpu.cpus == 2


@pytest.mark.parametrize("text", ["", "\x00\x01garbage\n\n::::\n", "hola: mundo\n", "processor : 0\n"])
def test_parse_garbage_never_raises(text):
    cpu = host.parse_cpuinfo(text)
    assert cpu.architecture == "unknown"
    assert not cpu.understood
    assert cpu.virtualization is None


def _tree(tmp_path: Path, files: dict[str, str], manifest: dict | None = None) -> Path:
    for rel, content in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)
    if manifest is not None:
        (tmp_path / host.MANIFEST).write_text(json.dumps(manifest))
    return tmp_path


KVM_RW = {"devices": {"dev/kvm": {"type": "char", "major": 10, "minor": 232, "readable": True, "writable": True}}}


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(InputError) as err:
        host.probe(str(tmp_path / "no-existe"))
    assert "no existe" in err.value.message
    assert err.value.hint


def test_missing_cpuinfo_gives_verdict_and_fail_check(tmp_path):
    r = host.probe(str(_tree(tmp_path, {"proc/cmdline": "quiet\n"})))
    assert r.check("cpuinfo").status == "FAIL"
    assert "No se pudo leer" in r.check("cpuinfo").message
    assert r.verdict == "no-hardware-support"
    assert r.accelerator == "tcg"


def test_missing_cpuinfo_but_working_kvm_still_uses_kvm(tmp_path):
    r = host.probe(str(_tree(tmp_path, {"proc/modules": "kvm_intel 1 0 - Live 0x0\n"}, KVM_RW)))
    assert r.check("cpuinfo").status == "FAIL"
    assert r.verdict == "kvm"


def test_garbage_cpuinfo(tmp_path):
    r = host.probe(str(_tree(tmp_path, {"proc/cpuinfo": "esto no es un cpuinfo\n"})))
    assert r.check("cpuinfo").status == "FAIL"
    assert "formato" in r.check("cpuinfo").message
    assert r.verdict == "no-hardware-support"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_cpuinfo(tmp_path):
    root = _tree(tmp_path, {"proc/cpuinfo": INTEL})
    (root / "proc/cpuinfo").chmod(0)
    r = host.probe(str(root))
    assert r.check("cpuinfo").status == "FAIL"
    assert r.problems


def test_cpuinfo_that_is_a_directory(tmp_path):
    (tmp_path / "proc/cpuinfo").mkdir(parents=True)
    r = host.probe(str(tmp_path))
    assert r.check("cpuinfo").status == "FAIL"
    assert r.problems  # the reason is kept, not swallowed


def test_dev_kvm_that_is_a_regular_file(tmp_path):
    root = _tree(tmp_path, {"proc/cpuinfo": INTEL, "dev/kvm": "no soy un dispositivo\n",
                            "proc/modules": "kvm_intel 1 0 - Live 0x0\nkvm 1 1 kvm_intel, Live 0x0\n"})
    r = host.probe(str(root))
    assert r.check("kvm-device").status == "FAIL"
    assert "no es un dispositivo de caracteres" in r.check("kvm-device").message
    assert r.verdict == "module-not-loaded"
    assert r.accelerator == "tcg"


def test_no_permission_verdict(tmp_path):
    manifest = {"devices": {"dev/kvm": {"type": "char", "major": 10, "minor": 232,
                                        "readable": False, "writable": False}}}
    root = _tree(tmp_path, {"proc/cpuinfo": INTEL, "proc/modules": "kvm_intel 1 0 - Live 0x0\n"}, manifest)
    r = host.probe(str(root))
    assert r.verdict == "no-permission"
    assert r.check("kvm-access").status == "FAIL"
    assert "usermod" in r.check("kvm-access").hint


def test_firmware_msr_decoding(tmp_path):
    root = _tree(tmp_path, {"proc/cpuinfo": INTEL}, {"msr": {"0x3a": 1}})
    r = host.probe(str(root))
    assert r.verdict == "disabled-in-firmware"
    assert r.check("firmware").status == "FAIL"
    # locked with VMX outside SMX allowed: not disabled
    (tmp_path / host.MANIFEST).write_text(json.dumps({"msr": {"0x3a": 5}}))
    r = host.probe(str(root))
    assert r.check("firmware").status == "PASS"
    assert r.verdict == "module-not-loaded"


def test_amd_vm_cr_svmdis(tmp_path):
    text = INTEL.replace("GenuineIntel", "AuthenticAMD").replace(" vmx ", " svm ")
    root = _tree(tmp_path, {"proc/cpuinfo": text}, {"msr": {"0xc0010114": 0x18}})
    r = host.probe(str(root))
    assert r.verdict == "disabled-in-firmware"
    assert "SVMDIS" in r.check("firmware").message


def test_nested_parameter(tmp_path):
    root = _tree(tmp_path, {"proc/cpuinfo": INTEL, "proc/modules": "kvm_intel 1 0 - Live 0x0\n",
                            "sys/module/kvm_intel/parameters/nested": "N\n"}, KVM_RW)
    r = host.probe(str(root))
    assert r.nested is False
    assert r.check("nested").status == "NOTE"
    assert "nested=1" in r.check("nested").hint
    (root / "sys/module/kvm_intel/parameters/nested").write_text("Y\n")
    assert host.probe(str(root)).nested is True


def test_cgroup_v2_maps_controllers(tmp_path):
    root = _tree(tmp_path, {"proc/cpuinfo": INTEL,
                            "sys/fs/cgroup/cgroup.controllers": "cpuset cpu io memory pids\n"})
    r = host.probe(str(root))
    for ctrl in ("cpu", "cpuacct", "cpuset", "memory", "devices", "blkio"):
        assert r.check(f"cgroup-{ctrl}").status == "PASS", ctrl
    (root / "sys/fs/cgroup/cgroup.controllers").write_text("cpuset pids\n")
    r = host.probe(str(root))
    assert r.check("cgroup-memory").status == "WARN"
    assert r.check("cgroup-cpuacct").status == "WARN"


def test_report_json_shape(tmp_path):
    r = host.probe(str(_tree(tmp_path, {"proc/cpuinfo": INTEL})))
    data = json.loads(json.dumps(r.to_dict()))
    assert {"verdict", "accelerator", "checks", "cpu"} <= set(data)
    assert all({"id", "status", "message", "hint"} <= set(c) for c in data["checks"])
    assert data["cpu"]["virtualization"] == "VT-x"


def test_saved_tree_round_trip(tmp_path):
    src = _tree(tmp_path / "src", {"proc/cpuinfo": INTEL, "proc/modules": "kvm_intel 1 0 - Live 0x0\n",
                                   "sys/module/kvm_intel/parameters/nested": "Y\n",
                                   "sys/firmware/acpi/tables/DMAR": "binario"}, KVM_RW)
    out = host.save_tree(str(tmp_path / "copia"), root=str(src))
    a, b = host.probe(str(src)), host.probe(str(out))
    assert (a.verdict, a.nested, a.kvm_module) == (b.verdict, b.nested, b.kvm_module) == ("kvm", True, "kvm_intel")
    assert b.check("iommu").status == a.check("iommu").status == "WARN"
    assert (out / "sys/firmware/acpi/tables/DMAR").read_bytes() == b""  # only the table's name is kept


def test_save_tree_never_overwrites(tmp_path):
    dest = tmp_path / "ocupado"
    dest.mkdir()
    (dest / "mio.txt").write_text("no tocar")
    with pytest.raises(InputError):
        host.save_tree(str(dest))
    assert (dest / "mio.txt").read_text() == "no tocar"


def test_this_machine_probe_is_consistent():
    """The live probe on whatever machine runs the tests: internally consistent, never crashes."""
    r = host.probe("/")
    assert r.verdict in host.VERDICTS
    assert r.accelerator == ("kvm" if r.verdict in ("kvm", "kvm-nested") else "tcg")
    if os.path.exists("/sys/module/kvm_pvm"):
        assert r.verdict == "kvm-pvm"


@pytest.mark.parametrize("address,value,disabled", [
    (0x3A, 0x0, False),   # unlocked: the kernel may still enable VMX
    (0x3A, 0x1, True),    # locked, VMX outside SMX off: what kvm-ok calls "disabled by bios"
    (0x3A, 0x5, False),   # locked and enabled
    (0x3A, 0x3, True),    # only inside SMX (TXT) is not enough for KVM
    (0xC0010114, 0x8, False),
    (0xC0010114, 0x18, True),
])
def test_decode_msr(address, value, disabled):
    assert host.decode_msr(address, value)["disabled"] is disabled


def test_decode_unknown_msr_is_refused():
    with pytest.raises(InputError):
        host.decode_msr(0x10, 1)


def test_sample_cpus_are_the_fixture_files():
    samples = host.sample_cpus()
    assert len(samples) == 5
    by_virt = {label: cpu.virtualization for label, cpu in samples.items()}
    assert by_virt["Portátil Intel (Core i5-7200U)"] == "VT-x"
    assert by_virt["Sobremesa AMD (Ryzen 9 5950X)"] == "AMD-V"
    assert by_virt["VM en la nube sin anidación (Xeon 8259CL)"] is None
    assert samples["Servidor ARM64 (Cavium ThunderX)"].architecture == "aarch64"
    fixtures = Path(__file__).parent / "fixtures" / "hosts"
    data = Path(host.__file__).parent / "data" / "cpuinfo"
    for name in host._SAMPLES:
        assert (data / f"{name}.txt").read_text() == (fixtures / name / "proc/cpuinfo").read_text()

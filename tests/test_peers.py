"""Comparison with virt-host-validate and kvm-ok (parsing is pure; one live run where installed)."""

import shutil
from pathlib import Path

import pytest

from labkit import host, peers

FIXTURES = Path(__file__).parent / "fixtures" / "hosts"

# Output of `virt-host-validate qemu` on the PVM sandbox this course is developed on (libvirt 9.0).
VHV_PVM = """\
  QEMU: Checking for hardware virtualization                                 : FAIL (Host not compatible with KVM; HW virtualization CPU features not found. Only emulated CPUs are available; performance will be significantly limited)
  QEMU: Checking if device /dev/vhost-net exists                             : WARN (Load the 'vhost_net' module to improve performance of virtio networking)
  QEMU: Checking if device /dev/net/tun exists                               : PASS
  QEMU: Checking for cgroup 'cpu' controller support                         : PASS
  QEMU: Checking for cgroup 'cpuacct' controller support                     : PASS
  QEMU: Checking for cgroup 'cpuset' controller support                      : PASS
  QEMU: Checking for cgroup 'memory' controller support                      : PASS
  QEMU: Checking for cgroup 'devices' controller support                     : PASS
  QEMU: Checking for cgroup 'blkio' controller support                       : PASS
  QEMU: Checking for device assignment IOMMU support                         : WARN (Unknown if this platform has IOMMU support)
  QEMU: Checking for secure guest support                                    : WARN (Unknown if this platform has Secure Guest support)
"""

# A laptop with VT-x whose kernel was booted without intel_iommu=on.
VHV_LAPTOP = """\
  QEMU: Checking for hardware virtualization                                 : PASS
  QEMU: Checking if device /dev/kvm exists                                   : PASS
  QEMU: Checking if device /dev/kvm is accessible                            : FAIL (Check /dev/kvm is world writable or you are in a group that is allowed to access it)
  QEMU: Checking if device /dev/vhost-net exists                             : PASS
  QEMU: Checking if device /dev/net/tun exists                               : PASS
  QEMU: Checking for cgroup 'cpu' controller mount-point                     : PASS
  QEMU: Checking for device assignment IOMMU support                         : PASS
  QEMU: Checking if IOMMU is enabled by kernel                               : WARN (IOMMU appears to be disabled in kernel. Add intel_iommu=on to kernel cmdline arguments)
"""


def test_parse_maps_lines_to_check_ids():
    lines = peers.parse_virt_host_validate(VHV_PVM)
    assert len(lines) == 11
    ids = [line.check_id for line in lines]
    assert ids[:3] == ["hw-virt", "vhost-net", "tun"]
    assert "cgroup-blkio" in ids and "secure-guest" in ids
    assert lines[0].status == "FAIL" and "HW virtualization" in lines[0].detail
    laptop = {line.check_id: line for line in peers.parse_virt_host_validate(VHV_LAPTOP)}
    assert laptop["kvm-access"].status == "FAIL"
    assert laptop["iommu"].status == "WARN"  # the kernel line is the later, more specific one
    assert laptop["cgroup-cpu"].status == "PASS"


def test_compare_on_the_pvm_tree_explains_what_vhv_skips():
    report = host.probe(str(FIXTURES / "pvm-sandbox"))
    rows = {r.check_id: r for r in peers.compare(report, VHV_PVM)}
    assert rows["hw-virt"].agrees
    assert rows["kvm-device"].peer is None
    assert "no comprueba /dev/kvm" in rows["kvm-device"].note
    assert rows["kvm-module"].peer is None and "kvm_pvm" in rows["kvm-module"].note
    assert rows["tun"].agrees


def test_compare_reports_a_disagreement_with_the_peer_detail():
    report = host.probe(str(FIXTURES / "intel-laptop"))
    rows = {r.check_id: r for r in peers.compare(report, VHV_LAPTOP)}
    assert rows["kvm-access"].labkit == "PASS" and rows["kvm-access"].peer == "FAIL"
    assert not rows["kvm-access"].agrees
    assert "world writable" in rows["kvm-access"].note


def test_explain_kvm_ok_on_pvm():
    report = host.probe(str(FIXTURES / "pvm-sandbox"))
    text = peers.explain_kvm_ok(report, "INFO: Your CPU does not support KVM extensions\n"
                                        "KVM acceleration can NOT be used")
    assert "kvm_pvm" in text and "cpuinfo" in text


def test_missing_tool_is_reported_not_raised():
    run = peers.run_tool(["no-such-tool-labkit"], "paquete-inventado")
    assert not run.installed and run.returncode is None


@pytest.mark.skipif(shutil.which("virt-host-validate") is None, reason="libvirt-clients not installed")
def test_live_virt_host_validate_is_parsed():
    run = peers.run_tool(["virt-host-validate", "qemu"], "libvirt-clients")
    lines = peers.parse_virt_host_validate(run.output)
    assert lines, run.output
    assert lines[0].check_id == "hw-virt"
    assert all(line.check_id for line in lines), [line.text for line in lines if not line.check_id]

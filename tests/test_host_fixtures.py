"""The host probe against saved host trees built from real machines' files.

Each directory in ``tests/fixtures/hosts/`` is a fake filesystem root holding
the files ``labkit.host.probe`` reads (``proc/cpuinfo`` copied verbatim from a
real machine, the rest consistent with it) plus ``labkit-snapshot.json`` for
what git cannot store: device nodes, MSR values, what /dev/kvm answered.
``tests/fixtures/hosts/README.md`` says where every file came from.

Every tree has a row in ``EXPECTED``, and a test fails when a tree has none.
A row asserts only what the tree implies; where the files leave the exact
status open, the row lists the statuses that are acceptable.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labkit.host import probe

FIXTURES = Path(__file__).parent / "fixtures" / "hosts"

PASS, WARN, FAIL, NOTE = "PASS", "WARN", "FAIL", "NOTE"
NOT_PASS = frozenset({WARN, FAIL, NOTE})

# Checks every tree states something about. A value is a status or a set of acceptable statuses.
#   hw-virt      vmx/svm in cpuinfo (x86) or /dev/kvm present (ARM)
#   kvm-device   /dev/kvm exists;   kvm-access: it is readable and writable (NOTE when there is none)
#   kvm-module   kvm_intel / kvm_amd / kvm_pvm / ARM built-in
#   nested       PASS with nested=Y/1, NOTE when absent or N
#   firmware     FAIL when the MSR says VT-x/AMD-V locked off, PASS when it says on, NOTE without MSR data
#   hypervisor   NOTE inside a virtual machine, PASS on bare metal
#   qemu         PASS when the manifest names a QEMU, NOTE when it is absent or null (= unknown)

# tree: (verdict, accelerator, {check id: status(es)}, extra report attributes)
EXPECTED: dict[str, tuple[str, str, dict[str, str | frozenset[str]], dict[str, object]]] = {
    # HP ProBook 430 G4, Core i5-7200U, Linux 6.x: the laptop the course is written for.
    "intel-laptop": ("kvm", "kvm", {
        "cpuinfo": PASS, "hw-virt": PASS, "kvm-device": PASS, "kvm-access": PASS, "kvm-module": PASS,
        "nested": PASS, "firmware": PASS, "hypervisor": PASS, "kvm-api": PASS, "vhost-net": PASS, "tun": PASS,
        "iommu": PASS, "cgroup-cpu": PASS, "cgroup-memory": PASS, "qemu": PASS,
    }, {"kvm_module": "kvm_intel", "nested": True, "in_vm": False, "virtualization": "VT-x",
        "architecture": "x86_64", "vmx_flags_has": "ept"}),
    # Ryzen 9 5950X desktop, kvm_amd nested=1, VM_CR = 0x8 (locked, SVM allowed), cgroup v1.
    "amd-desktop-nested": ("kvm", "kvm", {
        "cpuinfo": PASS, "hw-virt": PASS, "kvm-device": PASS, "kvm-access": PASS, "kvm-module": PASS,
        "nested": PASS, "firmware": PASS, "hypervisor": PASS, "kvm-api": PASS, "vhost-net": PASS, "tun": PASS,
        "iommu": PASS, "cgroup-cpu": PASS, "cgroup-memory": PASS, "qemu": PASS,
    }, {"kvm_module": "kvm_amd", "nested": True, "in_vm": False, "virtualization": "AMD-V",
        "architecture": "x86_64"}),
    # ThinkPad X230 with VT-x off in the BIOS: Linux >= 5.6 hides vmx, IA32_FEATURE_CONTROL = 1.
    "intel-firmware-disabled": ("disabled-in-firmware", "tcg", {
        "cpuinfo": PASS, "hw-virt": FAIL, "kvm-device": FAIL, "kvm-access": NOTE, "kvm-module": NOT_PASS,
        "nested": NOTE, "firmware": FAIL, "hypervisor": PASS, "kvm-api": NOTE, "vhost-net": PASS, "tun": PASS,
        "iommu": NOT_PASS, "cgroup-cpu": PASS, "cgroup-memory": PASS, "qemu": PASS,
    }, {"kvm_module": None, "nested": None, "in_vm": False, "virtualization": None,
        "architecture": "x86_64", "vmx_flags": None}),
    # Dell Inspiron 620: vmx present and allowed (0x3a = 5), kvm_intel blacklisted for VirtualBox.
    "intel-module-missing": ("module-not-loaded", "tcg", {
        "cpuinfo": PASS, "hw-virt": PASS, "kvm-device": FAIL, "kvm-access": NOTE, "kvm-module": FAIL,
        "nested": NOTE, "firmware": PASS, "hypervisor": PASS, "kvm-api": NOTE, "vhost-net": PASS, "tun": PASS,
        "iommu": NOT_PASS, "cgroup-cpu": PASS, "cgroup-memory": PASS, "qemu": NOTE,
    }, {"kvm_module": None, "nested": None, "in_vm": False, "virtualization": "VT-x",
        "architecture": "x86_64", "vmx_flags_has": "unrestricted_guest"}),
    # AWS EC2 (Nitro) RHEL 9 guest without nesting. Its IA32_FEATURE_CONTROL reads 1 because the guest
    # kernel itself locked it (feat_ctl.c): the firmware of a VM is not what stops KVM here.
    "cloud-vm-no-nesting": ("no-nested-support", "tcg", {
        "cpuinfo": PASS, "hw-virt": FAIL, "kvm-device": FAIL, "kvm-access": NOTE, "kvm-module": NOT_PASS,
        "nested": NOTE, "firmware": NOTE, "hypervisor": NOTE, "kvm-api": NOTE, "vhost-net": PASS, "tun": PASS,
        "iommu": NOT_PASS, "cgroup-cpu": PASS, "cgroup-memory": PASS, "qemu": NOTE,
    }, {"kvm_module": None, "nested": None, "in_vm": True, "virtualization": None, "architecture": "x86_64"}),
    # This course's own machine: /dev/kvm from kvm_pvm, no vmx/svm, no /proc/modules.
    "pvm-sandbox": ("kvm-pvm", "tcg", {
        "cpuinfo": PASS, "hw-virt": FAIL, "kvm-device": PASS, "kvm-access": PASS,
        "kvm-module": frozenset({WARN, NOTE}), "nested": NOTE, "firmware": NOTE, "hypervisor": NOTE,
        "kvm-api": PASS, "vhost-net": NOT_PASS, "tun": PASS, "cgroup-cpu": PASS, "cgroup-memory": PASS,
        "qemu": PASS,
    }, {"kvm_module": "kvm_pvm", "nested": None, "in_vm": True, "virtualization": None,
        "architecture": "x86_64"}),
    # Bare-metal Cavium ThunderX server booted at EL2: KVM built in, /dev/kvm usable.
    "aarch64-server": ("kvm", "kvm", {
        "cpuinfo": PASS, "hw-virt": PASS, "kvm-device": PASS, "kvm-access": PASS, "kvm-module": PASS,
        "nested": NOTE, "firmware": NOTE, "hypervisor": PASS, "kvm-api": PASS, "vhost-net": PASS, "tun": PASS,
        "iommu": PASS, "cgroup-cpu": PASS, "cgroup-memory": PASS, "qemu": PASS,
    }, {"module_message_has": "ARM", "in_vm": False, "virtualization": None, "architecture": "aarch64"}),
    # DigitalOcean droplet whose host passes VT-x through: KVM inside a KVM guest.
    "nested-guest-vmx": ("kvm-nested", "kvm", {
        "cpuinfo": PASS, "hw-virt": PASS, "kvm-device": PASS, "kvm-access": PASS, "kvm-module": PASS,
        "nested": PASS, "firmware": frozenset({PASS, NOTE}), "hypervisor": NOTE, "kvm-api": PASS,
        "vhost-net": PASS, "tun": PASS, "iommu": NOT_PASS, "cgroup-cpu": PASS, "cgroup-memory": PASS,
        "qemu": PASS,
    }, {"kvm_module": "kvm_intel", "nested": True, "in_vm": True, "virtualization": "VT-x",
        "architecture": "x86_64"}),
    # Lenovo Z510 on Ubuntu 14.04: kvm_intel loaded (nested=N), user not in group kvm.
    "no-permission": ("no-permission", "tcg", {
        "cpuinfo": PASS, "hw-virt": PASS, "kvm-device": PASS, "kvm-access": FAIL, "kvm-module": PASS,
        "nested": NOTE, "firmware": NOTE, "hypervisor": PASS, "kvm-api": NOTE, "vhost-net": PASS, "tun": PASS,
        "iommu": NOT_PASS, "cgroup-cpu": PASS, "cgroup-memory": PASS, "qemu": PASS,
    }, {"kvm_module": "kvm_intel", "nested": False, "in_vm": False, "virtualization": "VT-x",
        "architecture": "x86_64", "vmx_flags": None}),
    # HP Mini 5102 netbook, Atom N450 (no VT-x), Linux 2.6.35; QEMU unknown (manifest "qemu": null).
    "old-atom-no-vt": ("no-hardware-support", "tcg", {
        "cpuinfo": PASS, "hw-virt": FAIL, "kvm-device": FAIL, "kvm-access": NOTE, "kvm-module": NOT_PASS,
        "nested": NOTE, "firmware": NOTE, "hypervisor": PASS, "kvm-api": NOTE, "vhost-net": NOT_PASS,
        "tun": NOT_PASS, "iommu": NOT_PASS, "cgroup-cpu": PASS, "cgroup-memory": PASS, "qemu": NOTE,
    }, {"kvm_module": None, "nested": None, "in_vm": False, "virtualization": None, "architecture": "x86_64"}),
    # Hyper-V guest (OpenShift master on RHCOS) without nested virtualization: all files real.
    "hyperv-vm-no-nesting": ("no-nested-support", "tcg", {
        "cpuinfo": PASS, "hw-virt": FAIL, "kvm-device": FAIL, "kvm-access": NOTE, "kvm-module": NOT_PASS,
        "nested": NOTE, "firmware": NOTE, "hypervisor": NOTE, "kvm-api": NOTE, "vhost-net": PASS, "tun": PASS,
        "iommu": NOT_PASS, "cgroup-cpu": PASS, "cgroup-memory": PASS, "qemu": NOTE,
    }, {"kvm_module": None, "nested": None, "in_vm": True, "virtualization": None, "architecture": "x86_64"}),
    # EPYC 9654 server with SVM off in the BIOS: svm still in cpuinfo, VM_CR = 0x18, kvm_amd refused
    # to load and only the generic kvm module stayed.
    "amd-svm-disabled": ("disabled-in-firmware", "tcg", {
        "cpuinfo": PASS, "hw-virt": PASS, "kvm-device": FAIL, "kvm-access": NOTE, "kvm-module": NOT_PASS,
        "nested": NOTE, "firmware": FAIL, "hypervisor": PASS, "kvm-api": NOTE, "vhost-net": PASS, "tun": PASS,
        "iommu": PASS, "cgroup-cpu": PASS, "cgroup-memory": PASS, "qemu": NOTE,
    }, {"kvm_module": frozenset({None, "kvm"}), "nested": None, "in_vm": False, "virtualization": "AMD-V",
        "architecture": "x86_64"}),
    # AWS Graviton2 VM (c6g.xlarge): ARM has no hypervisor flag, only the DMI tells it is a VM.
    "aarch64-cloud-vm": ("no-nested-support", "tcg", {
        "cpuinfo": PASS, "hw-virt": FAIL, "kvm-device": FAIL, "kvm-access": NOTE, "kvm-module": NOT_PASS,
        "nested": NOTE, "firmware": NOTE, "hypervisor": NOTE, "kvm-api": NOTE, "vhost-net": PASS, "tun": PASS,
        "iommu": NOT_PASS, "cgroup-cpu": PASS, "cgroup-memory": PASS, "qemu": NOTE,
    }, {"kvm_module": None, "in_vm": True, "virtualization": None, "architecture": "aarch64"}),
}


def _trees() -> list[str]:
    return sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def _accepts(expected: object, got: object) -> bool:
    if isinstance(expected, frozenset):
        return got in expected
    return got == expected


def test_every_tree_has_a_row():
    trees = set(_trees())
    assert len(trees) >= 8
    assert trees - set(EXPECTED) == set(), "a host tree without a row in EXPECTED"
    assert set(EXPECTED) - trees == set(), "a row in EXPECTED without a host tree"


@pytest.mark.parametrize("tree", _trees())
def test_tree_is_well_formed(tree):
    root = FIXTURES / tree
    manifest = json.loads((root / "labkit-snapshot.json").read_text())
    assert manifest["format"] == 1
    assert manifest["source"].strip()
    for rel, dev in manifest["devices"].items():
        assert set(dev) == {"type", "major", "minor", "readable", "writable"}, rel
    for key in manifest.get("msr", {}):
        assert key == hex(int(key, 16)), f"msr key {key!r} must be written like hex() writes it"
    cpuinfo = (root / "proc" / "cpuinfo").read_text()
    assert cpuinfo.startswith("processor"), "proc/cpuinfo must be a verbatim copy"


@pytest.mark.parametrize("tree", sorted(EXPECTED))
def test_probe_verdict(tree):
    verdict, accelerator, _checks, _extra = EXPECTED[tree]
    r = probe(root=str(FIXTURES / tree))
    assert (r.verdict, r.accelerator) == (verdict, accelerator), (
        f"{tree}: {r.verdict}/{r.accelerator}: " + "; ".join(f"{c.id}={c.status}" for c in r.checks))
    assert r.problems == (), r.problems


@pytest.mark.parametrize("tree", sorted(EXPECTED))
def test_probe_checks(tree):
    _verdict, _acc, checks, _extra = EXPECTED[tree]
    r = probe(root=str(FIXTURES / tree))
    wrong = {cid: (want, r.check(cid).status, r.check(cid).message)
             for cid, want in checks.items() if not _accepts(want, r.check(cid).status)}
    assert wrong == {}, wrong


@pytest.mark.parametrize("tree", sorted(EXPECTED))
def test_probe_report_fields(tree):
    _verdict, _acc, _checks, extra = EXPECTED[tree]
    r = probe(root=str(FIXTURES / tree))
    got = {
        "kvm_module": r.kvm_module,
        "nested": r.nested,
        "in_vm": r.in_vm,
        "virtualization": r.cpu.virtualization,
        "architecture": r.cpu.architecture,
        "vmx_flags": r.cpu.vmx_flags,
    }
    wrong = {}
    for key, want in extra.items():
        if key == "module_message_has":
            ok = r.kvm_module is not None and want in r.check("kvm-module").message
            value = (r.kvm_module, r.check("kvm-module").message)
        elif key == "vmx_flags_has":
            ok = r.cpu.vmx_flags is not None and want in r.cpu.vmx_flags
            value = r.cpu.vmx_flags
        else:
            ok, value = _accepts(want, got[key]), got[key]
        if not ok:
            wrong[key] = (want, value)
    assert wrong == {}, wrong
    if r.kvm_module in ("kvm_intel", "kvm_amd", "kvm_pvm"):
        assert r.kvm_module in r.check("kvm-module").message  # the message names the module


def test_kvm_module_message_names_module():
    # explicit, for the three module flavours the course explains
    for tree, module in (("intel-laptop", "kvm_intel"), ("amd-desktop-nested", "kvm_amd"),
                         ("pvm-sandbox", "kvm_pvm")):
        assert module in probe(root=str(FIXTURES / tree)).check("kvm-module").message

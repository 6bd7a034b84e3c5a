"""The pure libvirt XML builder: structure, escaping, and libvirt's own schema (virt-xml-validate)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from labkit.errors import InputError
from labkit.guest import ChannelSpec, DiskSpec, GuestSpec, ShareSpec, kernel_cmdline
from labkit.guest.argv import BootFiles
from labkit.guest.domxml import (
    METADATA_NS,
    LibvirtRuntime,
    Owner,
    disk_target,
    domain_tree,
    domain_xml,
    libvirt_machine,
    parse_owner,
)
from labkit.guest.libvirt import _socket_of, unreachable_reason

BOOT = BootFiles(Path("/var/lib/libvirt/images/labkit/k/vmlinux"), Path("/var/lib/libvirt/images/labkit/k/initramfs.cpio"))
RT = LibvirtRuntime(Path("/run/labkit-libvirt/labkit-g1-abc"))
VALIDATOR = shutil.which("virt-xml-validate")


def validate(xml: str, tmp_path: Path) -> None:
    """libvirt's own schema check: virt-xml-validate FILE domain."""
    if VALIDATOR is None:
        pytest.skip("virt-xml-validate no está instalado (paquete libvirt-clients)")
    path = tmp_path / "domain.xml"
    path.write_text(xml)
    out = subprocess.run([VALIDATOR, str(path), "domain"], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


SPECS = {
    "default": GuestSpec(),
    "tcg-q35": GuestSpec(name="t", machine="q35", accel="tcg"),
    "pc-2cpu-1G": GuestSpec(name="p", machine="pc", vcpus=2, memory="1G"),
    "channels": GuestSpec(name="c", channels=(ChannelSpec("org.example.canal.0"), ChannelSpec("otro"))),
    "disks": GuestSpec(name="d", disks=(DiskSpec("/var/lib/libvirt/images/a.img"),
                                        DiskSpec("/var/lib/libvirt/images/b.qcow2", "qcow2", "DATOS-1"),
                                        DiskSpec("/var/lib/libvirt/images/c.img", readonly=True))),
    "all": GuestSpec(name="todo", machine="pc", cmdline="labkit.modules=virtio_blk",
                     disks=(DiskSpec("/tmp/x y&<z>.qcow2", "qcow2", "S1"),), channels=(ChannelSpec("org.x.1"),)),
}


@pytest.mark.parametrize("accel", ["kvm", "tcg"])
@pytest.mark.parametrize("case", sorted(SPECS))
def test_every_case_passes_libvirt_schema(case, accel, tmp_path):
    xml = domain_xml(SPECS[case], accel, BOOT, RT, tsc_khz=2_000_000 if accel == "tcg" else None,
                     owner=Owner(1234, 99, str(RT.directory)))
    validate(xml, tmp_path)
    # and without the optional parts
    validate(domain_xml(SPECS[case], accel, BOOT, RT), tmp_path)


def test_tcg_domain(tmp_path):
    root = domain_tree(GuestSpec(name="g1"), "tcg", BOOT, RT, tsc_khz=2_000_000)
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "labkit-g1"
    assert root.find("memory").get("unit") == "MiB" and root.findtext("memory") == "256"
    assert root.findtext("vcpu") == "1"
    assert root.find("cpu") is None  # TCG keeps the default CPU model (faster than -cpu max)
    assert root.findtext("os/kernel") == str(BOOT.kernel)
    assert root.findtext("os/initrd") == str(BOOT.initrd)
    assert root.find("features/acpi") is not None and root.find("features/apic") is not None
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        assert root.findtext(event) == "destroy"
    assert root.find("devices/serial").get("type") == "file"
    assert root.find("devices/serial/source").get("path") == str(RT.console_log)
    assert root.find("devices/memballoon").get("model") == "none"
    assert root.find("devices/controller[@type='usb']").get("model") == "none"


def test_kvm_domain_uses_host_passthrough():
    root = domain_tree(GuestSpec(), "kvm", BOOT, RT)
    assert root.get("type") == "kvm"
    assert root.find("cpu").get("mode") == "host-passthrough"
    assert "tsc_early_khz" not in root.findtext("os/cmdline")


def test_cmdline_is_the_qemu_one_for_the_same_machine():
    spec = GuestSpec(machine="q35", cmdline="labkit.shell=1")
    root = domain_tree(spec, "tcg", BOOT, RT, tsc_khz=1_500_000)
    assert root.findtext("os/cmdline") == kernel_cmdline(spec, "tcg", 1_500_000)
    assert root.findtext("os/cmdline").endswith("labkit.shell=1")


def test_microvm_becomes_q35_and_says_why():
    root = domain_tree(GuestSpec(machine="microvm"), "tcg", BOOT, RT)
    assert root.find("os/type").get("machine") == "q35"
    assert "pci=off" not in root.findtext("os/cmdline")  # q35 has PCI
    machine, why = libvirt_machine("microvm")
    assert machine == "q35" and "microvm" in why and "PCI" in why
    assert libvirt_machine("pc") == ("pc", "máquina pc")


def test_agent_and_channels_are_unix_sockets_in_the_runtime_dir():
    spec = SPECS["channels"]
    root = domain_tree(spec, "tcg", BOOT, RT)
    channels = root.findall("devices/channel")
    names = [c.find("target").get("name") for c in channels]
    assert names == ["org.qemu.guest_agent.0", "org.example.canal.0", "otro"]
    for channel in channels:
        assert channel.get("type") == "unix"
        assert channel.find("target").get("type") == "virtio"
        assert channel.find("source").get("mode") == "bind"
        assert Path(channel.find("source").get("path")).parent == RT.directory
    assert root.find("devices/controller[@type='virtio-serial']") is not None


def test_disks_have_virtio_targets_formats_and_serials():
    root = domain_tree(SPECS["disks"], "tcg", BOOT, RT)
    disks = root.findall("devices/disk")
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb", "vdc"]
    assert {d.find("target").get("bus") for d in disks} == {"virtio"}
    assert [d.find("driver").get("type") for d in disks] == ["raw", "qcow2", "raw"]
    assert [d.findtext("serial") for d in disks] == [None, "DATOS-1", None]
    assert [d.find("readonly") is not None for d in disks] == [False, False, True]
    assert disks[1].find("source").get("file") == "/var/lib/libvirt/images/b.qcow2"


def test_disk_targets():
    assert [disk_target(i) for i in (0, 1, 25, 26, 27)] == ["vda", "vdb", "vdz", "vdaa", "vdab"]
    with pytest.raises(InputError):
        disk_target(-1)


def test_hostile_paths_cannot_change_the_structure(tmp_path):
    spec = SPECS["all"]
    xml = domain_xml(spec, "tcg", BootFiles(Path("/k/<a>&'\"b"), Path("/i")), RT)
    root = ET.fromstring(xml)
    assert root.findtext("os/kernel") == "/k/<a>&'\"b"
    assert root.find("devices/disk/source").get("file") == "/tmp/x y&<z>.qcow2"
    assert len(root.findall("devices/disk")) == 1
    validate(xml, tmp_path)


def test_owner_metadata_round_trip():
    owner = Owner(4321, 777, "/run/labkit-libvirt/labkit-x-1")
    xml = domain_xml(GuestSpec(), "tcg", BOOT, RT, owner=owner)
    assert METADATA_NS in xml
    assert parse_owner(xml) == owner
    # libvirt's virDomainGetMetadata returns just the element
    element = ET.fromstring(xml).find(f"metadata/{{{METADATA_NS}}}owner")
    assert parse_owner(ET.tostring(element, encoding="unicode")) == owner
    assert parse_owner('<owner pid="4321" start="777" runtime="/run/labkit-libvirt/labkit-x-1"/>') == owner
    assert parse_owner(domain_xml(GuestSpec(), "tcg", BOOT, RT)) is None
    assert parse_owner("not xml") is None


def test_builder_refuses_auto():
    with pytest.raises(InputError):
        domain_xml(GuestSpec(), "auto", BOOT, RT)


def test_socket_of_uri():
    assert _socket_of("qemu:///system") == Path("/run/libvirt/libvirt-sock")
    assert _socket_of("qemu:///system?socket=/nonexistent") == Path("/nonexistent")
    assert _socket_of("qemu:///session") is None
    assert _socket_of("qemu+ssh://host/system") is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to build directories owned by others")
def test_unreachable_reason_walks_the_directories(tmp_path):
    import tempfile

    nobody = pwd.getpwnam("nobody")
    # pytest's tmp_path lives in a 0700 dir: that alone is a reason
    assert "no puede entrar" in unreachable_reason(tmp_path, nobody, need_read=False)
    base = Path(tempfile.mkdtemp(dir="/var/tmp"))
    try:
        base.chmod(0o755)
        closed = base / "closed"
        closed.mkdir(mode=0o700)
        (closed / "f").write_text("x")
        reason = unreachable_reason(closed / "f", nobody)
        assert reason and "no puede entrar" in reason and "nobody" in reason and str(closed) in reason
        (base / "f").write_text("x")
        (base / "f").chmod(0o600)
        assert "no puede leer" in unreachable_reason(base / "f", nobody)
        assert unreachable_reason(base / "f", nobody, need_read=False) is None
        (base / "f").chmod(0o644)
        assert unreachable_reason(base / "f", nobody) is None
    finally:
        shutil.rmtree(base)


def test_hotplug_disk_xml_round_trips_and_validates(tmp_path):
    from labkit.guest.domxml import disk_xml, parse_disks

    element = disk_xml("/var/lib/libvirt/images/a,b.qcow2", "qcow2", "vdb", serial="LK1", readonly=True)
    assert element.startswith('<disk type="file" device="disk">') and "<serial>LK1</serial>" in element
    # the same element inside a domain passes libvirt's schema, and parses back
    domain = ET.fromstring(domain_xml(GuestSpec(name="h", machine="q35"), "tcg", BOOT, RT))
    domain.find("devices").append(ET.fromstring(element))
    xml = ET.tostring(domain, encoding="unicode")
    validate(xml, tmp_path)
    (disk,) = parse_disks(xml)
    assert (disk.target, disk.source, disk.format, disk.serial, disk.readonly) == (
        "vdb", "/var/lib/libvirt/images/a,b.qcow2", "qcow2", "LK1", True)


def test_q35_gets_free_root_ports_for_hotplug():
    from labkit.guest.domxml import HOTPLUG_PORTS

    domain = ET.fromstring(domain_xml(GuestSpec(name="q", machine="q35"), "tcg", BOOT, RT))
    models = [c.get("model") for c in domain.iter("controller") if c.get("type") == "pci"]
    assert models == ["pcie-root"] + ["pcie-root-port"] * (HOTPLUG_PORTS + 1)  # + virtio-serial
    busy = GuestSpec(name="q", machine="q35", disks=[DiskSpec("/a.qcow2"), DiskSpec("/b.qcow2")],
                     shares=[ShareSpec("/srv", tag="s")], usb_controller=True)
    ports = [c for c in ET.fromstring(domain_xml(busy, "tcg", BOOT, RT)).iter("controller")
             if c.get("model") == "pcie-root-port"]
    assert len(ports) == HOTPLUG_PORTS + 5  # virtio-serial, 2 disks, the share, xHCI: each takes one
    pc = ET.fromstring(domain_xml(GuestSpec(name="p", machine="pc"), "tcg", BOOT, RT))
    assert not [c for c in pc.iter("controller") if c.get("type") == "pci"]

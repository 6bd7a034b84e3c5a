"""USB: host enumeration from fixture sysfs trees (real lsusb data), builders against known-good
argv and XML (validated with virt-xml-validate inside a domain), QEMU errors explained."""

from __future__ import annotations

import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from labkit.devices import usb as du
from labkit.errors import InputError
from labkit.guest import GuestSpec, UsbSpec
from labkit.guest.argv import BootFiles, Runtime, build_argv
from labkit.guest.domxml import LibvirtRuntime, domain_xml

FIXTURE = Path(__file__).parent / "fixtures" / "usb" / "laptop.json"


def make_tree(tmp_path: Path, openable: set[str] = frozenset()) -> tuple[Path, Path]:
    sysfs, dev = tmp_path / "sys" / "bus" / "usb" / "devices", tmp_path / "dev" / "bus" / "usb"
    sysfs.mkdir(parents=True)
    for name, attrs in json.loads(FIXTURE.read_text()).items():
        (sysfs / name).mkdir()
        for key, value in attrs.items():
            (sysfs / name / key).write_text(value + "\n")
        if "busnum" in attrs:
            node = dev / f"{int(attrs['busnum']):03d}" / f"{int(attrs['devnum']):03d}"
            node.parent.mkdir(parents=True, exist_ok=True)
            node.write_bytes(b"")
            node.chmod(0o664 if name in openable else 0o000)
    return sysfs, dev


def test_no_usb_bus_is_a_fact_not_an_error(tmp_path):
    report = du.host_devices(tmp_path / "nothing", tmp_path / "dev")
    assert not report.bus_present and report.devices == ()
    assert "no tiene bus USB" in report.explanation and "emulados" in report.explanation


def test_this_host_has_no_usb_bus():
    if Path("/sys/bus/usb").exists():
        pytest.skip("este anfitrión sí tiene USB")
    assert not du.host_devices().bus_present


def test_enumeration_like_lsusb(tmp_path):
    sysfs, dev = make_tree(tmp_path)
    report = du.host_devices(sysfs, dev)
    assert report.bus_present
    lines = [d.lsusb_line() for d in report.devices]
    assert lines == [
        "Bus 001 Device 001: ID 1d6b:0002 Linux 6.1.0-18-amd64 xhci-hcd xHCI Host Controller",
        "Bus 001 Device 003: ID 320f:5055 Evision AKKO Keyboard",
        "Bus 001 Device 005: ID 046d:c52b Logitech USB Receiver",
        "Bus 002 Device 001: ID 1d6b:0003 Linux 6.1.0-18-amd64 xhci-hcd xHCI Host Controller",
        "Bus 002 Device 002: ID 0781:5581 SanDisk SanDisk 3.2Gen1",
    ]
    assert [d.sysfs_name for d in report.passthrough_candidates] == ["1-3", "1-4", "2-1"]
    stick = report.devices[-1]
    assert stick.serial == "0401f0a9c7e2" and stick.speed == "5000" and stick.node.endswith("/002/002")


def test_unopenable_nodes_get_the_udev_fix(tmp_path):
    import os

    sysfs, dev = make_tree(tmp_path, openable={"1-3"})
    by_name = {d.sysfs_name: d for d in du.host_devices(sysfs, dev).devices}
    assert by_name["1-3"].openable
    if os.geteuid() == 0:  # root opens anything: the check says so
        assert by_name["1-4"].openable
    else:
        assert not by_name["1-4"].openable and "Permission denied" in by_name["1-4"].reason
    rule = du.udev_rule(by_name["1-4"])
    assert rule == 'SUBSYSTEM=="usb", ATTR{idVendor}=="046d", ATTR{idProduct}=="c52b", MODE="0660", GROUP="plugdev"'
    assert "usermod -aG plugdev" in du.fix_hint(by_name["1-4"])


def test_qemu_usb_host_argv_known_good(tmp_path):
    sysfs, dev = make_tree(tmp_path)
    keyboard = {d.sysfs_name: d for d in du.host_devices(sysfs, dev).devices}["1-3"]
    assert du.qemu_host_args(keyboard) == ["-device", "qemu-xhci,id=xhci",
                                           "-device", "usb-host,bus=xhci.0,hostbus=1,hostaddr=3"]
    assert du.qemu_host_args(keyboard, by="id") == ["-device", "qemu-xhci,id=xhci",
                                                    "-device", "usb-host,bus=xhci.0,vendorid=0x320f,productid=0x5055"]


def test_libvirt_hostdev_xml_known_good(tmp_path):
    sysfs, dev = make_tree(tmp_path)
    keyboard = {d.sysfs_name: d for d in du.host_devices(sysfs, dev).devices}["1-3"]
    assert du.libvirt_hostdev_xml(keyboard) == (
        '<hostdev mode="subsystem" type="usb" managed="yes"><source><vendor id="0x320f" />'
        '<product id="0x5055" /></source></hostdev>')
    assert '<address bus="1" device="3" />' in du.libvirt_hostdev_xml(keyboard, by="address")
    assert du.virsh_hostdev_lines("labkit-x")[0] == "virsh attach-device labkit-x usb.xml --live"


BOOT = BootFiles(Path("/k/vmlinux"), Path("/k/initramfs.cpio"))


@pytest.mark.skipif(shutil.which("virt-xml-validate") is None, reason="virt-xml-validate no está")
def test_usb_in_a_domain_validates(tmp_path):
    spec = GuestSpec(machine="pc", usb=(UsbSpec("keyboard"), UsbSpec("tablet"),
                                        UsbSpec("storage", image="/img/stick.raw", serial="S1"),
                                        UsbSpec("host", vendorid=0x320F, productid=0x5055),
                                        UsbSpec("host", hostbus=1, hostaddr=3)))
    xml = domain_xml(spec, "tcg", BOOT, LibvirtRuntime(Path("/run/x")))
    (tmp_path / "d.xml").write_text(xml)
    out = subprocess.run(["virt-xml-validate", str(tmp_path / "d.xml"), "domain"], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    root = ET.fromstring(xml)
    assert root.find("devices/controller[@type='usb']").get("model") == "qemu-xhci"
    assert root.find("devices/disk/target").attrib == {"dev": "sdc", "bus": "usb", "removable": "on"}
    assert len(root.findall("devices/hostdev[@type='usb']")) == 2


def test_no_usb_means_no_controller():
    xml = domain_xml(GuestSpec(machine="pc"), "tcg", BOOT, LibvirtRuntime(Path("/run/x")))
    assert "<controller type=\"usb\" model=\"none\" />" in xml
    assert "qemu-xhci" in domain_xml(GuestSpec(machine="pc", usb_controller=True), "tcg", BOOT,
                                     LibvirtRuntime(Path("/run/x")))


def test_boot_argv_with_usb_devices():
    spec = GuestSpec(machine="pc", usb=(UsbSpec("keyboard"), UsbSpec("storage", image="/i/s.raw", serial="S1")))
    argv = build_argv(spec, "tcg", BOOT, Runtime(Path("/r")))
    tail = argv[argv.index("qemu-xhci,id=xhci") - 1:]
    assert tail == ["-device", "qemu-xhci,id=xhci", "-device", "usb-kbd,id=usb0,bus=xhci.0",
                    "-blockdev", "driver=file,filename=/i/s.raw,node-name=usbdisk1-file,read-only=off",
                    "-blockdev", "driver=raw,file=usbdisk1-file,node-name=usbdisk1,read-only=off",
                    "-device", "usb-storage,id=usb1,bus=xhci.0,drive=usbdisk1,serial=S1,removable=on"]


def test_hotplug_messages():
    msgs = du.attach_messages(UsbSpec("storage", image="/i/s.qcow2", serial="S2"), 11, fmt="qcow2")
    assert [m[0] for m in msgs] == ["blockdev-add", "blockdev-add", "device_add"]
    assert msgs[2][1] == {"driver": "usb-storage", "id": "usb11", "bus": "xhci.0", "drive": "usbdisk11",
                          "serial": "S2", "removable": True}
    assert du.attach_messages(UsbSpec("tablet"), 3) == [("device_add", {"driver": "usb-tablet", "id": "usb3",
                                                                         "bus": "xhci.0"})]
    detach = du.detach_messages(du.AttachedUsb("storage", "usb11"))
    assert detach == [("device_del", {"id": "usb11"}), ("blockdev-del", {"node-name": "usbdisk11"}),
                      ("blockdev-del", {"node-name": "usbdisk11-file"})]
    assert du.xhci_message() == ("device_add", {"driver": "qemu-xhci", "id": "xhci"})


def test_specs_refuse_nonsense():
    with pytest.raises(InputError):
        UsbSpec("printer")
    with pytest.raises(InputError):
        UsbSpec("storage")
    with pytest.raises(InputError):
        UsbSpec("host")
    with pytest.raises(InputError):
        UsbSpec("host", hostbus=1, hostaddr=999)
    with pytest.raises(InputError, match="microvm"):
        GuestSpec(usb=(UsbSpec("keyboard"),))


def test_qemu_errors_explained_in_spanish():
    spec = UsbSpec("host", hostbus=9, hostaddr=99)
    text = du.explain_qemu_error("failed to find host usb device 9:99", spec)
    assert "hostbus=9" in text and "lsusb" in text
    assert "no tiene bus USB" in du.explain_qemu_error("cannot open directory '/sys/bus/usb/devices': No such file")


def test_guest_listing_parser():
    text = ("1-1|0627:0001|QEMU USB Keyboard|QEMU||480\n2-3|46f4:0001|QEMU USB HARDDRIVE|QEMU|LK1|5000\n"
            "usb1|1d6b:0002|xHCI Host Controller|Linux|0000:00:04.0|480\n--\nsda|2-3\n")
    devices = du.parse_usb_listing(text)
    assert [d.disk for d in devices] == ["", "sda", ""]
    table = du.usb_table(devices)
    assert table.splitlines()[0].split() == ["DISPOSITIVO", "ID", "PRODUCTO", "VELOCIDAD", "DISCO"]
    assert du.usb_table([]) == "(el invitado no ve ningún dispositivo USB)"


def test_usb_widget_without_bus_and_with_fixture(tmp_path):
    from labkit.widgets.usb import usb_table

    empty = usb_table(du.host_devices(tmp_path / "none"))
    assert "no tiene bus USB" in repr(empty) and empty.config_text().startswith("Este anfitrión no tiene bus USB")
    sysfs, dev = make_tree(tmp_path)
    table = usb_table(du.host_devices(sysfs, dev))
    assert repr(table) == "<Tabla USB: 3 dispositivo(s) para elegir y su configuración QEMU/libvirt>"
    text = table.select(2)
    assert "usb-host,bus=xhci.0,hostbus=2,hostaddr=2" in text and '<vendor id="0x0781" />' in text
    assert table._repr_mimebundle_()["text/plain"] == repr(table)

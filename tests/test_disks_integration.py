"""Virtual disks with a real guest under TCG (machine "pc": PCI hot-plug): attach by serial,
file system, detach, the data read back on the host, live resize, thin provisioning, cleanup."""

from __future__ import annotations

import subprocess

import pytest

from labkit.devices import disks as dd
from labkit.errors import InputError
from labkit.guest import Guest, GuestError, GuestSpec

pytestmark = pytest.mark.integration


def _qemu_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "qemu-system-x86_64 -name labkit-"], capture_output=True, text=True, check=False)
    return {int(p) for p in out.stdout.split()}


@pytest.fixture(scope="module")
def guest(guest_assets):
    before = _qemu_pids()
    with Guest(GuestSpec(name="labkit-test-disks", machine="pc", accel="tcg"), assets=guest_assets) as g:
        yield g
    assert not g.running
    assert _qemu_pids() <= before


def test_attach_write_detach_and_read_back_on_the_host(guest, tmp_path):
    image = dd.create(tmp_path / "datos.qcow2", "64M")
    disk = guest.attach_disk(image.path, serial="LKTEST1")
    assert disk.format == "qcow2" and disk.device_id == "lkdisk-LKTEST1" and len(disk.commands) == 3
    assert '"execute": "device_add"' in disk.commands[2] and "--serial LKTEST1 --live" in disk.virsh
    assert disk in guest.disks()
    dev = dd.find_by_serial(guest, "LKTEST1")
    assert dev.size == 64 << 20 and not dev.readonly
    guest.run(f"mke2fs -q {dev.path} >/dev/null", check=True, timeout=60)
    guest.run(f"modprobe ext4 && mkdir -p /mnt/t && mount {dev.path} /mnt/t && echo 'hola desde el invitado' "
              "> /mnt/t/hola.txt && sync", check=True)
    assert guest.run("cat /mnt/t/hola.txt").stdout == "hola desde el invitado\n"
    # mounted: refused; after umount: unplugged, and the guest no longer sees it
    with pytest.raises(GuestError, match="montado"):
        guest.detach_disk(disk)
    guest.run("umount /mnt/t", check=True)
    done = guest.detach_disk(disk)
    assert [c.split('"')[3] for c in done.commands] == ["device_del", "blockdev-del", "blockdev-del"]
    assert all(d.serial != "LKTEST1" for d in dd.guest_block_devices(guest))
    assert disk not in guest.disks()
    got = dd.read_file_from_image(image.path, "/hola.txt")
    assert got.text == "hola desde el invitado\n"
    assert dd.check(image.path).ok


def test_live_resize_seen_by_the_guest_and_qemu_img_refused(guest, tmp_path):
    image = dd.create(tmp_path / "crece.img", "32M", "raw")
    disk = guest.attach_disk(image.path, serial="LKTEST2")
    assert disk.format == "raw"
    assert dd.find_by_serial(guest, "LKTEST2").size == 32 << 20
    with pytest.raises(dd.DiskInUseError) as err:
        dd.resize(image.path, "64M")
    assert "block_resize" in err.value.hint
    result = guest.resize_disk(disk, "64M")
    assert (result.old_size, result.new_size) == (32 << 20, 64 << 20)
    assert '"block_resize"' in result.commands[0] and result.virsh.startswith("virsh blockresize ")
    assert dd.find_by_serial(guest, "LKTEST2").size == 64 << 20
    assert "capacity change" in guest.run("dmesg | tail -5").stdout
    with pytest.raises(InputError, match="menos que el tamaño actual"):
        guest.resize_disk(disk, "16M")
    guest.detach_disk(disk)
    assert dd.info(image.path).virtual_size == 64 << 20


def test_serial_conflicts_and_microvm_refuse(guest, tmp_path):
    image = dd.create(tmp_path / "x.qcow2", "16M")
    disk = guest.attach_disk(image.path, serial="LKTEST3", readonly=True)
    assert dd.find_by_serial(guest, "LKTEST3").readonly
    with pytest.raises(InputError, match="número de serie"):
        guest.attach_disk(image.path, serial="LKTEST3")
    guest.detach_disk(disk)
    micro = Guest(GuestSpec(name="labkit-test-micro", machine="microvm"))
    with pytest.raises(GuestError, match="microvm"):
        micro._hotplug_bus()


def test_thin_provisioning_grows_with_the_guest_writes(guest, tmp_path):
    q = dd.create(tmp_path / "fino.qcow2", "64M")
    r = dd.create(tmp_path / "fino.img", "64M", "raw")
    disks = {"qcow2": guest.attach_disk(q.path), "raw": guest.attach_disk(r.path)}
    points = dd.measure_growth(guest, disks, step="4M", steps=3)
    for disk in disks.values():
        guest.detach_disk(disk)
    by = {label: [p for p in points if p.label == label] for label in disks}
    for pts in by.values():
        assert [p.written for p in pts] == [0, 4 << 20, 8 << 20, 12 << 20]
        assert all(p.virtual_size == 64 << 20 for p in pts)
        sizes = [p.actual_size for p in pts]
        assert sizes == sorted(sizes) and sizes[-1] >= 12 << 20 and sizes[-1] < 16 << 20


def test_q35_hotplug_goes_through_free_root_ports(guest_assets, tmp_path):
    # pcie.0 takes no hot-plug: labkit gives a q35 guest 4 empty pcie-root-ports and puts each
    # hot-plugged PCI device (disk, virtiofs share, xHCI controller) in a free one, until none is left
    from labkit.devices import usb as du
    from labkit.guest.argv import HOTPLUG_PORTS

    share = tmp_path / "compartida"
    share.mkdir()
    (share / "desde-el-host.txt").write_text("hola\n")
    spec = GuestSpec(name="labkit-test-q35hp", machine="q35", accel="tcg", shared_memory=True)
    with Guest(spec, assets=guest_assets) as g:
        assert g.argv.count("pcie-root-port,id=lkport1,chassis=1") == 1 and HOTPLUG_PORTS == 4
        first = g.attach_disk(dd.create(tmp_path / "a.qcow2", "16M").path, serial="Q35A")
        g.attach_disk(dd.create(tmp_path / "b.qcow2", "24M").path, serial="Q35B")
        g.attach_share(share, tag="q35share", kind="virtiofs")
        g.attach_usb("storage", image=dd.create(tmp_path / "usb.img", "8M", "raw").path, serial="Q35USB")
        assert dd.find_by_serial(g, "Q35A").size == 16 << 20 and dd.find_by_serial(g, "Q35B").size == 24 << 20
        stick = du.find_usb_disk(g, "Q35USB")
        assert stick.disk.startswith("sd") and stick.serial == "Q35USB"
        mounted = g.mount_share("q35share")
        assert g.run(["cat", f"{mounted.mountpoint}/desde-el-host.txt"]).stdout == "hola\n"
        # the four ports are taken: a fifth device is refused in Spanish, nothing half-added
        with pytest.raises(GuestError, match="No quedan puertos PCIe libres"):
            g.attach_disk(dd.create(tmp_path / "c.qcow2", "8M").path, serial="Q35C")
        assert [d.serial for d in g.disks()] == ["Q35A", "Q35B"]
        # unplugging frees its port for the next one
        g.detach_disk(first)
        g.attach_disk(tmp_path / "c.qcow2", serial="Q35C")
        assert dd.find_by_serial(g, "Q35C").size == 8 << 20

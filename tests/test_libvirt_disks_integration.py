"""Disks through libvirt on a real domain under TCG: attachDeviceFlags / detachDeviceFlags /
blockResize (virsh attach-disk --live, detach-disk --live, blockresize), found by serial."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from labkit.devices import disks as dd
from labkit.errors import InputError
from labkit.guest import GuestError, GuestSpec
from labkit.guest.libvirt import LibvirtGuest

pytestmark = pytest.mark.integration


def _labkit_domains() -> set[str]:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True,
                         text=True, check=False)
    return {n for n in out.stdout.split() if n.startswith("labkit-")}


@pytest.fixture
def images():
    """A folder libvirt's QEMU user can enter (pytest's tmp_path is root-only 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="labkit-test-lvdisks-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


@pytest.fixture(params=["pc", "q35"], scope="module")
def guest(request, guest_assets):
    with LibvirtGuest(GuestSpec(name=f"labkit-test-lvdisks-{request.param}", machine=request.param, accel="tcg"),
                      assets=guest_assets) as g:
        yield g
    assert g.name not in _labkit_domains()


def test_attach_write_detach_read_back(guest, images):
    image = dd.create(images / "datos.qcow2", "64M")
    disk = guest.attach_disk(image.path, serial="LKLV1")
    assert disk.backend == "libvirt" and disk.target == "vda"
    assert disk.virsh.startswith(f"virsh attach-disk {guest.name} ") and "--live" in disk.virsh
    assert "VIR_DOMAIN_AFFECT_LIVE" in disk.commands[1] and "<serial>LKLV1</serial>" in disk.commands[1]
    assert [d.serial for d in guest.disks()] == ["LKLV1"]
    dev = dd.find_by_serial(guest, "LKLV1")
    assert dev.size == 64 << 20
    guest.run(f"mke2fs -q {dev.path} >/dev/null", check=True, timeout=60)
    guest.run(f"modprobe ext4 && mkdir -p /mnt/l && mount {dev.path} /mnt/l && echo libvirt > /mnt/l/x.txt && sync",
              check=True)
    with pytest.raises(GuestError, match="montado"):
        guest.detach_disk(disk)
    guest.run("umount /mnt/l", check=True)
    done = guest.detach_disk(disk)
    assert done.virsh == f"virsh detach-disk {guest.name} vda --live"
    assert guest.disks() == []
    assert all(d.serial != "LKLV1" for d in dd.guest_block_devices(guest))
    assert dd.read_file_from_image(image.path, "/x.txt").text == "libvirt\n"


def test_live_resize_and_refusals(guest, images):
    image = dd.create(images / "crece.img", "32M", "raw")
    disk = guest.attach_disk(image.path, serial="LKLV2")
    assert dd.find_by_serial(guest, "LKLV2").size == 32 << 20
    with pytest.raises(InputError, match="número de serie"):
        guest.attach_disk(dd.create(images / "otro.img", "8M", "raw").path, serial="LKLV2")
    result = guest.resize_disk(disk, "48M")
    assert (result.old_size, result.new_size) == (32 << 20, 48 << 20)
    assert result.virsh == f"virsh blockresize {guest.name} {disk.target} {48 << 20}B"
    assert dd.find_by_serial(guest, "LKLV2").size == 48 << 20
    with pytest.raises(InputError, match="menos que el tamaño actual"):
        guest.resize_disk(disk, "16M")
    guest.detach_disk(disk)


@pytest.mark.skipif(os.geteuid() != 0, reason="the check concerns root's private folders")
def test_image_in_a_folder_libvirt_cannot_enter_is_explained(guest, tmp_path):
    from labkit.guest.libvirt import FileAccessError

    image = dd.create(tmp_path / "privada.img", "8M", "raw")  # tmp_path is 0700 root
    with pytest.raises(FileAccessError) as err:
        guest.attach_disk(image.path)
    assert "no puede entrar" in err.value.message and "chmod o+x" in err.value.hint
    assert guest.disks() == []

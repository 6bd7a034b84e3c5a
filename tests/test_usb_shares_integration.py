"""Shares, USB hot-plug and agent file copy on real guests under TCG, both backends.

One guest per backend (module scope): a 9p share (mapped-xattr), a read-only 9p share, a virtiofs
share (and on QEMU-direct a read-only virtiofs share), an xHCI controller from boot on libvirt."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

from labkit.devices import disks as dd
from labkit.devices import files
from labkit.devices import shares as sh
from labkit.devices import usb as du
from labkit.errors import InputError
from labkit.guest import Guest, GuestError, GuestSpec, ShareSpec

pytestmark = pytest.mark.integration


@pytest.fixture(params=["qemu", "libvirt"], scope="module")
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def folders(backend):
    """Share folders libvirt's QEMU user can use (9p: QEMU opens the files itself); one set per backend."""
    base = Path(tempfile.mkdtemp(prefix=f"labkit-test-shares-{backend}-"))
    base.chmod(0o755)
    user = pwd.getpwnam("libvirt-qemu")
    made = {}
    for name in ("rw9p", "ro9p", "rwvfs", "rovfs", "images"):
        d = base / name
        d.mkdir()
        d.chmod(0o755)
        if name != "images":
            os.chown(d, user.pw_uid, user.pw_gid)
            (d / "del-anfitrion.txt").write_text(f"hola desde el anfitrión ({name})\n")
        made[name] = d
    yield made
    shutil.rmtree(base)


@pytest.fixture(scope="module")
def guest(backend, guest_assets, folders):
    shares = [ShareSpec(str(folders["rw9p"]), tag="rw9p"), ShareSpec(str(folders["ro9p"]), tag="ro9p", readonly=True),
              ShareSpec(str(folders["rwvfs"]), tag="rwvfs", kind="virtiofs")]
    if backend == "qemu":
        shares.append(ShareSpec(str(folders["rovfs"]), tag="rovfs", kind="virtiofs", readonly=True))
        cls = Guest
    else:
        from labkit.guest.libvirt import LibvirtGuest as cls
    spec = GuestSpec(name=f"labkit-test-usbsh-{backend}", machine="pc", accel="tcg", shares=tuple(shares),
                     usb_controller=backend == "libvirt")
    with cls(spec, assets=guest_assets, boot_timeout=120) as g:
        g.mounted = {s.tag: g.mount_share(s) for s in g.shares()}
        yield g


def test_round_trips(guest, folders):
    for tag, kind in (("rw9p", "9p"), ("rwvfs", "virtiofs")):
        m = guest.mounted[tag]
        assert m.mechanism == kind and m.backend == guest.backend
        out = guest.run(f"cat {m.mountpoint}/del-anfitrion.txt", check=True).stdout
        assert out == f"hola desde el anfitrión ({tag})\n"
        guest.run(f"echo 'hola desde el invitado' > {m.mountpoint}/del-invitado.txt && sync", check=True)
        assert (folders[tag] / "del-invitado.txt").read_text() == "hola desde el invitado\n"
        (folders[tag] / "editado.txt").write_text("cambiado en el anfitrión\n")
        assert guest.run(f"cat {m.mountpoint}/editado.txt", check=True).stdout == "cambiado en el anfitrión\n"


def test_ownership_as_each_model_shows_it(guest, folders):
    guest.run("echo x > /mnt/rw9p/dueño.txt && chmod 644 /mnt/rw9p/dueño.txt", check=True)
    inside = sh.guest_view(guest, "/mnt/rw9p/dueño.txt")
    host = sh.host_view(folders["rw9p"] / "dueño.txt")
    assert (inside.uid, inside.mode) == (0, "-rw-r--r--")  # the guest's root, as it asked
    assert host.mode == "-rw-------"  # mapped-xattr: private on the host, owned by QEMU's user
    assert host.uid == (0 if guest.backend == "qemu" else pwd.getpwnam("libvirt-qemu").pw_uid)
    assert dict(host.xattrs)["user.virtfs.mode"] == oct(0o100644)
    guest.run("echo x > /mnt/rwvfs/dueño.txt", check=True)
    assert sh.host_view(folders["rwvfs"] / "dueño.txt").uid == 0  # virtiofs: the guest's uid, as is


def test_read_only_share_refuses_guest_writes(guest, folders):
    tags = ["ro9p"] + (["rovfs"] if guest.backend == "qemu" else [])
    for tag in tags:
        m = guest.mounted[tag]
        assert guest.run(f"cat {m.mountpoint}/del-anfitrion.txt", check=True).ok
        result = guest.run(f"echo x > {m.mountpoint}/nuevo.txt")
        assert not result.ok and "Read-only file system" in result.stderr, (tag, result)
        assert not (folders[tag] / "nuevo.txt").exists()


def test_libvirt_refuses_9p_hotplug(guest, folders):
    if guest.backend != "libvirt":
        with pytest.raises(InputError, match="9p"):
            guest.attach_share(folders["rovfs"], kind="9p", tag="otro")
        return
    with pytest.raises(InputError, match="libvirt no permite conectar una carpeta 9p en caliente"):
        guest.attach_share(folders["rovfs"], kind="9p", tag="otro")


def test_usb_hotplug_seen_written_unplugged_read_back(guest, folders):
    image = folders["images"] / f"stick-{guest.backend}.raw"
    dd.create(image, "32M", format="raw")
    import subprocess
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    keyboard = guest.attach_usb("keyboard")
    tablet = guest.attach_usb("tablet")
    stick = guest.attach_usb("storage", image=image, serial=f"LKU{guest.backend[:3].upper()}")
    dev = du.find_usb_disk(guest, stick.serial)
    products = {d.product for d in du.guest_usb_devices(guest)}
    assert {"QEMU USB Keyboard", "QEMU USB Tablet", "QEMU USB HARDDRIVE"} <= products
    assert dev.ids == "46f4:0001" and dev.disk.startswith("sd")
    guest.run(f"modprobe ext4 && mkdir -p /mnt/usb && mount /dev/{dev.disk} /mnt/usb && "
              f"echo 'escrito en la memoria USB' > /mnt/usb/hola.txt && umount /mnt/usb", check=True)
    done = guest.detach_usb(stick)
    assert done.commands
    for d in (keyboard, tablet):
        guest.detach_usb(d)
    assert guest.usb_devices() == []
    assert dd.read_file_from_image(image, "/hola.txt").text == "escrito en la memoria USB\n"


def test_wrong_host_device_is_explained(guest):
    with pytest.raises(GuestError) as err:
        guest.attach_usb("host", hostbus=9, hostaddr=99)
    assert "QEMU dijo" in err.value.message and "hostbus=9" in err.value.message


def test_agent_file_copy_with_checksums(guest, tmp_path):
    data = os.urandom(300_000)
    src = tmp_path / "datos.bin"
    src.write_bytes(data)
    up = files.copy_to_guest(guest, src, "/root/datos.bin")
    assert up.ok and up.size == len(data) and up.sha256_guest == hashlib.sha256(data).hexdigest()
    down = files.copy_from_guest(guest, "/root/datos.bin", tmp_path / "vuelta.bin")
    assert down.ok and (tmp_path / "vuelta.bin").read_bytes() == data


def test_refused_share_paths_before_boot(guest_assets, tmp_path):
    with pytest.raises(sh.ShareRefused, match="«/»"):
        Guest(GuestSpec(name="labkit-test-refused", machine="pc", shares=(ShareSpec("/", tag="raiz"),)),
              assets=guest_assets).start()
    with pytest.raises(sh.ShareRefused, match="no existe"):
        Guest(GuestSpec(name="labkit-test-refused", machine="pc", shares=(ShareSpec(str(tmp_path / "no")),)),
              assets=guest_assets).start()


def test_share_lab_widget(guest, folders):
    from labkit.widgets.shares import share_lab

    lab = share_lab(guest, guest.mounted["rwvfs"], folders["rwvfs"])
    assert lab.write_host("uno") == {"anfitrión": "uno\n", "invitado": "uno\n"}
    assert lab.write_guest("dos") == {"anfitrión": "dos\n", "invitado": "dos\n"}
    assert repr(lab).startswith("<Laboratorio de carpeta compartida (virtiofs)")


def test_libvirt_virtiofs_hotplug_detach(guest_assets, tmp_path):
    from labkit.guest.libvirt import LibvirtGuest

    tmp_path.chmod(0o755)  # libvirt's virtiofsd must reach the folder
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "f.txt").write_text("x\n")
    spec = GuestSpec(name="labkit-test-lvshare", machine="q35", accel="tcg", shared_memory=True)
    with LibvirtGuest(spec, assets=guest_assets) as g:
        share = g.attach_share(folder, tag="lvdet", kind="virtiofs")
        mounted = g.mount_share("lvdet")
        assert g.run(["cat", f"{mounted.mountpoint}/f.txt"]).stdout == "x\n"
        g.run(["umount", mounted.mountpoint], check=True)
        g.detach_share(share)
        assert "lvdet" not in g.live_xml()

"""The closing challenge's checker (labkit.reto): pure parsing, and real guests under TCG.

The QEMU-direct guest (machine pc, shared memory for virtiofs hot-plug) is built up piece by
piece; after each step the checker must report exactly the pieces still missing. A libvirt
domain (pc, xHCI and a virtiofs share from boot) checks the complete setup on the other backend."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from labkit import reto
from labkit.devices import disks as dd
from labkit.devices import usb as du
from labkit.guest import Guest, GuestSpec, ShareSpec

MiB = 1 << 20
ALL = ["discos", "montados", "carpeta", "usb"]


# --------------------------------------------------------------------------- pure


def test_parse_mounts_decodes_escapes_and_options():
    text = ("rootfs / rootfs rw,size=96180k 0 0\n"
            "/dev/vda /mnt/mis\\040datos ext2 rw,relatime 0 0\n"
            "reto /mnt/reto virtiofs ro,relatime 0 0\n"
            "basura\n")
    mounts = reto.parse_mounts(text)
    assert [m.mountpoint for m in mounts] == ["/", "/mnt/mis datos", "/mnt/reto"]
    assert mounts[1] == reto.Mount("/dev/vda", "/mnt/mis datos", "ext2", ("rw", "relatime"))
    assert mounts[2].readonly and not mounts[1].readonly


def _dev(name, mib, mountpoint=None):
    return dd.GuestBlockDevice(name, f"S{name}", mib * MiB, False, mountpoint, "ext2" if mountpoint else None)


def test_match_disks_pairs_sizes_and_leaves_the_rest():
    found, left = reto.match_disks([_dev("vda", 128), _dev("vdb", 100), _dev("vdc", 64)])
    assert found == {64 * MiB: _dev("vdc", 64), 128 * MiB: _dev("vda", 128)}
    assert left == [_dev("vdb", 100)]
    found, left = reto.match_disks([_dev("vda", 64), _dev("vdb", 64)])
    assert list(found) == [64 * MiB] and left == [_dev("vdb", 64)]


def test_match_disks_prefers_a_mounted_disk():
    found, left = reto.match_disks([_dev("vda", 64), _dev("vdb", 64, "/mnt/x")], sizes=[64 * MiB])
    assert found[64 * MiB].name == "vdb" and [d.name for d in left] == ["vda"]


def test_result_text_and_html():
    result = reto.ChallengeResult((
        reto.Requirement("discos", 1, "Discos", True, "El invitado ve vda."),
        reto.Requirement("usb", 2, "USB", False, "No hay <memoria>.", "Usa `g.attach_usb(\"storage\")`.\nY espera."),
    ))
    assert not result.ok and result.missing == ["usb"] and result["discos"].ok
    assert str(result) == repr(result) == (
        "Reto final: 1 de 2 requisitos cumplidos.\n"
        "✔ 1. Discos\n    El invitado ve vda.\n"
        "✘ 2. USB\n    No hay <memoria>.\n    → Usa `g.attach_usb(\"storage\")`.\n    → Y espera.")
    page = result._repr_html_()
    assert "No hay &lt;memoria&gt;." in page and "<code>g.attach_usb(\"storage\")</code>" in page
    assert page.count("✔") == 1 and page.count("✘") == 1
    with pytest.raises(KeyError):
        result["carpeta"]
    done = reto.ChallengeResult((reto.Requirement("discos", 1, "Discos", True, "bien"),))
    assert done.ok and str(done).startswith("¡Reto superado! 1 de 1")


# --------------------------------------------------------------------------- real guests

@pytest.fixture(scope="module")
def folder():
    base = Path(tempfile.mkdtemp(prefix="labkit-test-reto-"))
    base.chmod(0o755)  # libvirt's QEMU user must reach the images
    yield base
    shutil.rmtree(base)


def _format_and_mount(guest, serial, mountpoint, marker=True):
    dev = dd.find_by_serial(guest, serial)
    guest.run(f"mke2fs {dev.path} >/dev/null", check=True, timeout=120)
    guest.run(f"modprobe ext4 && mkdir -p {mountpoint} && mount {dev.path} {mountpoint}", check=True)
    if marker:
        guest.run(f"echo hola > {mountpoint}/reto.txt", check=True)


@pytest.mark.integration
def test_checker_follows_the_student_step_by_step(guest_assets, folder):
    here = folder / "qemu"
    here.mkdir()
    spec = GuestSpec(name="labkit-test-reto", machine="pc", accel="tcg", shared_memory=True)
    with Guest(spec, assets=guest_assets, boot_timeout=120) as g:
        bare = reto.check(g)
        assert bare.missing == ALL
        assert "Faltan los discos de 64 MiB y 128 MiB." in bare["discos"].detail
        assert "g.attach_disk(d128.path" in bare["discos"].hint
        assert "g.attach_usb(\"storage\"" in bare["usb"].hint

        # a wrong size is named as such; the right ones make item 1 pass (and only it)
        wrong = g.attach_disk(dd.create(here / "mal.qcow2", "100M").path, serial="MAL")
        for mib in (64, 128):
            g.attach_disk(dd.create(here / f"d{mib}.qcow2", f"{mib}M").path, serial=f"RETO{mib}")
        dd.find_by_serial(g, "RETO128")
        partial = reto.check(g)
        assert partial.missing == ["montados", "carpeta", "usb"]
        assert "no está montado" in partial["montados"].detail and "mke2fs /dev/vd" in partial["montados"].hint
        g.detach_disk(wrong)

        _format_and_mount(g, "RETO64", "/mnt/a")
        _format_and_mount(g, "RETO128", "/mnt/b", marker=False)
        partial = reto.check(g)
        assert partial.missing == ["montados", "carpeta", "usb"]
        assert "falta /mnt/b/reto.txt" in partial["montados"].detail
        assert "/mnt/a" not in partial["montados"].hint
        g.run("echo hola > /mnt/b/reto.txt", check=True)

        # a read-only disk mount cannot pass the write-and-read-back test
        g.run("mount -o remount,ro /mnt/b", check=True)
        assert "no se pudo escribir" in reto.check(g)["montados"].detail
        g.run("mount -o remount,rw /mnt/b", check=True)

        memoria = dd.create(here / "memoria.img", "32M", "raw")
        g.attach_usb("keyboard")
        g.attach_usb("storage", image=memoria.path, serial="RETOUSB")
        du.find_usb_disk(g, "RETOUSB")
        partial = reto.check(g)
        assert partial.missing == ["carpeta"]
        assert "RETOUSB" in partial["usb"].detail

        # a read-only share fails the guest -> host direction; a share not yet mounted is named
        solo_lectura = here / "solo-lectura"
        compartida = here / "compartida"
        solo_lectura.mkdir()
        compartida.mkdir()
        g.attach_share(solo_lectura, tag="ro", readonly=True)
        g.mount_share("ro")
        partial = reto.check(g)
        assert partial.missing == ["carpeta"] and "solo lectura" in partial["carpeta"].detail
        g.attach_share(compartida, tag="reto")
        partial = reto.check(g)
        assert partial.missing == ["carpeta"]
        assert "solo lectura" in partial["carpeta"].detail and "«reto» está conectada" in partial["carpeta"].detail
        assert "`g.mount_share(\"reto\")`" in partial["carpeta"].hint
        g.mount_share("reto")

        done = reto.check(g)
        assert done.ok, str(done)
        assert "«reto» (virtiofs) montada en /mnt/reto" in done["carpeta"].detail
        # the checker cleans up after itself, on both sides
        assert sorted(p.name for p in compartida.iterdir()) == []
        assert g.run("ls -A /mnt/reto /mnt/ro").stdout.split() == ["/mnt/reto:", "/mnt/ro:"]
        assert g.run("ls -A /mnt/a").stdout.split() == ["lost+found", "reto.txt"]

        # breaking a piece again is noticed
        g.run("umount /mnt/a", check=True)
        assert reto.check(g).missing == ["montados"]


@pytest.mark.integration
def test_complete_setup_on_libvirt(guest_assets, folder):
    from labkit.guest.libvirt import LibvirtGuest

    here = folder / "libvirt"
    here.mkdir()
    here.chmod(0o755)
    compartida = here / "compartida"
    compartida.mkdir()
    spec = GuestSpec(name="labkit-test-reto-lv", machine="q35", accel="tcg", usb_controller=True,
                     shares=(ShareSpec(str(compartida), tag="reto", kind="virtiofs"),))
    with LibvirtGuest(spec, assets=guest_assets, boot_timeout=120) as g:
        first = reto.check(g)
        assert first.missing == ALL
        assert "g.mount_share(\"reto\")" in first["carpeta"].hint
        for mib in (64, 128):
            g.attach_disk(dd.create(here / f"d{mib}.qcow2", f"{mib}M").path, serial=f"RETO{mib}")
        for mib in (64, 128):
            _format_and_mount(g, f"RETO{mib}", f"/mnt/r{mib}")
        g.mount_share("reto")
        g.attach_usb("storage", image=dd.create(here / "memoria.img", "32M", "raw").path, serial="RETOUSB")
        du.find_usb_disk(g, "RETOUSB")
        done = reto.check(g)
        assert done.ok, str(done)
        assert list(compartida.iterdir()) == []

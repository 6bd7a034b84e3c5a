"""labkit.devices.disks: sizes, qemu-img on real images in tmp_path, pure hot-plug builders,
the guest-side listing parser and the disk widget (driven without a browser)."""

from __future__ import annotations

import json
import subprocess

import pytest

from labkit.devices import disks as dd
from labkit.errors import InputError, LabkitError

# --------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("text, expected", [
    ("512M", 512 << 20), ("5G", 5 << 30), ("1.5G", 3 << 29), ("1,5G", 3 << 29), ("64MiB", 64 << 20),
    ("100K", 100 << 10), ("2g", 2 << 30), (" 1 G ", 1 << 30), ("1048576", 1 << 20), (4096, 4096),
    ("1000", 1024), ("1T", 1 << 40),
])
def test_parse_size_accepts(text, expected):
    assert dd.parse_size(text) == expected


@pytest.mark.parametrize("text, words", [
    ("-5G", "negativo"), (-1, "negativo"), ("0", "mayor que cero"), (0, "mayor que cero"), ("0G", "mayor que cero"),
    ("abc", "no válido"), ("5X", "no válido"), ("", "no válido"), ("10P", "demasiado grande"), ("2T", "demasiado grande"),
    (True, "no válido"), (1.5, "no válido"),
])
def test_parse_size_refuses_with_spanish_message_and_hint(text, words):
    with pytest.raises(InputError) as err:
        dd.parse_size(text)
    assert words in err.value.message and err.value.hint


def test_format_size():
    assert dd.format_size(0) == "0 B"
    assert dd.format_size(1536) == "1.5 KiB"
    assert dd.format_size(64 << 20) == "64 MiB"
    assert dd.format_size(3 << 29) == "1.5 GiB"


# --------------------------------------------------------------------------- qemu-img

def test_create_qcow2_is_thin_and_info_parses_json(tmp_path):
    img = dd.create(tmp_path / "a.qcow2", "1G")
    assert img.format == "qcow2" and img.virtual_size == 1 << 30
    assert img.actual_size < 1 << 20 and img.thin
    assert img.cluster_size == 65536 and img.compat == "1.1" and not img.dirty and not img.corrupt
    assert img.command == f"qemu-img create -f qcow2 {tmp_path / 'a.qcow2'} {1 << 30}"
    again = dd.info(tmp_path / "a.qcow2")
    assert again.command.startswith("qemu-img info --output=json ")
    assert again == dd.ImageInfo(**again.__dict__)  # frozen, comparable
    assert "tamaño virtual:  1 GiB" in again.summary()


def test_create_raw_is_sparse_and_preallocation_full_is_not(tmp_path):
    raw = dd.create(tmp_path / "r.img", "64M", "raw")
    assert raw.format == "raw" and raw.virtual_size == 64 << 20 and raw.actual_size < 1 << 20
    assert (tmp_path / "r.img").stat().st_size == 64 << 20  # apparent size: the whole disk
    assert dd.allocated_bytes(tmp_path / "r.img") < 1 << 20  # but holes take nothing
    full = dd.create(tmp_path / "f.img", "16M", "raw", preallocation="full")
    assert full.actual_size >= 16 << 20 and "-o preallocation=full" in full.command


def test_create_never_overwrites_unless_asked(tmp_path):
    path = tmp_path / "a.qcow2"
    dd.create(path, "64M")
    before = path.read_bytes()
    with pytest.raises(InputError, match="Ya existe") as err:
        dd.create(path, "128M")
    assert "overwrite=True" in err.value.hint
    assert path.read_bytes() == before
    assert dd.create(path, "128M", overwrite=True).virtual_size == 128 << 20


def test_create_refuses_missing_directory_bad_format_and_a_directory(tmp_path):
    with pytest.raises(InputError, match="no existe") as err:
        dd.create(tmp_path / "nope" / "a.qcow2", "1G")
    assert "mkdir -p" in err.value.hint
    assert not (tmp_path / "nope").exists()
    with pytest.raises(InputError, match="Formato"):
        dd.create(tmp_path / "a.vmdk", "1G", "vmdk")
    with pytest.raises(InputError, match="carpeta"):
        dd.create(tmp_path, "1G")
    with pytest.raises(InputError, match="demasiado grande"):
        dd.create(tmp_path / "big.qcow2", "10P")
    assert list(tmp_path.iterdir()) == []


def test_info_of_missing_file_and_of_a_non_image(tmp_path):
    with pytest.raises(InputError, match="No existe"):
        dd.info(tmp_path / "x.qcow2")
    (tmp_path / "t.txt").write_text("hola")
    assert dd.info(tmp_path / "t.txt").format == "raw"  # any file is a raw disk


def test_check_qcow2_and_raw(tmp_path):
    q = dd.check(dd.create(tmp_path / "a.qcow2", "64M").path)
    assert q.supported and q.ok and q.total_clusters == 1024 and "sin errores" in q.summary()
    assert q.command.startswith("qemu-img check --output=json -f qcow2 ")
    r = dd.check(dd.create(tmp_path / "r.img", "64M", "raw").path)
    assert not r.supported and r.ok and "no tiene metadatos" in r.summary()


def test_check_counts_allocated_clusters(tmp_path):
    path = dd.create(tmp_path / "a.qcow2", "64M").path
    subprocess.run(["qemu-io", "-c", "write 0 1M", str(path)], check=True, capture_output=True)
    result = dd.check(path)
    assert result.ok
    assert result.allocated_clusters == 16


def test_convert_qcow2_to_raw_and_back(tmp_path):
    q = dd.create(tmp_path / "a.qcow2", "32M")
    r = dd.convert(q.path, tmp_path / "a.raw", "raw")
    assert r.format == "raw" and r.virtual_size == 32 << 20
    assert r.command == f"qemu-img convert -f qcow2 -O raw {q.path} {tmp_path / 'a.raw'}"
    with pytest.raises(InputError, match="Ya existe"):
        dd.convert(q.path, tmp_path / "a.raw", "raw")
    assert dd.convert(r.path, tmp_path / "b.vmdk", "vmdk").format == "vmdk"
    with pytest.raises(InputError, match="mismo fichero"):
        dd.convert(q.path, q.path, "qcow2", overwrite=True)


def test_resize_grows_and_refuses_to_shrink_silently(tmp_path):
    q = dd.create(tmp_path / "a.qcow2", "64M")
    grown = dd.resize(q.path, "128M")
    assert grown.virtual_size == 128 << 20 and grown.command.startswith("qemu-img resize -f qcow2 ")
    with pytest.raises(InputError, match="menor que el tamaño actual"):
        dd.resize(q.path, "32M")
    raw = dd.create(tmp_path / "r.img", "64M", "raw")
    assert dd.resize(raw.path, "32M", shrink=True).virtual_size == 32 << 20


def test_resize_of_an_image_in_use_explains_live_resize(tmp_path):
    q = dd.create(tmp_path / "a.qcow2", "64M")
    # qemu-io holds the same lock a running QEMU would
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", str(q.path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        holder.stdin.write(b"write 0 4k\n")
        holder.stdin.flush()
        holder.stdout.readline()
        with pytest.raises(dd.DiskInUseError) as err:
            dd.resize(q.path, "128M")
        assert "en uso" in err.value.message and "block_resize" in err.value.hint
        assert "virsh blockresize" in err.value.hint
        assert dd.info(q.path).command.startswith("qemu-img info -U ")  # reading still works
    finally:
        holder.stdin.close()
        holder.wait(10)


# --------------------------------------------------------------------------- hot-plug builders

def test_attach_messages_are_file_node_format_node_and_device():
    msgs = dd.attach_messages("/img/a b,c.qcow2", "qcow2", "LK1234", readonly=True)
    assert [m[0] for m in msgs] == ["blockdev-add", "blockdev-add", "device_add"]
    assert msgs[0][1] == {"driver": "file", "node-name": "lkfile-LK1234", "filename": "/img/a b,c.qcow2",
                          "read-only": True}
    assert msgs[1][1]["file"] == "lkfile-LK1234" and msgs[1][1]["driver"] == "qcow2"
    assert msgs[2][1] == {"driver": "virtio-blk-pci", "id": "lkdisk-LK1234", "drive": "lkfmt-LK1234",
                          "serial": "LK1234"}
    assert json.loads(dd.qmp_text(*msgs[2])) == {"execute": "device_add", "arguments": msgs[2][1]}
    with pytest.raises(InputError):
        dd.attach_messages("/a", "qcow2", "bad serial!")
    with pytest.raises(InputError):
        dd.attach_messages("/a", "vmdk", "LK1")


def test_detach_and_resize_messages():
    disk = dd.AttachedDisk(dd.Path("/a.qcow2"), "qcow2", "LK1", node_name="lkfmt-LK1", device_id="lkdisk-LK1",
                           file_node="lkfile-LK1")
    assert dd.detach_messages(disk) == [("device_del", {"id": "lkdisk-LK1"}),
                                        ("blockdev-del", {"node-name": "lkfmt-LK1"}),
                                        ("blockdev-del", {"node-name": "lkfile-LK1"})]
    assert dd.resize_message(disk, 1 << 30) == ("block_resize", {"node-name": "lkfmt-LK1", "size": 1 << 30})


def test_serials_are_short_unique_and_valid():
    serials = {dd.new_serial() for _ in range(100)}
    assert len(serials) == 100
    assert all(dd.SERIAL_PATTERN.fullmatch(s) and len(s) <= 20 and s.startswith("LK") for s in serials)


def test_virsh_lines():
    assert dd.virsh_attach_line("labkit-10", "/tmp/d.qcow2", "vdb", serial="LK1", fmt="qcow2") == (
        "virsh attach-disk labkit-10 /tmp/d.qcow2 vdb --targetbus virtio --driver qemu --subdriver qcow2 "
        "--serial LK1 --live")
    assert dd.virsh_attach_line("d", "/x y.img", "vdc", mode="persistent").endswith("'/x y.img' vdc --targetbus virtio --persistent")
    assert "--mode readonly" in dd.virsh_attach_line("d", "/x", "vdb", readonly=True)
    with pytest.raises(InputError):
        dd.virsh_attach_line("d", "/x", "vdb", mode="forever")
    assert dd.virsh_detach_line("d", "vdb") == "virsh detach-disk d vdb --live"
    assert dd.virsh_resize_line("d", "vdb", 1 << 30) == "virsh blockresize d vdb 1073741824B"
    assert dd.next_target([]) == "vda" and dd.next_target(["vda", "vdb"]) == "vdc"
    assert dd.next_target([f"vd{chr(97 + i)}" for i in range(26)]) == "vdaa"


# --------------------------------------------------------------------------- guest side (pure)

LISTING = """vda|LKDATOS|131072|0
vdb||2048|1
--
rootfs / rootfs rw 0 0
proc /proc proc rw 0 0
/dev/vda /mnt/datos ext2 rw,relatime 0 0
"""


def test_parse_block_listing_and_table():
    devs = dd.parse_block_listing(LISTING)
    assert devs == [dd.GuestBlockDevice("vda", "LKDATOS", 64 << 20, False, "/mnt/datos", "ext2"),
                    dd.GuestBlockDevice("vdb", "", 1 << 20, True)]
    assert devs[0].path == "/dev/vda"
    table = dd.block_table(devs)
    assert table.splitlines()[0].split() == ["NOMBRE", "SERIE", "TAMAÑO", "RO", "SIST.", "FICH.", "MONTADO", "EN"]
    assert "vda     LKDATOS  64 MiB  0   ext2         /mnt/datos" in table
    assert dd.block_table([]) == "(el invitado no ve ningún disco virtio)"
    assert dd.parse_block_listing("--\n") == []


def test_read_file_from_image_refuses_bad_paths(tmp_path):
    img = dd.create(tmp_path / "a.img", "8M", "raw")
    with pytest.raises(InputError):
        dd.read_file_from_image(img.path, "relativo.txt")
    with pytest.raises(LabkitError, match="No se pudo leer"):
        dd.read_file_from_image(img.path, "/hola.txt")  # no file system in it


def test_read_file_from_image_through_qcow2(tmp_path):
    raw = tmp_path / "fs.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", str(raw), "8M"], check=True)
    (tmp_path / "hola.txt").write_text("hola\n")
    subprocess.run(["debugfs", "-w", "-R", f"write {tmp_path / 'hola.txt'} hola.txt", str(raw)], check=True,
                   capture_output=True)
    q = dd.convert(raw, tmp_path / "fs.qcow2", "qcow2")
    got = dd.read_file_from_image(q.path, "/hola.txt")
    assert got.text == "hola\n"
    assert got.commands[0].startswith("qemu-img convert -f qcow2 -O raw ")
    assert got.commands[1].startswith("debugfs -R 'cat \"/hola.txt\"' /tmp/copia/")
    assert dd.read_file_from_image(raw, "/hola.txt").commands == (f"debugfs -R 'cat \"/hola.txt\"' {raw}",)


# --------------------------------------------------------------------------- widget and plot

class FakeGuest:
    """Just enough of a guest for the widget: attach/detach record calls, run answers the listing."""

    def __init__(self):
        self.plugged = []

    def attach_disk(self, image, *, format=None, serial=None, readonly=False):
        disk = dd.AttachedDisk(image, format, serial, node_name=f"lkfmt-{serial}", device_id=f"lkdisk-{serial}")
        self.plugged.append(disk)
        return disk

    def detach_disk(self, disk):
        self.plugged.remove(disk)
        return disk

    def run(self, command, **_kw):
        lines = [f"vd{chr(97 + i)}|{d.serial}|{dd.info(d.image).virtual_size // 512}|0" for i, d in enumerate(self.plugged)]
        return type("R", (), {"stdout": "\n".join(lines) + "\n--\n", "ok": True})()


def test_disk_widget_without_a_browser(tmp_path):
    from labkit.widgets.disks import disk_lab

    lab = disk_lab(FakeGuest(), tmp_path)
    assert lab.table_text() == "(el invitado no ve ningún disco virtio)"
    lab.size.value, lab.format.value = "32M", "raw"
    lab.create_button.click()
    assert (tmp_path / "widget1.img").exists() and "vda     LKW1   32 MiB" in lab.table_text()
    lab.size.value = "-3G"
    assert lab.create_and_attach() is None and "negativo" in lab.messages[-1]
    lab.detach_button.click()
    assert lab.table_text() == "(el invitado no ve ningún disco virtio)" and not lab.attached
    assert lab.detach() is None and "No hay discos" in lab.messages[-1]
    assert repr(lab) == lab._repr_mimebundle_()["text/plain"] and "Laboratorio de discos" in repr(lab)


def test_thin_provisioning_plot():
    from labkit.plots import thin_provisioning

    pts = [dd.GrowthPoint(label, w << 20, 64 << 20, a << 20)
           for label, w, a in [("qcow2", 0, 0), ("qcow2", 8, 9), ("raw", 0, 0), ("raw", 8, 8)]]
    fig = thin_provisioning(pts)
    ax = fig.axes[0]
    assert len(ax.lines) == 4 and ax.get_xlabel() == "MiB escritos por el invitado"

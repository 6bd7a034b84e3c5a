"""Guest assets: module load order, vmlinux extraction, the cpio, the cache, the kernel search.

Unit tests run on synthetic kernels (a fake bzImage around an xz-compressed ELF with a PVH
note, tiny .ko files, shell scripts standing in for busybox and qemu-ga). The integration
tests build the real assets from a Debian kernel (downloaded into labkit's cache if needed).
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from labkit.errors import SetupError
from labkit.guest import assets, kernel, kmod
from labkit.guest.assets import GuestAssets, ensure_assets
from labkit.guest.cpio import CpioWriter, list_cpio
from labkit.guest.kernel import extract_vmlinux, find_kernel, has_pvh_note, kernel_version_of
from labkit.guest.kmod import read_modinfo, resolve_load_order, write_module_index

VERSION = "9.9.9-test"


# --------------------------------------------------------------------------- synthetic files


def make_elf(notes: list[tuple[bytes, int, bytes]] = (), machine: int = 62) -> bytes:
    """A minimal ELF64 executable whose only program header is a PT_NOTE with ``notes``."""
    blob = b""
    for owner, ntype, desc in notes:
        name = owner + b"\0"
        blob += struct.pack("<III", len(name), len(desc), ntype)
        blob += name + b"\0" * (-len(name) % 4) + desc + b"\0" * (-len(desc) % 4)
    phoff, note_off = 64, 64 + 56
    header = (b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
              + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, 0x1000000, phoff, 0, 0, 64, 56, 1, 64, 0, 0))
    phdr = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(blob), len(blob), 4)
    return header + phdr + blob + b"payload" * 50


PVH_ELF = make_elf([(b"Xen", 6, b"linux\0"), (b"Xen", 18, struct.pack("<I", 0x1000000)),
                    (b"GNU", 3, b"\x01" * 20)])


def make_bzimage(version: str = VERSION, payload: bytes | None = None, kind: str = "xz") -> bytes:
    """Setup header with the version string, then garbage, then the compressed vmlinux, then garbage."""
    head = bytearray(os.urandom(0x400))
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x20E, 0x100)  # version string at 0x100 + 0x200
    text = f"{version} (test@example.org) #1 SMP".encode() + b"\0"
    head[0x300:0x300 + len(text)] = text
    elf = PVH_ELF if payload is None else payload
    if kind == "xz":
        packed = lzma.compress(elf, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    elif kind == "gzip":
        packed = gzip.compress(elf)
    else:
        packed = subprocess.run(["zstd", "-q", "-c"], input=elf, capture_output=True, check=True).stdout
    decoy = b"\x1f\x8b\x08" + os.urandom(64)  # a false gzip magic before the real payload
    return bytes(head) + decoy + os.urandom(500) + packed + os.urandom(300)


def make_ko(pairs: list[tuple[str, str]]) -> bytes:
    """A relocatable ELF64 with a .modinfo section holding ``key=value`` pairs."""
    modinfo = b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    data_off = 64
    str_off = data_off + len(modinfo)
    shoff = (str_off + len(shstrtab) + 7) // 8 * 8
    header = (b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
              + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2))
    body = modinfo + shstrtab + b"\0" * (shoff - str_off - len(shstrtab))
    null = b"\0" * 64
    sec_modinfo = struct.pack("<IIQQQQIIQQ", 1, 1, 2, 0, data_off, len(modinfo), 0, 0, 1, 0)
    sec_str = struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, str_off, len(shstrtab), 0, 0, 1, 0)
    return header + body + null + sec_modinfo + sec_str


# A small kernel: what the real one has for the agent, ext4 and the crc32c pitfall.
MODULES_DEP = textwrap.dedent("""\
    kernel/drivers/virtio/virtio_ring.ko:
    kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
    kernel/drivers/virtio/virtio_pci_modern_dev.ko:
    kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_ring.ko
    kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
    kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
    kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
    kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
    kernel/fs/jbd2/jbd2.ko:
    kernel/fs/mbcache.ko:
    kernel/lib/crc16.ko:
    kernel/lib/libcrc32c.ko:
    kernel/crypto/crc32c_generic.ko:
    kernel/arch/x86/crypto/crc32c-intel.ko:
    kernel/drivers/usb/host/xhci-pci.ko: kernel/drivers/usb/host/xhci-hcd.ko kernel/drivers/usb/core/usbcore.ko
    kernel/drivers/usb/host/xhci-hcd.ko: kernel/drivers/usb/core/usbcore.ko
    kernel/drivers/usb/core/usbcore.ko:
    """)
SOFTDEP = textwrap.dedent("""\
    # Soft dependencies extracted from modules themselves.
    softdep ext4 pre: crypto-crc32c
    softdep jbd2 pre: crypto-crc32c
    softdep libcrc32c pre: crc32c
    """)
ALIASES = textwrap.dedent("""\
    alias crypto-crc32c crc32c_intel
    alias crc32c crc32c_intel
    alias crypto-crc32c crc32c_generic
    alias crc32c crc32c_generic
    alias fs-ext4 ext4
    """)


def before(order: list[str], first: str, second: str) -> bool:
    return order.index(first) < order.index(second)


# --------------------------------------------------------------------------- load order


def test_dependencies_load_first():
    order = resolve_load_order(["virtio_console"], MODULES_DEP)
    assert order == ["virtio_ring", "virtio", "virtio_console"]


def test_every_module_follows_all_its_dependencies():
    order = resolve_load_order(["xhci_pci", "virtio_pci", "ext4"], MODULES_DEP, SOFTDEP, aliases_text=ALIASES)
    deps = kmod.parse_modules_dep(MODULES_DEP)
    for name in order:
        for dep in deps[name][1]:
            assert before(order, dep, name), (dep, name, order)
    assert len(order) == len(set(order))


def test_softdep_pre_is_honoured_and_generic_crc32c_chosen():
    order = resolve_load_order(["ext4"], MODULES_DEP, SOFTDEP, aliases_text=ALIASES)
    assert before(order, "crc32c_generic", "ext4")
    assert before(order, "crc32c_generic", "jbd2")
    assert "crc32c_intel" not in order  # the CPU-specific one fails under TCG: never pulled in


def test_softdep_alias_resolved_without_modules_alias():
    order = resolve_load_order(["ext4", "libcrc32c"], MODULES_DEP, SOFTDEP)
    assert before(order, "crc32c_generic", "ext4")
    assert before(order, "crc32c_generic", "libcrc32c")
    assert "crc32c_intel" not in order


def test_generic_crc32c_loads_before_the_cpu_specific_one():
    for aliases_text in (ALIASES, ""):
        order = resolve_load_order(["crc32c-intel", "ext4"], MODULES_DEP, SOFTDEP, aliases_text=aliases_text)
        assert before(order, "crc32c_generic", "crc32c_intel"), order


def test_builtin_modules_are_skipped():
    order = resolve_load_order(["virtio_console", "virtio_mmio"], MODULES_DEP, builtin={"virtio_ring", "virtio_mmio"})
    assert order == ["virtio", "virtio_console"]
    builtin = kmod.parse_builtin("kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_ring.ko\n")
    assert resolve_load_order(["virtio_console"], MODULES_DEP, builtin=builtin) == ["virtio_console"]


def test_dashes_and_underscores_are_the_same_module():
    assert resolve_load_order(["xhci-pci"], MODULES_DEP) == ["usbcore", "xhci_hcd", "xhci_pci"]


def test_missing_module_is_a_clear_error():
    with pytest.raises(SetupError, match="nosuchmod.*no existe"):
        resolve_load_order(["nosuchmod"], MODULES_DEP)


def test_missing_dependency_names_who_needs_it():
    text = "kernel/a.ko: kernel/b.ko\n"
    with pytest.raises(SetupError, match="«b».*necesita a"):
        resolve_load_order(["a"], text)


def test_cycle_of_hard_dependencies_is_a_clear_error():
    text = "kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/c.ko\nkernel/c.ko: kernel/a.ko\n"
    with pytest.raises(SetupError, match=r"circulares.*a -> b -> c -> a"):
        resolve_load_order(["a"], text)


def test_softdep_cycle_and_missing_softdep_are_dropped():
    text = "kernel/a.ko: kernel/b.ko\nkernel/b.ko:\n"
    soft = "softdep b pre: a nothere\n"
    assert resolve_load_order(["a"], text, soft) == ["b", "a"]


def test_modules_dep_parser_reads_compressed_names():
    table = kmod.parse_modules_dep("kernel/fs/nls/nls_iso8859-1.ko.xz: kernel/fs/nls/nls_base.ko.zst\n")
    assert table == {"nls_iso8859_1": ("kernel/fs/nls/nls_iso8859-1.ko.xz", ("nls_base",))}


# --------------------------------------------------------------------------- module index


def test_read_modinfo_of_a_synthetic_module():
    ko = make_ko([("name", "ext4"), ("depends", "jbd2,crc16"), ("softdep", "pre: crypto-crc32c"),
                  ("alias", "fs-ext4")])
    assert read_modinfo(ko) == [("name", "ext4"), ("depends", "jbd2,crc16"), ("softdep", "pre: crypto-crc32c"),
                                ("alias", "fs-ext4")]
    assert read_modinfo(b"not an elf") == []


def _write_module_tree(modules: Path) -> None:
    kos = {
        "kernel/drivers/virtio/virtio_ring.ko": [("depends", "")],
        "kernel/drivers/virtio/virtio.ko": [("depends", "virtio_ring")],
        "kernel/drivers/char/virtio_console.ko": [("depends", "virtio,virtio_ring")],
        "kernel/drivers/virtio/virtio_mmio.ko": [("depends", "virtio,virtio_ring")],
        "kernel/fs/ext4/ext4.ko": [("depends", "jbd2,crc16"), ("softdep", "pre: crypto-crc32c"),
                                   ("alias", "fs-ext4")],
        "kernel/fs/jbd2/jbd2.ko": [("depends", "")],
        "kernel/lib/crc16.ko": [("depends", "")],
        "kernel/crypto/crc32c_generic.ko": [("depends", ""), ("alias", "crypto-crc32c"), ("alias", "crc32c")],
        "kernel/arch/x86/crypto/crc32c-intel.ko": [("depends", ""), ("alias", "crypto-crc32c")],
        "kernel/drivers/usb/host/xhci-hcd.ko": [("depends", "usbcore")],
        "kernel/drivers/usb/host/xhci-pci.ko": [("depends", "xhci-hcd,usbcore")],
        "kernel/drivers/usb/core/usbcore.ko": [("depends", "")],
    }
    for rel, pairs in kos.items():
        path = modules / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make_ko([("name", kmod.module_name(rel)), *pairs]))
    xz = modules / "kernel/fs/nls/nls_utf8.ko.xz"
    xz.parent.mkdir(parents=True, exist_ok=True)
    xz.write_bytes(lzma.compress(make_ko([("depends", "")])))


def test_write_module_index_like_depmod(tmp_path):
    _write_module_tree(tmp_path)
    write_module_index(tmp_path)
    dep = kmod.parse_modules_dep((tmp_path / "modules.dep").read_text())
    assert dep["xhci_pci"] == ("kernel/drivers/usb/host/xhci-pci.ko",
                               ("xhci_hcd", "usbcore"))  # transitive, loaded-first last
    assert dep["nls_utf8"][0] == "kernel/fs/nls/nls_utf8.ko.xz"
    assert "softdep ext4 pre: crypto-crc32c" in (tmp_path / "modules.softdep").read_text()
    aliases = (tmp_path / "modules.alias").read_text()
    assert "alias fs-ext4 ext4" in aliases and "alias crypto-crc32c crc32c_intel" in aliases
    order = resolve_load_order(["ext4"], (tmp_path / "modules.dep").read_text(),
                               (tmp_path / "modules.softdep").read_text(), aliases_text=aliases)
    assert order[-1] == "ext4" and before(order, "crc32c_generic", "ext4") and "crc32c_intel" not in order


# --------------------------------------------------------------------------- vmlinux


def test_extract_vmlinux_from_xz_payload_in_garbage():
    image = make_bzimage()
    assert extract_vmlinux(image) == PVH_ELF
    assert has_pvh_note(PVH_ELF)


def test_extract_vmlinux_from_gzip_payload():
    assert extract_vmlinux(make_bzimage(kind="gzip")) == PVH_ELF


@pytest.mark.skipif(shutil.which("zstd") is None, reason="no zstd binary")
def test_extract_vmlinux_from_zstd_payload():
    assert extract_vmlinux(make_bzimage(kind="zstd")) == PVH_ELF


def test_extract_vmlinux_none_without_payload():
    assert extract_vmlinux(os.urandom(4096) + b"\x1f\x8b\x08" + os.urandom(100)) is None


def test_pvh_note_required():
    assert not has_pvh_note(make_elf([(b"Xen", 17, b"\0\0\0\0"), (b"GNU", 18, b"\0\0\0\0")]))
    assert not has_pvh_note(make_elf([(b"Xen", 18, b"\0\0\0\0")], machine=3))  # not x86_64
    assert not has_pvh_note(b"\x7fELF" + b"\0" * 10)


def test_kernel_version_from_setup_header(tmp_path):
    image = tmp_path / "vmlinuz"
    image.write_bytes(make_bzimage("6.1.0-99-amd64"))
    assert kernel_version_of(image) == "6.1.0-99-amd64"
    image.write_bytes(b"\0" * 4096)
    assert kernel_version_of(image) is None


# --------------------------------------------------------------------------- cpio


def test_cpio_round_trip(tmp_path):
    path = tmp_path / "x.cpio"
    with open(path, "wb") as f:
        w = CpioWriter(f)
        w.file("usr/sbin/tool", b"abc", 0o755)
        w.symlink("bin/sh", "/bin/busybox")
        w.chardev("dev/console", 5, 1)
        w.close()
    entries = list_cpio(path)
    assert set(entries) == {"usr", "usr/sbin", "usr/sbin/tool", "bin", "bin/sh", "dev", "dev/console"}
    assert entries["usr/sbin/tool"] == 0o100755 and entries["dev/console"] == 0o020600
    gz = tmp_path / "x.cpio.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert list_cpio(gz) == entries
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(SetupError, match="truncado|dañado"):
        list_cpio(path)


@pytest.mark.skipif(shutil.which("busybox") is None, reason="no busybox")
def test_init_scripts_parse_with_busybox_sh(tmp_path):
    for name, text in (("init", assets.INIT_SCRIPT), ("ports", assets._PORTS_SCRIPT),
                       ("shutdown", assets._SHUTDOWN_SCRIPT)):
        script = tmp_path / name
        script.write_text(text)
        result = subprocess.run(["busybox", "sh", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, (name, result.stderr)
    assert assets.READY_MARKER in assets.INIT_SCRIPT and assets.AGENT_PORT in assets.INIT_SCRIPT


# --------------------------------------------------------------------------- a fake kernel, cached


FAKE_BUSYBOX = "#!/bin/sh\n[ \"$1\" = --list-full ] && printf 'bin/sh\\nsbin/modprobe\\nsbin/insmod\\nusr/bin/setsid\\n'\n"


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A kernel tree, busybox and qemu-ga stand-ins, and an empty cache; env points at them."""
    root = tmp_path / "kernel"
    image = root / "boot" / f"vmlinuz-{VERSION}"
    image.parent.mkdir(parents=True)
    image.write_bytes(make_bzimage())
    modules = root / "lib" / "modules" / VERSION
    modules.mkdir(parents=True)
    (modules / "modules.dep").write_text(MODULES_DEP)
    (modules / "modules.softdep").write_text(SOFTDEP)
    (modules / "modules.alias").write_text(ALIASES)
    (modules / "modules.builtin").write_text("kernel/drivers/virtio/virtio_balloon.ko\n")
    for line in MODULES_DEP.splitlines():
        rel = line.split(":")[0]
        (modules / rel).parent.mkdir(parents=True, exist_ok=True)
        (modules / rel).write_bytes(b"fake module " + rel.encode())
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "busybox").write_text(FAKE_BUSYBOX)
    (tools / "qemu-ga").write_text("#!/bin/sh\necho fake qemu-ga\n")
    for tool in tools.iterdir():
        tool.chmod(0o755)
    cache = tmp_path / "cache"
    monkeypatch.setenv("LABKIT_CACHE_DIR", str(cache))
    monkeypatch.setenv("LABKIT_KERNEL", str(image))
    monkeypatch.setenv("LABKIT_BUSYBOX", str(tools / "busybox"))
    monkeypatch.setenv("LABKIT_QEMU_GA", str(tools / "qemu-ga"))
    return {"root": root, "image": image, "modules": modules, "tools": tools, "cache": cache}


def _build(progress_lines=None, **kw) -> GuestAssets:
    lines = progress_lines if progress_lines is not None else []
    return ensure_assets(progress=lines.append, **kw)


def _tree(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_build_produces_the_guest_files(fake):
    lines: list[str] = []
    a = _build(lines)
    assert a.kernel_version == VERSION
    assert a.cache_dir.parent == fake["cache"] / "guest"
    assert a.bzimage.read_bytes() == fake["image"].read_bytes()
    assert a.vmlinux is not None and a.vmlinux.read_bytes() == PVH_ELF
    # boot: the agent channel and the transports with their deps, in order
    assert a.modules == ("virtio_ring", "virtio_pci_modern_dev", "virtio", "virtio_pci", "virtio_mmio",
                         "virtio_console")
    assert "ext4" in a.available_modules and "crc32c_generic" in a.available_modules
    assert "crc32c_intel" not in a.available_modules
    assert before(list(a.available_modules), "crc32c_generic", "ext4")
    entries = list_cpio(a.initramfs)
    base = f"lib/modules/{VERSION}"
    for name in ("init", "bin/busybox", "bin/sh", "sbin/modprobe", "usr/sbin/qemu-ga", "sbin/shutdown",
                 "usr/sbin/labkit-ports", "dev/console", "etc/fstab", "etc/labkit/boot-modules",
                 f"{base}/modules.dep", f"{base}/modules.alias", f"{base}/kernel/drivers/char/virtio_console.ko",
                 f"{base}/kernel/fs/ext4/ext4.ko.gz"):
        assert name in entries, name
    assert any("Construyendo initramfs" in line for line in lines)
    manifest = json.loads((a.cache_dir / "manifest.json").read_text())
    assert set(manifest["files"]) == {"bzImage", "vmlinux", "initramfs.cpio"}


def test_guest_modules_dep_folds_softdeps_for_busybox(fake):
    a = _build()
    files = {name: data for name, _mode, data in assets.read_cpio(a.initramfs)}
    base = f"lib/modules/{VERSION}"
    dep = files[f"{base}/modules.dep"].decode()
    ext4 = next(line for line in dep.splitlines() if line.startswith("kernel/fs/ext4/ext4.ko.gz:"))
    # busybox modprobe loads a line's dependencies from the last one: crc32c_generic first
    assert ext4.split(":")[1].split() == ["kernel/lib/crc16.ko.gz", "kernel/fs/mbcache.ko.gz",
                                          "kernel/fs/jbd2/jbd2.ko.gz", "kernel/crypto/crc32c_generic.ko.gz"]
    assert "kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko " in dep  # boot: plain
    aliases = files[f"{base}/modules.alias"].decode()
    assert "crc32c_generic" in aliases and "crc32c_intel" not in aliases
    boot = files["etc/labkit/boot-modules"].decode().splitlines()
    assert [line.split()[0] for line in boot] == ["all", "pci", "all", "pci", "mmio", "all"]
    assert boot[-1] == f"all /{base}/kernel/drivers/char/virtio_console.ko"
    assert gzip.decompress(files[f"{base}/kernel/fs/ext4/ext4.ko.gz"]) == b"fake module kernel/fs/ext4/ext4.ko"
    assert files["init"].decode() == assets.INIT_SCRIPT


def test_second_call_uses_the_cache(fake):
    first = _build()
    stamp = _tree(first.cache_dir)
    lines: list[str] = []
    second = _build(lines)
    assert second == first
    assert _tree(second.cache_dir) == stamp
    assert lines[-1] == "Listo (en caché)"


def test_changed_input_rebuilds(fake):
    first = _build()
    (fake["modules"] / "kernel/fs/ext4/ext4.ko").write_bytes(b"a newer ext4")
    second = _build()
    assert second.cache_dir != first.cache_dir
    (fake["tools"] / "qemu-ga").write_text("#!/bin/sh\necho another qemu-ga\n")
    third = _build()
    assert third.cache_dir not in (first.cache_dir, second.cache_dir)


def test_truncated_cpio_is_detected_and_rebuilt(fake):
    a = _build()
    good = a.initramfs.read_bytes()
    a.initramfs.write_bytes(good[: len(good) // 2])
    lines: list[str] = []
    b = _build(lines)
    assert b.initramfs == a.initramfs and b.initramfs.read_bytes() == good
    assert any("dañada" in line for line in lines)


def test_missing_file_is_detected_and_rebuilt(fake):
    a = _build()
    assert a.vmlinux is not None
    a.vmlinux.unlink()
    b = _build()
    assert b.vmlinux is not None and b.vmlinux.read_bytes() == PVH_ELF


def test_bad_checksum_is_detected_and_rebuilt(fake):
    a = _build()
    good = a.initramfs.read_bytes()
    bad = bytearray(good)
    bad[200] ^= 0xFF  # same size, new mtime: its sha256 is checked and fails
    a.initramfs.write_bytes(bytes(bad))
    lines: list[str] = []
    _build(lines)
    assert any("dañada" in line for line in lines) and a.initramfs.read_bytes() == good
    # same size and the recorded mtime: only a full verification (labkit guest build) sees it
    recorded = json.loads((a.cache_dir / "manifest.json").read_text())["files"]["initramfs.cpio"]["mtime_ns"]
    a.initramfs.write_bytes(bytes(bad))
    os.utime(a.initramfs, ns=(recorded, recorded))
    lines = []
    _build(lines, verify=True)
    assert any("dañada" in line for line in lines) and a.initramfs.read_bytes() == good


def test_corrupt_manifest_is_rebuilt(fake):
    a = _build()
    (a.cache_dir / "manifest.json").write_text("{not json")
    assert _build() == a
    assert json.loads((a.cache_dir / "manifest.json").read_text())["kernel_version"] == VERSION


def test_rebuild_flag_builds_again(fake):
    a = _build()
    lines: list[str] = []
    b = _build(lines, rebuild=True)
    assert b == a and any("Construyendo" in line for line in lines)


def test_unrelated_cache_files_are_left_alone_and_old_builds_pruned(fake):
    cache = fake["cache"]
    (cache / "guest" / "mine").mkdir(parents=True)
    (cache / "guest" / "mine" / "notes.txt").write_text("keep me")
    (cache / "notes.txt").write_text("keep me too")
    dirs = set()
    for i in range(5):
        (fake["tools"] / "qemu-ga").write_text(f"#!/bin/sh\necho qemu-ga {i}\n")
        dirs.add(_build().cache_dir)
    assert (cache / "guest" / "mine" / "notes.txt").read_text() == "keep me"
    assert (cache / "notes.txt").read_text() == "keep me too"
    builds = {p for p in (cache / "guest").iterdir() if (p / "manifest.json").exists()}
    assert len(dirs) == 5 and len(builds) == 3 and builds <= dirs
    assert list((cache / "tmp").iterdir()) == []


def test_nothing_written_outside_the_cache(fake, tmp_path):
    # a kernel tree without modules.dep (like an unpacked package): indexed in a temp copy
    modules = fake["modules"]
    for name in ("modules.dep", "modules.softdep", "modules.alias"):
        (modules / name).unlink()
    shutil.rmtree(modules / "kernel")
    _write_module_tree(modules)
    before_tree = _tree(fake["root"])
    tools = _tree(fake["tools"])
    a = _build()
    assert "ext4" in a.available_modules and "crc32c_intel" not in a.available_modules
    assert _tree(fake["root"]) == before_tree and _tree(fake["tools"]) == tools
    outside = {p for p in tmp_path.iterdir()} - {fake["root"], fake["tools"], fake["cache"]}
    assert outside == set()


def test_concurrent_builds_do_not_corrupt_each_other(fake):
    code = "from labkit.guest.assets import ensure_assets; print(ensure_assets().initramfs)"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=os.environ.copy()) for _ in range(3)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    paths = {out.strip() for out, _err in results}
    assert len(paths) == 1
    assert list_cpio(Path(paths.pop()))
    assert len([p for p in (fake["cache"] / "guest").iterdir()]) == 1
    assert list((fake["cache"] / "tmp").iterdir()) == []


def test_build_cli_reports_and_fails_in_spanish(fake, tmp_path, capsys):
    assert assets.build_cli() == 0
    err = capsys.readouterr().err
    assert "Listo" in err and "initramfs" in err
    assert assets.build_cli(str(tmp_path / "nope")) == 1
    assert "No puedo leer el kernel" in capsys.readouterr().err


# --------------------------------------------------------------------------- finding the kernel


def test_explicit_kernel_needs_its_modules(fake, tmp_path):
    ks = find_kernel(fake["image"])
    assert (ks.version, ks.modules_dir, ks.origin) == (VERSION, fake["modules"], "explicit")
    assert find_kernel().origin == "env"
    assert find_kernel(fake["root"]).path == fake["image"]  # a directory with boot/vmlinuz-*
    lonely = tmp_path / "elsewhere" / "vmlinuz-1.2.3-none"
    lonely.parent.mkdir()
    lonely.write_bytes(make_bzimage("1.2.3-none"))
    with pytest.raises(SetupError, match="no sus módulos") as err:
        find_kernel(lonely)
    assert "/lib/modules/1.2.3-none" in err.value.hint
    with pytest.raises(SetupError, match="HdrS"):
        garbage = tmp_path / "garbage"
        garbage.write_bytes(b"x" * 100)
        find_kernel(garbage)


def test_boot_kernel_needs_readable_image_and_modules(tmp_path):
    boot, mods = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    (boot / "vmlinuz-6.1.0-9-amd64").write_bytes(b"x")
    (boot / "vmlinuz-6.1.0-10-amd64").write_bytes(b"x")
    (boot / "vmlinuz-6.1.0-11-amd64").write_bytes(b"x")  # newest, but no modules
    assert kernel._boot_kernel(boot, mods) is None
    (mods / "6.1.0-9-amd64").mkdir(parents=True)
    (mods / "6.1.0-10-amd64").mkdir(parents=True)
    found = kernel._boot_kernel(boot, mods)
    assert found is not None and found.version == "6.1.0-10-amd64" and found.origin == "boot"


def test_no_apt_and_no_kernel_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("LABKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LABKIT_KERNEL", raising=False)
    monkeypatch.setattr(kernel, "_boot_kernel", lambda *a: None)
    monkeypatch.setattr(kernel.shutil, "which", lambda name: None)
    with pytest.raises(SetupError) as err:
        find_kernel()
    assert "LABKIT_KERNEL" in err.value.hint


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LABKIT_CACHE_DIR", str(tmp_path / "a"))
    assert assets.cache_root() == tmp_path / "a"
    monkeypatch.delenv("LABKIT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_root() == tmp_path / "xdg" / "labkit"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_root() == tmp_path / "home" / ".cache" / "labkit"


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="no dpkg-deb")
def test_download_unpacks_the_package_into_the_cache(monkeypatch, tmp_path):
    """apt-cache and apt-get are stand-ins; the .deb and dpkg-deb -x are real."""
    stage = tmp_path / "stage"
    (stage / "DEBIAN").mkdir(parents=True)
    (stage / "DEBIAN" / "control").write_text(
        f"Package: linux-image-{VERSION}\nVersion: 1\nArchitecture: amd64\n"
        "Maintainer: test <t@example.org>\nDescription: test kernel\n")
    (stage / "boot").mkdir()
    (stage / "boot" / f"vmlinuz-{VERSION}").write_bytes(make_bzimage())
    modules = stage / "lib" / "modules" / VERSION
    modules.mkdir(parents=True)
    _write_module_tree(modules)  # no modules.dep: depmod runs in the postinst, not here
    deb = tmp_path / "kernel.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(stage), str(deb)],
                   check=True, capture_output=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt.log"
    (bin_dir / "apt-cache").write_text(
        f"#!/bin/sh\necho \"$@\" >> {log}\necho linux-image-amd64\necho '  Depends: linux-image-{VERSION}'\n")
    (bin_dir / "apt-get").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\ncp {deb} ./linux-image-{VERSION}_1_amd64.deb\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("LABKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LABKIT_KERNEL", raising=False)
    monkeypatch.setattr(kernel, "_boot_kernel", lambda *a: None)
    lines: list[str] = []
    ks = find_kernel(progress=lines.append)
    assert ks.origin == "download" and ks.version == VERSION
    assert ks.path == tmp_path / "cache" / "kernels" / VERSION / "boot" / f"vmlinuz-{VERSION}"
    assert lines[0] == f"Descargando linux-image-{VERSION}…"
    assert "download" in log.read_text() and "linux-image-amd64" in log.read_text()
    dep = kmod.parse_modules_dep((ks.modules_dir / "modules.dep").read_text())
    assert dep["virtio_console"][1] == ("virtio", "virtio_ring")
    again = find_kernel()
    assert again.origin == "cache" and again.path == ks.path
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


# --------------------------------------------------------------------------- the real thing


@pytest.mark.integration
def test_real_assets_build():
    """Builds (or reuses) the real guest files in labkit's cache; may download the kernel."""
    a = ensure_assets(progress=print)
    assert a.vmlinux is not None, "the Debian kernel's vmlinux should be extractable"
    assert has_pvh_note(a.vmlinux.read_bytes())
    entries = list_cpio(a.initramfs)
    base = f"lib/modules/{a.kernel_version}"
    for name in ("init", "bin/busybox", "bin/sh", "sbin/modprobe", "usr/sbin/qemu-ga",
                 "lib64/ld-linux-x86-64.so.2", "lib/x86_64-linux-gnu/libc.so.6",
                 "lib/x86_64-linux-gnu/libglib-2.0.so.0", f"{base}/modules.dep",
                 f"{base}/kernel/drivers/char/virtio_console.ko"):
        assert name in entries, name
    libs = assets.shared_libraries(Path("/usr/sbin/qemu-ga")) if Path("/usr/sbin/qemu-ga").exists() else []
    for lib in libs:
        assert str(lib).lstrip("/") in entries, lib
    assert a.modules[-1] == "virtio_console"
    for wanted in ("9p", "9pnet_virtio", "virtiofs", "ext4", "vfat", "xhci_pci", "usb_storage", "uas",
                   "sd_mod", "usbhid", "hid_generic", "loop", "virtio_blk", "virtio_net"):
        assert wanted in a.available_modules, wanted
    assert "crc32c_intel" not in a.available_modules
    assert before(list(a.available_modules), "crc32c_generic", "ext4")
    assert ensure_assets() == a

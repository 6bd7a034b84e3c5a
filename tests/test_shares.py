"""Shared folders: refused paths, builders (argv, XML validated by libvirt's schema), hot-plug
messages, the host's view of 9p's mapped-xattr metadata."""

from __future__ import annotations

import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from labkit.devices import shares as sh
from labkit.errors import InputError
from labkit.guest import GuestSpec, ShareSpec
from labkit.guest.argv import BootFiles, Runtime, build_argv
from labkit.guest.domxml import LibvirtRuntime, domain_xml, filesystem_xml

BOOT = BootFiles(Path("/k/vmlinux"), Path("/k/initramfs.cpio"))


def test_refused_paths(tmp_path):
    with pytest.raises(sh.ShareRefused, match="no existe"):
        sh.check_share_path(tmp_path / "nada")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(sh.ShareRefused, match="no es una carpeta"):
        sh.check_share_path(tmp_path / "f.txt")
    with pytest.raises(sh.ShareRefused, match="«/»"):
        sh.check_share_path("/")
    with pytest.raises(sh.ShareRefused, match="sistema"):
        sh.check_share_path("/etc")
    with pytest.raises(sh.ShareRefused, match="carpeta personal completa") as err:
        sh.check_share_path(Path.home())
    assert "allow_home=True" in err.value.hint


def test_home_with_consent(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(sh.ShareRefused):
        sh.check_share_path(tmp_path)
    assert sh.check_share_path(tmp_path, allow_home=True).path == tmp_path.resolve()


def test_escaping_symlinks(tmp_path):
    share = tmp_path / "share"
    (share / "sub").mkdir(parents=True)
    (share / "inside").symlink_to("sub")
    (share / "sub" / "up").symlink_to("../../")
    (share / "passwd").symlink_to("/etc/passwd")
    assert sorted(sh.escaping_symlinks(share)) == [("passwd", "/etc/passwd"), ("sub/up", "../../")]
    with pytest.raises(sh.ShareRefused, match="enlaces simbólicos") as err:
        sh.check_share_path(share)
    assert "allow_symlinks=True" in err.value.hint
    checked = sh.check_share_path(share, allow_symlinks=True)
    assert len(checked.escaping) == 2 and checked.warnings


def test_spec_defaults_and_validation():
    share = ShareSpec("/srv/compartida")
    assert (share.kind, share.security_model, share.tag) == ("9p", "mapped-xattr", "compartida")
    with pytest.raises(InputError):
        ShareSpec("/srv/x", kind="nfs")
    with pytest.raises(InputError):
        ShareSpec("/srv/x", security_model="root")
    with pytest.raises(InputError):
        ShareSpec("/srv/x", tag="con espacio")
    with pytest.raises(InputError, match="misma etiqueta"):
        GuestSpec(shares=(ShareSpec("/a/x"), ShareSpec("/b/x")))


def test_argv_known_good():
    spec = GuestSpec(machine="pc", memory=256, shares=(
        ShareSpec("/srv/a,b", tag="datos", readonly=True),
        ShareSpec("/srv/v", tag="vfs", kind="virtiofs")))
    argv = build_argv(spec, "tcg", BOOT, Runtime(Path("/r")))
    i = argv.index("-object")
    assert argv[i:] == [
        "-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-numa", "node,memdev=mem",
        "-fsdev", "local,id=fs0,path=/srv/a,,b,security_model=mapped-xattr,readonly=on",
        "-device", "virtio-9p-pci,id=share0,fsdev=fs0,mount_tag=datos",
        "-chardev", "socket,id=vfs1,path=/r/vfs-vfs.sock",
        "-device", "vhost-user-fs-pci,id=share1,chardev=vfs1,tag=vfs"]


def test_9p_only_has_no_shared_memory():
    argv = build_argv(GuestSpec(machine="pc", shares=(ShareSpec("/srv/a"),)), "tcg", BOOT, Runtime(Path("/r")))
    assert "-object" not in argv and "-numa" not in argv


def test_virtiofsd_argv():
    argv = sh.virtiofsd_argv(ShareSpec("/srv/v", kind="virtiofs"), Path("/r/vfs.sock"))
    assert argv == ["/usr/lib/qemu/virtiofsd", "--socket-path=/r/vfs.sock", "-o", "source=/srv/v",
                    "-o", "cache=auto", "-o", "sandbox=namespace", "-o", "log_level=warn"]


def test_filesystem_xml_known_good():
    assert filesystem_xml(ShareSpec("/srv/a", tag="datos", readonly=True)) == (
        '<filesystem type="mount" accessmode="mapped"><driver type="path" /><source dir="/srv/a" />'
        '<target dir="datos" /><readonly /></filesystem>')
    assert filesystem_xml(ShareSpec("/srv/v", tag="vfs", kind="virtiofs")) == (
        '<filesystem type="mount" accessmode="passthrough"><driver type="virtiofs" queue="1024" />'
        '<binary path="/usr/lib/qemu/virtiofsd" /><source dir="/srv/v" /><target dir="vfs" /></filesystem>')
    with pytest.raises(InputError, match="mapped-file"):
        filesystem_xml(ShareSpec("/srv/a", security_model="mapped-file"))


@pytest.mark.skipif(shutil.which("virt-xml-validate") is None, reason="virt-xml-validate no está")
def test_domain_with_shares_validates(tmp_path):
    spec = GuestSpec(machine="q35", shares=(ShareSpec("/srv/a"), ShareSpec("/srv/v", kind="virtiofs")))
    xml = domain_xml(spec, "tcg", BOOT, LibvirtRuntime(Path("/run/x")))
    (tmp_path / "d.xml").write_text(xml)
    out = subprocess.run(["virt-xml-validate", str(tmp_path / "d.xml"), "domain"], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    root = ET.fromstring(xml)
    assert root.find("memoryBacking/source").get("type") == "memfd"
    assert root.find("memoryBacking/access").get("mode") == "shared"


def test_hotplug_messages_refuse_9p():
    msgs = sh.hotplug_messages(ShareSpec("/srv/v", tag="v", kind="virtiofs"), 100, Path("/r/v.sock"))
    assert msgs[0] == ("chardev-add", {"id": "vfs100", "backend": {"type": "socket", "data": {
        "addr": {"type": "unix", "data": {"path": "/r/v.sock"}}, "server": False}}})
    assert msgs[1] == ("device_add", {"driver": "vhost-user-fs-pci", "id": "share100", "chardev": "vfs100",
                                      "tag": "v"})
    with pytest.raises(InputError, match="9p"):
        sh.hotplug_messages(ShareSpec("/srv/a"), 0, Path("/x"))
    assert "virtiofs" in sh.LIBVIRT_9P_HOTPLUG


def test_mount_commands():
    assert sh.mount_command(ShareSpec("/srv/a", tag="a"), "/mnt/a") == [
        "mount", "-t", "9p", "-o", "trans=virtio,version=9p2000.L,msize=524288,cache=none", "a", "/mnt/a"]
    assert sh.mount_command(ShareSpec("/srv/v", tag="v", kind="virtiofs"), "/mnt/v") == [
        "mount", "-t", "virtiofs", "v", "/mnt/v"]


def test_host_view_decodes_mapped_xattr(tmp_path):
    f = tmp_path / "g.txt"
    f.write_text("x")
    try:
        os.setxattr(f, "user.virtfs.uid", (1000).to_bytes(4, "little"))
        os.setxattr(f, "user.virtfs.mode", (0o100644).to_bytes(4, "little"))
    except OSError:
        pytest.skip("este sistema de ficheros no admite xattr de usuario")
    view = sh.host_view(f)
    assert dict(view.xattrs) == {"user.virtfs.mode": "0o100644", "user.virtfs.uid": "1000"}
    assert "user.virtfs.uid=1000" in view.line()


def test_qemu_user_problem(tmp_path):
    import pwd
    import tempfile

    nobody = pwd.getpwnam("nobody")
    assert "no puede entrar en" in sh.qemu_user_problem(tmp_path, nobody, write=False)  # pytest's 0700 dir
    d = Path(tempfile.mkdtemp(prefix="labkit-test-share-"))
    try:
        d.chmod(0o755)
        assert sh.qemu_user_problem(d, nobody, write=False) is None
        assert "no puede escribir" in sh.qemu_user_problem(d, nobody, write=True)
    finally:
        d.rmdir()

"""virtio-serial channels, the qemu-vdagent clipboard path and the SPICE builders.

Unit tests run everywhere; the ``integration`` ones boot one QEMU guest and one libvirt domain
(TCG) and do real round trips: a text channel both ways on both backends, and the clipboard
(VNC ClientCutText -> QEMU clipboard -> qemu-vdagent -> com.redhat.spice.0 -> labkit-clipd, and back).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from labkit.devices import channels as ch
from labkit.devices.clipboard import ClipboardLink
from labkit.errors import InputError
from labkit.guest import ChannelSpec, Guest, GuestSpec
from labkit.guest.argv import BootFiles, Runtime, build_argv
from labkit.guest.domxml import LibvirtRuntime, domain_xml
from labkit.widgets.clipboard import clipboard_sync

BOOT = BootFiles(Path("/k/vmlinux"), Path("/k/initramfs.cpio"))
VALIDATOR = shutil.which("virt-xml-validate")
SPEC = GuestSpec(name="c", channels=(ChannelSpec("org.labkit.chat"),), vdagent=True, vnc=True)


def _validate(xml: str, tmp_path: Path) -> None:
    if VALIDATOR is None:
        pytest.skip("virt-xml-validate no está instalado (paquete libvirt-clients)")
    path = tmp_path / "domain.xml"
    path.write_text(xml)
    out = subprocess.run([VALIDATOR, str(path), "domain"], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


# --------------------------------------------------------------------------- builders


def test_argv_has_vdagent_port_and_local_vnc_socket():
    rt = Runtime(Path("/run/x,y"))
    argv = build_argv(SPEC, "tcg", BOOT, rt)
    joined = " ".join(argv)
    assert "qemu-vdagent,id=vdagent,name=vdagent,clipboard=on,mouse=off" in joined
    assert "virtserialport,bus=vser0.0,chardev=vdagent,name=com.redhat.spice.0" in joined
    assert argv[argv.index("-vnc") + 1] == "unix:/run/x,,y/vnc.sock"  # comma escaped, never TCP
    assert "chan-org.labkit.chat.sock" in joined
    plain = build_argv(GuestSpec(), "tcg", BOOT, rt)
    assert "-vnc" not in plain and "qemu-vdagent" not in " ".join(plain)


def test_domain_xml_vdagent_channel_and_vnc_socket(tmp_path):
    rt = LibvirtRuntime(Path("/run/labkit-libvirt/labkit-c-abc"))
    xml = domain_xml(SPEC, "tcg", BOOT, rt)
    root = ET.fromstring(xml)
    vda = root.find("devices/channel[@type='qemu-vdagent']")
    assert vda.find("target").get("name") == "com.redhat.spice.0"
    assert vda.find("source/clipboard").get("copypaste") == "yes"
    assert root.find("devices/graphics").attrib == {"type": "vnc", "socket": str(rt.vnc)}
    _validate(xml, tmp_path)


def test_spice_port_name_is_reserved():
    with pytest.raises(InputError, match="vdagent=True"):
        ChannelSpec("com.redhat.spice.0")


def test_spice_qemu_args_listen_on_loopback():
    args = ch.spice_qemu_args()
    assert args[:2] == ["-spice", "addr=127.0.0.1,port=5930,disable-ticketing=on"]
    assert "spicevmc,id=vdagent,name=vdagent" in args
    assert "virtserialport,bus=vser1.0,chardev=vdagent,name=com.redhat.spice.0" in args
    with pytest.raises(InputError):
        ch.spice_qemu_args(port=0)


def test_desktop_domain_xml_is_valid_for_libvirt(tmp_path):
    xml = ch.desktop_domain_xml()
    root = ET.fromstring(xml)
    graphics = root.find("devices/graphics")
    assert graphics.get("type") == "spice" and graphics.find("listen").get("address") == "127.0.0.1"
    assert root.find("devices/channel[@type='spicevmc']/target").get("name") == "com.redhat.spice.0"
    _validate(xml, tmp_path)


def test_checklist_marks_the_host_client():
    items = ch.spice_checklist({"remote-viewer": False, "virt-viewer": True})
    assert [i.where for i in items].count("invitado") == 3
    assert items[-1].done is True and all(i.done is None for i in items[:-1])
    assert any("spice-vdagent" in i.what for i in items)


# --------------------------------------------------------------------------- Channel on a plain socket


def test_channel_send_recv_and_timeouts(tmp_path):
    path = tmp_path / "chan.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def echo():
        conn, _ = server.accept()
        data = conn.recv(100)
        conn.sendall(b"eco: " + data)
        conn.recv(1)  # wait until the client closes
        conn.close()

    thread = threading.Thread(target=echo)
    thread.start()
    with ch.Channel(path, "org.x", timeout=5).connect() as chan:
        assert chan.send("hola ñ\n") == 8
        assert chan.recv_line() == "eco: hola ñ"
        with pytest.raises(ch.ChannelError, match="No llegó"):
            chan.recv(timeout=0.1)
        assert "conectado" in repr(chan)
    thread.join(5)
    server.close()
    with pytest.raises(ch.ChannelError, match="No se pudo abrir"):
        ch.Channel(tmp_path / "nada.sock", timeout=0.1).connect()


# --------------------------------------------------------------------------- widget (fake link)


class _FakeTransfer:
    def __init__(self, direction, text):
        self.direction, self.sent, self.received, self.seconds = direction, text, text, 0.012
        self.messages = ("QEMU → invitado: VD_AGENT_CLIPBOARD_GRAB types=[UTF8_TEXT]",)


class _FakeLink:
    def host_copy(self, text):
        return _FakeTransfer("anfitrión → invitado", text)

    def guest_copy(self, text):
        if not text:
            raise InputError("No hay texto que copiar.", "Escribe algo.")
        return _FakeTransfer("invitado → anfitrión", text)


def test_widget_keeps_both_boxes_in_sync():
    w = clipboard_sync(_FakeLink())
    w.copy_from_host("uno")
    assert w.guest.value == "uno"
    w.copy_from_guest("dos")
    assert w.host.value == "dos"
    assert repr(w) == "<Portapapeles compartido: anfitrión='dos', invitado='dos', 2 copias>"
    assert w._repr_mimebundle_()["text/plain"] == repr(w)
    assert w.copy_from_guest("") is None and "No hay texto" in w.history.value
    assert "12 ms" in w.history.value


# --------------------------------------------------------------------------- real guests


@pytest.fixture(scope="module")
def qemu_guest(guest_assets):
    with Guest(GuestSpec(name="labkit-test-canal", accel="tcg", channels=(ChannelSpec("org.labkit.chat"),),
                         vdagent=True, vnc=True), assets=guest_assets, boot_timeout=120) as g:
        yield g
    assert not g.running


@pytest.mark.integration
def test_qemu_ports_and_channel_round_trip(qemu_guest):
    ports = ch.guest_ports(qemu_guest)
    assert {"org.labkit.chat", "com.redhat.spice.0", "org.qemu.guest_agent.0"} <= set(ports)
    result = ch.round_trip(qemu_guest, "org.labkit.chat", "hola ñandú", "adiós, anfitrión")
    assert result.ok, str(result)
    assert result.backend == "qemu"
    with pytest.raises(InputError, match="no tiene el canal"):
        qemu_guest.channel("org.otro")


@pytest.mark.integration
def test_qemu_clipboard_round_trip(qemu_guest):
    with ClipboardLink(qemu_guest, timeout=30) as link:
        there = link.host_copy("copiado en el anfitrión: ¡hola!")
        assert there.ok and link.guest_clipboard() == "copiado en el anfitrión: ¡hola!"
        kinds = [(e.direction, e.message.type_name) for e in there.messages]
        assert kinds == [("in", "VD_AGENT_CLIPBOARD_GRAB"), ("out", "VD_AGENT_CLIPBOARD_REQUEST"),
                         ("in", "VD_AGENT_CLIPBOARD")]
        back = link.guest_copy("copiado en el invitado")
        assert back.ok and back.received == "copiado en el invitado"
        assert [line.split()[0] for line in back.vnc] == ["<-", "->", "<-"]
        assert "PROVIDE" in back.vnc[-1]
        first = [e.message.type_name for e in link.trace()[:2]]
        assert first == ["VD_AGENT_ANNOUNCE_CAPABILITIES", "VD_AGENT_ANNOUNCE_CAPABILITIES"]


@pytest.mark.integration
def test_libvirt_channel_and_clipboard_round_trip(guest_assets):
    if not Path("/run/libvirt/libvirt-sock").exists():
        pytest.skip("libvirtd no está en marcha (./lab setup lo arranca)")
    from labkit.guest.libvirt import LibvirtGuest

    spec = GuestSpec(name="labkit-test-canal-lv", accel="tcg", channels=(ChannelSpec("org.labkit.chat"),),
                     vdagent=True, vnc=True)
    with LibvirtGuest(spec, assets=guest_assets, boot_timeout=120) as g:
        result = ch.round_trip(g, "org.labkit.chat", "hola libvirt", "adiós libvirt")
        assert result.ok and result.backend == "libvirt", str(result)
        assert "<channel type=\"qemu-vdagent\">" in g.xml()
        with ClipboardLink(g, timeout=30) as link:
            assert link.host_copy("de libvirt al invitado").ok
            assert link.guest_copy("del invitado a libvirt").ok
    assert not g.running

"""Real libvirt domains under TCG (qemu:///system): boot, commands, QMP, console, errors, cleanup."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from labkit.cleanup import cleanup
from labkit.guest import CommandFailed, GuestSpec
from labkit.guest.libvirt import (
    PID_DIR,
    RUNTIME_DIR,
    DomainDied,
    DomainNameTaken,
    LibvirtGuest,
    LibvirtUnavailable,
)

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def _labkit_domains() -> list[str]:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                         capture_output=True, text=True, check=True)
    return [n for n in out.stdout.split() if n.startswith("labkit-")]


@pytest.fixture(scope="module", autouse=True)
def no_domain_left():
    if not Path("/run/libvirt/libvirt-sock").exists():
        pytest.skip("libvirtd no está en marcha (./lab setup lo arranca)")
    yield
    assert _labkit_domains() == []


@pytest.fixture(scope="module")
def guest(guest_assets):
    with LibvirtGuest(GuestSpec(name="lvtest", accel="tcg"), assets=guest_assets) as g:
        yield g
    assert not g.running
    assert "labkit-lvtest" not in _labkit_domains()


def test_boot_reports_backend_accelerator_and_time(guest):
    assert guest.backend == "libvirt"
    assert guest.running and guest.accel == "tcg"
    assert "explícitamente" in guest.accel_reason
    assert 0 < guest.create_seconds < guest.boot_seconds < 60
    assert guest.pid and Path(f"/proc/{guest.pid}").exists()
    assert int((PID_DIR / "labkit-lvtest.pid").read_text()) == guest.pid
    assert "<domain" in guest.xml() and "type=\"qemu\"" in guest.xml()
    assert guest.command_line().startswith("virsh -c qemu:///system create ")
    assert Path(guest.command_line().split()[4]).read_text() == guest.xml()
    assert "org.qemu.guest_agent.0" in guest.live_xml()


def test_commands_output_and_status(guest):
    r = guest.run("uname -r; echo aviso >&2; exit 3")
    assert r.stdout.strip() == guest._assets.kernel_version
    assert r.stderr == "aviso\n" and r.exit_status == 3 and not r.ok
    assert guest.run(["echo", "a b", "c"]).stdout == "a b c\n"
    assert guest.run("tr a-z A-Z", input="hola\n").stdout == "HOLA\n"
    with pytest.raises(CommandFailed):
        guest.run("false", check=True)


def test_qmp_through_libvirt(guest):
    assert guest.qmp("query-status")["status"] == "running"
    assert guest.qmp("query-kvm") == {"enabled": False, "present": guest.qmp("query-kvm")["present"]}
    line = guest.virsh_line("qemu-monitor-command", "query-status")
    assert line == "virsh -c qemu:///system qemu-monitor-command labkit-lvtest '{\"execute\": \"query-status\"}'"
    with pytest.raises(Exception) as err:
        guest.qmp("no-such-command")
    assert "rechazó" in str(err.value) or "no pudo" in str(err.value)


def test_agent_and_console(guest):
    assert "version" in guest.agent("guest-info")
    assert "labkit: listo" in guest.console_log()


def test_name_taken_is_a_clear_error(guest, guest_assets):
    with pytest.raises(DomainNameTaken) as err:
        LibvirtGuest(GuestSpec(name="lvtest", accel="tcg"), assets=guest_assets).start()
    assert "labkit-lvtest" in err.value.message and "labkit cleanup" in err.value.hint


def test_unreachable_libvirtd_is_a_clear_error(guest_assets):
    with pytest.raises(LibvirtUnavailable) as err:
        LibvirtGuest(GuestSpec(name="nosock"), uri="qemu:///system?socket=/nonexistent", assets=guest_assets).start()
    assert "libvirtd no está en marcha" in err.value.message and "./lab setup" in err.value.hint


def test_domain_that_dies_shows_its_log(guest_assets):
    # no init in the initramfs under that name: the kernel panics, panic=-1 reboots, on_reboot destroys
    g = LibvirtGuest(GuestSpec(name="muere", accel="tcg", cmdline="rdinit=/no-existe init=/no-existe"),
                     assets=guest_assets, boot_timeout=60)
    with pytest.raises(DomainDied) as err:
        g.start()
    assert "se paró" in err.value.message
    assert "Kernel panic" in err.value.message or "Registro de libvirt" in err.value.message
    assert not g.running and "labkit-muere" not in _labkit_domains()


def test_cleanup_removes_a_domain_whose_owner_died(guest_assets):
    script = textwrap.dedent("""
        from labkit.guest import GuestSpec
        from labkit.guest.libvirt import LibvirtGuest
        from labkit.guest.assets import ensure_assets
        g = LibvirtGuest(GuestSpec(name="huerfano", accel="tcg"), assets=ensure_assets()).start()
        print(g.pid, flush=True)
        import time; time.sleep(600)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        qemu_pid = int(child.stdout.readline())
    finally:
        child.send_signal(signal.SIGKILL)  # a crashed notebook kernel: no finalizer runs
        child.wait()
    assert "labkit-huerfano" in _labkit_domains()  # libvirt domains outlive their owner
    lines = cleanup()
    assert any("labkit-huerfano" in line and "parado" in line for line in lines), lines
    assert "labkit-huerfano" not in _labkit_domains()
    for _ in range(50):
        if not Path(f"/proc/{qemu_pid}").exists():
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{qemu_pid}").exists()
    assert not [d for d in RUNTIME_DIR.glob("labkit-huerfano-*")]


def test_cleanup_leaves_live_guests_alone(guest):
    assert not any("labkit-lvtest" in line for line in cleanup())
    assert guest.running


def test_cli_cleanup_says_nothing_to_clean(guest):
    out = subprocess.run([sys.executable, "-m", "labkit.cli", "cleanup"], capture_output=True, text=True, check=False,
                         cwd=ROOT)
    assert out.returncode == 0
    assert out.stdout.strip() == "Nada que limpiar."


def test_libvirt_qemu_user_can_open_dev_kvm():
    # Without it libvirt (9.0) finds its cached QEMU capabilities stale and probes QEMU again
    # before every domain (60-80 s each here): ./lab setup gives /dev/kvm to group kvm as udev does.
    import grp
    import os
    import pwd
    import stat

    if not Path("/dev/kvm").exists():
        pytest.skip("no hay /dev/kvm")
    try:
        user = pwd.getpwnam("libvirt-qemu")
    except KeyError:
        pytest.skip("libvirt no usa aquí el usuario libvirt-qemu")
    st = os.stat("/dev/kvm")
    groups = {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem} | {user.pw_gid}
    usable = (st.st_uid == user.pw_uid and st.st_mode & stat.S_IRUSR and st.st_mode & stat.S_IWUSR) or \
             (st.st_gid in groups and st.st_mode & stat.S_IRGRP and st.st_mode & stat.S_IWGRP)
    assert usable, f"/dev/kvm es {stat.filemode(st.st_mode)} {st.st_uid}:{st.st_gid}"

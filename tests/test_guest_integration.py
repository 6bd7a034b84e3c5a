"""Real guests under TCG: boot, commands, QMP, console, failures and cleanup. Nothing is mocked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from labkit.guest import CommandFailed, CommandTimeout, Guest, GuestSpec, GuestStartError
from labkit.guest.runner import runtime_base, sweep_stale

pytestmark = pytest.mark.integration


def _qemu_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "qemu-system-x86_64 -name labkit-"], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


@pytest.fixture(scope="module")
def guest(guest_assets):
    with Guest(GuestSpec(name="labkit-test", accel="tcg"), assets=guest_assets) as g:
        yield g
    assert not g.running


def test_boot_reports_accelerator_and_time(guest):
    assert guest.running and guest.accel == "tcg"
    assert "explícitamente" in guest.accel_reason
    assert 0 < guest.boot_seconds < 60
    assert "qemu-system-x86_64 -name labkit-test" in guest.command_line()


def test_command_output_status_and_stderr(guest):
    r = guest.run("uname -r; echo aviso >&2; exit 3")
    assert r.stdout.strip() == os.path.basename(str(guest._assets.kernel_version))
    assert r.stderr == "aviso\n"
    assert r.exit_status == 3 and not r.ok
    assert r.duration > 0
    with pytest.raises(CommandFailed) as err:
        guest.run("false", check=True)
    assert "estado 1" in err.value.message


def test_argv_list_and_stdin(guest):
    assert guest.run(["echo", "a b", "c"]).stdout == "a b c\n"
    assert guest.run("tr a-z A-Z", input="hola\n").stdout == "HOLA\n"


def test_large_output_is_complete(guest):
    r = guest.run("head -c 1048576 /dev/zero | tr '\\0' 'x'", timeout=60)
    assert len(r.stdout) == 1048576 and set(r.stdout) == {"x"}


def test_timeout_kills_the_command_and_guest_stays_usable(guest):
    with pytest.raises(CommandTimeout) as err:
        guest.run("sleep 30", timeout=1)
    assert "no terminó" in err.value.message
    assert guest.run("echo sigo").stdout == "sigo\n"
    assert "sleep 30" not in guest.run("ps").stdout


def test_kernel_messages_do_not_leak_into_command_output(guest):
    guest.run("echo '<2>hola desde kmsg' > /dev/kmsg")  # priority 2 passes 'quiet'
    assert guest.run("echo limpio").stdout == "limpio\n"
    deadline = time.monotonic() + 5
    while "hola desde kmsg" not in guest.console_log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "hola desde kmsg" in guest.console_log()


def test_qmp(guest):
    kvm = guest.qmp("query-kvm")
    assert kvm["enabled"] is False  # TCG
    assert guest.qmp("query-status")["status"] == "running"
    from labkit.guest import GuestError

    with pytest.raises(GuestError):
        guest.qmp("no-such-command")


def test_bad_kernel_path_fails_cleanly(guest_assets, tmp_path):
    from dataclasses import replace

    bad = replace(guest_assets, vmlinux=tmp_path / "no-existe", bzimage=tmp_path / "no-existe")
    before = set(runtime_base().glob("labkit-badkernel-*"))
    g = Guest(GuestSpec(name="badkernel", accel="tcg"), assets=bad, boot_timeout=20)
    with pytest.raises(GuestStartError) as err:
        g.start()
    assert "QEMU dijo" in err.value.message and "no-existe" in err.value.message
    assert not g.running
    assert set(runtime_base().glob("labkit-badkernel-*")) == before


def _child_script(assets_dir: str, wait_for_boot: bool) -> str:
    return textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from labkit.guest import Guest, GuestSpec
        from labkit.guest.assets import ensure_assets
        g = Guest(GuestSpec(name="labkit-orphan", accel="tcg"), assets=ensure_assets())
        if {wait_for_boot}:
            g.start()
        else:
            import threading
            threading.Thread(target=g.start, daemon=True).start()
            while g.pid is None:
                time.sleep(0.01)
        print(g.pid, g._runtime.directory if g._runtime else "", flush=True)
        time.sleep(600)
    """)


@pytest.mark.parametrize("wait_for_boot", [True, False], ids=["booted", "mid-boot"])
def test_kill_9_of_the_owner_leaves_nothing(guest_assets, wait_for_boot):
    proc = subprocess.Popen([sys.executable, "-c", _child_script(str(guest_assets.cache_dir), wait_for_boot)],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().split()
        qemu_pid = int(line[0])
        assert qemu_pid in _qemu_pids()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    while qemu_pid in _qemu_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_pid not in _qemu_pids(), "QEMU survived its owner"
    if len(line) > 1:
        directory = Path(line[1])
        sweep_stale()
        assert not directory.exists()


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm")
def test_auto_falls_back_to_tcg_when_kvm_does_not_boot(guest_assets, monkeypatch):
    """Force the KVM path (as on a host whose verdict is kvm): a KVM boot that fails or hangs
    is bounded, stopped and retried under TCG, and the guest says so."""
    from labkit.guest import runner

    monkeypatch.setattr(runner, "choose_accel", lambda requested: ("kvm", "forzado por la prueba"))
    with Guest(GuestSpec(name="fallback", accel="auto"), assets=guest_assets, kvm_timeout=8) as g:
        assert g.run("echo ok").stdout == "ok\n"
        if g.accel == "tcg":  # this host cannot run stock kernels under KVM (e.g. kvm_pvm)
            assert "se repite con TCG" in g.fallback
        else:
            assert g.fallback is None


def test_guest_started_from_a_thread_outlives_the_thread(guest_assets):
    # PR_SET_PDEATHSIG fires when the forking *thread* ends: labkit forks from one long-lived
    # thread, so a guest started from a worker thread (thread pool, widget callback) survives it.
    import threading

    box = {}
    worker = threading.Thread(target=lambda: box.update(
        g=Guest(GuestSpec(name="hilo", accel="tcg"), assets=guest_assets).start()))
    worker.start()
    worker.join()
    g = box["g"]
    try:
        time.sleep(0.5)  # a parent-death signal would already have killed QEMU
        assert g.running
        assert g.run("echo vivo").stdout == "vivo\n"
    finally:
        g.stop()

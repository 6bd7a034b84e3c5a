"""Faults: ``kill -9`` of the process that owns guests at bad moments, and libvirtd restarted under a
running guest. Nothing may be left behind (after ``labkit cleanup`` for what the design leaves to
it: libvirt domains outlive their owner; runtime dirs wait for the next start or cleanup).

The kill scenarios are ``benchmarks/faults.py``'s (which runs each 20 times and prints a table);
here each runs twice. Real QEMU and libvirtd, nothing mocked.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from labkit.errors import LabkitError
from labkit.guest import GuestSpec
from labkit.guest.libvirt import RUNTIME_DIR, ConnectionLost, LibvirtGuest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
LIBVIRT_SOCK = Path("/run/libvirt/libvirt-sock")


@pytest.fixture(scope="module")
def faults(guest_assets):
    spec = importlib.util.spec_from_file_location("faults", ROOT / "benchmarks" / "faults.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workdir(faults):
    directory = faults.fault_workdir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


PHASES = {"boot": "arrancando", "disk": "escribiendo en el disco"}


@pytest.mark.parametrize("scenario", ["boot-qemu", "boot-libvirt", "disk-qemu", "disk-libvirt", "bench-qemu"])
def test_kill_9_of_the_owner_leaves_nothing(faults, workdir, scenario):
    if scenario.endswith("libvirt") and not LIBVIRT_SOCK.exists():
        pytest.skip("libvirtd no está en marcha (./lab setup lo arranca)")
    for index in range(2):  # two different moments (delays / bench phases)
        run = faults.run_once(scenario, index, workdir=workdir)
        print(f"{scenario} #{index}: {run.phase} +{run.delay:g} s, limpio en {run.clean_s:.2f} s; "
              f"1.ª limpieza: {run.first_cleanup}")
        assert not run.error, run.error
        assert run.killed
        kind = scenario.split("-")[0]
        if kind in PHASES:
            assert run.phase == PHASES[kind]  # killed before the agent answered / while writing
        else:
            assert run.phase != "terminó antes"  # labkit bench was still running
        assert run.leftovers == [], "\n".join(run.leftovers)
        assert run.second_cleanup == []


# ----------------------------------------------------------------------------- libvirtd restarted


def _libvirtd_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def _libvirt_answers() -> bool:
    try:
        return subprocess.run(["virsh", "-c", "qemu:///system", "list"], capture_output=True, timeout=30,
                              check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _stop_libvirtd() -> None:
    if Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "stop", "libvirtd"], check=True)
        return
    pids = _libvirtd_pids()
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids), "libvirtd no terminó con SIGTERM"


def _start_libvirtd() -> None:
    """Start libvirtd if it is not running (as ./lab setup does) and wait until it answers."""
    if _libvirt_answers():
        return
    if Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "start", "libvirtd"], check=True)
    elif not _libvirtd_pids():
        subprocess.run(["libvirtd", "-d"], check=True)
    deadline = time.monotonic() + 120
    while not _libvirt_answers():
        assert time.monotonic() < deadline, "libvirtd no volvió a responder"
        time.sleep(0.2)


def _domains() -> list[str]:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True,
                         text=True, check=True)
    return out.stdout.split()


@pytest.mark.skipif(os.geteuid() != 0, reason="reiniciar libvirtd necesita root")
def test_libvirtd_restart_under_a_running_guest(guest_assets):
    if not LIBVIRT_SOCK.exists():
        pytest.skip("libvirtd no está en marcha (./lab setup lo arranca)")
    g = LibvirtGuest(GuestSpec(name="fault-restart", accel="tcg"), assets=guest_assets, boot_timeout=300)
    g.start()
    try:
        qemu = g.pid
        assert g.run("echo antes").stdout == "antes\n"
        in_flight: dict[str, object] = {}

        def slow() -> None:
            try:
                in_flight["result"] = g.run("sleep 3; echo tarde", timeout=120)
            except LabkitError as err:
                in_flight["error"] = err

        worker = threading.Thread(target=slow)
        worker.start()
        time.sleep(0.5)
        _stop_libvirtd()
        try:
            worker.join(120)
            # the command that was running when libvirtd went away: a labkit error, not libvirt's
            assert isinstance(in_flight.get("error"), ConnectionLost), in_flight
            # a call while libvirtd is down: the same clear error, with what to do
            with pytest.raises(ConnectionLost) as err:
                g.run("echo durante")
            assert "libvirtd" in err.value.message
            assert "vuelve a intentarlo" in err.value.hint
            with pytest.raises(ConnectionLost):
                g.stop()  # cannot destroy the domain without libvirtd: says so and keeps the guest
            assert Path(f"/proc/{qemu}").exists()  # QEMU does not depend on libvirtd
        finally:
            _start_libvirtd()
        # the same object reconnects; the transient domain survived (same QEMU process)
        assert g.run("echo después").stdout == "después\n"
        assert g.running and g.pid == qemu and "labkit-fault-restart" in _domains()
        # a restart that no call saw happen
        try:
            _stop_libvirtd()
        finally:
            _start_libvirtd()
        assert g.run("uname -r").stdout.strip() == guest_assets.kernel_version
        assert g.pid == qemu
    finally:
        _start_libvirtd()
        g.stop()
    assert not g.running
    assert "labkit-fault-restart" not in _domains()
    assert not list(RUNTIME_DIR.glob("labkit-fault-restart-*"))
    deadline = time.monotonic() + 30
    while Path(f"/proc/{qemu}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{qemu}").exists()

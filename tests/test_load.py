"""Load: several guests started together (one thread each) and driven at the same time, each running
its own commands; every answer is checked and every guest is cleaned up. Boot times are printed,
not asserted (run with -s to see them). Real QEMU and libvirtd under TCG, nothing mocked."""

from __future__ import annotations

import hashlib
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from labkit.guest import Guest, GuestSpec
from labkit.guest.libvirt import RUNTIME_DIR, LibvirtGuest
from labkit.guest.runner import runtime_base

pytestmark = pytest.mark.integration

#: 8 TCG guests booting at once on 2 cores (next to whatever else runs) take far longer than one
#: alone (~2 s): the bound is generous, the times are printed.
BOOT_TIMEOUT = 180.0


def _drive(g: Any, index: int, kernel: str) -> list[str]:
    """Write a file and read it back, ``uname -r``, a checksum: what each guest answered wrong (empty: all right)."""
    wrong = []
    payload = "".join(f"invitado {index}, línea {n}\n" for n in range(2000))
    g.run("cat > /tmp/carga", input=payload, check=True, timeout=120)
    if g.run("cat /tmp/carga", timeout=120).stdout != payload:
        wrong.append("cat devolvió otro contenido")
    if g.run("uname -r", timeout=120).stdout.strip() != kernel:
        wrong.append("uname -r")
    digest = g.run("sha256sum /tmp/carga", timeout=120).stdout.split()[0]
    if digest != hashlib.sha256(payload.encode()).hexdigest():
        wrong.append(f"sha256 {digest}")
    if g.run(f"echo {index} > /tmp/n && cat /tmp/n", timeout=120).stdout != f"{index}\n":
        wrong.append("echo/cat")
    return wrong


def _qemu_pids(prefix: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", f"qemu-system.*-name (guest=)?{prefix}"], capture_output=True, text=True, check=False)
    return out.stdout.split()


def _domains(prefix: str) -> list[str]:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True,
                         text=True, check=True)
    return [n for n in out.stdout.split() if n.startswith(prefix)]


def _start_and_drive(guests: list[Any], kernel: str) -> None:
    try:
        # started from pool threads that end before the guests are used: the guests must outlive them
        with ThreadPoolExecutor(len(guests)) as pool:
            list(pool.map(lambda g: g.start(), guests))
        for g in guests:
            print(f"{g.spec.name}: arrancó en {g.boot_seconds:.1f} s ({g.backend})")
        assert all(g.running for g in guests)
        assert len({g.pid for g in guests}) == len(guests)
        with ThreadPoolExecutor(len(guests)) as pool:
            answers = list(pool.map(_drive, guests, range(len(guests)), [kernel] * len(guests)))
        assert answers == [[]] * len(guests)
    finally:
        with ThreadPoolExecutor(len(guests)) as pool:
            list(pool.map(lambda g: g.stop(), guests))
    assert not any(g.running for g in guests)


def test_eight_qemu_guests_at_once(guest_assets):
    guests = [Guest(GuestSpec(name=f"load-q{i}", accel="tcg"), assets=guest_assets, boot_timeout=BOOT_TIMEOUT)
              for i in range(8)]
    _start_and_drive(guests, guest_assets.kernel_version)
    assert _qemu_pids("labkit-load-q") == []
    assert list(runtime_base().glob("labkit-load-q*")) == []


def test_four_libvirt_domains_at_once(guest_assets):
    if not Path("/run/libvirt/libvirt-sock").exists():
        pytest.skip("libvirtd no está en marcha (./lab setup lo arranca)")
    guests = [LibvirtGuest(GuestSpec(name=f"load-l{i}", accel="tcg"), assets=guest_assets,
                           boot_timeout=BOOT_TIMEOUT) for i in range(4)]
    _start_and_drive(guests, guest_assets.kernel_version)
    assert _domains("labkit-load-l") == []
    assert list(RUNTIME_DIR.glob("labkit-load-l*")) == []

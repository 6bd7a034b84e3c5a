"""Shared fixtures: the guest assets are built (or taken from the cache) once per session, and
after the whole suite no labkit guest may remain (QEMU process or libvirt domain)."""

import shutil
import subprocess
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def guest_assets():
    from labkit.guest.assets import ensure_assets

    return ensure_assets()


def _leftovers() -> list[str]:
    found = []
    out = subprocess.run(["pgrep", "-af", "qemu-system-x86_64 -name labkit-"], capture_output=True, text=True)
    found += [f"proceso QEMU: {line[:120]}" for line in out.stdout.splitlines()]
    sock = Path("/run/libvirt/libvirt-sock")
    if shutil.which("virsh") and sock.exists():
        out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True,
                             text=True, timeout=30)
        found += [f"dominio libvirt: {n}" for n in out.stdout.split() if n.startswith("labkit-")]
    return found


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    before = set(_leftovers())
    yield
    left = [x for x in _leftovers() if x not in before]
    assert not left, "Quedan invitados de labkit tras las pruebas:\n" + "\n".join(left)

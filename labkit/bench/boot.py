"""Boot timing shared by ``labkit bench`` and ``benchmarks/guest_boot.py``: labkit's exact QEMU
command line with a tiny initramfs whose /init only prints a marker and powers off ("the floor").

Time = QEMU start -> marker on the console. With the PVH ``vmlinux`` or the compressed ``bzImage``
(which spends seconds decompressing itself in emulated code under TCG).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from ..guest import argv as qargv
from ..guest.runner import host_tsc_khz, spawn_dying_with_us
from ..guest.spec import GuestSpec

__all__ = ["FLOOR_INIT", "FLOOR_MARK", "boot_floor", "build_floor_initramfs", "kill", "spawn", "stats"]

FLOOR_MARK = "LABKIT-BENCH-FLOOR"
FLOOR_INIT = f"""#!/bin/sh
echo {FLOOR_MARK}
mount -t proc proc /proc
read -r up idle < /proc/uptime
echo "LABKIT-BENCH-UPTIME $up"
exec poweroff -f
"""


def stats(values: list[float]) -> dict[str, Any]:
    """n, median, q1, q3, iqr, min, max of the successful samples (None when there are none)."""
    if not values:
        return {"n": 0, "median": None, "q1": None, "q3": None, "iqr": None, "min": None, "max": None}
    if len(values) == 1:
        q1 = med = q3 = values[0]
    else:
        q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"n": len(values), "median": med, "q1": q1, "q3": q3, "iqr": q3 - q1,
            "min": min(values), "max": max(values)}


def spawn(argv: list[str], **kw: Any) -> subprocess.Popen:
    """Start a QEMU that dies with this process (parent-death signal), as labkit does."""
    return spawn_dying_with_us(argv, **kw)


def kill(proc: subprocess.Popen, grace: float = 2.0, group: bool = False) -> None:
    """SIGTERM (to the process or its group), SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    try:
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.terminate()
        proc.wait(grace)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    if proc.poll() is None:
        try:
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        except ProcessLookupError:
            pass
        proc.wait(5)


def build_floor_initramfs(path: Path, busybox: Path) -> int:
    """A newc cpio: /init (busybox sh script), /bin/busybox + sh/mount/poweroff links, /dev/console."""
    from ..guest.assets import CpioWriter

    with open(path, "wb") as out:
        cpio = CpioWriter(out)
        for d in ("bin", "dev", "proc"):
            cpio.dir(d)
        cpio.chardev("dev/console", 5, 1)
        cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
        for applet in ("sh", "mount", "poweroff"):
            cpio.symlink(f"bin/{applet}", "busybox")
        cpio.file("init", FLOOR_INIT.encode(), 0o755)
        cpio.close()
    return path.stat().st_size


def boot_floor(kernel: Path, initrd: Path, machine: str, timeout: float, workdir: Path,
               tag: str, *, accel: str = "tcg", vcpus: int = 1, prefix: str = "labkit-bench") -> dict[str, Any]:
    """labkit's exact QEMU argv with the floor initramfs: QEMU start -> marker on the console."""
    spec = GuestSpec(name=f"{prefix}-floor-{machine}{tag}", accel=accel, machine=machine, vcpus=vcpus)
    rundir = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    runtime = qargv.Runtime(rundir)
    argv = qargv.build_argv(spec, accel, qargv.BootFiles(kernel, initrd), runtime,
                            tsc_khz=host_tsc_khz() if accel == "tcg" else None)
    mark, up_re = FLOOR_MARK.encode(), re.compile(rb"LABKIT-BENCH-UPTIME ([\d.]+)")
    buf, seen, uptime = b"", None, None
    t0 = time.monotonic()
    with open(rundir / "qemu.stderr", "wb") as err:
        proc = spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        fh = None
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if fh is None:
                try:
                    fh = open(runtime.console_log, "rb")
                except OSError:
                    pass
            if fh is not None:
                buf += fh.read()
                if seen is None and mark in buf:
                    seen = time.monotonic() - t0
                m = up_re.search(buf)
                if m and buf.endswith(b"\n"):
                    uptime = float(m.group(1))
            if (seen is not None and uptime is not None) or proc.poll() is not None:
                break
            time.sleep(0.002)
        if fh is not None:
            buf += fh.read()
            fh.close()
        exited = None
        try:
            proc.wait(3)  # poweroff -f: QEMU exits by itself
            exited = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            pass
        if seen is None:
            tail = buf.decode(errors="replace").strip().splitlines()[-5:]
            errtxt = (rundir / "qemu.stderr").read_text(errors="replace").strip()[-300:]
            return {"ok": False, "seconds": None,
                    "error": f"sin marcador en {timeout:g} s; consola: {tail}; QEMU: {errtxt}"}
        return {"ok": True, "seconds": seen, "guest_uptime": uptime, "qemu_exit": exited}
    finally:
        kill(proc)
        shutil.rmtree(rundir, ignore_errors=True)

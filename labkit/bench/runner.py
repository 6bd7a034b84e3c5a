"""Run the workloads natively and in guests, round by round, and collect the samples.

Every round runs each workload natively and then in every guest configuration, one right after
the other, so that a burst of host noise hits the pair alike; the ratio guest/native is computed
per round (:func:`labkit.bench.stats.paired_ratios`). Guests are started once per configuration
and owned by an ``ExitStack``: an exception or a KeyboardInterrupt (Ctrl-C, the notebook's stop
button) stops them all before :func:`run` returns the partial results marked ``cancelled``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError
from . import workloads as wl
from .boot import boot_floor, build_floor_initramfs
from .results import SCHEMA, BenchResults, Config, host_metadata, summarize_samples
from .stats import NOISE_LIMIT

__all__ = ["DISK_SERIAL", "TAG", "Progress", "configs_here", "other_qemus", "run", "sweep_stale_workdirs"]

TAG = "labkit-bench"
DISK_SERIAL = "LKBENCH"
#: progress(done, total, text)
Progress = Callable[[int, int, str], None]


def configs_here(report: Any = None) -> list[Config]:
    """native, kvm, tcg-1, tcg-2; kvm is unavailable (with the probe's reason) unless the probe says it works."""
    if report is None:
        from ..host import probe

        report = probe()
    kvm_ok = report.accelerator == "kvm"
    why = "" if kvm_ok else f"no disponible aquí: veredicto «{report.verdict}»: {report.reason}"
    return [Config("native", "nativo", None),
            Config("kvm", "KVM", "kvm", 1, kvm_ok, why),
            Config("tcg-1", "TCG, 1 hilo", "tcg", 1),
            Config("tcg-2", "TCG multihilo, 2 vCPU", "tcg", 2)]


def other_qemus() -> int:
    """How many QEMU processes run that this benchmark did not start (they make numbers noisy)."""
    try:
        out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True, timeout=5,
                             check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if TAG not in line)


def _make_image(path: Path, size: int) -> None:
    """Random data (not a sparse file: a hole is read without touching the disk), flushed."""
    with open(path, "wb") as fh:
        left = size
        while left:
            chunk = min(left, 1 << 20)
            fh.write(os.urandom(chunk))
            left -= chunk
        fh.flush()
        os.fsync(fh.fileno())


def _bench_bases() -> list[Path]:
    return [Path(base) for base in dict.fromkeys(("/var/tmp", tempfile.gettempdir()))]


def sweep_stale_workdirs() -> list[Path]:
    """Remove the work dirs (test disk image, boot files) of a bench whose process died (``kill -9``)."""
    from ..guest.runner import sweep_stale

    return [d for base in _bench_bases() if base.is_dir() for d in sweep_stale(base)]


def _bench_dir() -> Path:
    """A temp dir on a disk file system (O_DIRECT works there; not on tmpfs with older kernels), with
    the owner's pid so that :func:`sweep_stale_workdirs` (next run, ``labkit cleanup``) can remove it."""
    sweep_stale_workdirs()
    for base in _bench_bases():
        if os.access(base, os.W_OK):
            workdir = Path(tempfile.mkdtemp(prefix=f"{TAG}-", dir=base))
            (workdir / "owner.pid").write_text(str(os.getpid()))
            return workdir
    raise InputError("No hay un directorio temporal escribible.", "Revisa /var/tmp y $TMPDIR.")


class _Native:
    """Runs a script with the host's busybox: ``busybox sh -c`` and a PATH of applet links only."""

    def __init__(self, busybox: Path, workdir: Path) -> None:
        self.bindir = workdir / "bin"
        self.bindir.mkdir()
        for applet in (*wl.APPLETS, "sh"):
            (self.bindir / applet).symlink_to(busybox)
        self.busybox = busybox
        self.timer = os.access("/proc/timer_list", os.R_OK)

    def run(self, w: wl.Workload, scale: float, device: str, timeout: float) -> tuple[float, int, str]:
        tmp = str(self.bindir.parent)
        # without a readable clock, Python's clock around the whole script (setup included)
        text = w.timed(scale, device, tmp) if self.timer else w.timed(scale, device, tmp).replace("/proc/timer_list", "/dev/null")
        t0 = time.perf_counter()
        done = subprocess.run([str(self.busybox), "sh", "-c", text], env={"PATH": str(self.bindir)},
                              capture_output=True, text=True, timeout=timeout, check=False)
        wall = time.perf_counter() - t0
        if not self.timer:
            return wall, done.returncode, "perf_counter"  # (the script's own numbers are empty)
        parsed = wl.parse_timed(done.stdout)
        if parsed is None:
            raise RuntimeError(f"sin medida: {done.stderr.strip()[:200]}")
        return parsed[0], parsed[1], "timer_list"


def _guest_sample(g: Any, w: wl.Workload, scale: float, device: str, timeout: float) -> tuple[float, int]:
    res = g.run(w.timed(scale, device, "/tmp"), timeout=timeout)
    parsed = wl.parse_timed(res.stdout)
    if parsed is None:
        raise RuntimeError(f"sin medida en el invitado: {res.stderr.strip()[:200]}")
    return parsed


def _direct_cache(g: Any, image: Path) -> str:
    """Make QEMU open the bench disk with O_DIRECT too (``blockdev-reopen``, cache.direct=on), so the
    guest's direct reads reach the host disk as the native ones do, not QEMU's page cache."""
    options = {"driver": "file", "node-name": "disk0-file", "filename": str(image), "read-only": True,
               "cache": {"direct": True, "no-flush": False}}
    try:
        g.qmp("blockdev-reopen", options=[options])
        return "blockdev-reopen disk0-file cache.direct=on"
    except Exception as err:  # noqa: BLE001 - say it and go on with the page cache
        return f"QEMU abre el disco con la caché de páginas del anfitrión ({err})"


def jit_stats(g: Any) -> dict[str, Any]:
    """``info jit`` (HMP over QMP) and its main counters (TB count, translated bytes...)."""
    from .translation import parse_info_jit

    text = g.qmp("human-monitor-command", **{"command-line": "info jit"})
    return {"text": text, "values": parse_info_jit(text)}


def run(*, mode: str = "quick", rounds: int | None = None, warmup: int = 1,
        workloads: Sequence[str] | None = None, configs: Sequence[str] | None = None,
        boot: bool = True, boot_rounds: int | None = None, boot_configs: Sequence[str] | None = None,
        progress: Progress | None = None, on_sample: Callable[[BenchResults], None] | None = None,
        label: str | None = None, assets: Any = None, report: Any = None, timeout: float = 300.0) -> BenchResults:
    """Measure ``workloads`` (names from WORKLOADS; all by default) natively and in each configuration
    (native, kvm, tcg-1, tcg-2 by default; unavailable ones are kept with their reason).

    ``mode``: "quick" (sizes for a notebook: ~1 min on a 2-core host) or "full" (4x the sizes, for
    the CLI). Returns the results even when cancelled (``results.data["cancelled"]``)."""
    if mode not in wl.SIZES:
        raise InputError(f"Modo no válido: «{mode}».", "Usa «quick» o «full».")
    scale = wl.SIZES[mode]
    rounds = rounds if rounds is not None else (3 if mode == "quick" else 7)
    boot_rounds = boot_rounds if boot_rounds is not None else (2 if mode == "quick" else 5)
    if rounds < 1 or warmup < 0:
        raise InputError("Hacen falta al menos 1 ronda y 0 o más de calentamiento.", "Usa rounds=3, warmup=1.")
    if boot_rounds < 0:
        raise InputError(f"Número de arranques no válido: {boot_rounds}.", "Usa 0 o más, p. ej. boot_rounds=2.")
    chosen = list(wl.WORKLOADS)
    if workloads is not None:
        known = {w.name: w for w in wl.WORKLOADS}
        unknown = [n for n in workloads if n not in known and n != "boot"]
        if unknown:
            raise InputError(f"Cargas desconocidas: {', '.join(unknown)}.",
                             f"Elige entre: {', '.join(known)}, boot.")
        boot = boot and "boot" in workloads
        chosen = [known[n] for n in workloads if n in known]
    all_configs = configs_here(report)
    if configs is not None:
        names = {c.name for c in all_configs}
        bad = [c for c in configs if c not in names]
        if bad:
            raise InputError(f"Configuraciones desconocidas: {', '.join(bad)}.", f"Elige entre: {', '.join(names)}.")
        # native is the baseline; an unavailable one stays, with its reason (never dropped silently)
        all_configs = [c for c in all_configs if c.name in configs or c.name == "native" or not c.available]
    guest_cfgs = [c for c in all_configs if c.accel and c.available]
    boot_cfgs = [c for c in guest_cfgs if boot_configs is None or c.name in boot_configs]
    if mode == "quick" and boot_configs is None:
        boot_cfgs = boot_cfgs[:1]
    started = time.monotonic()
    meta = host_metadata()
    meta.update({"mode": mode, "rounds": rounds, "warmup": warmup, "boot_rounds": boot_rounds if boot else 0,
                 "scale": scale, "other_qemus_start": other_qemus()})
    samples: list[dict[str, Any]] = []
    data: dict[str, Any] = {"schema": SCHEMA, "label": label or meta["hostname"], "metadata": meta,
                            "configs": [c.as_dict() for c in all_configs],
                            "workloads": [], "samples": samples, "summary": [], "notes": [],
                            "cancelled": False}
    emit = progress or (lambda _d, _t, _m: None)
    per_round = len(chosen) * (1 + len(guest_cfgs))
    total = (warmup + rounds) * per_round + len(guest_cfgs) + (boot_rounds * 2 * len(boot_cfgs) if boot else 0)
    done = 0

    def step(text: str) -> None:
        nonlocal done
        done += 1
        emit(done, total, text)

    def snapshot() -> BenchResults:
        data["summary"] = summarize_samples(samples, all_configs)
        return BenchResults(data)

    workdir = _bench_dir()
    guests: dict[str, Any] = {}
    try:
        with contextlib.ExitStack() as stack:
            from ..guest import Guest, GuestSpec
            from ..guest.assets import cache_root, ensure_assets, find_busybox
            from ..guest.spec import DiskSpec

            emit(0, total, "preparando el invitado y el disco de prueba")
            assets = assets or ensure_assets()
            busybox = Path(find_busybox(cache_root()))
            native = _Native(busybox, workdir)
            meta["timer"] = "timer_list" if native.timer else "perf_counter"
            blk = next((w for w in chosen if w.name == "blockio"), None)
            image = workdir / "bench.img"
            devices = {"native": str(image)}
            if blk:
                _make_image(image, 4096 * max(1, int(blk.units * scale)) + (1 << 20))
            for w in chosen:
                data["workloads"].append({"name": w.name, "label": w.label, "kind": w.kind, "what": w.what,
                                          "command": w.command(scale, "/dev/vdX" if w.kind == "io" else ""),
                                          "setup": w._fill(w.setup, scale, "", "/tmp")})
            if boot:
                data["workloads"] += [{"name": w.name, "label": w.label, "kind": w.kind, "what": w.what,
                                       "command": ""} for w in wl.BOOT_WORKLOADS]
            for c in guest_cfgs:
                spec = GuestSpec(name=f"{TAG}-{c.name}", accel=c.accel, vcpus=c.vcpus, machine="microvm",
                                 disks=(DiskSpec(str(image), "raw", DISK_SERIAL, readonly=True),) if blk else ())
                g = stack.enter_context(Guest(spec, assets=assets, boot_timeout=90))
                guests[c.name] = g
                info = {"config": c.name, "accel": g.accel, "pid": g.pid, "boot_seconds": g.boot_seconds,
                        "guest_kernel": g.run("uname -r").stdout.strip(), "argv": g.command_line()}
                if blk:
                    from ..devices.disks import find_by_serial, load_disk_drivers

                    load_disk_drivers(g)
                    devices[c.name] = find_by_serial(g, DISK_SERIAL).path
                    info["disk_cache"] = _direct_cache(g, image)
                data.setdefault("guests", []).append(info)
                meta["guest_kernel"] = info["guest_kernel"]
                step(f"{c.label}: invitado en marcha ({g.boot_seconds:.1f} s)")
            jit_guest = guests.get("tcg-1") or next((g for g in guests.values() if g.accel == "tcg"), None)
            if jit_guest is not None:
                data["jit"] = {"config": "tcg-1", "before": jit_stats(jit_guest)}
            for r in range(-warmup, rounds):
                busy = other_qemus()
                tag = "calentamiento" if r < 0 else f"ronda {r + 1}/{rounds}"
                for w in chosen:
                    t, status, _src = native.run(w, scale, devices["native"], timeout)
                    samples.append({"workload": w.name, "config": "native", "round": r, "warmup": r < 0,
                                    "seconds": t, "status": status, "other_qemus": busy})
                    step(f"{tag} · {w.label} · nativo {t:.3f} s")
                    for c in guest_cfgs:
                        t, status = _guest_sample(guests[c.name], w, scale, devices.get(c.name, ""), timeout)
                        samples.append({"workload": w.name, "config": c.name, "round": r, "warmup": r < 0,
                                        "seconds": t, "status": status, "other_qemus": busy})
                        step(f"{tag} · {w.label} · {c.label} {t:.3f} s")
                    if on_sample and r >= 0:
                        on_sample(snapshot())
            if jit_guest is not None:
                data["jit"]["after"] = jit_stats(jit_guest)
            for name in list(guests):
                guests.pop(name).stop()
            if boot and boot_cfgs:
                vmlinux = Path(assets.vmlinux) if assets.vmlinux else None
                floor = workdir / "floor.cpio"
                build_floor_initramfs(floor, busybox)
                for r in range(boot_rounds):
                    busy = other_qemus()
                    for c in boot_cfgs:
                        for w, kernel in (("boot_vmlinux", vmlinux), ("boot_bzimage", Path(assets.bzimage))):
                            if kernel is None:
                                continue
                            s = boot_floor(kernel, floor, "microvm", 60, workdir, f"-{c.name}-{w}-{r}",
                                           accel=c.accel, vcpus=c.vcpus, prefix=TAG)
                            samples.append({"workload": w, "config": c.name, "round": r, "warmup": False,
                                            "seconds": s.get("seconds"), "status": 0 if s["ok"] else 1,
                                            "error": s.get("error"), "other_qemus": busy})
                            step(f"arranque {r + 1}/{boot_rounds} · {c.label} · {w[5:]} "
                                 + (f"{s['seconds']:.2f} s" if s["ok"] else "FALLO"))
                        if on_sample:
                            on_sample(snapshot())
    except KeyboardInterrupt:
        data["cancelled"] = True
        data["notes"].append("cancelado por el usuario: los invitados se han parado; resultados parciales")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    res = snapshot()
    noisy = res.noisy()
    meta.update({"wall_seconds": time.monotonic() - started, "loadavg_end": list(os.getloadavg()),
                 "other_qemus_end": other_qemus(),
                 "max_other_qemus": max((s.get("other_qemus", 0) for s in samples), default=0)})
    spreads = [r["stats"]["spread"] for r in res.summary if r.get("stats")]
    data["noise"] = {"limit": NOISE_LIMIT, "max_spread": max(spreads, default=None),
                     "median_spread": sorted(spreads)[len(spreads) // 2] if spreads else None,
                     "noisy": [{"workload": w, "config": c, "spread": s} for w, c, s in noisy]}
    if noisy:
        data["notes"].append("AVISO: ruido > 10 % (IQR/mediana) en " + ", ".join(
            f"{w}/{c} ({s * 100:.0f} %)" for w, c, s in noisy) + ": repite con más rondas o con el equipo en reposo")
    emit(total, total, "cancelado" if data["cancelled"] else "terminado")
    return res

#!/usr/bin/env python3
"""How fast does a labkit guest boot under TCG, and against what?

A benchmark script (not a test): it prints a table and, with ``--json FILE``, writes every
sample. Measured in one run, interleaved round by round so that host noise hits all alike:

1. labkit: ``Guest.start()`` -> ``g.run("true")`` returns, for microvm (the default), q35 and
   pc; median and IQR of ``--runs``. Plus the command round trip, ``g.run("true")`` x50 on one
   guest.
2. The floor: the same QEMU command line (labkit's own ``build_argv``: same machine options,
   same PVH vmlinux, same ``kernel_cmdline()``), with labkit's initramfs swapped for a tiny one
   whose /init (busybox sh) only echoes a marker to the console and powers off. Time: QEMU
   start -> marker in the console file. labkit/floor is what labkit's own userland costs.
3. The Debian bzImage against the extracted vmlinux, same floor init: why labkit boots vmlinux.
4. virtme-ng (``vng``) on the same kernel and modules: ``vng -r <kernel> -- uname -r``.

Every boot has a timeout, every QEMU is named ``labkit-bench-*`` and killed afterwards.

    .venv/bin/python benchmarks/guest_boot.py [--runs 5] [--json out.json] [--vng PATH]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from labkit.guest import Guest, GuestSpec  # noqa: E402
from labkit.guest import argv as qargv  # noqa: E402
from labkit.guest.runner import host_tsc_khz  # noqa: E402,F401
# shared with `labkit bench` (moved to labkit.bench.boot; same names here)
from labkit.bench.boot import FLOOR_INIT, FLOOR_MARK, boot_floor, build_floor_initramfs, stats  # noqa: E402,F401
from labkit.bench.boot import kill as _kill  # noqa: E402
from labkit.bench.boot import spawn as _spawn  # noqa: E402,F401

TAG = "labkit-bench"
MACHINES = ("microvm", "q35", "pc")
TARGET_BOOT = 2.0  # s, median boot-to-command of the default guest
TARGET_RATIO = 1.15  # labkit / floor
TARGET_RTT = 0.020  # s, median g.run("true")


# --------------------------------------------------------------------------- small helpers


def say(text: str = "") -> None:
    print(text, flush=True)


def fmt_s(st: dict[str, Any], ms: bool = False) -> str:
    if not st or st.get("median") is None:
        return "—"
    k, unit = (1000.0, " ms") if ms else (1.0, " s")
    digits = 1 if ms else 2
    return (f"{st['median'] * k:.{digits}f}{unit} "
            f"[{st['q1'] * k:.{digits}f}–{st['q3'] * k:.{digits}f}]")


def yes_no(ok: bool | None) -> str:
    return "—" if ok is None else ("SÍ" if ok else "NO")


def first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "?"


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "?"
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    virt = ""
    if flags:
        f = flags.group(1).split()
        virt = " · " + ("vmx/svm" if ("vmx" in f or "svm" in f) else "sin vmx/svm")
        if "hypervisor" in f:
            virt += " · el anfitrión es a su vez una VM"
    return f"{m.group(1).strip() if m else '?'} ({os.cpu_count()} CPU{virt})"


def other_qemus() -> list[str]:
    """QEMU processes running that this script did not start (they make numbers noisy)."""
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if TAG not in line]


def leftovers() -> list[tuple[int, str]]:
    """Processes whose command line names labkit-bench (excluding this script and its parents)."""
    out = subprocess.run(["pgrep", "-af", TAG], capture_output=True, text=True).stdout
    mine = {os.getpid(), os.getppid()}
    found = []
    for line in out.splitlines():
        pid_s, _, cmd = line.partition(" ")
        if pid_s.isdigit() and int(pid_s) not in mine:
            found.append((int(pid_s), cmd))
    return found


# --------------------------------------------------------------------------- assets


def load_assets(retries: int, wait: float) -> Any:
    from labkit.guest.assets import ensure_assets

    for attempt in range(retries + 1):
        try:
            return ensure_assets(progress=lambda m: say(f"  [assets] {m}"))
        except Exception as err:  # noqa: BLE001 - the asset builder may be mid-edit by someone else
            if attempt == retries:
                raise
            say(f"  ensure_assets() falló ({type(err).__name__}: {err}); reintento en {wait:.0f} s")
            time.sleep(wait)
    raise AssertionError("unreachable")


def find_busybox() -> Path:
    try:
        from labkit.guest.assets import cache_root, find_busybox as lk_find

        return Path(lk_find(cache_root()))
    except Exception:  # noqa: BLE001
        for p in ("/bin/busybox", "/usr/bin/busybox"):
            if Path(p).is_file():
                return Path(p)
    raise SystemExit("No encuentro busybox estático (paquete busybox-static).")


# --------------------------------------------------------------------------- measurements


def boot_labkit(assets: Any, machine: str, timeout: float, tag: str = "") -> dict[str, Any]:
    """Guest start -> first g.run("true") answered; plus what the guest's init said."""
    spec = GuestSpec(name=f"{TAG}-{machine}{tag}", accel="tcg", machine=machine)
    guest = Guest(spec, assets=assets, boot_timeout=timeout)
    ready = re.compile(r"labkit: listo \(([\d.]+) s\)")
    seen: dict[str, float] = {}
    done = threading.Event()

    def watch() -> None:
        # host time at which /init printed "labkit: listo" (modules loaded, qemu-ga launched)
        while not done.is_set():
            if ready.search(guest.console_log()):
                seen["ready"] = time.monotonic() - t0
                return
            time.sleep(0.002)

    t0 = time.monotonic()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        guest.start()
        result = guest.run("true", timeout=timeout)
        total = time.monotonic() - t0
        m = ready.search(guest.console_log())
        return {"ok": result.ok, "seconds": total, "boot_seconds": guest.boot_seconds,
                "first_run": result.duration, "ready_host": seen.get("ready"),
                "guest_ready_uptime": float(m.group(1)) if m else None}
    except Exception as err:  # noqa: BLE001 - one failed boot must not stop the benchmark
        return {"ok": False, "seconds": None, "error": f"{type(err).__name__}: {err}"[:600]}
    finally:
        done.set()
        guest.stop()
        watcher.join(1)


def round_trip(assets: Any, calls: int, timeout: float) -> dict[str, Any]:
    spec = GuestSpec(name=f"{TAG}-rtt", accel="tcg", machine="microvm")
    try:
        with Guest(spec, assets=assets, boot_timeout=timeout) as g:
            durations = [g.run("true", timeout=10).duration for _ in range(calls)]
    except Exception as err:  # noqa: BLE001
        return {"ok": False, "error": f"{type(err).__name__}: {err}"[:600], "samples": []}
    p90 = statistics.quantiles(durations, n=10, method="inclusive")[-1] if len(durations) > 1 else durations[0]
    return {"ok": True, "samples": durations, "stats": stats(durations), "p90": p90}


# --------------------------------------------------------------------------- virtme-ng


class VngUnavailable(Exception):
    pass


def find_vng(explicit: str | None) -> Path:
    if explicit:
        p = Path(explicit)
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise VngUnavailable(f"--vng {explicit}: no es un ejecutable.")
        return p
    for cand in (shutil.which("vng"), "/tmp/vng-venv/bin/vng"):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return Path(cand)
    raise VngUnavailable("no encuentro «vng» (ni en el PATH ni en /tmp/vng-venv/bin/vng). Instálalo aparte: "
                         "python3 -m venv /tmp/vng-venv && /tmp/vng-venv/bin/pip install virtme-ng, "
                         "y repite con --vng /tmp/vng-venv/bin/vng")


def prepare_vng(vng: Path, assets: Any, workdir: Path) -> tuple[list[str], dict[str, str], list[str]]:
    """A private root for vng: boot/vmlinuz-<v> and lib/modules/<v> with kmod's binary indexes.

    vng finds modules at <dir of the kernel>/../lib/modules/<version> and resolves them with
    kmod's ``modprobe --show-depends``, which reads modules.*.bin (labkit's cache keeps the text
    indexes only, so depmod runs here, in a temp tree that links labkit's module files).
    """
    notes = []
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(vng.parent), env.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = [t for t in ("virtme-run", "modprobe", "depmod", "busybox") if not shutil.which(t, path=env["PATH"])]
    if missing:
        hints = {"virtme-run": "viene con virtme-ng, junto a vng", "modprobe": "paquete Debian kmod",
                 "depmod": "paquete Debian kmod", "busybox": "paquete Debian busybox-static"}
        raise VngUnavailable("a virtme-ng le faltan herramientas del anfitrión: "
                             + ", ".join(f"{t} ({hints[t]})" for t in missing))
    from labkit.guest.assets import find_kernel

    source = find_kernel(download=False)
    version = assets.kernel_version
    if source.version != version:
        raise VngUnavailable(f"el kernel con módulos que encuentra labkit ({source.version}) no es el de "
                             f"los assets ({version}).")
    root = workdir / "vng-root"
    mods = root / "lib" / "modules" / version
    (root / "boot").mkdir(parents=True)
    mods.mkdir(parents=True)
    (root / "boot" / f"vmlinuz-{version}").symlink_to(Path(assets.bzimage).resolve())
    (mods / "kernel").symlink_to((Path(source.modules_dir) / "kernel").resolve())
    for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (Path(source.modules_dir) / name).is_file():
            shutil.copy2(Path(source.modules_dir) / name, mods / name)
    done = subprocess.run(["depmod", "-b", str(root), version], env=env, capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0 or not (mods / "modules.dep.bin").is_file():
        raise VngUnavailable(f"depmod falló sobre los módulos de {version}: {done.stderr.strip()[:300]}")
    notes.append(f"módulos: {source.modules_dir} (índices kmod regenerados con depmod en un árbol temporal)")
    cmd = [str(vng), "--verbose", "--disable-kvm", "--force-9p", "--name", f"{TAG}-vng",
           "--append", "loglevel=0", "-r", str(root / "boot" / f"vmlinuz-{version}"), "--", "uname", "-r"]
    if not any(Path(p).exists() for p in ("/usr/lib/systemd/systemd-udevd", "/lib/systemd/systemd-udevd")) \
            and not shutil.which("udevd"):
        notes.append("sin udev en el anfitrión: el invitado de vng no crea /dev/virtio-ports/virtme.*, así que "
                     "vng ejecuta la orden con su «console fallback» y solo se ve con --verbose (por eso "
                     "--verbose y loglevel=0); sale con código 255 aunque la orden funcione")
    notes.append("--force-9p: el virtiofsd de QEMU 7.2 (en C) no acepta las opciones del virtiofsd en Rust que "
                 "vng le pasa; vng caería a 9p tras 0,5 s de espera")
    return cmd, env, notes


def run_vng(cmd: list[str], env: dict[str, str], version: str, timeout: float) -> dict[str, Any]:
    """vng start -> the line with the kernel version appears (answer) and -> vng exits."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd="/tmp")
    out, answer = b"", None
    try:
        fd = proc.stdout.fileno()  # type: ignore[union-attr]
        deadline = t0 + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([fd], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                out += chunk
                if answer is None and any(line.strip() == version.encode() for line in out.splitlines()):
                    answer = time.monotonic() - t0
        try:
            rc = proc.wait(max(0.1, deadline - time.monotonic()))
            exited = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            rc, exited = None, None
    finally:
        _kill(proc, group=True)
        if proc.stdout:
            proc.stdout.close()
    text = out.decode(errors="replace")
    if answer is None:
        why = f"no respondió en {timeout:g} s" if exited is None else f"salió ({rc}) sin imprimir {version}"
        tail = [ln for ln in text.strip().splitlines() if ln.strip()][-8:]
        return {"ok": False, "seconds": None, "exit_seconds": exited, "rc": rc, "error": why, "tail": tail}
    return {"ok": True, "seconds": answer, "exit_seconds": exited, "rc": rc}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="boots per machine type (default 5)")
    ap.add_argument("--bz-runs", type=int, default=3, help="bzImage floor boots (default 3)")
    ap.add_argument("--rtt-calls", type=int, default=50, help='g.run("true") calls (default 50)')
    ap.add_argument("--machines", default=",".join(MACHINES), help="comma list (default microvm,q35,pc)")
    ap.add_argument("--bz-machines", default="microvm", help="machines for bzImage vs vmlinux (default microvm)")
    ap.add_argument("--timeout", type=float, default=30.0, help="per boot, labkit and floor (default 30 s)")
    ap.add_argument("--vng", metavar="PATH", help="the vng executable (default: PATH, then /tmp/vng-venv/bin/vng)")
    ap.add_argument("--vng-runs", type=int, default=3, help="virtme-ng boots (default 3)")
    ap.add_argument("--vng-timeout", type=float, default=120.0, help="per vng run (default 120 s)")
    ap.add_argument("--no-vng", action="store_true", help="skip virtme-ng")
    ap.add_argument("--json", metavar="FILE", help="write every sample and summary as JSON")
    args = ap.parse_args(argv)
    machines = [m.strip() for m in args.machines.split(",") if m.strip()]
    bz_machines = [m.strip() for m in args.bz_machines.split(",") if m.strip()]
    for m in machines + bz_machines:
        if m not in MACHINES:
            ap.error(f"máquina desconocida: {m}")

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"señal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix=f"{TAG}-"))
    report: dict[str, Any] = {}
    try:
        return _main(args, machines, bz_machines, workdir, report, started)
    except KeyboardInterrupt:
        say("\nInterrumpido: se limpian los procesos y se sale.")
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        left = leftovers()
        if left:
            say("AVISO: procesos labkit-bench vivos al terminar: " + "; ".join(f"{p} {c[:80]}" for p, c in left))
        report.setdefault("leftover_processes", [c for _p, c in left])
        if args.json and report.get("date"):
            Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
            say(f"JSON: {args.json}")


def _main(args: argparse.Namespace, machines: list[str], bz_machines: list[str], workdir: Path,
          report: dict[str, Any], started: float) -> int:
    say("Preparando assets de labkit…")
    assets = load_assets(retries=3, wait=60)
    vmlinux, bzimage = Path(assets.vmlinux) if assets.vmlinux else None, Path(assets.bzimage)
    if vmlinux is None:
        raise SystemExit("Los assets no traen vmlinux (PVH): labkit arrancaría el bzImage; nada que comparar.")
    busybox = find_busybox()
    floor_cpio = workdir / "floor.cpio"
    floor_size = build_floor_initramfs(floor_cpio, busybox)
    tsc = host_tsc_khz()
    noisy = other_qemus()
    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "qemu": first_line([qargv.QEMU, "--version"]),
        "host_cpu": cpu_model(),
        "host_kernel": platform.release(),
        "guest_kernel": assets.kernel_version,
        "vmlinux": {"path": str(vmlinux), "bytes": vmlinux.stat().st_size},
        "bzimage": {"path": str(bzimage), "bytes": bzimage.stat().st_size},
        "initramfs": {"path": str(assets.initramfs), "bytes": Path(assets.initramfs).stat().st_size},
        "floor_initramfs_bytes": floor_size,
        "boot_modules": list(assets.modules),
        "loadavg_start": os.getloadavg(),
        "other_qemu_at_start": noisy,
        "cmdline": {m: qargv.kernel_cmdline(GuestSpec(machine=m), "tcg", tsc) for m in MACHINES},
        "runs": args.runs,
    }
    report.update(info)
    say()
    say("=" * 100)
    say("Lab KVM · arranque de invitados bajo TCG")
    say("=" * 100)
    say(f"Fecha:             {info['date']}")
    say(f"QEMU:              {info['qemu']}")
    say(f"CPU anfitrión:     {info['host_cpu']}")
    say(f"Kernel anfitrión:  {info['host_kernel']}   · carga media: "
        + " ".join(f"{x:.2f}" for x in info["loadavg_start"]))
    say(f"Kernel invitado:   {assets.kernel_version} · vmlinux PVH {vmlinux.stat().st_size / 1e6:.1f} MB · "
        f"bzImage {bzimage.stat().st_size / 1e6:.1f} MB")
    say(f"initramfs labkit:  {info['initramfs']['bytes'] / 1e6:.1f} MB ({Path(assets.initramfs).name}; "
        f"módulos al arrancar: {' '.join(assets.modules)})")
    say(f"initramfs suelo:   {floor_size / 1e6:.1f} MB (busybox sh: echo marca; poweroff -f)")
    for m in machines:
        say(f"cmdline {m:<8}   {info['cmdline'][m]}")
    if noisy:
        say(f"AVISO: hay {len(noisy)} QEMU ajenos en marcha: los números tendrán ruido.")
    say()

    # ---- 1 + 2 + 3: interleaved rounds
    lk: dict[str, list[dict[str, Any]]] = {m: [] for m in machines}
    fl: dict[str, list[dict[str, Any]]] = {m: [] for m in machines}
    bz: dict[str, list[dict[str, Any]]] = {m: [] for m in bz_machines}
    fl_vm_extra: dict[str, list[dict[str, Any]]] = {m: [] for m in bz_machines if m not in machines}
    rounds = max(args.runs, args.bz_runs)
    for r in range(rounds):
        line = [f"ronda {r + 1}/{rounds}:"]
        if r < args.runs:
            for m in machines:
                busy = bool(other_qemus())
                s = boot_labkit(assets, m, args.timeout, tag=f"-{r}")
                s["busy"] = busy or bool(other_qemus())
                lk[m].append(s)
                busy = bool(other_qemus())
                f = boot_floor(vmlinux, floor_cpio, m, args.timeout, workdir, tag=f"-{r}")
                f["busy"] = busy or bool(other_qemus())
                fl[m].append(f)
                line.append(f"{m} labkit {_short(s)} suelo {_short(f)}")
        if r < args.bz_runs:
            for m in bz_machines:
                b = boot_floor(bzimage, floor_cpio, m, args.timeout + 30, workdir, tag=f"-bz-{r}")
                bz[m].append(b)
                line.append(f"{m} bzImage {_short(b)}")
                if m in fl_vm_extra:
                    fl_vm_extra[m].append(boot_floor(vmlinux, floor_cpio, m, args.timeout, workdir, tag=f"-{r}"))
        say("  " + " · ".join(line))

    say(f'  g.run("true") ×{args.rtt_calls} en un invitado microvm…')
    rtt = round_trip(assets, args.rtt_calls, args.timeout)

    # ---- 4: virtme-ng
    vng_result: dict[str, Any] = {"skipped": bool(args.no_vng)}
    if not args.no_vng:
        try:
            vng = find_vng(args.vng)
            cmd, env, notes = prepare_vng(vng, assets, workdir)
            vng_result.update({"vng": str(vng), "version": first_line([str(vng), "--version"]),
                               "command": cmd, "notes": notes, "samples": []})
            for r in range(args.vng_runs):
                s = run_vng(cmd, env, assets.kernel_version, args.vng_timeout)
                vng_result["samples"].append(s)
                say(f"  virtme-ng {r + 1}/{args.vng_runs}: {_short(s)}"
                    + (f" (vng salió a los {s['exit_seconds']:.2f} s, código {s['rc']})"
                       if s.get("exit_seconds") else ""))
                if not s["ok"]:
                    break  # one failure says it; do not burn minutes repeating it
        except VngUnavailable as err:
            vng_result["unavailable"] = str(err)
        except Exception as err:  # noqa: BLE001
            vng_result["unavailable"] = f"{type(err).__name__}: {err}"

    # ---- summary
    def ok_values(samples: list[dict[str, Any]], key: str = "seconds") -> list[float]:
        return [s[key] for s in samples if s.get("ok") and s.get(key) is not None]

    summary: dict[str, Any] = {"machines": {}}
    for m in machines:
        lk_st, fl_st = stats(ok_values(lk[m])), stats(ok_values(fl[m]))
        ratio = lk_st["median"] / fl_st["median"] if lk_st["median"] and fl_st["median"] else None
        paired = [a["seconds"] / b["seconds"] for a, b in zip(lk[m], fl[m]) if a.get("ok") and b.get("ok")]
        summary["machines"][m] = {
            "labkit": lk_st, "floor": fl_st, "ratio": ratio, "paired_ratio": stats(paired),
            "labkit_failures": sum(1 for s in lk[m] if not s.get("ok")),
            "floor_failures": sum(1 for s in fl[m] if not s.get("ok")),
            "labkit_agent_connect": stats(ok_values(lk[m], "boot_seconds")),
            "labkit_ready_host": stats(ok_values(lk[m], "ready_host")),
            "labkit_first_run": stats(ok_values(lk[m], "first_run")),
            "labkit_guest_ready_uptime": stats(ok_values(lk[m], "guest_ready_uptime")),
            "floor_guest_uptime": stats(ok_values(fl[m], "guest_uptime")),
        }
    bz_summary = {}
    for m in bz_machines:
        vm_samples = fl[m] if m in fl else fl_vm_extra[m]
        b_st, v_st = stats(ok_values(bz[m])), stats(ok_values(vm_samples))
        bz_summary[m] = {"bzimage": b_st, "vmlinux": v_st,
                         "ratio": b_st["median"] / v_st["median"] if b_st["median"] and v_st["median"] else None,
                         "bzimage_guest_uptime": stats(ok_values(bz[m], "guest_uptime")),
                         "failures": sum(1 for s in bz[m] if not s.get("ok"))}
    vng_st = stats(ok_values(vng_result.get("samples", [])))
    vng_exit = stats(ok_values(vng_result.get("samples", []), "exit_seconds"))
    vng_result["stats"] = vng_st
    vng_result["exit_stats"] = vng_exit

    default = summary["machines"].get("microvm")
    targets = {
        "boot_le_2s": (default["labkit"]["median"] <= TARGET_BOOT) if default and default["labkit"]["median"] else None,
        "ratio_le_1_15": (default["ratio"] <= TARGET_RATIO) if default and default["ratio"] else None,
        "rtt_lt_20ms": (rtt["stats"]["median"] < TARGET_RTT) if rtt.get("ok") else None,
        "beats_vng": (vng_st["median"] / default["labkit"]["median"]) if default and default["labkit"]["median"]
        and vng_st["median"] else None,
    }
    report.update({"labkit": lk, "floor": fl, "bzimage": bz, "floor_extra": fl_vm_extra, "summary": summary,
                   "bzimage_summary": bz_summary, "round_trip": rtt, "vng": vng_result, "targets": targets,
                   "loadavg_end": os.getloadavg(), "wall_seconds": time.monotonic() - started})

    say()
    say(f"1+2. Arranque hasta la primera orden (Popen → g.run(\"true\") devuelve) frente al suelo "
        f"(mismo argv, /init mínimo → marca en la consola). Mediana [Q1–Q3] de {args.runs}, TCG.")
    say(f"{'máquina':<9}{'labkit':>24}{'suelo':>24}{'labkit/suelo':>14}{'por ronda':>11}"
        f"{'≤2,0 s':>8}{'≤1,15×':>8}{'fallos':>8}")
    for m in machines:
        s = summary["machines"][m]
        ratio, pr = s["ratio"], s["paired_ratio"]["median"]
        say(f"{m:<9}{fmt_s(s['labkit']):>24}{fmt_s(s['floor']):>24}"
            f"{(f'{ratio:.2f}×' if ratio else '—'):>14}{(f'{pr:.2f}×' if pr else '—'):>11}"
            f"{yes_no(s['labkit']['median'] <= TARGET_BOOT if s['labkit']['median'] else None):>8}"
            f"{yes_no(ratio <= TARGET_RATIO if ratio else None):>8}"
            f"{s['labkit_failures'] + s['floor_failures']:>8}")
    say()
    say("   labkit/suelo = cociente de medianas; «por ronda» = mediana de los cocientes de cada ronda")
    say("   (labkit y suelo arrancan uno tras otro en cada ronda, así que el ruido les afecta por igual).")
    say("   Desglose en el reloj del anfitrión (medianas desde Popen): el suelo llega a su /init; labkit")
    say("   llega a «labkit: listo» (módulos cargados, qemu-ga lanzado), luego qemu-ga responde, luego la orden.")
    say(f"{'máquina':<9}{'suelo: marca':>14}{'labkit: listo':>15}{'agente':>10}{'1.ª orden':>11}"
        f"{'  ·  uptime invitado: suelo / listo':>36}")
    for m in machines:
        s = summary["machines"][m]
        say(f"{m:<9}{_med(s['floor']):>14}{_med(s['labkit_ready_host']):>15}{_med(s['labkit_agent_connect']):>10}"
            f"{_med(s['labkit_first_run'], ms=True):>11}"
            f"{_med(s['floor_guest_uptime']):>24} / {_med(s['labkit_guest_ready_uptime'])}")
    say("   (el reloj del invitado se detiene en partes del arranque temprano bajo TCG: compara solo dentro")
    say("   de una misma máquina; las columnas del anfitrión son las que cuentan)")
    busy_n = sum(1 for m in machines for s in lk[m] + fl[m] if s.get("busy"))
    total_n = sum(len(lk[m]) + len(fl[m]) for m in machines)
    if busy_n:
        say(f"   AVISO: {busy_n}/{total_n} arranques coincidieron con QEMU ajenos en marcha (ruido).")
    for m in machines:
        for kind, samples in (("labkit", lk[m]), ("suelo", fl[m])):
            for s in samples:
                if not s.get("ok"):
                    say(f"   fallo {m} {kind}: {s.get('error', '?')}")
    say()
    say("3. bzImage comprimido frente a vmlinux PVH, mismo /init mínimo (QEMU → marca). Mediana [Q1–Q3].")
    say(f"{'máquina':<9}{'bzImage':>24}{'vmlinux':>24}{'bzImage/vmlinux':>17}")
    for m, s in bz_summary.items():
        ratio = s["ratio"]
        say(f"{m:<9}{fmt_s(s['bzimage']):>24}{fmt_s(s['vmlinux']):>24}"
            f"{(f'{ratio:.2f}×' if ratio else '—'):>17}")
    say()
    if rtt.get("ok"):
        st = rtt["stats"]
        say(f'4. Ida y vuelta de g.run("true"), {st["n"]} llamadas en un invitado microvm: mediana '
            f'{st["median"] * 1000:.1f} ms, p90 {rtt["p90"] * 1000:.1f} ms, mín {st["min"] * 1000:.1f} ms, '
            f'máx {st["max"] * 1000:.1f} ms → objetivo < 20 ms: {yes_no(targets["rtt_lt_20ms"])}')
    else:
        say(f'4. Ida y vuelta de g.run("true"): FALLÓ: {rtt.get("error")}')
    say()
    say("5. virtme-ng con el mismo kernel y módulos (vng -r <bzImage> -- uname -r):")
    if vng_result.get("skipped"):
        say("   omitido (--no-vng)")
    elif vng_result.get("unavailable"):
        say(f"   NO SE PUDO MEDIR: {vng_result['unavailable']}")
    else:
        say(f"   {vng_result['version']} · {shlex_join(vng_result['command'])}")
        for n in vng_result["notes"]:
            say(f"   nota: {n}")
        say("   vng fija por su cuenta: q35 (sin KVM no usa microvm), -cpu max, 2 vCPU, 1 GiB, raíz = / del "
            "anfitrión por 9p, bzImage")
        fails = [s for s in vng_result["samples"] if not s["ok"]]
        if vng_st["n"]:
            say(f"   hasta la respuesta: {fmt_s(vng_st)} (n={vng_st['n']}); hasta que vng termina: {fmt_s(vng_exit)}")
        for s in fails:
            say(f"   FALLO: {s['error']}; últimas líneas: {s.get('tail')}")
        if targets["beats_vng"]:
            say(f"   labkit (microvm) responde {targets['beats_vng']:.1f}× antes que virtme-ng")
    say()
    say("Objetivos (invitado por defecto, microvm):")
    if default:
        say(f"   arranque→orden ≤ {TARGET_BOOT:.1f} s: {yes_no(targets['boot_le_2s'])} ({_med(default['labkit'])})")
        say(f"   labkit/suelo ≤ {TARGET_RATIO:.2f}×: {yes_no(targets['ratio_le_1_15'])}"
            + (f" ({default['ratio']:.2f}×)" if default["ratio"] else ""))
    say(f"   g.run(\"true\") < 20 ms: {yes_no(targets['rtt_lt_20ms'])}")
    load = os.getloadavg()
    say(f"Carga media al final: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} · duración total "
        f"{time.monotonic() - started:.0f} s")
    left = leftovers()
    say("Procesos labkit-bench vivos: " + ("ninguno" if not left else str(left)))
    return 0


def _short(s: dict[str, Any]) -> str:
    return f"{s['seconds']:.2f}s" if s.get("ok") and s.get("seconds") is not None else "FALLO"


def _med(st: dict[str, Any], ms: bool = False) -> str:
    if not st or st.get("median") is None:
        return "—"
    return f"{st['median'] * 1000:.1f} ms" if ms else f"{st['median']:.2f} s"


def shlex_join(argv: list[str]) -> str:
    import shlex

    return shlex.join(argv)


if __name__ == "__main__":
    sys.exit(main())

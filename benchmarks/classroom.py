#!/usr/bin/env python3
"""How many course guests does one machine hold? (numbers for a classroom server)

A benchmark script (not a test): it prints a table and, with ``--json FILE``, writes every
sample. For N = 1, 4, 8 (``--counts``) guests of the course's default spec (the one every
notebook boots), in ``--rounds`` rounds:

1. N guests are started together (one thread each) and each runs its first command; the
   time each took (start -> ``g.run("true")`` answered) and the time until all had answered.
2. With all N running, the memory each costs the host: the QEMU process's PSS
   (/proc/PID/smaps_rollup: shared pages split between the N QEMUs) and RSS, next to the
   guest's configured RAM and what the guest itself says it uses (MemTotal - MemAvailable).
3. The host's MemAvailable before the guests and with all N running: the real cost of N.

Every guest is named ``labkit-aula-*`` and stopped at the end of its round, also on Ctrl+C.

    .venv/bin/python benchmarks/classroom.py [--counts 1,4,8] [--rounds 3] [--machine microvm]
                                             [--backend qemu|libvirt] [--json out.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from labkit.guest import Guest, GuestSpec  # noqa: E402
from labkit.guest.assets import ensure_assets  # noqa: E402

MIB = 1024 * 1024


def meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo -> {field: bytes}."""
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[name] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return out


def process_memory(pid: int) -> dict[str, int]:
    """PSS and RSS of a process in bytes (smaps_rollup)."""
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    fields = meminfo("\n".join(line for line in text.splitlines() if ":" in line and not line.startswith(" ")))
    return {"pss": fields.get("Pss", 0), "rss": fields.get("Rss", 0)}


def host_available() -> int:
    return meminfo(Path("/proc/meminfo").read_text())["MemAvailable"]


def _boot_one(index: int, args: argparse.Namespace, assets: Any, t0: float) -> tuple[Any, float]:
    spec = GuestSpec(name=f"aula-{index}", machine=args.machine, memory=args.memory, accel=args.accel)
    if args.backend == "libvirt":
        from labkit.guest.libvirt import LibvirtGuest

        g: Any = LibvirtGuest(spec, assets=assets, boot_timeout=args.boot_timeout)
    else:
        g = Guest(spec, assets=assets, boot_timeout=args.boot_timeout)
    try:
        g.start()
        g.run("true", timeout=args.boot_timeout)
    except BaseException:
        g.stop()
        raise
    return g, time.monotonic() - t0


def one_round(n: int, args: argparse.Namespace, assets: Any) -> dict[str, Any]:
    guests: list[Any] = []
    avail_before = host_available()
    t0 = time.monotonic()
    try:
        with cf.ThreadPoolExecutor(max_workers=n) as pool:
            futures = [pool.submit(_boot_one, i, args, assets, t0) for i in range(n)]
            boots, errors = [], []
            for fut in futures:
                try:
                    g, seconds = fut.result()
                    guests.append(g)
                    boots.append(seconds)
                except Exception as err:  # noqa: BLE001 - reported in the table
                    errors.append(str(err).splitlines()[0])
        all_ready = time.monotonic() - t0
        time.sleep(1.0)  # let the page cache and the guests settle before reading memory
        per_guest = []
        for g in guests:
            mem = process_memory(g.pid)
            inside = meminfo(g.run("cat /proc/meminfo").stdout)
            mem["guest_used"] = inside["MemTotal"] - inside["MemAvailable"]
            per_guest.append(mem)
        avail_during = host_available()
    finally:
        for g in guests:
            g.stop()
    return {"n": n, "boots": boots, "errors": errors, "all_ready": all_ready, "per_guest": per_guest,
            "host_cost": avail_before - avail_during, "accel": guests[0].accel if guests else None,
            "machine": getattr(guests[0], "machine", args.machine) if guests else args.machine}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", default="1,4,8", help="numbers of guests booting together (1,4,8)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per count (3)")
    p.add_argument("--machine", default="microvm", choices=("microvm", "q35", "pc"))
    p.add_argument("--memory", default="256M", help="RAM per guest (the course's default, 256M)")
    p.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    p.add_argument("--backend", default="qemu", choices=("qemu", "libvirt"))
    p.add_argument("--boot-timeout", type=float, default=180.0)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    assets = ensure_assets()
    results = []
    for n in counts:
        for r in range(args.rounds):
            print(f"… {n} invitado(s), ronda {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
            results.append(one_round(n, args, assets))

    cpus = os.cpu_count()
    total = meminfo(Path("/proc/meminfo").read_text())["MemTotal"]
    print(f"\nHost: {platform.node()}, {cpus} CPU, {total / 2**30:.1f} GiB; backend {args.backend}, "
          f"máquina {results[0]['machine']}, {args.memory} por invitado, acelerador {results[0]['accel']}")
    print(f"{'N':>2} {'arranque mediana':>17} {'peor':>7} {'todos listos':>13} {'PSS/invitado':>13} "
          f"{'RSS/invitado':>13} {'usada dentro':>13} {'coste host':>11} {'fallos':>6}")
    for n in counts:
        rows = [r for r in results if r["n"] == n]
        boots = [b for r in rows for b in r["boots"]]
        ready = [r["all_ready"] for r in rows]
        pss = [m["pss"] / MIB for r in rows for m in r["per_guest"]]
        rss = [m["rss"] / MIB for r in rows for m in r["per_guest"]]
        used = [m["guest_used"] / MIB for r in rows for m in r["per_guest"]]
        cost = [r["host_cost"] / MIB for r in rows]
        fails = sum(len(r["errors"]) for r in rows)
        print(f"{n:>2} {median(boots):>15.2f} s {max(boots, default=float('nan')):>5.2f} s {median(ready):>11.2f} s "
              f"{median(pss):>9.0f} MiB {median(rss):>9.0f} MiB {median(used):>9.0f} MiB "
              f"{median(cost):>7.0f} MiB {fails:>6}")
    for r in results:
        for e in r["errors"]:
            print(f"  fallo con N={r['n']}: {e}")
    if args.json:
        meta = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "host": platform.node(), "cpus": cpus,
                "mem_total": total, "argv": sys.argv}
        Path(args.json).write_text(json.dumps({"meta": meta, "rounds": results}, indent=1))
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

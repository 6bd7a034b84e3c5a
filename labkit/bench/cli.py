"""``labkit bench``: a line of progress on the terminal, the table, the files, the exit status
(0 done, 1 failed, 130 cancelled with Ctrl-C: guests stopped, partial results still saved)."""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
from types import ModuleType

__all__ = ["main", "terminal_progress"]


def terminal_progress(done: int, total: int, text: str) -> None:
    """``[#####.....]  12/40  ronda 2/7 · sha256 · TCG 1 hilo 0.62 s`` rewritten in place."""
    width = 24
    filled = int(width * done / total) if total else 0
    cols = shutil.get_terminal_size((100, 20)).columns
    line = f"[{'#' * filled}{'.' * (width - filled)}] {done:>3}/{total} {text}"
    if sys.stderr.isatty():
        sys.stderr.write("\r" + line[: cols - 1].ljust(cols - 1))
        if done >= total:
            sys.stderr.write("\n")
    else:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"señal {signum}")


def main(args: argparse.Namespace, bench: ModuleType) -> int:
    # SIGTERM (kill, a CI timeout) cancels like Ctrl-C: guests stopped, partial results kept
    signal.signal(signal.SIGTERM, _interrupt)
    others = [bench.load(p) for p in args.compare]
    configs = _split(args.configs)
    res = bench.run(mode=args.mode, rounds=args.rounds, warmup=args.warmup, boot_rounds=args.boot_rounds,
                    workloads=_split(args.workloads), configs=configs, label=args.label,
                    boot_configs=configs, progress=terminal_progress)
    meta = res.metadata
    print(f"\n{meta['host_cpu']} · {meta['host_cpus']} CPU · núcleo {meta['host_kernel']} · {meta['qemu']}")
    print(f"invitado: {meta.get('guest_kernel', '?')} · modo {meta['mode']}, {meta['rounds']} rondas "
          f"+ {meta['warmup']} de calentamiento · reloj: {meta.get('timer')}")
    print()
    print(res.table())
    for name, reason in res.unavailable():
        print(f"  {name}: {reason}")
    noise = res.data.get("noise", {})
    if noise.get("max_spread") is not None:
        print(f"\nRuido: IQR/mediana máximo {noise['max_spread'] * 100:.0f} %, mediana "
              f"{noise['median_spread'] * 100:.0f} % · otros QEMU en marcha: hasta {meta.get('max_other_qemus', 0)}")
    for note in res.data.get("notes", []):
        print(note)
    print(f"Duración total: {meta['wall_seconds']:.0f} s")
    if args.json:
        print(f"JSON: {res.to_json(args.json)}")
    if args.csv:
        print(f"CSV: {res.to_csv(args.csv)}")
    if args.plot:
        from ..plots import bench_bars

        bench_bars(res, others=others, log=args.log).savefig(args.plot, dpi=110)
        print(f"Gráfico: {args.plot}")
    return 130 if res.data.get("cancelled") else 0

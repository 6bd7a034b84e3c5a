"""Benchmarks: the same busybox workloads natively and in guests (KVM, TCG), paired round by round.

    from labkit import bench
    res = bench.run(mode="quick")            # native, kvm (if it works here), tcg-1, tcg-2
    print(res.table())
    res.to_json("resultados.json")
    otro = bench.load("portatil-de-ana.json")  # and plot both with labkit.plots.bench_bars

Modules: :mod:`.workloads` (the scripts), :mod:`.runner` (guests, rounds, cancellation),
:mod:`.stats` (median, IQR, bootstrap, paired ratios), :mod:`.results` (files),
:mod:`.boot` (boot timing, shared with ``benchmarks/guest_boot.py``),
:mod:`.translation` (TCG's translation log and ``info jit``).
"""

from __future__ import annotations

from .results import SCHEMA, BenchResults, Config, host_metadata, load
from .runner import configs_here, jit_stats, run
from .stats import NOISE_LIMIT, Summary, bootstrap_median, paired_ratios, summarize
from .translation import parse_info_jit, translate
from .workloads import BOOT_WORKLOADS, WORKLOADS, Workload

__all__ = [
    "BOOT_WORKLOADS",
    "NOISE_LIMIT",
    "SCHEMA",
    "WORKLOADS",
    "BenchResults",
    "Config",
    "Summary",
    "Workload",
    "bootstrap_median",
    "configs_here",
    "host_metadata",
    "jit_stats",
    "load",
    "paired_ratios",
    "parse_info_jit",
    "run",
    "summarize",
    "translate",
]

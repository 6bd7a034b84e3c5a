"""Benchmark results as data: samples, per-(workload, config) summaries, metadata; JSON and CSV.

A results file (``labkit-bench/1``) from another machine loads with :func:`load` and plots beside
this one's (:func:`labkit.plots.bench_bars`), so a class can compare laptops.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, os_reason
from .stats import NOISE_LIMIT, bootstrap_median, paired_ratios, summarize

__all__ = ["CSV_FIELDS", "SCHEMA", "BenchResults", "Config", "host_metadata", "load", "summarize_samples"]

SCHEMA = "labkit-bench/1"
CSV_FIELDS = ("workload", "config", "n", "median_s", "q1_s", "q3_s", "spread", "noisy", "ratio_to",
              "ratio_median", "ratio_q1", "ratio_q3", "available", "reason")


@dataclass(frozen=True)
class Config:
    """A configuration to measure: native, kvm, tcg-1 (single-threaded TCG, 1 vCPU) or tcg-2
    (multi-threaded TCG, 2 vCPUs); ``reason`` says why one is not available here."""

    name: str
    label: str
    accel: str | None  # None for native
    vcpus: int = 1
    available: bool = True
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "accel": self.accel, "vcpus": self.vcpus,
                "available": self.available, "reason": self.reason}


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
        return ((out.stdout or out.stderr).strip().splitlines() or ["?"])[0]
    except (OSError, subprocess.SubprocessError):
        return "?"


def host_metadata() -> dict[str, Any]:
    """Host CPU, kernel, QEMU version, date, CPU count and load (what makes numbers comparable)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    m = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    return {
        "host_cpu": m.group(1).strip() if m else platform.processor() or "?",
        "host_cpus": os.cpu_count(),
        "host_kernel": platform.release(),
        "hostname": platform.node(),
        "qemu": _first_line(["qemu-system-x86_64", "--version"]),
        "busybox": _first_line(["busybox"]),
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": list(os.getloadavg()),
    }


def summarize_samples(samples: list[dict[str, Any]], configs: list[Config]) -> list[dict[str, Any]]:
    """One row per (workload, config): the sample summary and the ratio to its baseline computed
    pair by pair (native for the workloads; the vmlinux boot of the same config for the bzImage)."""
    rows: list[dict[str, Any]] = []
    by: dict[tuple[str, str], dict[int, float]] = {}
    order: list[str] = []
    for s in samples:
        if s.get("warmup") or s.get("seconds") is None:
            continue
        by.setdefault((s["workload"], s["config"]), {})[s["round"]] = s["seconds"]
        if s["workload"] not in order:
            order.append(s["workload"])
    for w in order:
        for c in configs:
            row: dict[str, Any] = {"workload": w, "config": c.name, "available": c.available, "reason": c.reason,
                                   "n": 0, "stats": None, "ratio": None, "ratio_to": None}
            rows.append(row)
            mine = by.get((w, c.name))
            if not c.available:
                continue
            if not mine:
                row["reason"] = ("no aplica: el anfitrión ya está arrancado" if c.name == "native"
                                 and w.startswith("boot_") else "no medido en esta ejecución")
                continue
            st = summarize(list(mine.values()))
            row.update({"n": st.n, "stats": st.as_dict()})
            if w == "boot_bzimage":
                base = ("boot_vmlinux", c.name)
            elif w.startswith("boot_") or c.name == "native":
                base = None
            else:
                base = (w, "native")
            if base and base in by:
                pairs = paired_ratios(mine, by[base])
                rst = summarize(pairs)
                if rst:
                    row["ratio"] = {**rst.as_dict(), "bootstrap95": bootstrap_median(pairs)}
                    row["ratio_to"] = base[0] if base[0] != w else base[1]
    return rows


@dataclass
class BenchResults:
    """What a run measured. ``data`` is the JSON document; the methods read it."""

    data: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------ reading
    @property
    def metadata(self) -> dict[str, Any]:
        return self.data.get("metadata", {})

    @property
    def summary(self) -> list[dict[str, Any]]:
        return self.data.get("summary", [])

    @property
    def configs(self) -> list[dict[str, Any]]:
        return self.data.get("configs", [])

    @property
    def label(self) -> str:
        return self.data.get("label") or self.metadata.get("hostname", "?")

    def row(self, workload: str, config: str) -> dict[str, Any] | None:
        return next((r for r in self.summary if r["workload"] == workload and r["config"] == config), None)

    def ratio(self, workload: str, config: str) -> float | None:
        r = self.row(workload, config)
        return r["ratio"]["median"] if r and r.get("ratio") else None

    def noisy(self) -> list[tuple[str, str, float]]:
        """(workload, config, spread) of every measurement whose IQR/median exceeds 10 %."""
        return [(r["workload"], r["config"], r["stats"]["spread"]) for r in self.summary
                if r.get("stats") and r["stats"]["spread"] > NOISE_LIMIT]

    # ------------------------------------------------------------ writing
    def to_json(self, path: str | os.PathLike[str]) -> Path:
        p = Path(path)
        p.write_text(json.dumps(self.data, indent=1, ensure_ascii=False, default=str) + "\n")
        return p

    def csv_text(self) -> str:
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(CSV_FIELDS)
        for r in self.summary:
            st, ra = r.get("stats") or {}, r.get("ratio") or {}
            w.writerow([r["workload"], r["config"], r.get("n", 0), st.get("median"), st.get("q1"), st.get("q3"),
                        st.get("spread"), st.get("noisy"), r.get("ratio_to"), ra.get("median"), ra.get("q1"),
                        ra.get("q3"), r.get("available"), r.get("reason", "")])
        return out.getvalue()

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        p = Path(path)
        p.write_text(self.csv_text())
        return p

    def table(self, *, times: bool = True) -> str:
        """A Spanish text table: median [Q1–Q3] per config and the paired ratio to native.
        ``times=False`` leaves measured numbers out (a stable layout, e.g. for nbval)."""
        names = [c["name"] for c in self.configs]
        labels = {w["name"]: w["label"] for w in self.data.get("workloads", [])}
        lines = [f"{'carga':<38}" + "".join(f"{n:>26}" for n in names)]
        for w in dict.fromkeys(r["workload"] for r in self.summary):
            cells = []
            for n in names:
                r = self.row(w, n)
                if r is None or not r.get("available"):
                    cells.append("no disponible aquí")
                elif not r.get("stats"):
                    cells.append("no aplica" if w.startswith("boot_") else "—")
                elif not times:
                    cells.append("medido")
                else:
                    st, ra = r["stats"], r.get("ratio")
                    text = f"{st['median']:.3f} s ±{st['spread'] * 100:.0f}%"
                    if ra:
                        text += f" ({ra['median']:.1f}×)"
                    cells.append(text)
            lines.append(f"{labels.get(w, w):<38}" + "".join(f"{c:>26}" for c in cells))
        return "\n".join(lines)

    def unavailable(self) -> list[tuple[str, str]]:
        return [(c["name"], c["reason"]) for c in self.configs if not c["available"]]


def _check(data: Any, source: str) -> dict[str, Any]:
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise InputError(f"«{source}» no es un fichero de resultados de labkit bench ({SCHEMA}).",
                         "Genera uno con «labkit bench --json resultados.json».")
    for key in ("metadata", "configs", "workloads", "samples", "summary"):
        if key not in data:
            raise InputError(f"Al fichero «{source}» le falta «{key}».", "Vuelve a generarlo con labkit bench.")
    for r in data["summary"]:
        ra = r.get("ratio")
        if ra and not (isinstance(ra.get("median"), (int, float)) and math.isfinite(ra["median"])):
            raise InputError(f"«{source}»: cociente no válido en {r['workload']}/{r['config']}.",
                             "Vuelve a generarlo con labkit bench.")
    return data


def load(path: str | os.PathLike[str], *, label: str | None = None) -> BenchResults:
    """Read a results file (this machine's or another's); ``label`` names it in plots."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as err:
        raise InputError(f"No se puede leer «{p}»: {os_reason(err)}.", "Comprueba la ruta.") from err
    except json.JSONDecodeError as err:
        raise InputError(f"«{p}» no es JSON válido ({err.msg}, línea {err.lineno}).",
                         "¿Es el fichero que escribió labkit bench --json?") from err
    res = BenchResults(_check(data, str(p)))
    if label:
        res.data["label"] = label
    return res

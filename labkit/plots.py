"""Plots for the notebooks (matplotlib). Each function returns a Figure and does no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from .bench.results import BenchResults
    from .devices.disks import GrowthPoint

__all__ = ["LiveBenchPlot", "bench_bars", "thin_provisioning"]

_MIB = 1 << 20


def thin_provisioning(points: Sequence[GrowthPoint], *, title: str = "Aprovisionamiento fino") -> Figure:
    """Space an image takes on the host (solid) vs the disk size the guest sees (dashed), as the
    guest writes data, one colour per image (from :func:`labkit.devices.disks.measure_growth`)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    labels = list(dict.fromkeys(p.label for p in points))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for i, label in enumerate(labels):
        mine = [p for p in points if p.label == label]
        x = [p.written / _MIB for p in mine]
        color = colors[i % len(colors)]
        ax.plot(x, [p.actual_size / _MIB for p in mine], marker="o", color=color,
                label=f"{label}: ocupa en el anfitrión")
        ax.plot(x, [p.virtual_size / _MIB for p in mine], linestyle="--", color=color, alpha=0.6,
                label=f"{label}: tamaño virtual")
    ax.set_xlabel("MiB escritos por el invitado")
    ax.set_ylabel("MiB")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center right")
    return fig


_CONFIG_COLORS = {"native": "tab:gray", "kvm": "tab:green", "tcg-1": "tab:blue", "tcg-2": "tab:purple"}


def bench_bars(results: BenchResults, *, others: Sequence[BenchResults] = (), log: bool = False,
               workloads: Sequence[str] | None = None, title: str = "Tiempo por carga y configuración",
               fig: Figure | None = None) -> Figure:
    """Bars of the median time per workload (groups) and configuration (colours), with IQR error bars
    and the paired ratio to native written over each guest bar; unavailable configurations get a
    hatched stub labelled «no disponible aquí». ``others`` (results loaded from other machines) are
    drawn in their own panel beside, on the same scale. ``log=True``: logarithmic time axis."""
    from matplotlib.figure import Figure

    panels = [results, *others]
    if fig is None:
        fig = Figure(figsize=(max(7.5, 5.0 * len(panels)), 4.6), layout="constrained")
    else:
        fig.clear()
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, res in zip(axes, panels):
        names = list(workloads or dict.fromkeys(r["workload"] for r in res.summary))
        labels = {w["name"]: w["label"] for w in res.data.get("workloads", [])}
        configs = res.configs
        width = 0.8 / max(1, len(configs))
        top = max((r["stats"]["q3"] for r in res.summary if r.get("stats")), default=1.0)
        for j, c in enumerate(configs):
            xs, ys, lo, hi, notes = [], [], [], [], []
            for i, w in enumerate(names):
                r = res.row(w, c["name"])
                x = i + (j - (len(configs) - 1) / 2) * width
                if not c["available"]:
                    ax.bar(x, top * 0.05 if not log else top * 0.01, width, color="none", edgecolor="0.6",
                           hatch="//", linewidth=0.5)
                    ax.text(x, (top * 0.06) if not log else top * 0.012, "no disponible aquí", rotation=90,
                            ha="center", va="bottom", fontsize=6, color="0.4")
                    continue
                if not r or not r.get("stats"):
                    continue
                st = r["stats"]
                xs.append(x)
                ys.append(st["median"])
                lo.append(st["median"] - st["q1"])
                hi.append(st["q3"] - st["median"])
                notes.append(r.get("ratio"))
            if not c["available"]:
                ax.bar([0], [0], 0, color="none", edgecolor="0.6", hatch="//",
                       label=f"{c['label']} (no disponible aquí)")
                continue
            if not xs:
                continue
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=c["label"],
                   color=_CONFIG_COLORS.get(c["name"], None), alpha=0.85)
            for x, y, h, ra in zip(xs, ys, hi, notes):
                if ra:
                    ax.annotate(f"{ra['median']:.1f}×", (x, y + h), ha="center", va="bottom", fontsize=7,
                                xytext=(0, 1), textcoords="offset points")
        ax.set_xticks(range(len(names)), [labels.get(w, w) for w in names], rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{res.label} · {res.metadata.get('host_cpu', '?')[:40]}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if log:
            ax.set_yscale("log")
    axes[0].set_ylabel("segundos (mediana, barra = Q1–Q3)" + (" · escala log" if log else ""))
    axes[0].legend(fontsize="small", loc="upper left")
    fig.suptitle(title + " · sobre cada barra: veces más lento que nativo (o que vmlinux)", fontsize=10)
    return fig


class LiveBenchPlot:
    """A plot that grows as measurements arrive: pass ``update`` as ``on_sample`` to
    :func:`labkit.bench.run`. In a notebook it redraws inside an ``ipywidgets.Output``
    (``.widget``); elsewhere it just keeps the latest Figure in ``.figure``."""

    def __init__(self, *, log: bool = False) -> None:
        self.log = log
        self.figure: Figure | None = None
        self.updates = 0
        try:
            import ipywidgets as widgets

            self.widget: Any = widgets.Output()
        except ImportError:  # pragma: no cover
            self.widget = None

    def update(self, results: BenchResults) -> None:
        self.updates += 1
        self.figure = bench_bars(results, log=self.log, title="Medidas hasta ahora")
        if self.widget is not None:
            from IPython.display import display

            self.widget.clear_output(wait=True)
            with self.widget:
                display(self.figure)

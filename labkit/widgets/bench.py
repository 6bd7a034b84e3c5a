"""Progress for ``labkit.bench.run`` in a notebook: a progress bar, the current step and
(optionally) a live plot that grows as measurements arrive.

    vista = BenchProgress(live=True)
    display(vista)
    res = bench.run(progress=vista.progress, on_sample=vista.on_sample)

Its text/plain repr is short and stable (for nbval): it never contains a measured time.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from ..plots import LiveBenchPlot

__all__ = ["BenchProgress"]


class BenchProgress(widgets.VBox):
    """``bar`` (IntProgress), ``step`` (the last thing done), ``plot`` (a LiveBenchPlot or None)."""

    def __init__(self, *, live: bool = False, log: bool = False) -> None:
        self.bar = widgets.IntProgress(value=0, min=0, max=1, description="Midiendo:",
                                       layout=widgets.Layout(width="60%"))
        self.step = widgets.Label(value="")
        self.plot = LiveBenchPlot(log=log) if live else None
        self.done = 0
        self.total = 0
        children: list[Any] = [widgets.HBox([self.bar, self.step])]
        if self.plot is not None and self.plot.widget is not None:
            children.append(self.plot.widget)
        super().__init__(children)

    def progress(self, done: int, total: int, text: str) -> None:
        self.done, self.total = done, total
        self.bar.max = max(1, total)
        self.bar.value = min(done, self.bar.max)
        self.step.value = text
        if done >= total:
            self.bar.bar_style = "success" if text != "cancelado" else "warning"

    def on_sample(self, results: Any) -> None:
        if self.plot is not None:
            self.plot.update(results)

    def __repr__(self) -> str:
        return "<BenchProgress: barra de progreso de labkit bench>"

"""The host panel: every check as a traffic light, the verdict and what to do."""

from __future__ import annotations

import html
from typing import Callable

import ipywidgets as W

from ..host import FAIL, IMPORTANCE_ES, NOTE, PASS, WARN, Check, HostReport, probe

__all__ = ["HostPanel", "host_panel", "checks_html"]

_LIGHT = {PASS: ("#2e7d32", "correcto"), WARN: ("#f9a825", "aviso"), FAIL: ("#c62828", "fallo"),
          NOTE: ("#1565c0", "nota")}
FILTERS = {
    "todas": lambda c: True,
    "solo problemas": lambda c: c.status in (WARN, FAIL),
    "importantes para el curso": lambda c: c.importance != "not-needed",
}


def checks_html(checks: list[Check] | tuple[Check, ...]) -> str:
    """An HTML table, one row a check, with a coloured light; every value escaped."""
    rows = []
    for c in checks:
        colour, word = _LIGHT[c.status]
        hint = f"<br><small>→ {html.escape(c.hint)}</small>" if c.hint else ""
        rows.append(
            f"<tr><td title='{word}' style='color:{colour};font-size:1.3em'>●</td>"
            f"<td><b>{html.escape(c.title)}</b><br><small>{IMPORTANCE_ES[c.importance]}</small></td>"
            f"<td style='color:{colour}'><b>{c.status}</b></td>"
            f"<td>{html.escape(c.message)}{hint}</td></tr>"
        )
    return "<table style='border-collapse:collapse'>" + "".join(rows) + "</table>"


def _verdict_html(report: HostReport) -> str:
    colour = "#2e7d32" if report.accelerator == "kvm" else "#f9a825"
    return (
        f"<div style='border-left:6px solid {colour};padding:4px 10px;margin:4px 0'>"
        f"<b>Veredicto: {html.escape(report.verdict)}</b> · acelerador: <b>{report.accelerator}</b><br>"
        f"{html.escape(report.reason)}<br><i>Qué puedes hacer:</i> {html.escape(report.advice)}</div>"
    )


class HostPanel(W.VBox):
    """Verdict on top, a filter, the checks below and a button to probe again."""

    def __init__(self, report: HostReport | None = None,
                 prober: Callable[[], HostReport] = probe) -> None:
        self._prober = prober
        self.report = report if report is not None else prober()
        self.verdict = W.HTML()
        self.filter = W.ToggleButtons(options=list(FILTERS), value="todas", description="Mostrar:",
                                      style={"button_width": "auto"})
        self.table = W.HTML()
        self.refresh = W.Button(description="Volver a comprobar", icon="refresh", layout=W.Layout(width="auto"))
        self.summary = W.Label()
        self.filter.observe(lambda _change: self._render(), names="value")
        self.refresh.on_click(lambda _b: self.update(self._prober()))
        super().__init__([self.verdict, W.HBox([self.filter, self.refresh]), self.summary, self.table])
        self._render()

    def update(self, report: HostReport) -> None:
        self.report = report
        self._render()

    def visible_checks(self) -> list[Check]:
        keep = FILTERS[self.filter.value]
        return [c for c in self.report.checks if keep(c)]

    def _render(self) -> None:
        shown = self.visible_checks()
        counts = {s: sum(c.status == s for c in self.report.checks) for s in (PASS, WARN, FAIL, NOTE)}
        self.verdict.value = _verdict_html(self.report)
        self.table.value = checks_html(shown)
        self.summary.value = (f"{len(shown)} de {len(self.report.checks)} comprobaciones · "
                              + " · ".join(f"{n} {s}" for s, n in counts.items()))

    def __repr__(self) -> str:  # what nbval and a plain console see
        return f"<Panel del anfitrión: veredicto {self.report.verdict}, acelerador {self.report.accelerator}>"


def host_panel(report: HostReport | None = None) -> HostPanel:
    """The host panel for ``report`` (probes this machine when not given)."""
    return HostPanel(report)

"""Interactive CPU flag explorer (notebook 04, «¿Qué es Intel VT-x y AMD-V?»).

``flag_explorer(cpu.flags, cpu.vmx_flags or ())`` returns a widget with a search
box, a category dropdown, a «solo virtualización» checkbox, a count and an HTML
table that follows the controls live. Its controls are public attributes so
tests (and curious students) can drive it without a browser. Its text/plain
repr is short and deterministic, for nbval.
"""

from __future__ import annotations

import html
from typing import Iterable, Optional, Sequence

import ipywidgets as widgets

from ..cpuflags import ALL, CATEGORIES, FlagRow, classify, flags_table, search

__all__ = ["FlagExplorer", "flag_explorer", "flags_table", "rows_html"]

_VIRT_BG = "#fff4cc"
_TABLE_STYLE = "border-collapse:collapse;width:100%;font-size:0.9em;"
_CELL = "padding:3px 8px;border-bottom:1px solid #ddd;vertical-align:top;text-align:left;"


def rows_html(rows: Sequence[FlagRow]) -> str:
    """An HTML table of rows; every value is escaped, virtualization rows highlighted."""
    if not rows:
        return "<p><i>Ningún flag coincide con el filtro.</i></p>"
    head = "".join(f'<th style="{_CELL}">{h}</th>' for h in ("flag", "línea", "categoría", "explicación"))
    esc = html.escape
    body = []
    for r in rows:
        style = f' style="background:{_VIRT_BG}"' if r.virt else ""
        name = f"<b>{esc(r.name)}</b>" if r.virt else esc(r.name)
        title = f"<br><small>{esc(r.title)}</small>" if r.title else ""
        text = esc(r.explanation) if r.known else f"<i>{esc(r.explanation)}</i>"
        ref = f'<br><small style="color:#666">{esc(r.ref)}</small>' if r.ref else ""
        body.append(
            f'<tr class="{"virt" if r.virt else "other"}"{style}>'
            f'<td style="{_CELL}"><code>{name}</code>{title}</td>'
            f'<td style="{_CELL}">{esc(r.source)}</td>'
            f'<td style="{_CELL}">{esc(r.category)}</td>'
            f'<td style="{_CELL}">{text}{ref}</td></tr>'
        )
    return (f'<table style="{_TABLE_STYLE}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


class FlagExplorer(widgets.VBox):
    """The explorer widget. Controls: ``search_box``, ``category``, ``only_virt``;
    outputs: ``count`` (label), ``table`` (HTML); ``visible`` holds the shown rows."""

    def __init__(self, rows: Sequence[FlagRow], *, title: str = "Flags de la CPU") -> None:
        self.rows: list[FlagRow] = list(rows)
        self.visible: list[FlagRow] = list(self.rows)
        present = {r.category for r in self.rows}
        options = [ALL, *(c for c in CATEGORIES if c in present)]
        self.search_box = widgets.Text(
            value="", placeholder="p. ej. ept, páginas, cifrado", description="Buscar:",
            continuous_update=True,
        )
        self.category = widgets.Dropdown(options=options, value=ALL, description="Categoría:")
        self.only_virt = widgets.Checkbox(value=False, description="solo virtualización", indent=False)
        self.count = widgets.Label()
        self.table = widgets.HTML(
            layout=widgets.Layout(max_height="480px", overflow="auto", width="100%")
        )
        self.heading = title
        header = widgets.HTML(f"<h4>{html.escape(title)}</h4>")
        controls = widgets.HBox([self.search_box, self.category, self.only_virt])
        super().__init__([header, controls, self.count, self.table])
        for control in (self.search_box, self.category, self.only_virt):
            control.observe(self._refresh, names="value")
        self._refresh()

    def _refresh(self, _change: Optional[dict] = None) -> None:
        self.visible = search(self.rows, self.search_box.value, self.category.value,
                              self.only_virt.value)
        self.count.value = f"{len(self.visible)} de {len(self.rows)} flags"
        self.table.value = rows_html(self.visible)

    def as_text(self, *, max_text: Optional[int] = 70) -> str:
        """The rows currently shown, as a plain-text table."""
        return flags_table(self.visible, max_text=max_text)

    def __repr__(self) -> str:
        n_virt = sum(r.virt for r in self.rows)
        return (f"<Explorador de flags «{self.heading}»: {len(self.visible)} de {len(self.rows)} "
                f"flags ({n_virt} de virtualización)>")


def flag_explorer(
    flags: Iterable[str],
    vmx_flags: Optional[Iterable[str]] = (),
    *,
    arch: Optional[str] = None,
    title: str = "Flags de la CPU",
) -> FlagExplorer:
    """Build the explorer over a cpuinfo's ``flags``/``Features`` and ``vmx flags`` lines."""
    return FlagExplorer(classify(flags, vmx_flags, arch=arch), title=title)

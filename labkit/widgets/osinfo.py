"""A search box over the libosinfo catalogue (notebook 08, «sistemas invitados»).

``os_browser(entries)`` returns a widget with a text search, a family dropdown, a
vendor dropdown, a «solo con soporte» checkbox, a count and an HTML table with the
release and end-of-life dates. Its controls are public attributes so tests (and
students) can drive it without a browser; its text/plain repr is short and
deterministic, for nbval.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from datetime import date

import ipywidgets as widgets

from ..osinfo import FAMILY_LABELS, OsEntry, family_counts, search, support_status, vendors

__all__ = ["OsinfoBrowser", "os_browser", "entries_html", "ALL"]

ALL = "(todas)"
ALL_VENDORS = "(todos)"
MAX_ROWS = 200
_TABLE_STYLE = "border-collapse:collapse;width:100%;font-size:0.9em;"
_CELL = "padding:3px 8px;border-bottom:1px solid #ddd;vertical-align:top;text-align:left;"
_EOL_BG = "#f3f3f3"


def entries_html(entries: Sequence[OsEntry], today: date, *, limit: int = MAX_ROWS) -> str:
    """An HTML table of entries (every value escaped); rows past their end of life are greyed."""
    if not entries:
        return "<p><i>Ningún sistema coincide con el filtro.</i></p>"
    esc = html.escape
    heads = ("short-id", "nombre", "familia", "fabricante", "publicado", "fin de soporte (EOL)")
    head = "".join(f'<th style="{_CELL}">{h}</th>' for h in heads)
    body = []
    for e in entries[:limit]:
        past = e.eol is not None and e.eol < today
        style = f' style="background:{_EOL_BG};color:#666"' if past else ""
        body.append(
            f"<tr{style}><td style=\"{_CELL}\"><code>{esc(e.short_id)}</code></td>"
            f'<td style="{_CELL}">{esc(e.name)}</td>'
            f'<td style="{_CELL}">{esc(e.family_label)}</td>'
            f'<td style="{_CELL}">{esc(e.vendor)}</td>'
            f'<td style="{_CELL}">{e.release.isoformat() if e.release else "—"}</td>'
            f'<td style="{_CELL}">{esc(support_status(e, today))}</td></tr>'
        )
    more = ""
    if len(entries) > limit:
        more = f"<p><i>Se muestran {limit} de {len(entries)}: afina la búsqueda para ver el resto.</i></p>"
    return (f'<table style="{_TABLE_STYLE}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>{more}')


class OsinfoBrowser(widgets.VBox):
    """The browser widget. Controls: ``search_box``, ``family``, ``vendor``, ``only_supported``;
    outputs: ``count`` (label) and ``table`` (HTML); ``visible`` holds the entries shown."""

    def __init__(self, entries: Sequence[OsEntry], *, today: date | None = None,
                 title: str = "Sistemas operativos en libosinfo") -> None:
        self.entries = list(entries)
        self.today = today or date.today()
        self.visible: list[OsEntry] = list(self.entries)
        families = [(f"{FAMILY_LABELS.get(f, f)} ({n})", f) for f, n in family_counts(self.entries)]
        self.search_box = widgets.Text(value="", placeholder="p. ej. centos 6, windows, bsd",
                                       description="Buscar:", continuous_update=True)
        self.family = widgets.Dropdown(options=[(ALL, None), *families], value=None, description="Familia:")
        self.vendor = widgets.Dropdown(options=[(ALL_VENDORS, None), *((v, v) for v in vendors(self.entries))],
                                       value=None, description="Fabricante:")
        self.only_supported = widgets.Checkbox(value=False, description="solo con soporte hoy", indent=False)
        self.count = widgets.Label()
        self.table = widgets.HTML(layout=widgets.Layout(max_height="420px", overflow="auto", width="100%"))
        self.heading = title
        header = widgets.HTML(f"<h4>{html.escape(title)}</h4>")
        controls = widgets.HBox([self.search_box, self.family, self.vendor, self.only_supported],
                                layout=widgets.Layout(flex_flow="row wrap"))
        super().__init__([header, controls, self.count, self.table])
        for control in (self.search_box, self.family, self.vendor, self.only_supported):
            control.observe(self._refresh, names="value")
        self._refresh()

    def _refresh(self, _change: dict | None = None) -> None:
        shown = search(self.entries, self.search_box.value, family=self.family.value, vendor=self.vendor.value)
        if self.only_supported.value:
            shown = [e for e in shown if e.eol is not None and e.eol >= self.today]
        self.visible = shown
        self.count.value = f"{len(shown)} de {len(self.entries)} sistemas"
        self.table.value = entries_html(shown, self.today)

    def __repr__(self) -> str:
        return f"<Buscador de osinfo: {len(self.entries)} sistemas>"


def os_browser(entries: Sequence[OsEntry], *, today: date | None = None) -> OsinfoBrowser:
    """Build the browser over ``entries`` (from :func:`labkit.osinfo.load_os_list`)."""
    return OsinfoBrowser(entries, today=today)

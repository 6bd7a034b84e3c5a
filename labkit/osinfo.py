"""The libosinfo database: which guest operating systems it knows, and their dates.

libosinfo is the catalogue virt-install, virt-manager and GNOME Boxes consult to
set up a guest (``virt-install --osinfo debian11`` picks the devices and the
minimum resources from it). Its command-line face is ``osinfo-query`` (Debian
``libosinfo-bin``; the data is ``osinfo-db``)::

    entries = load_os_list()                 # runs osinfo-query os --fields=...
    family_counts(entries)                   # [("linux", 556), ("dragonflybsd", 66), ...]
    search(entries, "centos 6", family="linux")

:func:`parse_os_table` is pure (tested on a captured sample); :func:`load_os_list`
runs the tool and says in Spanish what to install when the tool or the database
is missing.
"""

from __future__ import annotations

import os
import subprocess
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from .errors import ProbeError, SetupError, ToolMissingError
from .tools import find_program

__all__ = [
    "FIELDS",
    "FAMILY_LABELS",
    "OsEntry",
    "parse_os_table",
    "query_argv",
    "load_os_list",
    "db_version",
    "family_counts",
    "vendors",
    "search",
    "find",
    "support_status",
    "format_entries",
]

# The columns asked of osinfo-query, in this order (the header it prints is translated, so
# the parser trusts this order, not the header's words).
FIELDS = ("short-id", "name", "version", "family", "distro", "vendor", "release-date", "eol-date",
          "codename", "id")

FAMILY_LABELS = {
    "linux": "Linux",
    "winnt": "Windows (familia NT)",
    "win9x": "Windows 95/98/Me",
    "win16": "Windows 1.0-3.1",
    "msdos": "MS-DOS",
    "freebsd": "FreeBSD",
    "netbsd": "NetBSD",
    "openbsd": "OpenBSD",
    "dragonflybsd": "DragonFly BSD",
    "darwin": "macOS / Mac OS X (Darwin)",
    "solaris": "Solaris / OpenIndiana",
    "haiku": "Haiku",
    "hurd": "GNU Hurd",
    "netware": "NetWare",
    "": "(sin familia)",
}

_DB_DIRS = ("/usr/share/osinfo", "/usr/share/libosinfo/db", "/etc/osinfo")


@dataclass(frozen=True)
class OsEntry:
    """One operating system as libosinfo describes it."""

    short_id: str
    name: str
    version: str = ""
    family: str = ""
    distro: str = ""
    vendor: str = ""
    release: date | None = None
    eol: date | None = None
    codename: str = ""
    id: str = ""

    @property
    def family_label(self) -> str:
        return FAMILY_LABELS.get(self.family, self.family)


def _date(text: str, line: int) -> date | None:
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ProbeError(f"Fecha no válida en la línea {line} de osinfo-query: «{text}».",
                         "Comprueba la salida de osinfo-query os; quizá es de otra versión.") from None


def parse_os_table(text: str, fields: Sequence[str] = FIELDS) -> list[OsEntry]:
    """Parse ``osinfo-query os --fields=<fields>`` output (a ``|``-separated table with a
    header and a dashed rule) into entries. Pure; raises ProbeError on a malformed table."""
    unknown = set(fields) - set(FIELDS)
    if unknown or "short-id" not in fields or "name" not in fields:
        raise ProbeError(f"Campos no admitidos: {sorted(unknown) or fields}.",
                         "Pide al menos short-id y name, de entre " + ", ".join(FIELDS) + ".")
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2 or set(lines[1].strip()) - {"-", "+"}:
        raise ProbeError("La salida de osinfo-query no parece una tabla (falta la cabecera).",
                         "Ejecuta osinfo-query os a mano y mira qué imprime.")
    if lines[0].count("|") != len(fields) - 1:
        raise ProbeError(f"La cabecera de osinfo-query tiene {lines[0].count('|') + 1} columnas y se "
                         f"esperaban {len(fields)}.", "Comprueba los campos pedidos con --fields.")
    keys = {"short-id": "short_id", "release-date": "release", "eol-date": "eol"}
    entries = []
    for number, line in enumerate(lines[2:], start=3):
        cells = [c.strip() for c in line.split("|")]
        if len(cells) != len(fields):
            raise ProbeError(f"La línea {number} de osinfo-query tiene {len(cells)} columnas, no {len(fields)}: "
                             f"{line.strip()[:80]}", "Comprueba la versión de osinfo-query.")
        values: dict[str, object] = {}
        for field, cell in zip(fields, cells):
            key = keys.get(field, field)
            values[key] = _date(cell, number) if key in ("release", "eol") else cell
        entries.append(OsEntry(**values))  # type: ignore[arg-type]
    return entries


def query_argv(fields: Sequence[str] = FIELDS, tool: str = "osinfo-query") -> list[str]:
    """The command that lists every OS with the given columns."""
    return [tool, "os", "--fields=" + ",".join(fields)]


def db_version(dirs: Iterable[str] = _DB_DIRS) -> str | None:
    """The osinfo-db release (its VERSION file, a date like 20221203), or None."""
    env = os.environ.get("OSINFO_SYSTEM_DIR")
    for directory in ([env] if env else []) + list(dirs):
        try:
            return (Path(directory) / "VERSION").read_text().strip()
        except OSError:
            continue
    return None


def load_os_list(*, tool: str = "osinfo-query", timeout: float = 60.0) -> list[OsEntry]:
    """Every OS in the local libosinfo database (runs osinfo-query; about half a second)."""
    path = find_program(tool)
    if path is None:
        raise ToolMissingError(tool, "libosinfo-bin osinfo-db",
                               "No se encuentra osinfo-query, la consulta del catálogo libosinfo.")
    argv = query_argv(tool=path)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                              env={**os.environ, "LC_ALL": "C.UTF-8"})
    except subprocess.TimeoutExpired as err:
        raise ProbeError(f"osinfo-query no respondió en {timeout:g} s.", "Vuelve a intentarlo.") from err
    if done.returncode != 0:
        raise ProbeError(f"osinfo-query terminó con error {done.returncode}: {done.stderr.strip()[:300]}",
                         "Ejecuta la orden a mano: " + " ".join(argv))
    entries = parse_os_table(done.stdout)
    if not entries:
        raise SetupError("osinfo-query funciona, pero la base de datos de sistemas está vacía.",
                         "Instala los datos: sudo apt-get install osinfo-db (o ejecuta ./lab setup).")
    return entries


def family_counts(entries: Iterable[OsEntry]) -> list[tuple[str, int]]:
    """(family, how many) from the largest family down; ties by name."""
    counts = Counter(e.family for e in entries)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def vendors(entries: Iterable[OsEntry]) -> list[str]:
    """The vendors, in alphabetical order (case- and accent-insensitive)."""
    return sorted({e.vendor for e in entries if e.vendor}, key=_fold)


def _fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def search(entries: Iterable[OsEntry], text: str = "", *, family: str | None = None,
           vendor: str | None = None) -> list[OsEntry]:
    """The entries whose short id, name, codename or vendor contain every word of ``text``
    (case- and accent-insensitive), optionally of one family and one vendor."""
    words = _fold(text).split()
    found = []
    for e in entries:
        if family is not None and e.family != family:
            continue
        if vendor is not None and e.vendor != vendor:
            continue
        haystack = _fold(" ".join((e.short_id, e.name, e.codename, e.vendor, e.distro)))
        if all(w in haystack for w in words):
            found.append(e)
    return found


def find(entries: Iterable[OsEntry], short_id: str) -> OsEntry | None:
    """The entry with this short id (as osinfo-query shows it), or None."""
    return next((e for e in entries if e.short_id == short_id), None)


def support_status(entry: OsEntry, today: date | None = None) -> str:
    """In Spanish: out of support since its EOL date, supported until it, or no date known."""
    today = today or date.today()
    if entry.eol is None:
        return "sin fecha de fin en la base de datos"
    if entry.eol < today:
        return f"sin soporte desde {entry.eol.isoformat()}"
    return f"con soporte hasta {entry.eol.isoformat()}"


def format_entries(entries: Sequence[OsEntry], *, today: date | None = None, limit: int | None = None) -> str:
    """A plain-text table: short id, name, family, release date, end of life, status."""
    shown = list(entries)[:limit] if limit else list(entries)
    rows = [("short-id", "nombre", "familia", "publicado", "fin de soporte (EOL)")]
    for e in shown:
        rows.append((e.short_id, e.name, e.family or "—", e.release.isoformat() if e.release else "—",
                     support_status(e, today)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    lines.insert(1, "-" * max(len(line.rstrip()) for line in lines))
    if limit and len(entries) > limit:
        lines.append(f"... y {len(entries) - limit} más")
    return "\n".join(line.rstrip() for line in lines)

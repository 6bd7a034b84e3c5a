"""``labkit doctor``: the host report as text, in the style of virt-host-validate."""

from __future__ import annotations

import json
import os
import sys
from typing import TextIO

from .host import FAIL, IMPORTANCE_ES, NOTE, PASS, WARN, HostReport

__all__ = ["format_report", "format_json", "use_color"]

_COLORS = {PASS: "\033[32m", WARN: "\033[33m", FAIL: "\033[31m", NOTE: "\033[36m"}
_RESET, _BOLD = "\033[0m", "\033[1m"
_WIDTH = 58


def use_color(stream: TextIO) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set."""
    return hasattr(stream, "isatty") and stream.isatty() and "NO_COLOR" not in os.environ


def format_report(report: HostReport, color: bool = False) -> str:
    """One line a check (``título : ESTADO (mensaje)``), the hint below, then the verdict."""

    def paint(text: str, code: str) -> str:
        return f"{code}{text}{_RESET}" if color else text

    lines = []
    for c in report.checks:
        title = f"  {c.title} ".ljust(_WIDTH, ".")
        lines.append(f"{title}: {paint(c.status, _COLORS[c.status])} ({c.message})")
        if c.hint:
            lines.append(f"      → {c.hint} [{IMPORTANCE_ES[c.importance]}]")
    lines.append("")
    lines.append(paint(f"Veredicto: {report.verdict}", _BOLD) + f"   Acelerador: {report.accelerator}")
    lines.append(f"  {report.reason}")
    lines.append(f"  Qué puedes hacer: {report.advice}")
    for problem in report.problems:
        lines.append(f"  Aviso: {problem}")
    return "\n".join(lines)


def format_json(report: HostReport) -> str:
    return json.dumps(report.to_dict(), indent=2, ensure_ascii=False)


def print_report(report: HostReport, as_json: bool = False, stream: TextIO = sys.stdout) -> None:
    text = format_json(report) if as_json else format_report(report, color=use_color(stream))
    print(text, file=stream)

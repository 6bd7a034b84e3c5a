"""``labkit doctor``: the host report as text, in the style of virt-host-validate."""

from __future__ import annotations

import json
import os
import sys
from typing import Iterable, TextIO

from .host import FAIL, IMPORTANCE_ES, NOTE, PASS, WARN, Check, HostReport

__all__ = ["format_checks", "format_report", "format_json", "print_report", "use_color"]

_COLORS = {PASS: "\033[32m", WARN: "\033[33m", FAIL: "\033[31m", NOTE: "\033[36m"}
_RESET, _BOLD = "\033[0m", "\033[1m"
_WIDTH = 58


def use_color(stream: TextIO) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set."""
    return hasattr(stream, "isatty") and stream.isatty() and "NO_COLOR" not in os.environ


def _paint(text: str, code: str, color: bool) -> str:
    return f"{code}{text}{_RESET}" if color else text


def format_checks(checks: Iterable[Check], color: bool = False) -> str:
    """One line a check (``título ...: ESTADO (mensaje)``) and its hint below."""
    lines = []
    for c in checks:
        title = f"  {c.title} ".ljust(_WIDTH, ".")
        lines.append(f"{title}: {_paint(c.status, _COLORS[c.status], color)} ({c.message})")
        if c.hint:
            lines.append(f"      → {c.hint} [{IMPORTANCE_ES[c.importance]}]")
    return "\n".join(lines)


def format_report(report: HostReport, color: bool = False) -> str:
    """Every check, then the verdict, the accelerator and what to do."""

    def paint(text: str, code: str) -> str:
        return _paint(text, code, color)

    lines = [format_checks(report.checks, color), ""]
    lines.append(paint(f"Veredicto: {report.verdict}", _BOLD) + f"   Acelerador: {report.accelerator}")
    lines.append(f"  {report.reason}")
    lines.append(f"  Qué puedes hacer: {report.advice}")
    for problem in report.problems:
        lines.append(f"  Aviso: {problem}")
    return "\n".join(lines)


def format_json(report: HostReport) -> str:
    return json.dumps(report.to_dict(), indent=2, ensure_ascii=False)


def print_report(report: HostReport, as_json: bool = False, stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    text = format_json(report) if as_json else format_report(report, color=use_color(stream))
    print(text, file=stream)

"""The bad-input matrix (labkit/_badinput.py): every case ends as expected, in Spanish, and leaves
nothing changed or behind. Cases that need a running guest share one TCG guest (module scope);
docs/bad_input.md must list the same cases (regenerate it with ``python -m labkit._badinput``)."""

from __future__ import annotations

import os
import re

import pytest

from labkit import _badinput as bi


@pytest.fixture(scope="module")
def ws():
    with bi.Workspace() as w:
        yield w
        guest = w._guest
    assert guest is None or not guest.running


def _param(case: bi.Case):
    marks = [pytest.mark.integration] if case.needs in ("guest", "libvirt") else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in bi.CASES])
def test_case(case, ws):
    if case.needs == "root" and os.geteuid() != 0:
        pytest.skip("hace falta ser root para ejecutar la orden como otro usuario")
    outcome = bi.run_case(case, ws)
    assert outcome.passed, outcome.report()


def test_cases_are_unique_and_complete():
    ids = [c.id for c in bi.CASES]
    assert len(ids) == len(set(ids))
    for case in bi.CASES:
        assert re.fullmatch(r"[a-z0-9-]+[A-Za-z0-9-]*", case.id), case.id
        assert case.expect == "ok" or case.expect.startswith("exit ") or case.expect[0].isupper(), case.id
        assert case.area and case.entry and case.given
    areas = {c.area for c in bi.CASES}
    assert {"memoria y vCPU", "rutas de imágenes", "carpetas compartidas", "USB", "órdenes en el invitado",
            "línea de órdenes"} <= areas


def test_the_doc_lists_every_case_as_it_is_now():
    doc = bi.DOC.read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([^`]+)` \|(?:[^|]|\\\|)*\|(?:[^|]|\\\|)*\| ([^|]+) \|",
                                                         doc, re.M)}
    assert set(rows) == {c.id for c in bi.CASES}, "docs/bad_input.md no está al día: python -m labkit._badinput"
    for case in bi.CASES:
        assert rows[case.id].strip() == case.expect, case.id
    assert "FALLA" not in doc
    assert f"**{len(bi.CASES)} casos, {len(bi.CASES)} como se espera.**" in doc


def test_the_judge_catches_english_and_tracebacks():
    case = bi.CASES[0]
    english = bi._judge_error(case, bi.LabkitError("Invalid value: no such file", "try again"))
    assert any("inglés" in p for p in english.problems)
    plain = bi._judge_error(case, ValueError("boom"))
    assert plain.problems and "sin traducir" in plain.problems[0]
    cli = bi.Case("x", "a", "labkit", "x", "exit 2", lambda ws: None)
    run = bi.CliRun(("x",), 1, "", "Traceback (most recent call last):\n  ...\nValueError: boom\n")
    problems = bi._judge_cli(cli, run).problems
    assert any("traza" in p for p in problems) and any("estado de salida" in p for p in problems)

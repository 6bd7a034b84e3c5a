"""The host panel, driven without a browser."""

from pathlib import Path

from labkit import host
from labkit.widgets.host import HostPanel, checks_html

FIXTURES = Path(__file__).parent / "fixtures" / "hosts"


def test_panel_shows_verdict_and_filters():
    report = host.probe(str(FIXTURES / "pvm-sandbox"))
    panel = HostPanel(report, prober=lambda: report)
    assert "kvm-pvm" in panel.verdict.value and "tcg" in panel.verdict.value
    total = len(report.checks)
    assert panel.summary.value.startswith(f"{total} de {total}")
    panel.filter.value = "solo problemas"
    shown = panel.visible_checks()
    assert shown and all(c.status in ("WARN", "FAIL") for c in shown)
    assert "Existe /dev/net/tun" not in panel.table.value  # a PASS line is hidden
    panel.filter.value = "importantes para el curso"
    assert all(c.importance != "not-needed" for c in panel.visible_checks())
    assert repr(panel) == "<Panel del anfitrión: veredicto kvm-pvm, acelerador tcg>"


def test_refresh_button_probes_again():
    first = host.probe(str(FIXTURES / "pvm-sandbox"))
    second = host.probe(str(FIXTURES / "intel-laptop"))
    calls = []

    def prober():
        calls.append(1)
        return second

    panel = HostPanel(first, prober=prober)
    panel.refresh.click()
    assert calls == [1]
    assert panel.report.verdict == "kvm"
    assert "Veredicto: kvm<" in panel.verdict.value


def test_checks_html_escapes_values():
    bad = host.Check("x", "<script>", "FAIL", "required", "a < b & c", "usa <b>")
    out = checks_html([bad])
    assert "<script>" not in out and "&lt;script&gt;" in out
    assert "a &lt; b &amp; c" in out

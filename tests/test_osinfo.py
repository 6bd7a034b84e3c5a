"""labkit.osinfo (parser, loader, queries) and its search widget, driven without a browser."""

from __future__ import annotations

import shutil
from datetime import date

import pytest

from labkit import osinfo
from labkit.errors import ProbeError, ToolMissingError
from labkit.widgets.osinfo import OsinfoBrowser, entries_html, os_browser

# Captured from `osinfo-query os --fields=short-id,name,version,family,distro,vendor,release-date,eol-date,codename,id`
# (Debian 12, osinfo-db 20221203). Note the Fedora 18 code name wider than its column and the
# rows with an empty family: the table is split on "|", not by position.
SAMPLE = """\
 Short ID             | Name                                               | Version  | Family       | Distro       | Vendor                    | Release date | End of life  | Code name  | ID                                      
----------------------+----------------------------------------------------+----------+--------------+--------------+---------------------------+--------------+--------------+------------+-----------------------------------------
 alpinelinux3.17      | Alpine Linux 3.17                                  | 3.17     | linux        | alpinelinux  | Alpine Linux Project      | 2022-11-22   | 2024-11-22   |            | http://alpinelinux.org/alpinelinux/3.17 
 centos6.5            | CentOS 6.5                                         | 6.5      | linux        | centos       | CentOS                    | 2013-12-01   | 2014-10-28   |            | http://centos.org/centos/6.5            
 elementary5.0        | Elementary OS 5.0 Juno                             | 5.0      |              | elementaryos | Elementary, Inc.          | 2018-10-16   |              | Juno       | http://elementary.io/elementary/5.0     
 fedora18             | Fedora 18                                          | 18       | linux        | fedora       | Fedora Project            | 2013-01-15   | 2014-01-14   | The Spherical Cow | http://fedoraproject.org/fedora/18      
 freebsd13.1          | FreeBSD 13.1                                       | 13.1     | freebsd      | freebsd      | FreeBSD Project           | 2022-05-12   |              |            | http://freebsd.org/freebsd/13.1         
 manjaro              | Manjaro                                            |          | linux        | Manjaro      | Manjaro                   |              |              |            | http://manjaro.org/manjaro/rolling      
 msdos6.22            | Microsoft MS-DOS 6.22                              | 6.22     | msdos        | msdos        | Microsoft                 | 1994-06-01   | 2001-12-31   |            | http://microsoft.com/msdos/6.22         
 rocky9               | Rocky Linux 9                                      | 9        | linux        | rocky        | Rocky Enterprise Software Foundation | 2022-07-14   | 2032-05-31   | Blue Onyx  | http://rockylinux.org/rocky/9           
 ubuntu22.04          | Ubuntu 22.04 LTS                                   | 22.04    | linux        | ubuntu       | Canonical Ltd             | 2022-04-21   |              | Jammy Jellyfish | http://ubuntu.com/ubuntu/22.04          
 unknown              | Unknown                                            |          |              |              | Libosinfo                 |              |              |            | http://libosinfo.org/unknown            
 win11                | Microsoft Windows 11                               | 11.0     | winnt        | win          | Microsoft Corporation     | 2021-10-05   |              |            | http://microsoft.com/win/11             
 win95                | Microsoft Windows 95                               | 4.0      | win9x        | win          | Microsoft Corporation     | 1995-08-24   | 2001-12-13   |            | http://microsoft.com/win/95             
"""
TODAY = date(2026, 1, 1)


@pytest.fixture(scope="module")
def entries():
    return osinfo.parse_os_table(SAMPLE)


def test_parse_sample(entries):
    assert len(entries) == 12
    win95 = osinfo.find(entries, "win95")
    assert win95 == osinfo.OsEntry("win95", "Microsoft Windows 95", "4.0", "win9x", "win", "Microsoft Corporation",
                                   date(1995, 8, 24), date(2001, 12, 13), "", "http://microsoft.com/win/95")
    fedora = osinfo.find(entries, "fedora18")
    assert fedora.codename == "The Spherical Cow" and fedora.id == "http://fedoraproject.org/fedora/18"
    manjaro = osinfo.find(entries, "manjaro")
    assert manjaro.version == "" and manjaro.release is None and manjaro.eol is None
    assert osinfo.find(entries, "elementary5.0").family == ""
    assert osinfo.find(entries, "debian12") is None


def test_parse_with_fewer_fields():
    text = " Short ID | Name \n----------+------\n win95    | Microsoft Windows 95 \n"
    [e] = osinfo.parse_os_table(text, fields=("short-id", "name"))
    assert (e.short_id, e.name, e.release) == ("win95", "Microsoft Windows 95", None)


@pytest.mark.parametrize("text, words", [
    ("", "tabla"),
    ("Short ID | Name\nnot a rule\n", "tabla"),
    (" a | b \n---+---\n x | y \n", "columnas"),
    (SAMPLE + " extra | row \n", "columnas"),
    (SAMPLE.replace("1995-08-24", "1995-13-45"), "Fecha"),
])
def test_parse_rejects_malformed_tables(text, words):
    with pytest.raises(ProbeError) as err:
        osinfo.parse_os_table(text)
    assert words in err.value.message


def test_parse_rejects_unknown_fields():
    with pytest.raises(ProbeError):
        osinfo.parse_os_table(SAMPLE, fields=("short-id", "colour"))


def test_query_argv():
    assert osinfo.query_argv() == ["osinfo-query", "os", "--fields=" + ",".join(osinfo.FIELDS)]


def test_counts_vendors_search(entries):
    counts = dict(osinfo.family_counts(entries))
    assert counts["linux"] == 6 and counts["winnt"] == 1 and counts[""] == 2
    assert osinfo.family_counts(entries)[0] == ("linux", 6)
    assert osinfo.vendors(entries)[0] == "Alpine Linux Project"
    assert [e.short_id for e in osinfo.search(entries, "CENTOS 6")] == ["centos6.5"]
    assert [e.short_id for e in osinfo.search(entries, "windows", family="win9x")] == ["win95"]
    assert [e.short_id for e in osinfo.search(entries, "", vendor="Fedora Project")] == ["fedora18"]
    assert [e.short_id for e in osinfo.search(entries, "jellyfish")] == ["ubuntu22.04"]  # code name
    assert osinfo.search(entries, "microsoft 95 xp") == []  # every word must match


def test_support_status_and_table(entries):
    get = lambda sid: osinfo.find(entries, sid)
    assert osinfo.support_status(get("win95"), TODAY) == "sin soporte desde 2001-12-13"
    assert osinfo.support_status(get("rocky9"), TODAY) == "con soporte hasta 2032-05-31"
    assert osinfo.support_status(get("ubuntu22.04"), TODAY) == "sin fecha de fin en la base de datos"
    table = osinfo.format_entries([get("win95"), get("manjaro")], today=TODAY)
    lines = table.splitlines()
    assert lines[0].split() == ["short-id", "nombre", "familia", "publicado", "fin", "de", "soporte", "(EOL)"]
    assert set(lines[1]) == {"-"}
    assert lines[2].startswith("win95") and lines[2].endswith("sin soporte desde 2001-12-13")
    assert "—" in lines[3]
    assert osinfo.format_entries(entries, today=TODAY, limit=3).endswith("... y 9 más")


def test_db_version(tmp_path, monkeypatch):
    monkeypatch.delenv("OSINFO_SYSTEM_DIR", raising=False)
    (tmp_path / "VERSION").write_text("20221203\n")
    assert osinfo.db_version([str(tmp_path / "none"), str(tmp_path)]) == "20221203"
    assert osinfo.db_version([str(tmp_path / "none")]) is None


def test_missing_tool_says_what_to_install(monkeypatch):
    monkeypatch.setattr(osinfo, "find_program", lambda name: None)
    with pytest.raises(ToolMissingError) as err:
        osinfo.load_os_list()
    assert "osinfo-query" in err.value.message
    assert "libosinfo-bin osinfo-db" in err.value.hint


@pytest.mark.skipif(shutil.which("osinfo-query") is None, reason="libosinfo-bin no está instalado")
def test_load_the_real_database():
    entries = osinfo.load_os_list()
    assert len(entries) > 300
    assert osinfo.find(entries, "win95").family == "win9x"
    assert {"linux", "winnt", "freebsd"} <= {f for f, _ in osinfo.family_counts(entries)}


# ---------------------------------------------------------------- the widget
def test_browser_filters(entries):
    b = os_browser(entries, today=TODAY)
    assert repr(b) == "<Buscador de osinfo: 12 sistemas>"
    assert b.count.value == "12 de 12 sistemas"
    labels = [label for label, _ in b.family.options]
    assert labels[0] == "(todas)" and labels[1] == "Linux (6)"
    b.search_box.value = "windows"
    assert {e.short_id for e in b.visible} == {"win95", "win11"}
    b.family.value = "win9x"
    assert [e.short_id for e in b.visible] == ["win95"]
    assert b.count.value == "1 de 12 sistemas"
    assert "sin soporte desde 2001-12-13" in b.table.value
    b.search_box.value, b.family.value = "", None
    b.vendor.value = "CentOS"
    assert [e.short_id for e in b.visible] == ["centos6.5"]
    b.vendor.value = None
    b.only_supported.value = True
    assert {e.short_id for e in b.visible} == {"rocky9"}  # the only EOL date after TODAY here
    b.search_box.value = "nada parecido"
    assert "Ningún sistema" in b.table.value
    assert repr(b) == "<Buscador de osinfo: 12 sistemas>"  # the repr does not follow the filter


def test_entries_html_escapes_and_limits(entries):
    evil = osinfo.OsEntry("x<y", "<script>alert(1)</script>", vendor="A & B")
    out = entries_html([evil], TODAY)
    assert "<script>" not in out and "&lt;script&gt;" in out and "A &amp; B" in out
    out = entries_html(entries, TODAY, limit=5)
    assert out.count("<tr") == 6 and "Se muestran 5 de 12" in out
    assert isinstance(OsinfoBrowser(entries), OsinfoBrowser)

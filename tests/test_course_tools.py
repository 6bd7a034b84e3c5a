"""Instructor tools: the students' copy, the HTML handouts of a headless run, doctor archives."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import nbformat
import pytest

from labkit import cli, host, snapshot
from labkit.course import INSTRUCTOR_TAG, course_notebooks, default_source
from labkit.errors import InputError
from labkit.quiz import grade, list_banks, load_bank, markdown_to_text
from labkit.student import strip_notebook, student_copy
from labkit.widgets.quiz import feedback_html, markdown_to_html

HERE = Path(__file__).parent
NOTEBOOKS = default_source()
HOSTS = HERE / "fixtures" / "hosts"
NOTE_START = "**Nota para el profesor.**"


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch) -> Path:
    """Quiz progress goes to a private folder, never to the real home."""
    d = tmp_path / "data"
    monkeypatch.setenv("LABKIT_DATA_DIR", str(d))
    return d


def _squash(text: str) -> str:
    return " ".join(text.split())


def _all_strings(node) -> str:
    """Every string in a JSON document, joined: sources, outputs and metadata alike."""
    if isinstance(node, str):
        return node
    if isinstance(node, dict):
        return "\n".join(_all_strings(v) for v in node.values())
    if isinstance(node, list):
        return "".join(s if isinstance(s, str) else "\n" + _all_strings(s) for s in node)
    return ""


def _secrets(notebook_id: str) -> list[str]:
    """What a notebook must not contain for the students: explanations, per-option feedback and
    the verdict block a correct answer renders, in the forms the quiz widget would show them."""
    found = []
    for q in load_bank(notebook_id):
        found += [q.explanation, markdown_to_text(q.explanation), markdown_to_html(q.explanation)]
        found += [o.feedback for o in q.options if o.feedback]
        right = sorted(q.correct) if q.kind != "numeric" else q.value
        found.append(feedback_html(grade(q, right)))
    return [_squash(s) for s in found if s.strip()]


def _leaked(path: Path, notebook_id: str) -> list[str]:
    text = _squash(_all_strings(json.loads(path.read_text(encoding="utf-8"))))
    return [s[:60] for s in _secrets(notebook_id) if s in text]


# --------------------------------------------------------------------------- students' copy

def test_every_course_notebook_has_instructor_notes():
    for path in course_notebooks(NOTEBOOKS):
        if int(path.stem[:2]) > 11:
            continue  # 00-11 carry notes; later notebooks are being written
        nb = json.loads(path.read_text(encoding="utf-8"))
        notes = [c for c in nb["cells"] if INSTRUCTOR_TAG in c["metadata"].get("tags", [])]
        assert 1 <= len(notes) <= 2, path.name
        for cell in notes:
            assert cell["cell_type"] == "markdown"
            assert "".join(cell["source"]).startswith(NOTE_START), path.name


def test_student_copy_of_the_course(tmp_path, capsys):
    out = tmp_path / "alumnos"
    assert cli.main(["course", "student-copy", "--out", str(out)]) == 0
    assert "cuadernos en" in capsys.readouterr().out
    sources = course_notebooks(NOTEBOOKS)
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in sources]
    for src in sources:
        original = json.loads(src.read_text(encoding="utf-8"))
        copy_path = out / src.name
        copy = json.loads(copy_path.read_text(encoding="utf-8"))
        nbformat.validate(nbformat.reads(copy_path.read_text(encoding="utf-8"), as_version=4))
        kept = [c for c in original["cells"] if INSTRUCTOR_TAG not in c["metadata"].get("tags", [])]
        assert [c["source"] for c in copy["cells"]] == [c["source"] for c in kept], src.name
        assert [c["id"] for c in copy["cells"]] == [c["id"] for c in kept]
        assert NOTE_START not in copy_path.read_text(encoding="utf-8")
        for cell in copy["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None
        assert "widgets" not in copy["metadata"]
        assert copy["metadata"]["kernelspec"] == original["metadata"]["kernelspec"]
        if src.stem in list_banks():
            assert _leaked(copy_path, src.stem) == [], src.name


def test_student_copy_removes_answers_a_student_left_in_outputs_and_widget_state(tmp_path):
    """A notebook saved after answering the quiz holds the explanations; the copy must not."""
    from labkit.widgets.quiz import Quiz

    notebook_id = "04_vtx_amdv"
    quiz = Quiz(notebook_id)
    for box in quiz.items:
        q = box.question
        right = str(q.value) if q.kind == "numeric" else sorted(q.correct)
        box.answer = right[0] if q.kind == "single" else right
        box.button.click()
        assert box.last is not None and box.last.correct
    shown = [box.feedback.value for box in quiz.items]
    nb = json.loads((NOTEBOOKS / f"{notebook_id}.ipynb").read_text(encoding="utf-8"))
    quiz_cell = next(c for c in nb["cells"] if f'quiz("{notebook_id}")' in "".join(c["source"]))
    quiz_cell["outputs"] = [{"output_type": "display_data", "metadata": {},
                             "data": {"text/html": shown, "text/plain": ["Autoevaluación"]}}]
    nb["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {
        "version_major": 2, "version_minor": 0,
        "state": {f"w{n}": {"model_name": "HTMLModel", "model_module": "@jupyter-widgets/controls",
                            "model_module_version": "2.0.0", "state": {"value": v}}
                  for n, v in enumerate(shown)}}}
    nb["cells"].insert(1, {"cell_type": "markdown", "id": "nota-prueba", "metadata": {"tags": [INSTRUCTOR_TAG]},
                           "source": [NOTE_START + " La respuesta a la pregunta 2 es la b."]})
    src = tmp_path / "src"
    src.mkdir()
    dirty = src / f"{notebook_id}.ipynb"
    dirty.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    assert len(_leaked(dirty, notebook_id)) >= len(quiz.items)  # the check can see a leak

    (written,) = student_copy(tmp_path / "out", source=src)
    assert _leaked(written, notebook_id) == []
    assert "La respuesta a la pregunta 2" not in written.read_text(encoding="utf-8")
    assert strip_notebook(nb)["cells"][0] == nb["cells"][0]  # untagged markdown stays as it is


def test_student_copy_refuses_a_non_empty_folder_unless_forced(tmp_path, capsys):
    out = tmp_path / "alumnos"
    out.mkdir()
    mine = out / "mis-notas.txt"
    mine.write_text("no me borres")
    assert cli.main(["course", "student-copy", "--out", str(out), "--notebooks", "02"]) == 2
    err = capsys.readouterr().err
    assert "no está vacía" in err and "--force" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["mis-notas.txt"]
    assert cli.main(["course", "student-copy", "--out", str(out), "--notebooks", "02", "--force"]) == 0
    assert mine.read_text() == "no me borres"
    assert (out / "02_tipos_de_hipervisor.ipynb").is_file()


def test_notebook_selection_errors_are_spanish(tmp_path):
    with pytest.raises(InputError, match="No hay ningún cuaderno «99»"):
        course_notebooks(NOTEBOOKS, "02,99")
    assert [p.stem[:2] for p in course_notebooks(NOTEBOOKS, "07, 02,02_tipos_de_hipervisor")] == ["02", "07"]
    with pytest.raises(InputError, match="no existe"):
        course_notebooks(tmp_path / "nada")


# --------------------------------------------------------------------------- handouts

def _write_nb(path: Path, *cells) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = list(cells)
    nbformat.write(nb, path)


def _index(out: Path) -> dict:
    return json.loads((out / "index.json").read_text(encoding="utf-8"))


@pytest.mark.integration
def test_handouts_of_two_real_notebooks(tmp_path, capsys):
    """02 and 07 boot no guest (a few seconds each); the course's files stay as they were."""
    before = {p: p.read_bytes() for p in NOTEBOOKS.glob("*.ipynb")}
    out = tmp_path / "apuntes"
    assert cli.main(["course", "handouts", "--out", str(out), "--notebooks", "02,07"]) == 0
    captured = capsys.readouterr()
    assert "2 de 2 cuadernos sin errores" in captured.out
    assert "[1/2] 02_tipos_de_hipervisor: bien" in captured.err
    assert {p: p.read_bytes() for p in NOTEBOOKS.glob("*.ipynb")} == before
    index = _index(out)
    assert [r["name"] for r in index["runs"]] == ["02_tipos_de_hipervisor", "07_sistemas_anfitriones"]
    assert all(r["passed"] and r["accel"] in ("kvm", "tcg") and r["seconds"] > 0 for r in index["runs"])
    assert index["accel"] == host.probe().accelerator
    page = (out / "02_tipos_de_hipervisor.html").read_text(encoding="utf-8")
    assert "KVM_EXIT_IO" in page  # an output of this run
    assert "application/vnd.jupyter.widget-state+json" in page  # the quiz's widgets, embedded
    assert NOTE_START not in page and "Nota para el profesor" not in page
    html = (out / "index.html").read_text(encoding="utf-8")
    assert html.count("✔ sin errores") == 2 and "href='07_sistemas_anfitriones.html'" in html


@pytest.mark.integration
def test_handouts_report_a_failing_notebook_and_go_on(tmp_path, capsys):
    src = tmp_path / "cuadernos"
    src.mkdir()
    new = nbformat.v4
    _write_nb(src / "00_bien.ipynb", new.new_code_cell("print('hola ' * 2)"))
    _write_nb(src / "01_falla.ipynb", new.new_markdown_cell("# falla"),
              new.new_markdown_cell(NOTE_START + " secreto del profesor", metadata={"tags": [INSTRUCTOR_TAG]}),
              new.new_code_cell("x = 1"), new.new_code_cell("raise RuntimeError('a propósito\\notra línea')"),
              new.new_code_cell("print('no se ejecuta')"))
    _write_nb(src / "02_tambien.ipynb", new.new_code_cell("print(6 * 7)"))
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = tmp_path / "apuntes"

    assert cli.main(["course", "handouts", "--source", str(src), "--out", str(out), "--timeout", "60"]) == 1
    captured = capsys.readouterr()
    assert "1/3] 00_bien: bien" in captured.err
    assert "01_falla: FALLO en la celda 4: RuntimeError: a propósito" in captured.err
    assert "2 de 3 cuadernos sin errores" in captured.out
    runs = {r["name"]: r for r in _index(out)["runs"]}
    assert runs["00_bien"]["passed"] and runs["02_tambien"]["passed"]
    fail = runs["01_falla"]
    assert not fail["passed"] and fail["cell"] == 4 and fail["error"] == "RuntimeError: a propósito"
    for name in runs:
        assert (out / f"{name}.html").is_file()
    assert "42" in (out / "02_tambien.html").read_text(encoding="utf-8")
    failed_page = (out / "01_falla.html").read_text(encoding="utf-8")
    assert "RuntimeError" in failed_page and "secreto del profesor" not in failed_page
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "✘ falló" in html and f"01_falla.html#cell-id={fail['cell_id']}" in html
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # run in a copy


def test_handout_pages_leave_instructor_notes_out_unless_asked(tmp_path):
    from labkit.course import _export_html

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Título"),
                nbformat.v4.new_markdown_cell(NOTE_START + " secreto", metadata={"tags": [INSTRUCTOR_TAG]})]
    assert "secreto" not in _export_html(nb, "prueba", tmp_path, with_notes=False)
    page = _export_html(nb, "prueba", tmp_path, with_notes=True)
    assert "secreto" in page and "Título" in page


def test_handouts_refuse_a_non_empty_folder_before_running_anything(tmp_path, capsys):
    out = tmp_path / "apuntes"
    out.mkdir()
    (out / "index.html").write_text("el de ayer")
    assert cli.main(["course", "handouts", "--out", str(out), "--notebooks", "02"]) == 2
    err = capsys.readouterr().err
    assert "no está vacía" in err and "Traceback" not in err and "ejecutando" not in err
    assert (out / "index.html").read_text() == "el de ayer"
    (tmp_path / "fichero").write_text("x")
    assert cli.main(["course", "handouts", "--out", str(tmp_path / "fichero")]) == 2
    assert cli.main(["course", "handouts", "--out", str(tmp_path / "o"), "--timeout", "0"]) == 2


# --------------------------------------------------------------------------- doctor archives

def test_doctor_archive_round_trip(tmp_path, capsys):
    tree = HOSTS / "intel-laptop"
    archive = tmp_path / "equipo.tar.gz"
    assert cli.main(["doctor", "--save", str(archive), "--root", str(tree)]) == 0
    assert f"labkit doctor --root {archive}" in capsys.readouterr().out
    assert archive.is_file() and list(tmp_path.iterdir()) == [archive]
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        assert all(n == "equipo" or n.startswith("equipo/") for n in names)
        assert f"equipo/{host.MANIFEST}" in names
        assert all(m.uid == 0 and m.uname == "" for m in tar.getmembers())

    assert cli.main(["doctor", "--root", str(archive), "--json"]) == 0
    seen = json.loads(capsys.readouterr().out)
    direct = host.probe(str(tree)).to_dict()
    assert seen["verdict"] == direct["verdict"] == "kvm"
    assert seen["checks"] == direct["checks"]

    data = archive.read_bytes()
    assert cli.main(["doctor", "--save", str(archive)]) == 2  # never overwritten
    assert "ya existe" in capsys.readouterr().err
    assert archive.read_bytes() == data
    # an archive of an archive's diagnosis, and a folder from an archive, both work
    again = tmp_path / "otra.tgz"
    assert cli.main(["doctor", "--save", str(again), "--root", str(archive)]) == 0
    folder = tmp_path / "carpeta"
    assert cli.main(["doctor", "--save", str(folder), "--root", str(again)]) == 0
    assert host.probe(str(folder)).verdict == "kvm"


def _evil(tmp_path: Path, kind: str) -> Path:
    archive = tmp_path / f"{kind}.tar.gz"
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"format": 1}')
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(manifest, arcname=f"equipo/{host.MANIFEST}")  # a good entry first
        info = tarfile.TarInfo()
        if kind == "absolute":
            info.name, info.size = str(tmp_path / "absoluto.txt"), 0
        elif kind == "dotdot":
            info.name, info.size = "equipo/../../fuera.txt", 0
        elif kind == "symlink":
            info.name, info.type, info.linkname = "equipo/proc/cpuinfo", tarfile.SYMTYPE, "/etc/shadow"
        elif kind == "hardlink":
            info.name, info.type, info.linkname = "equipo/proc/modules", tarfile.LNKTYPE, "../../etc/passwd"
        elif kind == "device":
            info.name, info.type, info.devmajor, info.devminor = "equipo/dev/kvm", tarfile.CHRTYPE, 10, 232
        elif kind == "fifo":
            info.name, info.type = "equipo/tuberia", tarfile.FIFOTYPE
        tar.addfile(info)
    return archive


@pytest.mark.parametrize("kind, says", [
    ("absolute", "ruta absoluta"), ("dotdot", "sale de su carpeta"), ("symlink", "apunta fuera"),
    ("hardlink", "apunta fuera"), ("device", "dispositivo"), ("fifo", "FIFO"),
])
def test_doctor_refuses_unsafe_archives(tmp_path, capsys, kind, says):
    archive = _evil(tmp_path, kind)
    assert cli.main(["doctor", "--root", str(archive)]) == 2
    err = capsys.readouterr().err
    assert says in err and "Qué hacer" in err and "Traceback" not in err
    dest = tmp_path / "extraido"
    dest.mkdir()
    with pytest.raises(InputError, match=re.escape(says)):
        snapshot.extract_archive(archive, dest)
    assert list(dest.iterdir()) == []  # refused whole: not even the good entry was written
    assert not (tmp_path / "absoluto.txt").exists() and not (tmp_path.parent / "fuera.txt").exists()


def test_doctor_refuses_files_that_are_not_snapshots(tmp_path, capsys):
    junk = tmp_path / "equipo.tar.gz"
    junk.write_bytes(b"esto no es un tar")
    assert cli.main(["doctor", "--root", str(junk)]) == 2
    assert "no es una carpeta ni un archivo .tar.gz" in capsys.readouterr().err
    other = tmp_path / "otro.tar.gz"
    with tarfile.open(other, "w:gz") as tar:
        tar.add(junk, arcname="algo/fichero")
    assert cli.main(["doctor", "--root", str(other)]) == 2
    assert "no parece un diagnóstico de labkit" in capsys.readouterr().err

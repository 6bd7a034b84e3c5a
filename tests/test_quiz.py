"""Tests for the self-check quizzes: banks, grading, saved progress and the widget."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from labkit import quiz as q
from labkit.errors import HostError, InputError

MINE = ("00_preparacion", "04_vtx_amdv", "05_verificar_soporte")


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch) -> Path:
    """Every test saves its progress in its own folder, never in the real home."""
    d = tmp_path / "data"
    monkeypatch.setenv("LABKIT_DATA_DIR", str(d))
    return d


def write_bank(tmp_path: Path, body: str, name: str = "roto.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


GOOD = """
title = "Prueba"

[[questions]]
id = "uno"
kind = "single"
prompt = "¿Cuál?"
answer = "b"
explanation = "Porque sí."

[questions.options]
a = "Esta no"
b = "Esta"

[questions.feedback]
a = "Casi."

[[questions]]
id = "varias"
kind = "multiple"
prompt = "¿Cuáles?"
answer = ["a", "c"]
explanation = "Las dos."

[questions.options]
a = "Sí"
b = "No"
c = "También"

[[questions]]
id = "numero"
kind = "numeric"
prompt = "¿Cuánto?"
answer = 1.5
tolerance = 0.1
unit = "s"
explanation = "Uno y medio."
"""


@pytest.fixture
def bank(tmp_path) -> q.Bank:
    return q.read_bank(write_bank(tmp_path, GOOD, "prueba.toml"))


# --------------------------------------------------------------------------- public face

def test_public_names():
    assert set(q.__all__) == {
        "KINDS", "KIND_LABELS", "MAX_OPTION_CHARS", "Answer", "Option", "Question", "Bank", "Feedback", "Summary", "Progress",
        "ProgressWarning", "list_banks", "load_bank", "read_bank", "parse_number", "grade",
        "format_bank", "markdown_to_text", "default_progress_path",
    }
    for name in q.__all__:
        assert hasattr(q, name), name


# --------------------------------------------------------------------------- shipped banks

def test_my_banks_are_shipped():
    assert set(MINE) <= set(q.list_banks())


@pytest.mark.parametrize("notebook_id", q.list_banks())
def test_shipped_bank_is_consistent(notebook_id):
    bank = q.load_bank(notebook_id)
    assert bank.notebook_id == notebook_id
    assert bank.title and len(bank) >= 1
    assert len({x.id for x in bank}) == len(bank)
    for question in bank:
        assert question.explanation
        if question.kind == "numeric":
            assert q.grade(question, question.value).correct
            assert not q.grade(question, question.value + 1000).correct
            continue
        right = q.grade(question, sorted(question.correct))
        assert right.correct and right.valid, question.id
        for key in question.keys:
            if key not in question.correct:
                wrong = key if question.kind == "single" else sorted(question.correct | {key})
                fb = q.grade(question, wrong)
                assert fb.valid and not fb.correct, (question.id, key)


@pytest.mark.parametrize("notebook_id", MINE)
def test_my_banks_shape(notebook_id):
    bank = q.load_bank(notebook_id)
    assert 4 <= len(bank) <= 6
    assert {x.kind for x in bank} >= {"single", "multiple"}


def test_numeric_questions_of_my_banks():
    walk = q.load_bank("04_vtx_amdv").question("recorrido-2d")
    assert q.grade(walk, "24").correct and not q.grade(walk, "25").correct
    msr = q.load_bank("05_verificar_soporte").question("direccion-msr")
    for answer in ("58", "0x3A", "0x3a", 58):
        assert q.grade(msr, answer).correct, answer
    assert not q.grade(msr, "3").correct
    assert not q.grade(msr, "3A").valid  # hex needs its 0x prefix


def test_load_unknown_notebook():
    with pytest.raises(InputError) as exc:
        q.load_bank("99_no_existe")
    assert "99_no_existe" in exc.value.message
    assert "04_vtx_amdv" in exc.value.hint


def test_question_lookup(bank):
    assert bank.question("uno").kind == "single"
    with pytest.raises(InputError, match="no tiene la pregunta"):
        bank.question("nada")


# --------------------------------------------------------------------------- validation

BROKEN = {
    "tipo desconocido": (
        GOOD.replace('kind = "single"', 'kind = "verdadero-falso"'),
        "tipo «verdadero-falso» desconocido",
    ),
    "respuesta fuera de las opciones": (
        GOOD.replace('answer = "b"', 'answer = "z"'),
        "la respuesta correcta «z» no está entre las opciones (a, b)",
    ),
    "varias fuera de las opciones": (
        GOOD.replace('answer = ["a", "c"]', 'answer = ["a", "d"]'),
        "la respuesta correcta «d» no está",
    ),
    "id repetido": (GOOD.replace('id = "varias"', 'id = "uno"'), "el identificador está repetido"),
    "sin explicación": (
        GOOD.replace('explanation = "Porque sí."\n', ""),
        "falta la explicación",
    ),
    "explicación vacía": (
        GOOD.replace('explanation = "Porque sí."', 'explanation = "   "'),
        "falta la explicación",
    ),
    "clave mal escrita": (
        GOOD.replace('explanation = "Porque sí."', 'explantion = "Porque sí."'),
        "clave desconocida: explantion",
    ),
    "multiple sin lista": (
        GOOD.replace('answer = ["a", "c"]', 'answer = "a"'),
        "lista no vacía de claves",
    ),
    "numérica sin número": (GOOD.replace("answer = 1.5", 'answer = "1,5"'), "debe ser un número"),
    "numérica con opciones": (
        GOOD + '\n[questions.options]\na = "x"\nb = "y"\n',
        "una pregunta numérica no lleva «options»",
    ),
    "tolerancia negativa": (GOOD.replace("tolerance = 0.1", "tolerance = -1"), "≥ 0"),
    "comentario de opción inexistente": (
        GOOD.replace('a = "Casi."', 'x = "Casi."'),
        "opciones que no existen: x",
    ),
    "comentario de la correcta": (
        GOOD.replace('a = "Casi."', 'b = "Bien."'),
        "opción correcta «b», que nunca se mostraría",
    ),
    "opción larga": (
        GOOD.replace('a = "Esta no"', f'a = "{"x" * 200}"'),
        "demasiado larga",
    ),
    "una sola opción": (GOOD.replace('b = "Esta"\n', ""), "al menos dos opciones"),
    "sin preguntas": ('title = "Nada"\n', "no tiene preguntas"),
    "toml roto": ("[[questions]\nid = ", "TOML no válido"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_bank_is_rejected(tmp_path, case):
    body, expected = BROKEN[case]
    path = write_bank(tmp_path, body)
    with pytest.raises(InputError) as exc:
        q.read_bank(path)
    assert expected in exc.value.message
    assert "roto.toml" in exc.value.message
    assert exc.value.hint


def test_error_names_the_question(tmp_path):
    path = write_bank(tmp_path, GOOD.replace('answer = "b"', 'answer = "z"'))
    with pytest.raises(InputError, match="pregunta «uno»"):
        q.read_bank(path)


def test_read_missing_file(tmp_path):
    with pytest.raises(InputError, match="No se puede leer"):
        q.read_bank(tmp_path / "no.toml")


# --------------------------------------------------------------------------- grading

def test_single_right_and_wrong(bank):
    one = bank.question("uno")
    fb = q.grade(one, "b")
    assert fb.correct and fb.valid and fb.explanation == "Porque sí."
    fb = q.grade(one, "a")
    assert not fb.correct and fb.valid
    assert fb.explanation == "Porque sí."  # the explanation comes after any real attempt
    assert fb.option_feedback == ("**a)** Casi.",)


@pytest.mark.parametrize(
    "answer, fragment",
    [
        (None, "No has marcado ninguna respuesta"),
        ("", "No has marcado ninguna respuesta"),
        ([], "No has marcado ninguna respuesta"),
        ("z", "La opción «z» no existe; elige entre: a, b"),
        (["a", "b"], "una sola respuesta"),
        (3, "Respuesta no válida"),
    ],
)
def test_single_bad_input(bank, answer, fragment):
    fb = q.grade(bank.question("uno"), answer)
    assert not fb.valid and not fb.correct
    assert fragment in fb.message
    assert fb.explanation == ""  # nothing given away for a non-answer


def test_multiple(bank):
    many = bank.question("varias")
    assert q.grade(many, ["c", "a"]).correct
    assert q.grade(many, ("a", "c")).correct
    fb = q.grade(many, ["a"])
    assert not fb.correct and fb.valid and "te falta una opción correcta" in fb.message
    fb = q.grade(many, ["a", "b", "c"])
    assert not fb.correct and "has marcado una opción que no corresponde" in fb.message
    fb = q.grade(many, ["b"])
    assert "has marcado una" in fb.message and "te faltan 2 opciones" in fb.message
    assert not q.grade(many, []).valid
    assert "al menos una opción" in q.grade(many, []).message
    assert not q.grade(many, ["a", "q"]).valid


@pytest.mark.parametrize(
    "text, value",
    [
        ("1,5", 1.5), ("1.5", 1.5), (" 1,5 ", 1.5), ("-2", -2.0), ("+3", 3.0), ("58", 58.0),
        ("0x3A", 58.0), (",5", 0.5), ("1e3", 1000.0), ("1\u00a0000", 1000.0), (7, 7.0),
        ("abc", None), ("", None), ("1,000.5", None), ("1.000,5", None), ("1,2,3", None),
        ("inf", None), ("nan", None), ("1/2", None), (True, None), (float("nan"), None),
    ],
)
def test_parse_number(text, value):
    assert q.parse_number(text) == value


def test_numeric(bank):
    num = bank.question("numero")
    for answer in ("1,5", "1.5", "1,45", "1.6", 1.5):
        assert q.grade(num, answer).correct, answer
    fb = q.grade(num, "1,7")
    assert fb.valid and not fb.correct and "1,7 s es demasiado alto" in fb.message
    assert "demasiado bajo" in q.grade(num, "1").message
    for bad in ("abc", "", "   ", None, "1.000,5"):
        fb = q.grade(num, bad)
        assert not fb.valid and not fb.correct, bad
    assert "«abc» no es un número" in q.grade(num, "abc").message
    assert "Escribe un número" in q.grade(num, "").message


def test_numeric_relative_tolerance():
    question = q.Question("r", "numeric", "¿?", "x", value=100.0, rel_tolerance=0.1)
    assert q.grade(question, "109").correct
    assert q.grade(question, "90,5").correct
    assert not q.grade(question, "111").correct
    exact = q.Question("e", "numeric", "¿?", "x", value=0.1 + 0.2)
    assert q.grade(exact, "0,3").correct  # float noise is not a wrong answer


# --------------------------------------------------------------------------- text

def test_markdown_to_text():
    assert q.markdown_to_text("Un `flag` **muy**\n*importante*") == "Un flag muy importante"
    assert q.markdown_to_text("a\n\n b") == "a\n\nb"
    assert q.markdown_to_text("4 * 5 = 20") == "4 * 5 = 20"


def test_format_bank_has_questions_not_answers(bank):
    text = q.format_bank(bank)
    assert text.splitlines()[0] == "Autoevaluación · Prueba (3 preguntas)"
    assert "1. ¿Cuál? [una respuesta]" in text
    assert "   b) Esta" in text
    assert "3. ¿Cuánto? [respuesta numérica]" in text
    assert "Porque sí" not in text and "Casi" not in text
    assert all(len(line) <= 88 for line in q.format_bank(q.load_bank("04_vtx_amdv")).splitlines())


# --------------------------------------------------------------------------- progress

def test_default_progress_path(monkeypatch, tmp_path):
    assert q.default_progress_path() == tmp_path / "data" / "progress.json"
    monkeypatch.delenv("LABKIT_DATA_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert q.default_progress_path() == tmp_path / "xdg" / "labkit" / "progress.json"
    monkeypatch.setenv("XDG_DATA_HOME", "relativa")  # not absolute: ignored, as the spec says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert q.default_progress_path() == tmp_path / "home" / ".local/share/labkit/progress.json"


def test_progress_round_trip(data_dir, bank):
    progress = q.Progress()
    assert progress.path == data_dir / "progress.json"
    assert progress.record_of("prueba", "uno") is None
    progress.record("prueba", "uno", "a", False)
    rec = progress.record("prueba", "uno", "b", True)
    assert rec["attempts"] == 2 and rec["correct"] and rec["last_answer"] == "b"
    progress.record("prueba", "varias", {"c", "a"}, True)
    progress.record("prueba", "numero", "9", False)
    progress.record("otro", "x", "a", True)

    again = q.Progress()  # a fresh object reads the same file
    saved = again.record_of("prueba", "varias")
    assert saved["last_answer"] == ["a", "c"] and saved["answered"] is True
    summary = again.summary("prueba", bank=bank)
    assert (summary.total, summary.answered, summary.correct, summary.attempts) == (3, 3, 2, 4)
    assert str(summary) == "2/3 correctas (3 respondidas)"

    data = json.loads((data_dir / "progress.json").read_text(encoding="utf-8"))
    assert data["version"] == 1
    assert data["notebooks"]["prueba"]["uno"]["attempts"] == 2

    again.reset("prueba")
    assert again.summary("prueba", bank=bank).answered == 0
    assert again.record_of("otro", "x") is not None
    again.reset()
    assert again.record_of("otro", "x") is None


def test_summary_uses_the_shipped_bank():
    progress = q.Progress()
    assert progress.summary("04_vtx_amdv").total == len(q.load_bank("04_vtx_amdv"))
    progress.record("04_vtx_amdv", "ept-npt", "a", True)
    progress.record("04_vtx_amdv", "pregunta-retirada", "a", True)  # no longer in the bank
    summary = progress.summary("04_vtx_amdv")
    assert (summary.answered, summary.correct) == (1, 1)
    assert progress.summary("sin_banco").total == 0


def test_write_is_atomic(data_dir, monkeypatch):
    progress = q.Progress()
    progress.record("nb", "a", "x", True)
    before = (data_dir / "progress.json").read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(q.os, "replace", broken_replace)
    with pytest.raises(HostError) as exc:
        progress.record("nb", "b", "y", False)
    assert "No se pudo guardar el progreso" in exc.value.message
    assert "LABKIT_DATA_DIR" in exc.value.hint
    assert (data_dir / "progress.json").read_bytes() == before  # old file intact
    assert sorted(p.name for p in data_dir.iterdir()) == ["progress.json"]  # no temp left


@pytest.mark.parametrize("content", ["{esto no es json", "[1, 2]", '{"notebooks": {"nb": 3}}', ""])
def test_corrupt_file_is_kept_aside(data_dir, content):
    data_dir.mkdir(parents=True)
    (data_dir / "progress.json").write_text(content, encoding="utf-8")
    progress = q.Progress()
    with pytest.warns(q.ProgressWarning, match="dañado"):
        assert progress.load() == {"version": 1, "notebooks": {}}
    aside = [p for p in data_dir.iterdir() if p.name.startswith("progress.json.corrupt-")]
    assert len(aside) == 1
    assert aside[0].read_text(encoding="utf-8") == content  # never silently lost
    assert aside[0].name in progress.notice
    assert not (data_dir / "progress.json").exists()
    progress.record("nb", "a", "x", True)  # and a fresh file starts
    assert q.Progress().record_of("nb", "a")["correct"] is True


def test_two_corrupt_files_in_the_same_second(data_dir):
    data_dir.mkdir(parents=True)
    for text in ("{uno", "{dos"):
        (data_dir / "progress.json").write_text(text, encoding="utf-8")
        with pytest.warns(q.ProgressWarning):
            q.Progress().load()
    kept = sorted(p.read_text() for p in data_dir.iterdir() if ".corrupt-" in p.name)
    assert kept == ["{dos", "{uno"]


# --------------------------------------------------------------------------- widget

widgets = pytest.importorskip("ipywidgets")
from labkit.widgets import quiz as wq  # noqa: E402


@pytest.fixture
def vtx(data_dir) -> wq.Quiz:
    return wq.quiz("04_vtx_amdv")


def test_widget_structure(vtx):
    assert isinstance(vtx, widgets.VBox)
    assert len(vtx.items) == 6
    kinds = {item.question.kind: item for item in vtx.items}
    assert isinstance(kinds["single"].input, widgets.RadioButtons)
    assert kinds["single"].input.value is None  # nothing preselected
    assert all(isinstance(c, widgets.Checkbox) for c in kinds["multiple"].input.children)
    assert isinstance(kinds["numeric"].text, widgets.Text)
    assert all(item.button.description == "Comprobar" for item in vtx.items)
    assert "0/6 correctas" in vtx.progress_line.value


def test_widget_single_choice_click(vtx, data_dir):
    box = vtx.box("ept-npt")
    box.input.value = "b"  # as a student would, then a real click
    box.button.click()
    assert "No es correcto" in box.feedback.value and "#cf222e" in box.feedback.value
    assert "rompería el aislamiento" in box.feedback.value  # per-option feedback
    assert "Por qué:" in box.feedback.value
    box.input.value = "a"
    box.button.click()
    assert "¡Correcto!" in box.feedback.value and "#1a7f37" in box.feedback.value
    assert "1/6 correctas · 1 respondidas" in vtx.progress_line.value
    saved = json.loads((data_dir / "progress.json").read_text())["notebooks"]["04_vtx_amdv"]
    assert saved["ept-npt"] == {**saved["ept-npt"], "attempts": 2, "correct": True, "last_answer": "a"}


def test_widget_multiple_and_numeric(vtx):
    box = vtx.box("flags-amd")
    box.checkboxes["a"].value = True
    box.button.click()
    assert "te falta una opción correcta" in box.feedback.value
    box.checkboxes["b"].value = True
    box.button.click()
    assert "¡Correcto!" in box.feedback.value
    assert vtx.answer("recorrido-2d", "24,0").correct
    assert "¡Correcto!" in vtx.box("recorrido-2d").feedback.value
    assert "2/6 correctas" in vtx.progress_line.value
    assert q.Progress().record_of("04_vtx_amdv", "flags-amd")["last_answer"] == ["a", "b"]


def test_widget_bad_input_is_explained_not_saved(vtx):
    box = vtx.box("que-anaden")
    box.button.click()  # nothing chosen
    assert "No has marcado ninguna respuesta" in box.feedback.value
    assert "#9a6700" in box.feedback.value
    fb = vtx.answer("recorrido-2d", "muchos")
    assert not fb.valid
    assert "«muchos» no es un número" in vtx.box("recorrido-2d").feedback.value
    assert q.Progress().summary("04_vtx_amdv").answered == 0
    assert "0/6 correctas" in vtx.progress_line.value


def test_widget_answer_setter_round_trip(vtx):
    multi = vtx.box("extensiones")
    multi.answer = ["a", "c"]
    assert multi.answer == ["a", "c"]
    assert [c.value for c in multi.input.children] == [True, False, True, False]
    num = vtx.box("recorrido-2d")
    num.answer = 24
    assert num.text.value == "24"


def test_widget_reads_saved_progress(vtx):
    vtx.answer("ept-npt", "a")
    vtx.answer("flag-hypervisor", "a")
    later = wq.quiz("04_vtx_amdv")
    assert "1/6 correctas · 2 respondidas" in later.progress_line.value


def test_widget_unknown_question(vtx):
    with pytest.raises(InputError):
        vtx.box("no-existe")


def test_widget_survives_unwritable_progress(tmp_path):
    blocker = tmp_path / "un_archivo"
    blocker.write_text("x")
    progress = q.Progress(blocker / "progress.json")  # parent is a file: cannot write
    widget = wq.Quiz("00_preparacion", progress=progress)
    fb = widget.answer("dev-kvm", "a")
    assert fb.correct
    value = widget.box("dev-kvm").feedback.value
    assert "¡Correcto!" in value and "No se pudo guardar el progreso" in value


def test_widget_shows_corrupt_notice(data_dir):
    data_dir.mkdir(parents=True)
    (data_dir / "progress.json").write_text("{roto")
    with pytest.warns(q.ProgressWarning):
        widget = wq.quiz("05_verificar_soporte")
    assert "dañado" in widget.progress_line.value


def test_widget_text_plain_is_stable(vtx):
    """What nbval compares and a static viewer shows: same on every run, whatever was saved."""
    from IPython.core.formatters import DisplayFormatter

    data, _ = DisplayFormatter().format(vtx)  # what the kernel sends for display(vtx)
    expected = q.format_bank(q.load_bank("04_vtx_amdv"))
    assert data["text/plain"] == expected == repr(vtx)
    assert len(expected) > 110  # not ipywidgets' cut-off default
    assert "application/vnd.jupyter.widget-view+json" in data
    assert " object at 0x" not in expected and "model_id" not in expected
    vtx.answer("ept-npt", "a")  # progress and answers do not leak into the text
    assert DisplayFormatter().format(vtx)[0]["text/plain"] == expected
    assert DisplayFormatter().format(wq.quiz("04_vtx_amdv"))[0]["text/plain"] == expected


def test_markdown_to_html():
    out = wq.markdown_to_html("Usa `<vmx>` y **KVM**\n\n*nota*")
    assert out == ("<p style='margin:0.3em 0'>Usa <code>&lt;vmx&gt;</code> y <b>KVM</b></p>"
                   "<p style='margin:0.3em 0'><i>nota</i></p>")

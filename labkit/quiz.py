"""Self-check quizzes ("Autoevaluación"): question banks, grading and saved progress.

Pure logic, no widgets (the widget lives in :mod:`labkit.widgets.quiz`).

A bank is a TOML file shipped in ``labkit/quizzes/<notebook_id>.toml``::

    title = "Intel VT-x y AMD-V"

    [[questions]]
    id = "hypervisor-flag"
    kind = "single"                 # single | multiple | numeric
    prompt = "¿Qué indica el flag `hypervisor` en `/proc/cpuinfo`?"
    answer = "b"                    # multiple: ["a", "c"]; numeric: 58
    explanation = "Lo activa el hipervisor en la CPU virtual (CPUID.1:ECX bit 31) ..."

    [questions.options]             # single / multiple only; order is kept
    a = "Que la CPU soporta VT-x"
    b = "Que este sistema operativo se ejecuta dentro de una máquina virtual"

    [questions.feedback]            # optional, per wrong option
    a = "Eso lo dice el flag `vmx`."

Options are one line each (at most ``MAX_OPTION_CHARS``); details go in ``explanation``.
Prompts and explanations may use a small Markdown subset: `code`, **bold**, *italic*
and blank lines between paragraphs.
Numeric questions take ``answer`` (a number), and optionally ``tolerance``
(absolute), ``rel_tolerance`` (fraction of the answer) and ``unit``. Student
answers may use a decimal comma ("1,5"), a decimal point ("1.5") or hex ("0x3A").

Progress is a small JSON file (see :func:`default_progress_path`), written
atomically; a corrupt file is kept aside, never silently lost.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import textwrap
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Union

from .errors import HostError, InputError

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "KINDS",
    "KIND_LABELS",
    "MAX_OPTION_CHARS",
    "Answer",
    "Option",
    "Question",
    "Bank",
    "Feedback",
    "Summary",
    "Progress",
    "ProgressWarning",
    "list_banks",
    "load_bank",
    "read_bank",
    "parse_number",
    "grade",
    "format_bank",
    "markdown_to_text",
    "default_progress_path",
]

KINDS = ("single", "multiple", "numeric")
KIND_LABELS = {
    "single": "una respuesta",
    "multiple": "varias respuestas",
    "numeric": "respuesta numérica",
}
_QUESTION_KEYS = {
    "id", "kind", "prompt", "options", "answer", "explanation", "feedback",
    "tolerance", "rel_tolerance", "unit",
}
MAX_OPTION_CHARS = 110  # an option is one line next to a radio button or checkbox
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")

Answer = Union[str, int, float, Iterable[str], None]


# --------------------------------------------------------------------------- model

@dataclass(frozen=True)
class Option:
    """One choice of a single/multiple question."""

    key: str
    text: str
    feedback: str = ""


@dataclass(frozen=True)
class Question:
    """One question of a bank; ``correct`` holds option keys, ``value`` the number."""

    id: str
    kind: str
    prompt: str
    explanation: str
    options: tuple[Option, ...] = ()
    correct: frozenset[str] = frozenset()
    value: float | None = None
    tolerance: float = 0.0
    rel_tolerance: float = 0.0
    unit: str = ""

    def option(self, key: str) -> Option | None:
        return next((o for o in self.options if o.key == key), None)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(o.key for o in self.options)


@dataclass(frozen=True)
class Bank:
    """The questions of one notebook."""

    notebook_id: str
    title: str
    questions: tuple[Question, ...]

    def __len__(self) -> int:
        return len(self.questions)

    def __iter__(self) -> Iterator[Question]:
        return iter(self.questions)

    def question(self, question_id: str) -> Question:
        for q in self.questions:
            if q.id == question_id:
                return q
        raise InputError(
            f"El cuestionario «{self.notebook_id}» no tiene la pregunta «{question_id}».",
            "Preguntas disponibles: " + ", ".join(q.id for q in self.questions),
        )


@dataclass(frozen=True)
class Feedback:
    """Result of grading one answer.

    ``valid`` is False when the answer could not be graded (nothing chosen,
    not a number ...): then ``message`` says what to do and nothing is recorded.
    """

    correct: bool
    message: str
    explanation: str = ""
    valid: bool = True
    option_feedback: tuple[str, ...] = ()


# --------------------------------------------------------------------------- banks

def _quizzes_dir():
    return resources.files("labkit").joinpath("quizzes")


def list_banks() -> list[str]:
    """Notebook ids that have a shipped question bank, sorted."""
    return sorted(
        p.name[: -len(".toml")]
        for p in _quizzes_dir().iterdir()
        if p.name.endswith(".toml")
    )


def load_bank(notebook_id: str) -> Bank:
    """Load and validate the shipped bank of ``notebook_id`` (e.g. ``"04_vtx_amdv"``)."""
    res = _quizzes_dir().joinpath(f"{notebook_id}.toml")
    if not res.is_file():
        raise InputError(
            f"No hay autoevaluación para «{notebook_id}».",
            "Cuestionarios disponibles: " + (", ".join(list_banks()) or "ninguno"),
        )
    return _parse_bank(res.read_text(encoding="utf-8"), notebook_id, f"{notebook_id}.toml")


def read_bank(path: str | os.PathLike[str]) -> Bank:
    """Load and validate a bank from any TOML file (the notebook id is its stem)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(
            f"No se puede leer el cuestionario «{path}»: {err.strerror or err}.",
            "Comprueba la ruta del archivo .toml.",
        ) from err
    return _parse_bank(text, path.stem, path.name)


def _bank_error(source: str, where: str, problem: str) -> InputError:
    place = f"«{source}»" + (f", pregunta «{where}»" if where else "")
    return InputError(
        f"Cuestionario {place}: {problem}",
        "Corrige el archivo del banco de preguntas (formato descrito en labkit/quiz.py).",
    )


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _parse_bank(text: str, notebook_id: str, source: str) -> Bank:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise _bank_error(source, "", f"TOML no válido ({err}).") from err
    raw = data.get("questions")
    if not isinstance(raw, list) or not raw:
        raise _bank_error(source, "", "no tiene preguntas (falta la lista [[questions]]).")
    questions: list[Question] = []
    seen: set[str] = set()
    for n, item in enumerate(raw, 1):
        q = _parse_question(item, n, source)
        if q.id in seen:
            raise _bank_error(source, q.id, "el identificador está repetido.")
        seen.add(q.id)
        questions.append(q)
    return Bank(notebook_id, _text(data.get("title")) or notebook_id, tuple(questions))


def _parse_question(item: Any, n: int, source: str) -> Question:
    if not isinstance(item, dict):
        raise _bank_error(source, f"nº {n}", "no es una tabla TOML.")
    qid = item.get("id")
    where = qid if isinstance(qid, str) and qid else f"nº {n}"

    def fail(problem: str) -> InputError:
        return _bank_error(source, where, problem)

    if not isinstance(qid, str) or not _ID_RE.match(qid):
        raise fail("falta «id» o no es válido (minúsculas, cifras, «-» y «_»).")
    unknown = sorted(set(item) - _QUESTION_KEYS)
    if unknown:
        raise fail(f"clave desconocida: {', '.join(unknown)}.")
    kind = item.get("kind")
    if kind not in KINDS:
        raise fail(f"tipo «{kind}» desconocido; usa uno de: {', '.join(KINDS)}.")
    prompt, explanation = _text(item.get("prompt")), _text(item.get("explanation"))
    if not prompt:
        raise fail("falta el enunciado («prompt»).")
    if not explanation:
        raise fail("falta la explicación («explanation»).")
    answer = item.get("answer")

    if kind == "numeric":
        for key in ("options", "feedback"):
            if key in item:
                raise fail(f"una pregunta numérica no lleva «{key}».")
        value = _number(answer)
        if value is None or not math.isfinite(value):
            raise fail("«answer» debe ser un número.")
        tol = _number(item.get("tolerance", 0))
        rel = _number(item.get("rel_tolerance", 0))
        if tol is None or tol < 0 or rel is None or rel < 0:
            raise fail("«tolerance» y «rel_tolerance» deben ser números ≥ 0.")
        unit = item.get("unit", "")
        if not isinstance(unit, str):
            raise fail("«unit» debe ser texto.")
        return Question(qid, kind, prompt, explanation, value=value,
                        tolerance=tol, rel_tolerance=rel, unit=unit.strip())

    for key in ("tolerance", "rel_tolerance", "unit"):
        if key in item:
            raise fail(f"«{key}» solo vale para preguntas numéricas.")
    options = item.get("options")
    if not isinstance(options, dict) or len(options) < 2:
        raise fail("necesita al menos dos opciones en [questions.options].")
    if not all(isinstance(v, str) and v.strip() for v in options.values()):
        raise fail("cada opción debe ser un texto no vacío.")
    long = [k for k, v in options.items() if len(v.strip()) > MAX_OPTION_CHARS or "\n" in v.strip()]
    if long:
        raise fail(
            f"la opción «{', '.join(long)}» es demasiado larga para una línea "
            f"(máximo {MAX_OPTION_CHARS} caracteres); lleva los detalles a «explanation»."
        )
    feedback = item.get("feedback", {})
    if not isinstance(feedback, dict) or not all(isinstance(v, str) for v in feedback.values()):
        raise fail("[questions.feedback] debe asociar claves de opción con textos.")
    stray = [k for k in feedback if k not in options]
    if stray:
        raise fail(f"hay comentarios para opciones que no existen: {', '.join(stray)}.")
    if kind == "single":
        if not isinstance(answer, str):
            raise fail("«answer» debe ser la clave de una opción (p. ej. \"b\").")
        correct = [answer]
    else:
        if not isinstance(answer, list) or not answer or not all(isinstance(a, str) for a in answer):
            raise fail("«answer» debe ser una lista no vacía de claves (p. ej. [\"a\", \"c\"]).")
        if len(set(answer)) != len(answer):
            raise fail("«answer» repite una opción.")
        correct = answer
    missing = [a for a in correct if a not in options]
    if missing:
        raise fail(
            f"la respuesta correcta «{', '.join(missing)}» no está entre las opciones "
            f"({', '.join(options)})."
        )
    wasted = [k for k in feedback if k in correct]
    if wasted:
        raise fail(
            f"hay comentario para la opción correcta «{', '.join(wasted)}», que nunca se "
            "mostraría; ponlo en «explanation»."
        )
    opts = tuple(Option(k, v.strip(), feedback.get(k, "").strip()) for k, v in options.items())
    return Question(qid, kind, prompt, explanation, options=opts, correct=frozenset(correct))


# --------------------------------------------------------------------------- text

def markdown_to_text(md: str) -> str:
    """Plain text of the small Markdown subset used in banks (`code`, **bold**, *italic*).

    Paragraphs are separated by a blank line; line breaks inside one are joined.
    """
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", md.strip())]
    text = "\n\n".join(p for p in paragraphs if p)
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*(\S(?:.*?\S)?)\*(?![\w*])", r"\1", text)
    return text.replace("`", "")


def format_bank(bank: Bank, width: int = 88) -> str:
    """The questions and options of ``bank`` as plain text, without answers.

    Deterministic: it is what a notebook shows where widgets cannot be displayed.
    """
    lines = [f"Autoevaluación · {bank.title} ({len(bank)} preguntas)"]
    for n, q in enumerate(bank, 1):
        lines.append("")
        head = f"{n}. "
        label = f"[{KIND_LABELS[q.kind]}]".replace(" ", "\u00a0")  # keep the label on one line
        prompt = markdown_to_text(q.prompt) + " " + label
        for i, para in enumerate(prompt.split("\n\n")):
            wrapped = textwrap.wrap(para, width, initial_indent=head if i == 0 else "   ",
                                    subsequent_indent="   ")
            lines.extend(line.replace("\u00a0", " ") for line in wrapped)
        for o in q.options:
            lines.extend(textwrap.wrap(markdown_to_text(o.text), width,
                                       initial_indent=f"   {o.key}) ", subsequent_indent="      "))
    lines += ["", "(Para responder aquí hace falta Jupyter con ipywidgets.)"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- grading

def parse_number(text: str | int | float) -> float | None:
    """Parse a student's number: ``"1,5"``, ``"1.5"``, ``"-2"``, ``"0x3A"``, ``"1e3"``.

    Returns None when the text is not one plain number (``"abc"``, ``"1.000,5"``).
    """
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return float(text) if math.isfinite(text) else None
    s = str(text).strip().replace("\u00a0", "").replace("\u202f", "").replace(" ", "")
    if re.fullmatch(r"[+-]?0[xX][0-9a-fA-F]+", s):
        return float(int(s, 16))
    if "," in s:
        if "." in s or s.count(",") > 1:
            return None  # thousands separators are ambiguous: refuse
        s = s.replace(",", ".")
    if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", s):
        return None
    value = float(s)
    return value if math.isfinite(value) else None


def _fmt(value: float) -> str:
    text = f"{value:g}" if value != int(value) or abs(value) >= 1e16 else str(int(value))
    return text.replace(".", ",")


def _keys_of(answer: Answer) -> list[str] | None:
    if answer is None:
        return []
    if isinstance(answer, str):
        return [answer] if answer else []
    if isinstance(answer, Iterable):
        keys = list(answer)
        return keys if all(isinstance(k, str) for k in keys) else None
    return None


def grade(question: Question, answer: Answer) -> Feedback:
    """Grade ``answer`` for ``question``; never raises for a bad answer.

    ``answer`` is an option key (single), an iterable of keys (multiple) or a
    text/number (numeric).
    """
    if question.kind == "numeric":
        return _grade_numeric(question, answer)
    keys = _keys_of(answer)
    if keys is None:
        return Feedback(False, "Respuesta no válida: indica la(s) letra(s) de las opciones.", valid=False)
    if not keys:
        what = "una opción" if question.kind == "single" else "al menos una opción"
        return Feedback(False, f"No has marcado ninguna respuesta: elige {what} y pulsa «Comprobar».",
                        valid=False)
    unknown = [k for k in keys if question.option(k) is None]
    if unknown:
        return Feedback(
            False,
            f"La opción «{', '.join(map(str, unknown))}» no existe; elige entre: "
            f"{', '.join(question.keys)}.",
            valid=False,
        )
    if question.kind == "single" and len(keys) > 1:
        return Feedback(False, "Esta pregunta admite una sola respuesta: elige solo una opción.",
                        valid=False)
    chosen = set(keys)
    notes = tuple(
        f"**{o.key})** {o.feedback}" for o in question.options
        if o.key in chosen and o.key not in question.correct and o.feedback
    )
    if chosen == question.correct:
        return Feedback(True, "¡Correcto!", question.explanation)
    if question.kind == "single":
        message = "No es correcto."
    else:
        wrong, missed = chosen - question.correct, question.correct - chosen
        parts = []
        if wrong:
            parts.append("has marcado una opción que no corresponde" if len(wrong) == 1
                         else f"has marcado {len(wrong)} opciones que no corresponden")
        if missed:
            parts.append("te falta una opción correcta" if len(missed) == 1
                         else f"te faltan {len(missed)} opciones correctas")
        message = "No del todo: " + " y ".join(parts) + "."
    return Feedback(False, message, question.explanation, option_feedback=notes)


def _grade_numeric(question: Question, answer: Answer) -> Feedback:
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        return Feedback(False, "Escribe un número y pulsa «Comprobar».", valid=False)
    value = parse_number(answer) if isinstance(answer, (str, int, float)) else None
    if value is None:
        return Feedback(
            False,
            f"«{answer}» no es un número. Escribe solo la cifra, p. ej. 1,5 o 1.5 "
            "(sin separador de miles; también vale hexadecimal como 0x3A).",
            valid=False,
        )
    target = question.value if question.value is not None else math.nan
    allowed = max(question.tolerance, question.rel_tolerance * abs(target))
    unit = f" {question.unit}" if question.unit else ""
    if abs(value - target) <= allowed + 1e-12 * max(1.0, abs(target)):
        return Feedback(True, "¡Correcto!", question.explanation)
    side = "alto" if value > target else "bajo"
    return Feedback(False, f"No es correcto: {_fmt(value)}{unit} es demasiado {side}.",
                    question.explanation)


# --------------------------------------------------------------------------- progress

class ProgressWarning(UserWarning):
    """The progress file had to be set aside (it was corrupt)."""


def default_progress_path() -> Path:
    """``$LABKIT_DATA_DIR/progress.json``, else ``$XDG_DATA_HOME/labkit/progress.json``,
    else ``~/.local/share/labkit/progress.json``."""
    override = os.environ.get("LABKIT_DATA_DIR")
    if override:
        return Path(override).expanduser() / "progress.json"
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "labkit" / "progress.json"


@dataclass(frozen=True)
class Summary:
    """Counts for one notebook: ``correct``/``total`` is the "3/5 correctas" line."""

    notebook_id: str
    total: int
    answered: int
    correct: int
    attempts: int

    def __str__(self) -> str:
        return f"{self.correct}/{self.total} correctas ({self.answered} respondidas)"


@dataclass
class Progress:
    """Saved answers, one JSON file shared by every notebook.

    Every call re-reads the file, so two notebooks open at once do not undo each
    other's answers. ``notice`` holds the last warning (e.g. a corrupt file kept aside).
    """

    path: Path = field(default_factory=default_progress_path)
    notice: str = ""

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    # -- reading
    def load(self) -> dict[str, Any]:
        """The whole file as a dict (``{"version": 1, "notebooks": {...}}``)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return _empty()
        except OSError as err:
            raise HostError(
                f"No se puede leer el progreso guardado en {self.path}: {err.strerror or err}.",
                "Comprueba los permisos o usa otra carpeta con LABKIT_DATA_DIR=/ruta.",
            ) from err
        try:
            data = json.loads(text)
            if not _well_formed(data):
                raise ValueError("unexpected structure")
        except ValueError:
            return self._set_aside()
        return data

    def record_of(self, notebook_id: str, question_id: str) -> dict[str, Any] | None:
        """What was saved for one question, or None if never answered."""
        return self.load()["notebooks"].get(notebook_id, {}).get(question_id)

    def summary(self, notebook_id: str, bank: Bank | None = None) -> Summary:
        """Counts for ``notebook_id``; ``total`` comes from its bank when there is one."""
        records: Mapping[str, Any] = self.load()["notebooks"].get(notebook_id, {})
        if bank is None and notebook_id in list_banks():
            bank = load_bank(notebook_id)
        if bank is not None:
            ids = {q.id for q in bank}
            records = {k: v for k, v in records.items() if k in ids}
            total = len(bank)
        else:
            total = len(records)
        return Summary(
            notebook_id,
            total,
            answered=sum(1 for r in records.values() if r.get("answered")),
            correct=sum(1 for r in records.values() if r.get("correct")),
            attempts=sum(int(r.get("attempts", 0)) for r in records.values()),
        )

    # -- writing
    def record(self, notebook_id: str, question_id: str, answer: Answer, correct: bool) -> dict[str, Any]:
        """Save one graded attempt; ``correct`` is the result of this (last) attempt."""
        data = self.load()
        questions = data["notebooks"].setdefault(notebook_id, {})
        old = questions.get(question_id, {})
        if answer is not None and not isinstance(answer, (str, int, float)):
            answer = sorted(answer)
        rec = {
            "answered": True,
            "correct": bool(correct),
            "attempts": int(old.get("attempts", 0)) + 1,
            "last_answer": answer,
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        questions[question_id] = rec
        self._write(data)
        return rec

    def reset(self, notebook_id: str | None = None) -> None:
        """Forget one notebook's answers, or all of them."""
        data = self.load()
        if notebook_id is None:
            data = _empty()
        else:
            data["notebooks"].pop(notebook_id, None)
        self._write(data)

    def _write(self, data: dict[str, Any]) -> None:
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".progress-", suffix=".tmp", dir=self.path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, ensure_ascii=False, indent=1, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as err:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
            raise HostError(
                f"No se pudo guardar el progreso en {self.path}: {err.strerror or err}.",
                "Comprueba los permisos o usa otra carpeta con LABKIT_DATA_DIR=/ruta.",
            ) from err

    def _set_aside(self) -> dict[str, Any]:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        try:
            os.replace(self.path, aside)
        except OSError as err:
            raise HostError(
                f"El progreso guardado en {self.path} está dañado y no se pudo apartar: "
                f"{err.strerror or err}.",
                "Mueve o borra ese archivo a mano, o usa LABKIT_DATA_DIR=/otra/ruta.",
            ) from err
        self.notice = (
            f"El archivo de progreso estaba dañado; se ha guardado aparte como {aside.name} "
            "y se empieza uno nuevo."
        )
        warnings.warn(self.notice, ProgressWarning, stacklevel=3)
        return _empty()


def _empty() -> dict[str, Any]:
    return {"version": 1, "notebooks": {}}


def _well_formed(data: Any) -> bool:
    if not isinstance(data, dict) or not isinstance(data.get("notebooks"), dict):
        return False
    return all(
        isinstance(qs, dict) and all(isinstance(r, dict) for r in qs.values())
        for qs in data["notebooks"].values()
    )

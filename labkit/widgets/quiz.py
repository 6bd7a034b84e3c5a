"""The "Autoevaluación" widget: one box per question, a «Comprobar» button, live progress.

Usage in a notebook::

    from labkit.widgets.quiz import quiz
    quiz("04_vtx_amdv")

Everything can be driven without a browser (tests do)::

    q = quiz("04_vtx_amdv")
    box = q.box("ept-npt")
    box.answer = "a"          # sets the RadioButtons / Checkboxes / Text
    box.button.click()        # same handler as a real click
    box.feedback.value        # HTML with the verdict and the explanation

Where no widget frontend exists (nbval, a static viewer), the output shows the
``text/plain`` of the top box: :func:`labkit.quiz.format_bank`, i.e. the questions and
options without answers or saved progress, identical on every run.
"""

from __future__ import annotations

import html
import re
from typing import Any, Callable

import ipywidgets as widgets

from ..errors import LabkitError
from ..quiz import (
    KIND_LABELS,
    Answer,
    Bank,
    Feedback,
    Progress,
    Question,
    format_bank,
    grade,
    load_bank,
    markdown_to_text,
)

__all__ = ["Quiz", "QuestionBox", "quiz", "markdown_to_html"]

_GREEN, _RED, _AMBER = "#1a7f37", "#cf222e", "#9a6700"


def markdown_to_html(md: str) -> str:
    """HTML for the small Markdown subset of the banks: `code`, **bold**, *italic*, paragraphs."""
    out = []
    for para in re.split(r"\n\s*\n", md.strip()):
        text = html.escape(" ".join(para.split()), quote=False)
        text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
        text = re.sub(r"(?<![\w*])\*(\S(?:.*?\S)?)\*(?![\w*])", r"<i>\1</i>", text)
        if text:
            out.append(f"<p style='margin:0.3em 0'>{text}</p>")
    return "".join(out)


def _box_html(color: str, title: str, body: str = "") -> str:
    return (
        f"<div style='border-left:4px solid {color};padding:2px 10px;margin:4px 0'>"
        f"<b style='color:{color}'>{html.escape(title, quote=False)}</b>{body}</div>"
    )


def feedback_html(fb: Feedback) -> str:
    """Render a :class:`~labkit.quiz.Feedback` as a coloured block."""
    if not fb.valid:
        return _box_html(_AMBER, "⚠ " + fb.message)
    body = "".join(markdown_to_html(note) for note in fb.option_feedback)
    if fb.explanation:
        body += "<div><b>Por qué:</b>" + markdown_to_html(fb.explanation) + "</div>"
    return _box_html(_GREEN if fb.correct else _RED, ("✔ " if fb.correct else "✘ ") + fb.message, body)


class QuestionBox(widgets.VBox):
    """One question: prompt, input, «Comprobar» button and feedback area."""

    def __init__(self, number: int, question: Question,
                 on_graded: Callable[[QuestionBox, Feedback], str] | None = None) -> None:
        self.question = question
        self._on_graded = on_graded
        self.checkboxes: dict[str, widgets.Checkbox] = {}
        self.input = self._make_input(question)
        self.button = widgets.Button(description="Comprobar", button_style="primary",
                                     tooltip="Corrige esta respuesta")
        self.button.on_click(lambda _button: self.check())
        self.feedback = widgets.HTML("")
        self.last: Feedback | None = None
        header = widgets.HTML(
            f"<b>{number}.</b> {markdown_to_html(question.prompt)}"
            f"<i style='opacity:0.7'>({KIND_LABELS[question.kind]})</i>"
        )
        super().__init__(
            [header, self.input, self.button, self.feedback],
            layout=widgets.Layout(border="1px solid #d0d7de", padding="4px 10px", margin="6px 0"),
        )

    def _make_input(self, q: Question) -> widgets.Widget:
        full = widgets.Layout(width="100%")
        if q.kind == "single":
            return widgets.RadioButtons(
                options=[(markdown_to_text(o.text), o.key) for o in q.options],
                value=None, layout=full,
            )
        if q.kind == "multiple":
            self.checkboxes = {
                o.key: widgets.Checkbox(value=False, description=markdown_to_text(o.text),
                                        indent=False, layout=full)
                for o in q.options
            }
            return widgets.VBox(list(self.checkboxes.values()))
        text = widgets.Text(placeholder="Escribe un número (p. ej. 24, 1,5 o 0x3A)",
                            layout=widgets.Layout(width="22em"))
        if q.unit:
            return widgets.HBox([text, widgets.Label(q.unit)])
        return text

    @property
    def text(self) -> widgets.Text:
        """The Text widget of a numeric question."""
        return self.input.children[0] if isinstance(self.input, widgets.HBox) else self.input

    @property
    def answer(self) -> Answer:
        """The current answer in :func:`labkit.quiz.grade` terms."""
        if self.question.kind == "single":
            return self.input.value
        if self.question.kind == "multiple":
            return [k for k, box in self.checkboxes.items() if box.value]
        return self.text.value

    @answer.setter
    def answer(self, value: Any) -> None:
        if self.question.kind == "single":
            self.input.value = value
        elif self.question.kind == "multiple":
            chosen = {value} if isinstance(value, str) else set(value or ())
            for key, box in self.checkboxes.items():
                box.value = key in chosen
        else:
            self.text.value = "" if value is None else str(value)

    def check(self) -> Feedback:
        """Grade the current answer, show the feedback and (through the quiz) save it."""
        fb = grade(self.question, self.answer)
        self.last = fb
        note = self._on_graded(self, fb) if self._on_graded else ""
        self.feedback.value = feedback_html(fb) + note
        return fb


class Quiz(widgets.VBox):
    """The self-check of one notebook; progress is saved as answers are checked."""

    def __init__(self, notebook_id: str, progress: Progress | None = None,
                 bank: Bank | None = None) -> None:
        self.bank = bank if bank is not None else load_bank(notebook_id)
        self.notebook_id = notebook_id
        self.progress = progress if progress is not None else Progress()
        self.items = [QuestionBox(n, q, self._graded) for n, q in enumerate(self.bank, 1)]
        self.progress_line = widgets.HTML("")
        title = widgets.HTML(f"<h3 style='margin:0.2em 0'>Autoevaluación: "
                             f"{html.escape(self.bank.title, quote=False)}</h3>")
        super().__init__([title, self.progress_line, *self.items])
        self.refresh()

    def box(self, question_id: str) -> QuestionBox:
        """The box of one question, by id."""
        for item in self.items:
            if item.question.id == question_id:
                return item
        self.bank.question(question_id)  # raises the Spanish InputError
        raise AssertionError("unreachable")

    def answer(self, question_id: str, value: Any) -> Feedback:
        """Set an answer and press «Comprobar», as a student would."""
        item = self.box(question_id)
        item.answer = value
        item.button.click()
        assert item.last is not None
        return item.last

    def refresh(self) -> None:
        """Recompute the «n/m correctas» line from the saved progress."""
        try:
            summary = self.progress.summary(self.notebook_id, bank=self.bank)
            text = (f"<b>Progreso:</b> {summary.correct}/{summary.total} correctas "
                    f"· {summary.answered} respondidas")
        except LabkitError as err:
            text = f"<b>Progreso:</b> no disponible ({html.escape(err.message, quote=False)})"
        if self.progress.notice:
            text += f"<br><span style='color:{_AMBER}'>⚠ {html.escape(self.progress.notice)}</span>"
        self.progress_line.value = text

    def _graded(self, item: QuestionBox, fb: Feedback) -> str:
        note = ""
        if fb.valid:
            answer = item.answer
            try:
                self.progress.record(self.notebook_id, item.question.id, answer, fb.correct)
            except LabkitError as err:
                note = _box_html(_AMBER, "⚠ No se pudo guardar el progreso.",
                                 markdown_to_html(f"{err.message} {err.hint}"))
        self.refresh()
        return note

    # A stable text/plain for places without a widget frontend (nbval, static viewers):
    # ipywidgets' default is a repr cut at 110 characters.
    def __repr__(self) -> str:
        return format_bank(self.bank)

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        data = super()._repr_mimebundle_(**kwargs) or {}
        data["text/plain"] = repr(self)
        return data


def quiz(notebook_id: str, progress: Progress | None = None) -> Quiz:
    """The «Autoevaluación» widget of ``notebook_id`` (e.g. ``"05_verificar_soporte"``)."""
    return Quiz(notebook_id, progress=progress)

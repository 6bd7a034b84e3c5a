"""The students' copy of the course: the notebooks without anything meant for the instructor.

``student_copy()`` writes each notebook with

- every cell tagged ``instructor`` ("Notas para el profesor") removed;
- every output cleared and every execution count reset;
- the saved widget state (``metadata.widgets``) dropped: after a run it can hold what a
  widget showed, e.g. a checked quiz answer with its explanation.

Quiz answers live only in ``labkit/quizzes/*.toml``; a notebook shows them only when a
student presses «Comprobar», i.e. in outputs and widget state, both removed here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .course import INSTRUCTOR_TAG, course_notebooks, default_source, prepare_out
from .errors import InputError

__all__ = ["strip_notebook", "student_copy"]


def strip_notebook(nb: dict[str, Any]) -> dict[str, Any]:
    """A student version of the notebook JSON ``nb`` (a new dict; ``nb`` is not changed)."""
    cells = []
    for cell in nb.get("cells", []):
        if INSTRUCTOR_TAG in cell.get("metadata", {}).get("tags", ()):
            continue
        cell = dict(cell)
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
            meta = {k: v for k, v in cell.get("metadata", {}).items() if k not in ("execution", "widgets")}
            cell["metadata"] = meta
        cells.append(cell)
    out = dict(nb)
    out["cells"] = cells
    out["metadata"] = {k: v for k, v in nb.get("metadata", {}).items() if k != "widgets"}
    return out


def student_copy(out: str | Path, *, source: str | Path | None = None, select: str | None = None,
                 force: bool = False) -> list[Path]:
    """Write the students' copy of the notebooks into ``out``; returns the files written.

    ``out`` must be new or empty unless ``force`` (then only same-named files are replaced).
    """
    src = Path(source) if source is not None else default_source()
    notebooks = course_notebooks(src, select)
    out_dir = prepare_out(Path(out), force)
    written = []
    for path in notebooks:
        try:
            nb = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"No se puede leer el cuaderno «{path}»: {err}.",
                             "Comprueba que es un .ipynb válido (ábrelo en JupyterLab) o quítalo de la lista."
                             ) from err
        target = out_dir / path.name
        # The course's own format (nbformat's too): indent 1, UTF-8 as is, final newline.
        target.write_text(json.dumps(strip_notebook(nb), indent=1, ensure_ascii=False) + "\n",
                          encoding="utf-8")
        written.append(target)
    return written

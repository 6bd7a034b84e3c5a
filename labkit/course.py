"""Instructor tools: run the whole course headless and write one HTML handout per notebook.

``run_handouts()`` executes every notebook in order with nbclient, in a temporary COPY of the
notebook folder (the course's own notebooks are never written), exports each one with
nbconvert's ``HTMLExporter`` (outputs and widget state included, "Notas para el profesor"
left out unless asked) and writes ``index.html`` + ``index.json``: per notebook, passed or
failed (which cell, the error's first line), seconds and accelerator; plus host, date, labkit
version and total time. A failing notebook does not stop the others.

The students' copy (instructor notes, outputs and quiz state removed) is :mod:`labkit.student`.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from .errors import InputError, LabkitError, SetupError, os_reason

__all__ = [
    "INSTRUCTOR_TAG",
    "NotebookRun",
    "Handouts",
    "course_notebooks",
    "default_source",
    "prepare_out",
    "run_handouts",
    "render_index",
    "write_index",
    "seconds_es",
]

INSTRUCTOR_TAG = "instructor"  # markdown cells "**Nota para el profesor.** ..."
_NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

Progress = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _notebooks_es(n: int) -> str:
    return f"{n} cuaderno" if n == 1 else f"{n} cuadernos"


def seconds_es(seconds: float) -> str:
    """``12.34`` -> ``"12,3 s"`` (Spanish decimal comma)."""
    return f"{seconds:.1f} s".replace(".", ",")


# --------------------------------------------------------------------------- inputs

def default_source() -> Path:
    """The course's ``notebooks/`` folder (next to the ``labkit`` package in a checkout)."""
    here = Path(__file__).resolve().parent.parent / "notebooks"
    if not here.is_dir():
        raise SetupError("No encuentro la carpeta notebooks/ del curso junto al paquete labkit.",
                         "Indica dónde están los cuadernos con --source CARPETA.")
    return here


def course_notebooks(source: Path, select: str | None = None) -> list[Path]:
    """The notebooks ``NN_*.ipynb`` of ``source``, in order; ``select`` = ``"00,03"`` keeps some.

    Each item of ``select`` is a number (``03``) or a full name (``03_kvm_con_qemu``).
    """
    source = Path(source)
    if not source.is_dir():
        raise InputError(f"La carpeta de cuadernos «{source}» no existe.",
                         "Indica una carpeta con cuadernos NN_nombre.ipynb (--source).")
    found = sorted(source.glob(_NOTEBOOK_GLOB))
    if not found:
        raise InputError(f"No hay cuadernos NN_nombre.ipynb en «{source}».",
                         "Indica la carpeta notebooks/ del curso (--source).")
    if not select:
        return found
    chosen: list[Path] = []
    for item in (s.strip().removesuffix(".ipynb") for s in select.split(",")):
        if not item:
            continue
        match = [p for p in found if p.stem == item or p.stem.split("_", 1)[0] == item]
        if not match:
            raise InputError(f"No hay ningún cuaderno «{item}» en «{source}».",
                             "Usa números separados por comas, p. ej. --notebooks 00,03. Hay: "
                             + ", ".join(p.stem.split("_", 1)[0] for p in found) + ".")
        chosen += [p for p in match if p not in chosen]
    if not chosen:
        raise InputError("La lista de cuadernos está vacía.", "Usa p. ej. --notebooks 00,03.")
    return sorted(chosen)


def prepare_out(out: Path, force: bool = False) -> Path:
    """Create ``out``; refuse an existing file, or a non-empty folder unless ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"«{out}» ya existe y no es una carpeta.", "Elige otra carpeta con --out.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(f"La carpeta «{out}» ya existe y no está vacía: no sobrescribo nada.",
                         "Elige otra carpeta con --out, o añade --force para escribir encima.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"No se puede crear la carpeta «{out}»: {os_reason(err)}.",
                         "Elige otra carpeta con --out.") from err
    return out


def _nb_libs() -> tuple[Any, Any, Any]:
    try:
        import nbformat
        from nbclient import NotebookClient
        from nbconvert import HTMLExporter
    except ImportError as err:
        raise SetupError(f"Faltan las bibliotecas de Jupyter para ejecutar cuadernos ({err.name}).",
                         "Instálalas con: .venv/bin/pip install -e '.[course]'  (o ejecuta ./lab setup).") from err
    return nbformat, NotebookClient, HTMLExporter


# --------------------------------------------------------------------------- results

@dataclass(frozen=True)
class NotebookRun:
    """How one notebook went: ``cell`` is the 1-based index of the failing cell."""

    name: str
    passed: bool
    seconds: float
    accel: str
    html: str = ""
    cell: int | None = None
    cell_id: str = ""
    error: str = ""

    def line(self) -> str:
        """One Spanish progress line, e.g. ``02_tipos_de_hipervisor: bien (12,3 s)``."""
        if self.passed:
            return f"{self.name}: bien ({seconds_es(self.seconds)})"
        where = f" en la celda {self.cell}" if self.cell else ""
        return f"{self.name}: FALLO{where}: {self.error} ({seconds_es(self.seconds)})"


@dataclass
class Handouts:
    """The result of :func:`run_handouts` (also written as ``index.json``)."""

    out: Path
    accel: str
    accel_reason: str
    host: str
    date: str
    version: str
    runs: list[NotebookRun] = field(default_factory=list)
    total_seconds: float = 0.0
    interrupted: bool = False  # Ctrl-C: ``runs`` has the notebooks that finished

    @property
    def failed(self) -> list[NotebookRun]:
        return [r for r in self.runs if not r.passed]

    @property
    def index(self) -> Path:
        return self.out / "index.html"

    def summary(self) -> str:
        ok = len(self.runs) - len(self.failed)
        stop = "Interrumpido con Ctrl-C. " if self.interrupted else ""
        return (f"{stop}{ok} de {_notebooks_es(len(self.runs))} sin errores, "
                f"{seconds_es(self.total_seconds)} en total "
                f"(acelerador {self.accel}). Índice: {self.index}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        return data


# --------------------------------------------------------------------------- execution

def _kernel_manager(sockets: Path) -> Any:
    """A kernel of THIS Python (the one with labkit), whatever kernelspecs are installed.

    It talks over unix sockets named ``sockets-N`` (IPC), not localhost TCP: no other user of
    a shared machine can reach it.
    """
    from ipykernel.kernelspec import RESOURCES, get_kernel_dict
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    class _ThisPython(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str) -> KernelSpec:  # any name: always this Python
            return KernelSpec(resource_dir=RESOURCES, **get_kernel_dict())

    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=_ThisPython(),
                              transport="ipc", ip=str(sockets))


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in _ANSI.sub("", text).splitlines() if ln.strip()]
    return lines[0][:300] if lines else ""


def _error_text(err: BaseException, timeout: float) -> str:
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    if isinstance(err, CellExecutionError):
        return _first_line(f"{err.ename}: {err.evalue}" if err.evalue else err.ename)
    if isinstance(err, CellTimeoutError):
        return f"la celda no terminó en {timeout:g} s (--timeout)"
    if isinstance(err, DeadKernelError):
        return "el núcleo de Python murió durante la celda"
    return _first_line(f"{type(err).__name__}: {err}")


def _execute(nb: Any, cwd: Path, timeout: float) -> tuple[int | None, BaseException | None]:
    """Run ``nb`` in place; returns (index of the cell that failed, the error) or (None, None)."""
    _, NotebookClient, _ = _nb_libs()
    current: dict[str, int] = {}

    def started(cell: Any = None, cell_index: int = 0, **_: Any) -> None:
        current["index"] = cell_index

    client = NotebookClient(nb, km=_kernel_manager(cwd.parent / "kernel"), timeout=timeout, startup_timeout=120,
                            store_widget_state=True, on_cell_start=started,
                            resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute(cleanup_kc=True)  # shut the kernel down: we passed km, so it would not
    except Exception as err:  # any failure is this notebook's result, not ours
        # On Ctrl-C (SIGINT) or SIGTERM nbclient's own handler stops the kernel, and the cell then
        # fails with some other error; that handler leaves this future behind: stop the whole run.
        if getattr(client, "_async_cleanup_kernel_future", None) is not None:
            raise KeyboardInterrupt from err
        return current.get("index"), err
    return None, None


def _export_html(nb: Any, name: str, cwd: Path, with_notes: bool) -> str:
    _, _, HTMLExporter = _nb_libs()
    from traitlets.config import Config

    config = Config()
    if not with_notes:
        config.TagRemovePreprocessor.enabled = True
        config.TagRemovePreprocessor.remove_cell_tags = {INSTRUCTOR_TAG}
    exporter = HTMLExporter(config=config, embed_images=True)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": name, "path": str(cwd)}})
    return body


def _working_copy(source: Path, tmp: Path) -> Path:
    """Copy ``source`` into ``tmp``; link its siblings so relative paths (``../tests/...``) still work."""
    work = tmp / source.name
    shutil.copytree(source, work, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    for sibling in source.parent.iterdir():
        if sibling.name != source.name:
            (tmp / sibling.name).symlink_to(sibling)
    return work


def _cleanup_after_failure(progress: Progress) -> None:
    """A notebook that died may leave libvirt domains behind (its kernel, their owner, is gone)."""
    from .cleanup import cleanup

    try:
        lines = cleanup()
    except LabkitError as err:
        progress(f"  (no se pudo comprobar si quedaron invitados: {err.message})")
        return
    for line in lines:
        progress(f"  limpieza: {line}")


def run_handouts(out: str | Path, *, source: str | Path | None = None, select: str | None = None,
                 timeout: float = 600.0, force: bool = False, with_notes: bool = False,
                 progress: Progress = _stderr) -> Handouts:
    """Execute the course's notebooks in order and write their HTML handouts and an index into ``out``.

    ``select`` = ``"02,04"`` runs only those; ``timeout`` is per cell, in seconds. Progress lines
    (Spanish) go to ``progress``. Never raises for a failing notebook: look at ``.failed``.
    Ctrl-C stops the run (``.interrupted``); the index then lists the notebooks that finished.
    """
    if timeout <= 0:
        raise InputError(f"El tiempo máximo por celda debe ser positivo (no {timeout:g}).",
                         "Usa p. ej. --timeout 600.")
    src = Path(source) if source is not None else default_source()
    notebooks = course_notebooks(src, select)
    nbformat, _, _ = _nb_libs()
    out_dir = prepare_out(Path(out), force)

    from . import __version__
    from .guest.runner import choose_accel

    accel, reason = choose_accel("auto")  # what the notebooks' guests use ("auto")
    result = Handouts(out_dir, accel, reason, os.uname().nodename,
                      datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), __version__)
    progress(f"Ejecutando {_notebooks_es(len(notebooks))} en una copia (acelerador {accel}: {reason.split(':')[0]})")
    start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="labkit-handouts-") as tmp:
            work = _working_copy(src.resolve(), Path(tmp))
            for n, path in enumerate(notebooks, 1):
                progress(f"[{n}/{len(notebooks)}] {path.stem}: ejecutando…")
                run = _run_one(nbformat, work / path.name, out_dir, timeout, accel, with_notes)
                result.runs.append(run)
                progress(f"[{n}/{len(notebooks)}] {run.line()}")
                if not run.passed:
                    _cleanup_after_failure(progress)
    except KeyboardInterrupt:
        result.interrupted = True
        _cleanup_after_failure(progress)
    finally:
        result.total_seconds = time.monotonic() - start
        write_index(result)
    return result


def _run_one(nbformat: Any, path: Path, out_dir: Path, timeout: float, accel: str,
             with_notes: bool) -> NotebookRun:
    t0 = time.monotonic()
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as err:  # noqa: BLE001 - unreadable notebook: report it, go on
        return NotebookRun(path.stem, False, time.monotonic() - t0, accel,
                           error=_first_line(f"no se puede leer el cuaderno: {err}"))
    index, err = _execute(nb, path.parent, timeout)
    seconds = time.monotonic() - t0
    page = f"{path.stem}.html"
    try:
        (out_dir / page).write_text(_export_html(nb, path.stem, path.parent, with_notes), encoding="utf-8")
    except Exception as exc:  # noqa: BLE001 - keep going; the index says why there is no page
        page = ""
        err = err or exc
    if err is None:
        return NotebookRun(path.stem, True, seconds, accel, page)
    cell = nb.cells[index] if index is not None and index < len(nb.cells) else None
    return NotebookRun(path.stem, False, seconds, accel, page,
                       cell=None if index is None else index + 1,
                       cell_id=str(cell.get("id", "")) if cell is not None else "",
                       error=_error_text(err, timeout))


# --------------------------------------------------------------------------- index

_CSS = """
body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em;color:#1f2328}
table{border-collapse:collapse;width:100%}th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left}
th{background:#f6f8fa}td.num{text-align:right}.ok{color:#1a7f37;font-weight:bold}
.fail{color:#cf222e;font-weight:bold}dt{font-weight:bold;float:left;width:10em}dd{margin-left:11em}
code{font-size:90%}
"""


def render_index(h: Handouts) -> str:
    """``index.html``: the summary table of a run (Spanish)."""
    e = html.escape
    rows = []
    for n, r in enumerate(h.runs, 1):
        name = f"<a href='{e(r.html)}'>{e(r.name)}</a>" if r.html else e(r.name)
        if r.passed:
            verdict, detail = "<span class='ok'>✔ sin errores</span>", ""
        else:
            verdict = "<span class='fail'>✘ falló</span>"
            where = f"celda {r.cell}" if r.cell else "antes de ejecutar"
            if r.html and r.cell_id:
                where = f"<a href='{e(r.html)}#cell-id={e(r.cell_id)}'>{where}</a>"
            detail = f"{where}: <code>{e(r.error)}</code>"
        rows.append(f"<tr><td class='num'>{n}</td><td>{name}</td><td>{verdict}</td>"
                    f"<td class='num'>{e(seconds_es(r.seconds))}</td><td>{e(r.accel)}</td><td>{detail}</td></tr>")
    ok = len(h.runs) - len(h.failed)
    stop = (" (<span class='fail'>interrumpido con Ctrl-C</span>: faltan los cuadernos siguientes)"
            if h.interrupted else "")
    return f"""<!DOCTYPE html>
<html lang="es"><head><meta charset="utf-8"><title>Lab KVM · apuntes ejecutados</title>
<style>{_CSS}</style></head><body>
<h1>Lab KVM · el curso ejecutado</h1>
<p>Cada cuaderno se ejecutó de principio a fin, en orden y sin intervención, en una copia de la carpeta
de cuadernos. Pulsa un nombre para ver sus apuntes en HTML, con las salidas de esta ejecución.</p>
<dl>
<dt>Resultado</dt><dd>{ok} de {_notebooks_es(len(h.runs))} sin errores{stop}</dd>
<dt>Equipo</dt><dd>{e(h.host)}</dd>
<dt>Fecha</dt><dd>{e(h.date)}</dd>
<dt>labkit</dt><dd>{e(h.version)}</dd>
<dt>Acelerador</dt><dd>{e(h.accel)} ({e(h.accel_reason)})</dd>
<dt>Tiempo total</dt><dd>{e(seconds_es(h.total_seconds))}</dd>
</dl>
<table>
<tr><th>#</th><th>Cuaderno</th><th>Resultado</th><th>Tiempo</th><th>Acelerador</th><th>Dónde falló</th></tr>
{chr(10).join(rows)}
</table>
</body></html>
"""


def write_index(h: Handouts) -> Path:
    """Write ``index.html`` and ``index.json`` into ``h.out``."""
    h.index.write_text(render_index(h), encoding="utf-8")
    (h.out / "index.json").write_text(json.dumps(h.to_dict(), indent=1, ensure_ascii=False) + "\n",
                                      encoding="utf-8")
    return h.index

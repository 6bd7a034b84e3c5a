"""The student's view: notebooks 00 and 06 run in JupyterLab inside a real browser.

JupyterLab (from .venv, on 127.0.0.1 with a random token) serves copies of the two
notebooks, stripped of their saved outputs and widget state so that everything seen comes
from this run. Headless Chromium (Debian's ``chromium``, driven by Playwright's Python
package; Playwright's own browser download is not used) opens each one, runs every cell
from the Run menu and waits until every code cell has an execution count. Then:

- 00: the host panel shows the verdict, accelerator and reason that ``labkit.probe()``
  computes on this host, and the quiz answers a click on an option and on «Comprobar» with
  the feedback ``labkit.quiz.grade`` gives (a wrong answer, then the right one, and the
  progress line follows);
- 06: the live benchmark plot (an ipywidgets Output) and the matplotlib figures arrive as
  decoded images of a real size, as many figures as the committed run of the notebook had;
- both: no cell shows a traceback, in the page or in the notebook as saved by the browser.

Full-page screenshots go to ``test-artifacts/browser/`` (kept, also when a check fails).
Kernels are shut down and JupyterLab's process group and Chromium are stopped in the
fixtures' teardown; a guest a kernel started dies with it (labkit's parent-death signal),
and the teardown checks that none of this test's processes, QEMU included, survives.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.browser]

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
ARTIFACTS = ROOT / "test-artifacts" / "browser"
NB00 = "00_preparacion.ipynb"
NB06 = "06_virtualizacion_por_software.ipynb"

# Upper bounds for waiting, not measurements: a run that needs longer has hung.
# In the browser here, notebook 00 runs in ~10 s (one TCG guest) and 06 in ~70 s (its quick
# benchmark boots TCG guests again and again); other guests on the shared 2 cores slow both.
SERVER_START_BOUND = 180
RUN_BOUND = {NB00: 600, NB06: 1500}
UI_BOUND_MS = 60_000
KERNEL_START_BOUND = 180

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser")
# Chromium as root in a closed network: no sandbox, no GPU, nothing that phones home.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]

# JupyterLab user settings for the test: never ask about (or fetch) Jupyter news, whose
# toast would cover part of the screenshots. Everything else stays at its default.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false"},
}


# --------------------------------------------------------------------------- helpers

def find_chromium() -> str | None:
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def strip_notebook(src: Path, dst: Path) -> dict[str, Any]:
    """Copy a notebook without outputs, execution counts or saved widget state, so that
    nothing the browser shows can come from the committed run. Returns the original."""
    original = json.loads(src.read_text(encoding="utf-8"))
    nb = json.loads(json.dumps(original))
    nb["metadata"].pop("widgets", None)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
            cell["metadata"].pop("execution", None)
    dst.write_text(json.dumps(nb, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return original


def code_cells(nb: dict[str, Any]) -> int:
    return sum(1 for cell in nb["cells"] if cell["cell_type"] == "code")


def committed_figures(nb: dict[str, Any]) -> int:
    """Top-level image outputs (matplotlib figures) in the committed run of a notebook."""
    return sum(
        1
        for cell in nb["cells"] if cell["cell_type"] == "code"
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    )


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line), from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        table[int(entry.name)] = (ppid, cmdline.strip())
    return table


def descendants(root: int) -> dict[int, str]:
    """Every live process below ``root`` (kernels run in their own session, so the
    process group of JupyterLab does not cover them): pid -> command line."""
    table = process_table()
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, cmd) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = cmd
                frontier.append(pid)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def labkit_guests() -> dict[int, str]:
    """``pgrep -af 'qemu-system-x86_64 -name labkit-'``: pid -> command line."""
    out = subprocess.run(["pgrep", "-af", "qemu-system-x86_64 -name labkit-"],
                         capture_output=True, text=True, check=False)
    guests = {}
    for line in out.stdout.splitlines():
        pid, _, cmd = line.partition(" ")
        guests[int(pid)] = cmd
    return guests


class Lab:
    """A running JupyterLab: base URL, token, the API, and its log."""

    def __init__(self, proc: subprocess.Popen, port: int, token: str, log: Path) -> None:
        self.proc, self.port, self.token, self.log = proc, port, token, log
        self.base = f"http://127.0.0.1:{port}"

    def api(self, method: str, path: str) -> Any:
        req = urllib.request.Request(f"{self.base}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def url(self, notebook: str, workspace: str) -> str:
        return f"{self.base}/lab/workspaces/{workspace}/tree/{notebook}?token={self.token}"

    def log_tail(self, n: int = 40) -> str:
        lines = self.log.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def shutdown_kernels(self) -> None:
        """Shut every kernel down through the API; then check that no process the server
        started (kernels and what they started: guests) is left, killing any that is.
        Kernels run in a session of their own, outside JupyterLab's process group."""
        ours = descendants(self.proc.pid)
        try:
            for session in self.api("GET", "/api/sessions"):
                self.api("DELETE", f"/api/sessions/{session['id']}")
            for kernel in self.api("GET", "/api/kernels"):
                self.api("DELETE", f"/api/kernels/{kernel['id']}")
        except (urllib.error.URLError, OSError):
            pass  # the server is gone: its kernels are checked below all the same
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in ours) and time.monotonic() < deadline:
            time.sleep(0.2)
        leftovers = {pid: cmd for pid, cmd in ours.items() if alive(pid)}
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        guests = [cmd for pid, cmd in labkit_guests().items() if pid in ours]
        assert not guests, f"invitados de esta prueba vivos tras apagar los núcleos: {guests}"
        assert not leftovers, f"procesos de la prueba vivos tras apagar los núcleos: {list(leftovers.values())}"


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("browser")


@pytest.fixture(scope="module")
def originals(workdir) -> dict[str, dict[str, Any]]:
    """The notebooks copied (stripped) into the server's root; returns the committed ones.

    Neither notebook opens a path relative to itself (they import labkit and write only
    to mkdtemp()), so the two files are all the server root needs."""
    root = workdir / "root"
    root.mkdir()
    return {name: strip_notebook(NOTEBOOKS / name, root / name) for name in (NB00, NB06)}


@pytest.fixture(scope="module")
def lab(workdir, originals) -> Iterator[Lab]:
    jupyter = ROOT / ".venv" / "bin" / "jupyter"
    if not jupyter.exists():
        jupyter = Path(sys.executable).with_name("jupyter")
    settings = workdir / "lab-settings"
    for rel, values in LAB_SETTINGS.items():
        path = settings / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values), encoding="utf-8")
    env = {
        **os.environ,
        # The quiz saves progress: into this test's folder, not the user's.
        "LABKIT_DATA_DIR": str(workdir / "labkit-data"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(workdir / "lab-workspaces"),
        "JUPYTER_RUNTIME_DIR": str(workdir / "jupyter-runtime"),
    }
    port, token = free_port(), secrets.token_hex(24)
    argv = [
        str(jupyter), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
        "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={workdir / 'root'}",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    if os.geteuid() == 0:
        argv.append("--allow-root")
    log = workdir / "jupyter.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    server = Lab(proc, port, token, log)
    try:
        deadline = time.monotonic() + SERVER_START_BOUND
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab terminó al arrancar (código {proc.returncode}):\n{server.log_tail()}")
            try:
                server.api("GET", "/api/status")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab no responde tras {SERVER_START_BOUND} s:\n{server.log_tail()}")
                time.sleep(0.5)
        yield server
    finally:
        try:
            if proc.poll() is None:
                server.shutdown_kernels()
        finally:
            stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM JupyterLab's process group, then SIGKILL after a grace period."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def browser(workdir) -> Iterator[Any]:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no hay chromium (./lab setup lo instala: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # launch() gives Chromium a new, empty --user-data-dir of its own.
        # Debian's chromium keeps crash reports under $XDG_CONFIG_HOME/chromium whatever
        # the profile: point it at this test's folder, not the user's home.
        env = {**os.environ, "XDG_CONFIG_HOME": str(workdir / "xdg-config"),
               "XDG_CACHE_HOME": str(workdir / "xdg-cache")}
        instance = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS, env=env)
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture
def page(browser, lab) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, locale="es-ES")
    pg = context.new_page()
    pg.set_default_timeout(UI_BOUND_MS)
    pg.on("dialog", lambda dialog: dialog.accept())  # e.g. "leave this page?"
    try:
        yield pg
    finally:
        context.close()
        lab.shutdown_kernels()  # free the CPU (and any guest) before the next notebook


# --------------------------------------------------------------------------- browser steps

def dismiss_dialogs(page: Any) -> None:
    """Accept any JupyterLab modal (e.g. kernel selection) that is open."""
    for _ in range(5):
        dialog = page.locator(".jp-Dialog")
        if dialog.count() == 0:
            return
        dialog.locator(".jp-Dialog-button.jp-mod-accept").first.click()
        page.wait_for_timeout(300)


def open_notebook(page: Any, lab: Lab, name: str, n_code: int) -> Any:
    """Open ``name`` in its own workspace and wait until its cells are shown and its
    kernel has started and is idle (running cells before that asks for a kernel)."""
    page.goto(lab.url(name, workspace=Path(name).stem), wait_until="domcontentloaded")
    panel = page.locator(".jp-NotebookPanel").filter(has=page.locator(".jp-Cell")).first
    panel.wait_for(state="visible")
    deadline = time.monotonic() + KERNEL_START_BOUND
    while True:
        dismiss_dialogs(page)
        shown = panel.locator(".jp-CodeCell .jp-InputArea-prompt").count()
        states = [s["kernel"]["execution_state"] for s in lab.api("GET", "/api/sessions")
                  if s["path"] == name and s.get("kernel")]
        indicator = panel.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").count()
        if shown == n_code and states == ["idle"] and indicator:
            return panel
        if time.monotonic() > deadline:
            pytest.fail(f"{name}: el cuaderno no quedó listo en {KERNEL_START_BOUND} s "
                        f"(celdas de código visibles {shown} de {n_code}, núcleo {states})")
        page.wait_for_timeout(500)


def run_all(page: Any) -> None:
    """Run > Run All Cells, from the menu bar, as a student would."""
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^\s*Run\s*$")).click()
    page.locator(".lm-Menu-item", has_text=re.compile(r"^\s*Run All Cells\s*")).first.click()


def wait_until_done(page: Any, notebook: Any, n_code: int, bound: float) -> None:
    """Until every code cell shows an execution count (none ``[*]`` or empty) and the
    kernel is idle again. Fails, with the prompts seen, after ``bound`` seconds."""
    prompts = notebook.locator(".jp-CodeCell .jp-InputArea-prompt")
    deadline = time.monotonic() + bound
    seen: list[str] = []
    while time.monotonic() < deadline:
        dialog = page.locator(".jp-Dialog")
        if dialog.count():  # e.g. "kernel died": say so now rather than wait for the bound
            pytest.fail(f"JupyterLab abrió un diálogo durante la ejecución: {dialog.first.inner_text()!r}")
        # textContent: innerText is empty for cells the browser skips while off screen
        # (JupyterLab's default content-visibility windowing).
        seen = [t.strip() for t in prompts.all_text_contents()]
        done = len(seen) == n_code and all(re.fullmatch(r"\[\d+\]:", t) for t in seen)
        idle = notebook.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").count() > 0
        if done and idle:
            return
        page.wait_for_timeout(1000)
    pytest.fail(f"las celdas no terminaron en {bound:.0f} s; indicadores de las celdas: {seen}")


def assert_no_errors(page: Any, notebook: Any, lab: Lab, name: str) -> None:
    """No traceback in the page, and none in the notebook the browser saves."""
    stderr = notebook.locator('.jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"]')
    tracebacks = [t for t in stderr.all_text_contents()
                  if "Traceback" in t or re.search(r"^\w*(Error|Exception)\b", t, re.M)]
    assert not tracebacks, f"{name}: celdas con error en el navegador:\n" + "\n---\n".join(tracebacks)
    # Save from the browser (Ctrl+S) and read the file back: no output of type "error",
    # and every code cell ran.
    notebook.locator(".jp-Cell").first.click()
    page.keyboard.press("Escape")
    page.keyboard.press("Control+s")
    saved = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        model = lab.api("GET", f"/api/contents/{name}?content=1")["content"]
        code = [c for c in model["cells"] if c["cell_type"] == "code"]
        if all(c.get("execution_count") for c in code):
            saved = code
            break
        page.wait_for_timeout(500)
    assert saved is not None, f"{name}: el navegador no guardó el cuaderno ejecutado"
    errors = [f"{o.get('ename')}: {o.get('evalue')}" for c in saved for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, f"{name}: salidas de error en el cuaderno guardado: {errors}"


def screenshot(page: Any, name: str) -> Path:
    """A screenshot of the whole notebook: the page is made as tall as its content
    (JupyterLab scrolls inside the notebook panel, so full_page alone sees one screen)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    height = page.evaluate(
        """() => {
            const outer = document.querySelector('.jp-NotebookPanel .jp-WindowedPanel-outer');
            const panel = document.querySelector('.jp-NotebookPanel');
            if (!outer || !panel) return 1000;
            return outer.scrollHeight + panel.getBoundingClientRect().top + 60;
        }"""
    )
    page.set_viewport_size({"width": 1400, "height": int(min(max(height, 1000), 16000))})
    page.evaluate("() => document.querySelectorAll('.jp-WindowedPanel-outer').forEach(e => e.scrollTop = 0)")
    page.wait_for_timeout(1500)  # layout and images settle at the new size
    path = ARTIFACTS / f"{Path(name).stem}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def shown_on_screen(locator: Any) -> Any:
    """The first match, scrolled into view and checked visible (what a student sees)."""
    from playwright.sync_api import expect

    first = locator.first
    first.wait_for(state="attached")
    first.scroll_into_view_if_needed()
    first.wait_for(state="visible")
    # Off screen, the browser skips rendering the cell; its innerText fills in a frame later.
    expect(first).not_to_have_text(re.compile(r"^\s*$"), use_inner_text=True)
    return first


@contextlib.contextmanager
def screenshot_afterwards(page: Any, name: str) -> Iterator[None]:
    """Keep a screenshot whatever happens; when a check already failed, a failing
    screenshot must not hide that failure."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            screenshot(page, name)
        raise
    screenshot(page, name)


# --------------------------------------------------------------------------- tests

def test_notebook_00_widgets_render_and_answer(page, lab, originals):
    from labkit.host import probe
    from labkit.quiz import grade, load_bank, markdown_to_text

    report = probe()
    cells = code_cells(originals[NB00])
    nb = open_notebook(page, lab, NB00, cells)
    run_all(page)
    with screenshot_afterwards(page, NB00):
        wait_until_done(page, nb, cells, RUN_BOUND[NB00])

        # The host panel: the same verdict, accelerator and reason as the probe here.
        verdict = shown_on_screen(nb.locator(".widget-html", has_text=re.compile("Veredicto: ")))
        text = " ".join(verdict.inner_text().split())
        assert f"Veredicto: {report.verdict}" in text
        assert f"acelerador: {report.accelerator}" in text
        assert " ".join(report.reason.split()) in text
        summary = shown_on_screen(nb.locator(".widget-label", has_text="comprobaciones"))
        n = len(report.checks)
        assert f"{n} de {n} comprobaciones" in summary.inner_text()

        # The quiz: a wrong option, then the right one, each graded by the kernel.
        bank = load_bank("00_preparacion")
        question = next(q for q in bank if q.kind == "single")
        prompt = markdown_to_text(question.prompt).split("\n\n")[0][:40]
        box = (nb.locator(".widget-vbox")
               .filter(has=page.locator(".widget-html", has_text=prompt))
               .filter(has=page.locator(".widget-radio-box"))
               .last)
        shown_on_screen(box)
        wrong = next(o for o in question.options if o.key not in question.correct)
        right = next(o for o in question.options if o.key in question.correct)
        for option in (wrong, right):
            expected = grade(question, option.key)
            box.locator(".widget-radio-box label", has_text=markdown_to_text(option.text)).click()
            box.get_by_role("button", name="Comprobar").click()
            mark = "✔" if expected.correct else "✘"
            box.locator(".widget-html", has_text=f"{mark} {expected.message}").wait_for(state="visible")
        progress = shown_on_screen(nb.locator(".widget-html", has_text="Progreso:"))
        assert f"1/{len(bank)} correctas" in progress.inner_text()

        assert_no_errors(page, nb, lab, NB00)


def test_notebook_06_plots_render(page, lab, originals):
    cells = code_cells(originals[NB06])
    nb = open_notebook(page, lab, NB06, cells)
    run_all(page)
    with screenshot_afterwards(page, NB06):
        wait_until_done(page, nb, cells, RUN_BOUND[NB06])

        # Every image in the cells' outputs: decoded size, and whether it sits inside a
        # widget (the live plot is an ipywidgets Output) or is a cell's own output.
        found = nb.locator(".jp-Cell-outputArea .jp-RenderedImage img").evaluate_all(
            """els => els.map(e => ({w: e.naturalWidth, h: e.naturalHeight, done: e.complete,
                                      widget: e.closest('.jupyter-widgets') !== null}))""")

        def real(images: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [i for i in images if i["done"] and i["w"] >= 200 and i["h"] >= 150]

        # The live plot: redrawn inside the benchmark's progress widget as results came in.
        live = [i for i in found if i["widget"]]
        assert real(live), f"la gráfica en vivo no se ve como imagen: {found}"
        # The figures the cells display: as many as in the committed run, all decoded.
        expected = committed_figures(originals[NB06])
        figures = [i for i in found if not i["widget"]]
        assert expected > 0
        assert len(real(figures)) == expected, f"se esperaban {expected} figuras: {figures}"

        assert_no_errors(page, nb, lab, NB06)

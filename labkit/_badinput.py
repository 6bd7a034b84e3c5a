"""The bad-input matrix: what labkit answers to wrong sizes, paths, names, commands and CLI arguments.

The cases are data (:data:`CASES`): an id, where the input goes (a call or a command line), the
input as shown, and the expected outcome. One list drives both ``tests/test_bad_input.py`` and the
generator of ``docs/bad_input.md``::

    .venv/bin/python -m labkit._badinput      # runs every case (one TCG guest) and writes the doc

A case passes when it ends as expected *and* leaves everything as it was:

- an error is a labkit error whose message and hint are Spanish (a tool's own words may be quoted
  between «»); on the command line, the exit status expected, the message on stderr and no Python
  traceback;
- no file of the workspace changed (type, mode, size, mtime and sha256 compared before and after);
- no runtime dir, temp dir, socket, process or libvirt domain is left behind, and the shared guest
  still answers.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .devices import disks as dd
from .devices import files
from .errors import LabkitError
from .guest import Guest, GuestSpec
from .guest.spec import ChannelSpec, DiskSpec, ShareSpec, UsbSpec

__all__ = ["CASES", "Case", "CliRun", "Outcome", "Workspace", "render", "run_case", "main"]

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_input.md"
PREFIX = "labkit-badinput"
#: A command line that does not end by then has failed (e.g. a bench that should have been refused).
CLI_TIMEOUT = 180.0


@dataclass(frozen=True)
class CliRun:
    """One run of ``python -m labkit.cli``."""

    args: tuple[str, ...]
    returncode: int | None  # None: it did not end in CLI_TIMEOUT and was stopped
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Case:
    """One bad input: ``action(ws)`` feeds it to labkit; ``expect`` is an error class name (the
    error must be that class or a subclass), ``"exit N"`` for the command line, or ``"ok"``."""

    id: str
    area: str
    entry: str  # where the input goes, as shown in the doc
    given: str  # the input, as shown in the doc
    expect: str
    action: Callable[[Workspace], Any]
    needs: str = ""  # "guest" (the shared running guest), "libvirt" (talks to libvirtd), "root" or ""
    check: Callable[[Workspace, Any], str | None] | None = None  # extra check: a problem or None
    creates: tuple[str, ...] = ()  # files the case may add to the workspace (relative paths)


@dataclass
class Outcome:
    """What a case did: the error (class and Spanish text) or the result, and what went wrong."""

    case: Case
    result: str  # "InputError", "exit 2", "ok" ...
    message: str = ""
    hint: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def report(self) -> str:
        text = f"{self.case.id}: se esperaba {self.case.expect}, se obtuvo {self.result}"
        if self.message:
            text += f"\n  mensaje: {self.message}"
        if self.hint:
            text += f"\n  qué hacer: {self.hint}"
        return text + "".join(f"\n  PROBLEMA: {p}" for p in self.problems)


# --------------------------------------------------------------------------- the workspace


class Workspace:
    """A private playground: fixture files, a private temp dir (``tempfile.tempdir`` and the CLI's
    TMPDIR while it is open, so every runtime dir a case makes lands there) and, on demand, one
    shared TCG guest (``pc``: hot-plug works there)."""

    def __init__(self, *, assets: Any = None) -> None:
        self._assets = assets
        self.root = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-"))
        self.files = self.root / "files"
        self.tmp = self.root / "tmp"
        self._guest: Guest | None = None
        self._saved: tuple[Any, str | None] | None = None

    # fixture paths
    @property
    def image(self) -> Path:
        return self.files / "disco.qcow2"

    @property
    def raw(self) -> Path:
        return self.files / "datos.raw"

    @property
    def folder(self) -> Path:
        return self.files / "carpeta"

    @property
    def text(self) -> Path:
        return self.files / "fichero.txt"

    @property
    def report(self) -> Path:
        return self.files / "informe.txt"

    @property
    def linked(self) -> Path:
        return self.files / "con-enlace"

    @property
    def private(self) -> Path:
        return self.files / "privada"

    def missing(self, name: str = "no-existe.qcow2") -> Path:
        return self.files / "no-hay" / name

    def __enter__(self) -> Workspace:
        self._saved = (tempfile.tempdir, os.environ.pop("XDG_RUNTIME_DIR", None))
        try:
            self._make_files()
        except BaseException:
            self.close()
            raise
        return self

    def _make_files(self) -> None:
        self.files.mkdir()
        self.tmp.mkdir()
        tempfile.tempdir = str(self.tmp)
        dd.create(self.image, "16M", "qcow2")
        dd.create(self.raw, "1M", "raw")
        self.folder.mkdir()
        (self.folder / "dentro.txt").write_text("dentro\n")
        self.text.write_text("no es JSON ni una imagen\n")
        self.report.write_text("un informe que no se debe perder\n")
        self.linked.mkdir()
        (self.linked / "fuera").symlink_to(self.text)
        self.private.mkdir(mode=0o700)
        self.root.chmod(0o755)  # so that «nobody» reaches files/privada and is refused there
        self.files.chmod(0o755)

    def close(self) -> None:
        if self._guest is not None:
            self._guest.stop()
            self._guest = None
        if self._saved is not None:
            tempfile.tempdir, xdg = self._saved
            if xdg is not None:
                os.environ["XDG_RUNTIME_DIR"] = xdg
            self._saved = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def assets(self) -> Any:
        if self._assets is None:
            from .guest.assets import ensure_assets

            self._assets = ensure_assets()
        return self._assets

    @property
    def guest(self) -> Guest:
        """The shared guest, started on first use."""
        if self._guest is None:
            spec = GuestSpec(name=PREFIX, machine="pc", accel="tcg", channels=(ChannelSpec("org.labkit.badinput.0"),))
            self._guest = Guest(spec, assets=self.assets, boot_timeout=180).start()
        return self._guest

    def boot(self, *, libvirt: bool = False, **spec: Any) -> Any:
        """Start a guest (a libvirt domain with ``libvirt``) that should be refused before or while
        starting; stopped in any case."""
        cls: Any = Guest
        if libvirt:
            from .guest.libvirt import LibvirtGuest as cls
        g = cls(GuestSpec(accel="tcg", **spec), assets=self.assets, boot_timeout=60)
        try:
            return g.start()
        finally:
            g.stop()

    def cli(self, *args: str | os.PathLike[str], nobody: bool = False) -> CliRun:
        """``python -m labkit.cli ARGS`` (as user «nobody» with ``nobody``), argument list, no shell."""
        argv = [sys.executable, "-m", "labkit.cli", *map(str, args)]
        if nobody:
            argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", *argv]
        env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
        env.update(TMPDIR=str(self.tmp), PYTHONDONTWRITEBYTECODE="1")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, errors="replace", env=env, cwd="/", start_new_session=True)
        try:
            out, err = proc.communicate(timeout=CLI_TIMEOUT)
            code: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # the session we started for it, nothing else
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
            code = None
        return CliRun(tuple(map(str, args)), code, out, err)

    def shown(self, text: str) -> str:
        """Paths of this workspace written the same way on every run (for the doc)."""
        text = text.replace(str(self.files), "<tmp>").replace(str(self.tmp), "<tmp>").replace(str(self.root), "<tmp>")
        if os.getcwd() != "/":
            text = text.replace(os.getcwd() + "/", "<cwd>/")
        return text.encode(errors="backslashreplace").decode()  # a name with non-UTF-8 bytes, written as \xff


# --------------------------------------------------------------------------- before / after


def _files_state(root: Path) -> dict[str, tuple[Any, ...]]:
    state: dict[str, tuple[Any, ...]] = {}
    for directory, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(directory) / name
            st = path.lstat()
            digest = ""
            if path.is_file() and not path.is_symlink():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            state[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return state


def _children(pid: int) -> set[int]:
    """Live descendants of ``pid`` (zombies excluded)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _libvirt_leftovers() -> set[str]:
    from .guest.libvirt import RUNTIME_DIR

    return {p.name for p in RUNTIME_DIR.glob(f"{PREFIX}*")} if RUNTIME_DIR.is_dir() else set()


def _libvirt_domains() -> set[str]:
    from .guest.libvirt import connect

    conn = connect()
    try:
        return {d.name() for d in conn.listAllDomains(0) if d.name().startswith(PREFIX)}
    finally:
        conn.close()


@dataclass
class _Snapshot:
    files: dict[str, tuple[Any, ...]]
    tmp: set[str]
    children: set[int]
    libvirt: set[str]


def _snapshot(ws: Workspace) -> _Snapshot:
    keep: set[int] = set()
    skip = ""
    if ws._guest is not None and ws._guest.running:
        keep = {ws._guest.pid or 0}
        skip = str(ws._guest._runtime.directory) if ws._guest._runtime else ""
    tmp = {str(p) for p in ws.tmp.rglob("*") if not (skip and str(p).startswith(skip))}
    return _Snapshot(_files_state(ws.files), tmp, _children(os.getpid()) - keep, _libvirt_leftovers())


def _compare(before: _Snapshot, after: _Snapshot, case: Case, ws: Workspace) -> list[str]:
    problems = []
    for name, state in before.files.items():
        if name not in after.files:
            problems.append(f"se borró «{name}»")
        elif after.files[name] != state:
            problems.append(f"cambió «{name}» (contenido, tamaño, modo o fecha)")
    for name in sorted(set(after.files) - set(before.files)):
        if name not in case.creates:
            problems.append(f"apareció «{name}»")
    base = str(ws.tmp / f"labkit-{os.getuid()}")  # the runtime base itself may appear (empty)
    for name in sorted(after.tmp - before.tmp - {base}):
        problems.append(f"quedó en la carpeta temporal: {ws.shown(name)}")
    for pid in sorted(after.children - before.children):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        problems.append(f"quedó un proceso: {pid} {cmd[:120]}")
    for name in sorted(after.libvirt - before.libvirt):
        problems.append(f"quedó la carpeta de libvirt /run/labkit-libvirt/{name}")
    return problems


# --------------------------------------------------------------------------- judging the text

_QUOTED = re.compile(r"«[^»]*»|'[^'\n]*'|\"[^\"\n]*\"")
_ENGLISH = re.compile(r"\b(usage|invalid|argument|choose from|expected|required|not found|no such file|"
                      r"permission denied|traceback|failed|unrecognized|error was|could not|cannot|"
                      r"does not|is not|must be|unable)\b", re.I)
_SPANISH = re.compile(r"\b(no|de|la|el|en|es|un|una|que|con|para|los|las|del|se|sin|hay|ya|falta|faltan|usa|"
                      r"indica|elige|desconocid[oa]s?)\b|[áéíóúñ¿¡]", re.I)


def _language_problems(text: str, what: str) -> list[str]:
    """English outside quotes, or no Spanish at all (judge a message together with its hint)."""
    bare = _QUOTED.sub("", text)
    problems = []
    english = sorted({m.group(0).lower() for m in _ENGLISH.finditer(bare)})
    if english:
        problems.append(f"{what} con palabras en inglés fuera de comillas: {', '.join(english)}")
    if not _SPANISH.search(bare):
        problems.append(f"{what} no parece español: {text[:120]!r}")
    return problems


def _judge_error(case: Case, err: Exception) -> Outcome:
    names = [k.__name__ for k in type(err).__mro__]
    if not isinstance(err, LabkitError):
        return Outcome(case, type(err).__name__, str(err),
                       problems=[f"excepción de Python sin traducir: {type(err).__name__}: {err}"])
    outcome = Outcome(case, type(err).__name__, err.message, err.hint)
    if case.expect not in names:
        outcome.problems.append(f"error {type(err).__name__} en lugar de {case.expect}")
    if not err.hint.strip():
        outcome.problems.append("el error no dice qué hacer (hint vacío)")
    outcome.problems += _language_problems(f"{err.message}\n{err.hint}", "el mensaje")
    return outcome


def _judge_cli(case: Case, run: CliRun) -> Outcome:
    if run.returncode is None:
        return Outcome(case, "sin terminar", run.stderr[-300:],
                       problems=[f"la orden no terminó en {CLI_TIMEOUT:g} s y se paró"])
    text = run.stderr.strip()
    # for the doc: argparse's usage lines dropped, labkit's «Qué hacer» as the hint
    shown = re.sub(r"(?s)\Auso: .*?\n(?=\S+(?: \S+)*: error: )", "", text).removeprefix("labkit: ")
    message, _, hint = shown.partition("\n  Qué hacer: ")
    if not hint and "\nPrueba «" in message:
        message, _, hint = message.partition("\nPrueba «")
        hint = "Prueba «" + hint
    outcome = Outcome(case, f"exit {run.returncode}", message, hint)
    if "Traceback" in run.stderr:
        outcome.problems.append("traza de Python en la salida de error")
    if case.expect != outcome.result:
        outcome.problems.append(f"estado de salida {run.returncode} en lugar de {case.expect.split()[-1]}")
    if not text:
        outcome.problems.append("no dijo nada en la salida de error")
    else:
        outcome.problems += _language_problems(text, "la salida de error")
        if "Qué hacer:" not in text and "Prueba «" not in text:
            outcome.problems.append("la salida de error no dice qué hacer")
    return outcome


def run_case(case: Case, ws: Workspace) -> Outcome:
    """Feed one bad input to labkit and judge what happened (the result and what it left)."""
    if case.needs == "guest":
        ws.guest  # noqa: B018 - started before the snapshot, so its sockets are not leftovers
    before = _snapshot(ws)
    domains = _libvirt_domains() if case.needs == "libvirt" else set()
    value: Any = None
    try:
        value = case.action(ws)
    except Exception as err:  # noqa: BLE001 - judged below (Ctrl-C still stops the run)
        value = err
    if isinstance(value, CliRun):
        outcome = _judge_cli(case, value)
    elif isinstance(value, Exception):
        outcome = _judge_error(case, value)
    else:
        outcome = Outcome(case, "ok", ws.shown(_short(value)))
        if case.expect != "ok":
            outcome.problems.append(f"no hubo error: se esperaba {case.expect}")
    outcome.message = ws.shown(outcome.message)
    outcome.hint = ws.shown(outcome.hint)
    if case.check is not None and not outcome.problems:
        problem = case.check(ws, value)
        if problem:
            outcome.problems.append(problem)
    if case.needs == "guest":
        try:  # the agent and QMP both still answer
            alive = (ws.guest.run("echo vivo", timeout=60).stdout == "vivo\n"
                     and ws.guest.qmp("query-status")["status"] == "running")
        except Exception as err:  # noqa: BLE001 - any failure here is the finding
            detail = err.message if isinstance(err, LabkitError) else f"{type(err).__name__}: {err}"
            alive, outcome.message = False, f"{outcome.message} / después: {detail}"
        if not alive:
            outcome.problems.append("el invitado compartido dejó de responder")
    outcome.problems += _compare(before, _snapshot(ws), case, ws)
    if case.needs == "libvirt":
        outcome.problems += [f"quedó el dominio {d}" for d in sorted(_libvirt_domains() - domains)]
    return outcome


def _short(value: Any) -> str:
    from .guest.runner import CommandResult

    if isinstance(value, CommandResult):
        return (f"estado {value.exit_status}, {len(value.stdout)} caracteres de salida"
                + (" (recortada por el agente)" if value.truncated else "") + f": {value.stdout[:40]!r}")
    if isinstance(value, dd.ImageInfo):
        return f"imagen {value.format} de {dd.format_size(value.virtual_size)} en «{value.path}»"
    if isinstance(value, ShareSpec):
        return f"ShareSpec(path={value.path!r}, tag={value.tag!r})"
    return repr(value)[:200]


# --------------------------------------------------------------------------- the cases


def _checks(*items: tuple[bool, str]) -> str | None:
    return next((text for ok, text in items if not ok), None)


def _copy(source: Path, dest: Path) -> Path:
    shutil.copyfile(source, dest)
    return dest


def _host_memory_plus_1g() -> str:
    from .guest.runner import host_memory_mib

    return f"{(host_memory_mib() or 0) + 1024}M"


def _timeout_check(ws: Workspace, _err: Any) -> str | None:
    return _checks(("sleep 1000" not in ws.guest.run("ps").stdout, "la orden sigue viva en el invitado"))


def _truncated_check(_ws: Workspace, r: Any) -> str | None:
    return _checks((r.ok, f"estado {r.exit_status}"), (r.truncated, "no se marcó como recortada"),
                   (0 < len(r.stdout) <= 16 << 20, f"{len(r.stdout)} caracteres"),
                   (set(r.stdout) == {"x"}, "salida rara"))


_NON_UTF8 = os.fsdecode(b"/tmp/\xff\xfe")
_SPEC = "GuestSpec(...)"
_START = "Guest(...).start()"


def _spec(key: str, value: Any) -> Callable[[Workspace], Any]:
    return lambda ws: GuestSpec(**{key: value})


def _api(id: str, area: str, entry: str, given: str, expect: str, action: Callable[[Workspace], Any],
         **extra: Any) -> Case:
    return Case(id, area, entry, given, expect, action, **extra)


def _cli(id: str, given: str, expect: str, args: Callable[[Workspace], Sequence[Any]], *,
         nobody: bool = False) -> Case:
    return Case(id, "línea de órdenes", "labkit" + (" (como «nobody»)" if nobody else ""), given, expect,
                lambda ws: ws.cli(*args(ws), nobody=nobody), needs="root" if nobody else "")


CASES: tuple[Case, ...] = (
    # memory and vCPUs
    _api("memoria-cero", "memoria y vCPU", _SPEC, 'memory="0"', "InputError", _spec("memory", "0")),
    _api("memoria-negativa", "memoria y vCPU", _SPEC, 'memory="-1"', "InputError", _spec("memory", "-1")),
    _api("memoria-texto", "memoria y vCPU", _SPEC, 'memory="abc"', "InputError", _spec("memory", "abc")),
    _api("memoria-1T", "memoria y vCPU", _SPEC, 'memory="1T"', "InputError", _spec("memory", "1T")),
    _api("memoria-mas-que-el-anfitrion", "memoria y vCPU", _START, "memory = la del anfitrión + 1 GiB",
         "InputError", lambda ws: ws.boot(name=f"{PREFIX}-ram", memory=_host_memory_plus_1g())),
    _api("vcpu-texto", "memoria y vCPU", _SPEC, 'vcpus="abc"', "InputError", _spec("vcpus", "abc")),
    _api("vcpu-cero", "memoria y vCPU", _SPEC, "vcpus=0", "InputError", _spec("vcpus", 0)),
    _api("vcpu-10000", "memoria y vCPU", _SPEC, "vcpus=10000", "InputError", _spec("vcpus", 10000)),
    # accelerators
    _api("acelerador-mayusculas", "acelerador", _SPEC, 'accel="KVM" (se acepta como «kvm»)', "ok",
         lambda ws: _spec("accel", "KVM")(ws).accel),
    _api("nombre-none", "nombres de invitado", _SPEC, "name=None", "InputError", _spec("name", None)),
    _api("cmdline-none", "nombres de invitado", _SPEC, "cmdline=None", "InputError", _spec("cmdline", None)),
    _api("discos-texto", "rutas de imágenes", _SPEC, 'disks="disco.qcow2" (no una lista)', "InputError",
         _spec("disks", "disco.qcow2")),
    _api("acelerador-xen", "acelerador", _SPEC, 'accel="xen"', "InputError", _spec("accel", "xen")),
    _api("acelerador-vacio", "acelerador", _SPEC, 'accel=""', "InputError", _spec("accel", "")),
    # guest names
    _api("nombre-barra", "nombres de invitado", _SPEC, 'name="a/b"', "InputError", _spec("name", "a/b")),
    _api("nombre-espacios", "nombres de invitado", _SPEC, 'name="mi invitado"', "InputError",
         _spec("name", "mi invitado")),
    _api("nombre-vacio", "nombres de invitado", _SPEC, 'name=""', "InputError", _spec("name", "")),
    _api("nombre-largo", "nombres de invitado", _SPEC, 'name="x" × 100', "InputError", _spec("name", "x" * 100)),
    _api("nombre-unicode", "nombres de invitado", _SPEC, 'name="máquina"', "InputError", _spec("name", "máquina")),
    # disk sizes
    _api("disco-cero", "tamaños de disco", "disks.create(ruta, tamaño)", "0", "InputError",
         lambda ws: dd.create(ws.files / "nuevo.qcow2", 0)),
    _api("disco-negativo", "tamaños de disco", "disks.create(ruta, tamaño)", '"-1G"', "InputError",
         lambda ws: dd.create(ws.files / "nuevo.qcow2", "-1G")),
    _api("disco-enorme", "tamaños de disco", "disks.create(ruta, tamaño)", '"2T"', "InputError",
         lambda ws: dd.create(ws.files / "nuevo.qcow2", "2T")),
    _api("disco-petabyte", "tamaños de disco", "disks.create(ruta, tamaño)", '"1P"', "InputError",
         lambda ws: dd.create(ws.files / "nuevo.qcow2", "1P")),
    _api("disco-basura", "tamaños de disco", "disks.create(ruta, tamaño)", '"mucho"', "InputError",
         lambda ws: dd.create(ws.files / "nuevo.qcow2", "mucho")),
    _api("redimensionar-negativo", "tamaños de disco", "disks.resize(ruta, tamaño)", '"-5G"', "InputError",
         lambda ws: dd.resize(ws.image, "-5G")),
    # image paths
    _api("crear-sobre-existente", "rutas de imágenes", "disks.create(ruta, tamaño)", "una imagen que ya existe",
         "InputError", lambda ws: dd.create(ws.image, "1G")),
    _api("convertir-sobre-existente", "rutas de imágenes", "disks.convert(origen, destino, formato)",
         "destino: una imagen que ya existe", "InputError", lambda ws: dd.convert(ws.raw, ws.image, "qcow2")),
    _api("reducir-imagen", "rutas de imágenes", "disks.resize(ruta, tamaño)", '"1M" (menor que la imagen)',
         "InputError", lambda ws: dd.resize(ws.image, "1M")),
    _api("crear-en-carpeta-inexistente", "rutas de imágenes", "disks.create(ruta, tamaño)",
         "<tmp>/no-hay/no-existe.qcow2", "InputError", lambda ws: dd.create(ws.missing(), "1G")),
    _api("crear-sobre-carpeta", "rutas de imágenes", "disks.create(ruta, tamaño)", "una carpeta", "InputError",
         lambda ws: dd.create(ws.folder, "1G")),
    _api("crear-bajo-fichero", "rutas de imágenes", "disks.create(ruta, tamaño)", "<tmp>/fichero.txt/d.qcow2",
         "InputError", lambda ws: dd.create(ws.text / "d.qcow2", "1G")),
    _api("crear-en-proc", "rutas de imágenes", "disks.create(ruta, tamaño)", "/proc/labkit.qcow2 (no se puede crear)",
         "QemuImgError", lambda ws: dd.create("/proc/labkit-badinput.qcow2", "1M")),
    _api("crear-con-espacios", "rutas de imágenes", "disks.create(ruta, tamaño)", '"mi disco.qcow2"', "ok",
         lambda ws: dd.create(ws.files / "mi disco.qcow2", "16M"), creates=("mi disco.qcow2",),
         check=lambda ws, i: _checks((i.format == "qcow2" and i.path.name == "mi disco.qcow2", "imagen rara"))),
    _api("crear-con-salto-de-linea", "rutas de imágenes", "disks.create(ruta, tamaño)", '"a\\nb.qcow2"',
         "InputError", lambda ws: dd.create(ws.files / "a\nb.qcow2", "16M")),
    _api("crear-no-utf8", "rutas de imágenes", "disks.create(ruta, tamaño)", "b\"disco-\\xff.qcow2\" (os.fsdecode)",
         "ok", lambda ws: dd.create(ws.files / os.fsdecode(b"disco-\xff.qcow2"), "16M"),
         creates=(os.fsdecode(b"disco-\xff.qcow2"),),
         check=lambda ws, i: _checks((dd.info(i.path).format == "qcow2", "no se relee"))),
    _api("info-inexistente", "rutas de imágenes", "disks.info(ruta)", "<tmp>/no-hay/no-existe.qcow2",
         "InputError", lambda ws: dd.info(ws.missing())),
    _api("info-byte-nulo", "rutas de imágenes", "disks.info(ruta)", '"disco\\0.qcow2"', "InputError",
         lambda ws: dd.info(ws.files / "disco\0.qcow2")),
    _api("info-carpeta", "rutas de imágenes", "disks.info(ruta)", "una carpeta", "InputError",
         lambda ws: dd.info(ws.folder)),
    _api("arranque-disco-inexistente", "rutas de imágenes", _START, "disks=(DiskSpec(<no existe>),)", "InputError",
         lambda ws: ws.boot(name=f"{PREFIX}-d1", disks=(DiskSpec(str(ws.missing())),))),
    _api("arranque-disco-carpeta", "rutas de imágenes", _START, "disks=(DiskSpec(<carpeta>),)", "InputError",
         lambda ws: ws.boot(name=f"{PREFIX}-d2", disks=(DiskSpec(str(ws.folder)),))),
    _api("arranque-disco-inexistente-libvirt", "rutas de imágenes", "LibvirtGuest(...).start()",
         "disks=(DiskSpec(<no existe>),)", "InputError",
         lambda ws: ws.boot(libvirt=True, name=f"{PREFIX}-d3", disks=(DiskSpec(str(ws.missing())),)), needs="libvirt"),
    _api("disco-ruta-con-salto", "rutas de imágenes", "DiskSpec(ruta)", '"a\\nb.qcow2"', "InputError",
         lambda ws: DiskSpec("a\nb.qcow2")),
    # shared folders
    _api("compartir-inexistente", "carpetas compartidas", _START, "shares=(ShareSpec(<no existe>),)",
         "ShareRefused", lambda ws: ws.boot(name=f"{PREFIX}-s1", machine="pc",
                                            shares=(ShareSpec(str(ws.missing("carpeta"))),))),
    _api("compartir-fichero", "carpetas compartidas", _START, "shares=(ShareSpec(<un fichero>),)", "ShareRefused",
         lambda ws: ws.boot(name=f"{PREFIX}-s2", machine="pc", shares=(ShareSpec(str(ws.text)),))),
    _api("compartir-raiz", "carpetas compartidas", _START, 'shares=(ShareSpec("/"),)', "ShareRefused",
         lambda ws: ws.boot(name=f"{PREFIX}-s3", machine="pc", shares=(ShareSpec("/"),))),
    _api("compartir-home", "carpetas compartidas", _START, 'shares=(ShareSpec("~"),)', "ShareRefused",
         lambda ws: ws.boot(name=f"{PREFIX}-s4", machine="pc", shares=(ShareSpec("~"),))),
    _api("compartir-enlace-que-sale", "carpetas compartidas", _START,
         "una carpeta con un enlace simbólico que apunta fuera", "ShareRefused",
         lambda ws: ws.boot(name=f"{PREFIX}-s5", machine="pc", shares=(ShareSpec(str(ws.linked)),))),
    _api("compartir-relativa", "carpetas compartidas", "ShareSpec(ruta)", '"compartida" (relativa)', "ok",
         lambda ws: ShareSpec("compartida"),
         check=lambda ws, s: _checks((s.path == os.path.join(os.getcwd(), "compartida"), f"ruta {s.path}"))),
    _api("compartir-raiz-libvirt", "carpetas compartidas", "LibvirtGuest(...).start()", 'shares=(ShareSpec("/"),)',
         "ShareRefused", lambda ws: ws.boot(libvirt=True, name=f"{PREFIX}-s6", machine="pc", shares=(ShareSpec("/"),)),
         needs="libvirt"),
    # USB
    _api("usb-bus-texto", "USB", "UsbSpec(...)", 'kind="host", hostbus="1-2", hostaddr=3', "InputError",
         lambda ws: UsbSpec("host", hostbus="1-2", hostaddr=3)),
    _api("usb-puerto-texto", "USB", "UsbSpec(...)", 'kind="host", hostbus=1, hostaddr="3.1"', "InputError",
         lambda ws: UsbSpec("host", hostbus=1, hostaddr="3.1")),
    _api("usb-bus-fuera-de-rango", "USB", "UsbSpec(...)", 'kind="host", hostbus=300, hostaddr=1', "InputError",
         lambda ws: UsbSpec("host", hostbus=300, hostaddr=1)),
    _api("usb-sin-direccion", "USB", "UsbSpec(...)", 'kind="host"', "InputError", lambda ws: UsbSpec("host")),
    _api("usb-tipo-desconocido", "USB", "UsbSpec(...)", 'kind="pendrive"', "InputError",
         lambda ws: UsbSpec("pendrive")),
    _api("usb-arranque-imagen-carpeta", "USB", _START, 'usb=(UsbSpec("storage", image=<carpeta>),)', "InputError",
         lambda ws: ws.boot(name=f"{PREFIX}-u1", machine="pc", usb=(UsbSpec("storage", image=str(ws.folder)),))),
    _api("usb-sin-arrancar", "USB", "Guest(q35).attach_usb(...)", 'kind="tablet", invitado sin arrancar',
         "GuestError", lambda ws: Guest(GuestSpec(name=f"{PREFIX}-q35", machine="q35")).attach_usb("tablet")),
    _api("usb-host-inexistente", "USB", "guest.attach_usb(...)", 'kind="host", hostbus=9, hostaddr=99',
         "GuestError", lambda ws: ws.guest.attach_usb("host", hostbus=9, hostaddr=99), needs="guest"),
    _api("usb-imagen-carpeta", "USB", "guest.attach_usb(...)", 'kind="storage", image=<carpeta>', "InputError",
         lambda ws: ws.guest.attach_usb("storage", image=ws.folder), needs="guest"),
    _api("usb-imagen-inexistente", "USB", "guest.attach_usb(...)", 'kind="storage", image=<no existe>',
         "InputError", lambda ws: ws.guest.attach_usb("storage", image=ws.missing()), needs="guest"),
    # hot-plugged disks
    _api("conectar-disco-sin-arrancar", "discos en caliente", "Guest(q35).attach_disk(...)",
         "una imagen que existe, invitado sin arrancar",
         "GuestError", lambda ws: Guest(GuestSpec(name=f"{PREFIX}-q35", machine="q35")).attach_disk(ws.image)),
    _api("conectar-disco-inexistente", "discos en caliente", "guest.attach_disk(ruta)", "<tmp>/no-hay/no-existe.qcow2",
         "InputError", lambda ws: ws.guest.attach_disk(ws.missing()), needs="guest"),
    _api("conectar-disco-carpeta", "discos en caliente", "guest.attach_disk(ruta)", "una carpeta", "InputError",
         lambda ws: ws.guest.attach_disk(ws.folder), needs="guest"),
    _api("conectar-disco-no-utf8", "discos en caliente", "guest.attach_disk(ruta)",
         'b"otro-\\xff.qcow2" (os.fsdecode)', "InputError",
         lambda ws: ws.guest.attach_disk(_copy(ws.image, ws.files / os.fsdecode(b"otro-\xff.qcow2"))),
         needs="guest", creates=(os.fsdecode(b"otro-\xff.qcow2"),)),
    _api("conectar-disco-byte-nulo", "discos en caliente", "guest.attach_disk(ruta)", '"disco\\0.qcow2"',
         "InputError", lambda ws: ws.guest.attach_disk(ws.files / "disco\0.qcow2"), needs="guest"),
    _api("conectar-disco-serie-mala", "discos en caliente", "guest.attach_disk(ruta, serial=...)",
         'serial="con espacios"', "InputError", lambda ws: ws.guest.attach_disk(ws.image, serial="con espacios"),
         needs="guest"),
    # commands in the guest
    _api("orden-con-nul", "órdenes en el invitado", "guest.run(orden)", '"echo a\\0b"', "InputError",
         lambda ws: ws.guest.run("echo a\0b"), needs="guest"),
    _api("argv-con-nul", "órdenes en el invitado", "guest.run([...])", '["echo", "a\\0b"]', "InputError",
         lambda ws: ws.guest.run(["echo", "a\0b"]), needs="guest"),
    _api("argv-no-utf8", "órdenes en el invitado", "guest.run([...])", '["ls", os.fsdecode(b"/tmp/\\xff\\xfe")]',
         "InputError", lambda ws: ws.guest.run(["ls", _NON_UTF8]), needs="guest"),
    _api("entrada-no-utf8", "órdenes en el invitado", "guest.run(orden, input=...)",
         'input=os.fsdecode(b"\\xff\\xfe") a «wc -c»', "ok",
         lambda ws: ws.guest.run("wc -c", input=os.fsdecode(b"\xff\xfe")),
         needs="guest", check=lambda ws, r: _checks((r.stdout.strip() == "2", f"wc -c dijo {r.stdout!r}"))),
    _api("salida-no-utf8", "órdenes en el invitado", "guest.run(orden)", "printf '\\377x' (salida no UTF-8)", "ok",
         lambda ws: ws.guest.run("printf '\\377x'"), needs="guest",
         check=lambda ws, r: _checks((r.stdout == "\ufffdx", f"salida {r.stdout!r}"))),
    _api("argumento-de-200KiB", "órdenes en el invitado", "guest.run([...])", '["echo", "x" × 200 000]',
         "InputError", lambda ws: ws.guest.run(["echo", "x" * 200_000]), needs="guest"),
    _api("argv-de-3MB", "órdenes en el invitado", "guest.run([...])", '["true"] + 3000 argumentos de 1000 bytes',
         "InputError", lambda ws: ws.guest.run(["true"] + ["y" * 1000] * 3000), needs="guest"),
    _api("salida-de-50MB", "órdenes en el invitado", "guest.run(orden)", "50 MB por la salida estándar", "ok",
         lambda ws: ws.guest.run("head -c 52428800 /dev/zero | tr '\\0' x", timeout=600), needs="guest",
         check=_truncated_check),
    _api("orden-sin-fin", "órdenes en el invitado", "guest.run(orden, timeout=1)", '"sleep 1000"', "CommandTimeout",
         lambda ws: ws.guest.run("sleep 1000", timeout=1), needs="guest", check=_timeout_check),
    _api("programa-inexistente", "órdenes en el invitado", "guest.run([...])", '["/no/existe"]', "CommandFailed",
         lambda ws: ws.guest.run(["/no/existe"]), needs="guest"),
    _api("orden-vacia", "órdenes en el invitado", "guest.run([...])", "[]", "InputError",
         lambda ws: ws.guest.run([]), needs="guest"),
    # files and channels
    _api("copiar-origen-inexistente", "ficheros y canales", "files.copy_to_guest(g, origen, destino)",
         "origen: <no existe>", "InputError", lambda ws: files.copy_to_guest(ws.guest, ws.missing(), "/tmp/x"),
         needs="guest"),
    _api("copiar-destino-relativo", "ficheros y canales", "files.copy_to_guest(g, origen, destino)",
         'destino: "tmp/x" (relativo)', "InputError", lambda ws: files.copy_to_guest(ws.guest, ws.text, "tmp/x"),
         needs="guest"),
    _api("traer-a-carpeta-inexistente", "ficheros y canales", "files.copy_from_guest(g, origen, destino)",
         "destino: <tmp>/no-hay/version", "InputError",
         lambda ws: files.copy_from_guest(ws.guest, "/proc/version", ws.missing("version")), needs="guest"),
    _api("canal-inexistente", "ficheros y canales", "guest.channel(nombre)", '"org.nada.0"', "InputError",
         lambda ws: ws.guest.channel("org.nada.0"), needs="guest"),
    _api("canal-nombre-malo", "ficheros y canales", "ChannelSpec(nombre)", '"canal con espacios"', "InputError",
         lambda ws: ChannelSpec("canal con espacios")),
    # the command line
    _cli("cli-boot-memoria-xyz", "guest boot --memory xyz", "exit 2", lambda ws: ["guest", "boot", "--memory", "xyz"]),
    _cli("cli-boot-memoria-1T", "guest boot --memory 1T", "exit 2", lambda ws: ["guest", "boot", "--memory", "1T"]),
    _cli("cli-boot-timeout-texto", "guest boot --timeout abc", "exit 2",
         lambda ws: ["guest", "boot", "--timeout", "abc"]),
    _cli("cli-boot-acelerador-xen", "guest boot --accel xen", "exit 2", lambda ws: ["guest", "boot", "--accel", "xen"]),
    _cli("cli-doctor-root-inexistente", "doctor --root /nonexistent", "exit 2",
         lambda ws: ["doctor", "--root", "/nonexistent"]),
    _cli("cli-doctor-root-fichero", "doctor --root <un fichero de texto>", "exit 2",
         lambda ws: ["doctor", "--root", ws.text]),
    _cli("cli-doctor-save-existente", "doctor --save <un fichero que ya existe>", "exit 2",
         lambda ws: ["doctor", "--save", ws.report]),
    _cli("cli-doctor-save-en-proc", "doctor --save /proc/labkit-diagnostico", "exit 2",
         lambda ws: ["doctor", "--save", "/proc/labkit-diagnostico"]),
    _cli("cli-doctor-save-sin-permiso", "doctor --save <carpeta 0700 de root>/diag", "exit 2",
         lambda ws: ["doctor", "--save", ws.private / "diag"], nobody=True),
    _cli("cli-bench-rondas-negativas", "bench --rounds -1", "exit 2", lambda ws: ["bench", "--rounds", "-1"]),
    _cli("cli-bench-rondas-texto", "bench --rounds abc", "exit 2", lambda ws: ["bench", "--rounds", "abc"]),
    _cli("cli-bench-arranques-negativos", "bench --boot-rounds -1", "exit 2",
         lambda ws: ["bench", "--boot-rounds", "-1"]),
    _cli("cli-bench-carga-desconocida", "bench --workloads nope", "exit 2",
         lambda ws: ["bench", "--workloads", "nope"]),
    _cli("cli-bench-compare-inexistente", "bench --compare <no existe>", "exit 2",
         lambda ws: ["bench", "--compare", ws.missing("r.json")]),
    _cli("cli-bench-compare-no-json", "bench --compare <un fichero de texto>", "exit 2",
         lambda ws: ["bench", "--compare", ws.text]),
    _cli("cli-orden-desconocida", "frobnicate", "exit 2", lambda ws: ["frobnicate"]),
    _cli("cli-guest-sin-accion", "guest", "exit 2", lambda ws: ["guest"]),
    _cli("cli-opcion-desconocida", "doctor --bogus", "exit 2", lambda ws: ["doctor", "--bogus"]),
    _cli("cli-build-kernel-inexistente", "guest build --kernel /nonexistent", "exit 1",
         lambda ws: ["guest", "build", "--kernel", "/nonexistent"]),
    _cli("cli-build-kernel-carpeta", "guest build --kernel <una carpeta>", "exit 1",
         lambda ws: ["guest", "build", "--kernel", ws.folder]),
)


# --------------------------------------------------------------------------- the doc


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def render(outcomes: Sequence[Outcome]) -> str:
    """docs/bad_input.md: every case with what it gave, grouped by area."""
    passed = sum(o.passed for o in outcomes)
    lines = [
        "# Entradas erróneas: qué responde labkit",
        "",
        "<!-- Generado por `.venv/bin/python -m labkit._badinput`; no lo edites a mano. -->",
        "",
        "Cada caso da a labkit un valor, una ruta, un nombre o una orden equivocados y comprueba que la "
        "respuesta es un error de labkit con un mensaje en español y qué hacer (en la línea de órdenes: el "
        "estado de salida, el mensaje y ninguna traza de Python), que ningún fichero cambia (tipo, modo, "
        "tamaño, fecha y sha256 antes y después) y que no queda ningún invitado, socket, proceso ni "
        "carpeta temporal. Los casos que necesitan un invitado en marcha comparten uno (TCG, máquina `pc`), "
        "que además debe seguir respondiendo después de cada caso. La lista está en `labkit/_badinput.py` "
        "y la comprueba `tests/test_bad_input.py`. `<tmp>` es la carpeta temporal de la prueba.",
        "",
        f"**{len(outcomes)} casos, {passed} como se espera.**",
    ]
    area = None
    for o in outcomes:
        if o.case.area != area:
            area = o.case.area
            lines += ["", f"## {area[0].upper()}{area[1:]}", "", "| caso | dónde | entrada | se espera | resultado |",
                      "|---|---|---|---|---|"]
        text = f"**{o.result}**"
        if o.message:
            text += f": {o.message}"
        if o.hint:
            text += f" — *Qué hacer:* {o.hint}"
        if o.problems:
            text += " — **FALLA:** " + "; ".join(o.problems)
        lines.append(f"| `{o.case.id}` | `{_cell(o.case.entry)}` | {_cell(o.case.given)} | {o.case.expect} "
                     f"| {_cell(text)} |")
    return ("\n".join(lines) + "\n").encode(errors="backslashreplace").decode()  # non-UTF-8 names as \xff


def main(argv: Sequence[str] | None = None) -> int:
    """Run every case, write the doc (``--out``, default docs/bad_input.md), print the failures."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m labkit._badinput", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DOC), help="dónde escribir el documento")
    parser.add_argument("-k", default="", help="solo los casos cuyo id contiene este texto")
    args = parser.parse_args(argv)
    outcomes = []
    with Workspace() as ws:
        for case in CASES:
            if args.k in case.id:
                outcomes.append(run_case(case, ws))
                print(("ok   " if outcomes[-1].passed else "FALLA ") + case.id, file=sys.stderr, flush=True)
    if not args.k:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(render(outcomes))
        print(f"Escrito {args.out}", file=sys.stderr)
    failed = [o for o in outcomes if not o.passed]
    for o in failed:
        print(o.report(), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

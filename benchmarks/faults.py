#!/usr/bin/env python3
"""Kill -9 the Python process that owns labkit guests at bad moments, and look for what is left.

A benchmark script (not a test; ``tests/test_faults.py`` runs each scenario twice through these
same functions). Scenarios, each run ``--runs`` times (default 20):

- ``boot-qemu`` / ``boot-libvirt``: a child Python starts a guest; it is killed when the guest's
  runtime dir appears plus a delay that varies from run to run (0 to 2 s: before QEMU is spawned,
  while libvirt creates the domain, while the kernel boots), before the agent answers.
- ``disk-qemu`` / ``disk-libvirt``: the child boots a ``pc`` guest, hot-plugs a qcow2 image
  (``attach_disk``) and writes to it from the guest in a loop; it is killed mid-write.
- ``bench-qemu``: ``labkit bench --mode quick`` (1 round) killed when its progress reaches a
  phase (first guest booting, second guest booting, a workload, the boot timing), varying.

After each kill: wait until the child's QEMU processes are gone (QEMU direct: the parent-death
signal kills them; libvirt domains outlive their owner by design), run ``labkit cleanup`` once
(it removes stale domains and dirs, as the next labkit start would), then look for anything left:
QEMU processes, libvirt domains and libvirt's per-domain files, runtime dirs and sockets, bench
work dirs, staging temp files, and the disk image still open, locked or owned by libvirt's user.
Then ``labkit cleanup`` again must find nothing of ours. Everything is named ``labkit-fault-*``
(the bench: its own ``labkit-bench-*`` guests, told apart by their owner pid).

    .venv/bin/python benchmarks/faults.py [--runs 20] [--scenarios boot-qemu,disk-libvirt] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from labkit.cleanup import NOTHING, find_qemu_processes  # noqa: E402
from labkit.guest.libvirt import IMAGES_DIR, PID_DIR, RUNTIME_DIR  # noqa: E402
from labkit.guest.runner import _alive, runtime_base  # noqa: E402

SCENARIOS = ("boot-qemu", "boot-libvirt", "disk-qemu", "disk-libvirt", "bench-qemu")
PREFIX = "labkit-fault-"
BENCH_TAG = "labkit-bench"
BOOT_DELAYS = (0.0, 0.05, 0.2, 0.5, 1.0, 2.0)  # s after the runtime dir appears
WRITE_DELAYS = (0.1, 0.4, 1.0, 2.0)  # s after the guest starts writing
#: (progress text that triggers the kill, what is happening then, extra delay in s)
BENCH_PHASES = (("preparando", "arrancando el 1.er invitado", 1.0),
                ("TCG, 1 hilo: invitado en marcha", "arrancando el 2.º invitado", 0.3),
                ("nativo", "carga en el invitado", 0.1),
                ("TCG multihilo, 2 vCPU: invitado en marcha", "primera carga", 0.0),
                ("arranque 1/1", "medida de arranque (suelo)", 0.0))
LIBVIRT_STATE = Path("/var/lib/libvirt/qemu")
LIBVIRT_LOGS = Path("/var/log/libvirt/qemu")
CHILD_ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}

_GUEST_CHILD = """
import sys, time
from labkit.guest import Guest, GuestSpec
from labkit.guest.assets import ensure_assets
from labkit.guest.libvirt import LibvirtGuest
backend, name, image = sys.argv[1], sys.argv[2], sys.argv[3]
cls = Guest if backend == "qemu" else LibvirtGuest
g = cls(GuestSpec(name=name, accel="tcg", machine="pc" if image else "microvm"), assets=ensure_assets(),
        boot_timeout=600)
g.start()
print("BOOTED", flush=True)
if image:
    from labkit.devices.disks import find_by_serial
    disk = g.attach_disk(image)
    dev = find_by_serial(g, disk.serial).path
    print("WRITING", dev, flush=True)
    g.run(f"while :; do dd if=/dev/urandom of={dev} bs=64k count=32 conv=fsync 2>/dev/null; done", timeout=3600)
time.sleep(3600)
"""


@dataclass
class Run:
    """One kill and what was found after it."""

    scenario: str
    index: int
    name: str
    phase: str = ""
    delay: float = 0.0
    killed: bool = False
    qemu_gone_s: float | None = None  # kill -> every QEMU of the child gone (QEMU direct only)
    survivors: list[str] = field(default_factory=list)  # QEMU direct: QEMUs alive 5 s after the kill (cleanup kills them)
    clean_s: float | None = None  # kill -> first `labkit cleanup` done
    first_cleanup: list[str] = field(default_factory=list)  # its lines about us
    second_cleanup: list[str] = field(default_factory=list)  # the second one's lines about us (must be [])
    second_cleanup_text: str = ""  # the second one's whole output (other helpers' leftovers too)
    leftovers: list[str] = field(default_factory=list)
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ----------------------------------------------------------------------------- looking around


def _owner_of(directory: Path) -> int | None:
    try:
        return int((directory / "owner.pid").read_text())
    except (OSError, ValueError):
        return None


def _temp_bases() -> list[Path]:
    return [runtime_base(), RUNTIME_DIR, Path("/var/tmp"), Path(tempfile.gettempdir())]


def labkit_dirs() -> set[Path]:
    """Every ``labkit-*`` entry where labkit makes temp dirs (runtime dirs, bench work dirs)."""
    return {d for base in _temp_bases() if base.is_dir() for d in base.glob("labkit-*") if d != runtime_base()}


def _children(pid: int) -> set[int]:
    """Every descendant of ``pid`` (QEMU, setpriv, qemu-img...)."""
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            for k in kids:
                if k not in found:
                    found.add(k)
                    todo.append(k)
    return found


def _unix_socket_paths() -> list[str]:
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    return [parts[7] for parts in (line.split() for line in lines) if len(parts) > 7]


def _open_by(path: Path) -> list[int]:
    """Pids that hold ``path`` open."""
    pids = []
    target = str(path)
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                try:
                    if os.readlink(fd) == target:
                        pids.append(int(fd_dir.parent.name))
                        break
                except OSError:
                    continue
        except OSError:
            continue
    return pids


def _domains(prefix: str) -> list[str]:
    if not Path("/run/libvirt/libvirt-sock").exists():
        return []
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True,
                         text=True, timeout=60, check=False)
    return [n for n in out.stdout.split() if n.startswith(prefix)]


def labkit_cleanup() -> str:
    """``labkit cleanup`` (the CLI, as a student runs it); its output."""
    out = subprocess.run([sys.executable, "-m", "labkit.cli", "cleanup"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, check=False)
    return (out.stdout + out.stderr).strip()


def _keys(run: Run, child: int, mine: set[Path]) -> list[str]:
    """Strings that mark something as this run's: its guest name (the bench's is shared with other
    runs of the bench: its dirs and its pid instead), libvirt's short name, its dirs."""
    named = [] if run.scenario.startswith("bench") else [run.name, run.name[:20]]
    return named + [str(d) for d in mine] + [f"dueño {child} "]


def _about(lines: str, keys: list[str]) -> list[str]:
    """The lines of a cleanup output that are about this run."""
    return [line for line in lines.splitlines() if line != NOTHING and any(k in line for k in keys)]


def leftovers(run: Run, child: int, qemu_pids: set[int], mine: set[Path], before: set[Path],
              image: Path | None, image_owner: tuple[int, int] | None, staging: set[Path]) -> list[str]:
    """Everything the killed child left behind (empty: nothing)."""
    found = []
    for pid in sorted(qemu_pids):
        if _alive(pid):
            found.append(f"proceso {pid} ({Path(f'/proc/{pid}/comm').read_text().strip()}) sigue vivo")
    for proc in find_qemu_processes():
        orphan = proc.owner is None or not _alive(proc.owner)
        if proc.pid not in qemu_pids and (proc.owner == child or (orphan and proc.name.startswith(run.name))):
            found.append(f"proceso QEMU {proc.pid} ({proc.name}) sigue vivo")
    if not run.scenario.startswith("bench"):
        found += [f"dominio libvirt {d}" for d in _domains(run.name)]
    for path in (PID_DIR / f"{run.name}.pid", PID_DIR / f"{run.name}.xml"):
        if path.exists():
            found.append(f"fichero de libvirt {path}")
    short = run.name[:20]  # libvirt names a domain's private dir domain-<id>-<first 20 characters>
    found += [f"directorio de libvirt {d}" for d in LIBVIRT_STATE.glob(f"domain-*-{short}*")]
    found += [f"directorio de libvirt {d}" for d in LIBVIRT_STATE.glob(f"channel/target/domain-*-{short}*")]
    for d in sorted(labkit_dirs() - before):
        owner = _owner_of(d)
        if d.exists() and (d in mine or owner == child or (owner is None and (run.name in d.name or (
                run.scenario.startswith("bench") and d.name.startswith(BENCH_TAG))))):
            found.append(f"directorio temporal {d}")
    keys = _keys(run, child, mine)[:-1]
    found += [f"socket {s}" for s in _unix_socket_paths() if any(k in s for k in keys)]
    found += [f"fichero temporal de preparación {p}" for p in sorted(_staging_temps() - staging)]
    if image is not None:
        holders = _open_by(image)
        if holders:
            found.append(f"la imagen {image.name} sigue abierta por {holders}")
        check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True, check=False)
        if "lock" in check.stderr:
            found.append(f"la imagen {image.name} sigue bloqueada: {check.stderr.strip()[:120]}")
        st = image.stat()
        if image_owner is not None and (st.st_uid, st.st_gid) != image_owner:
            found.append(f"la imagen {image.name} es ahora de {st.st_uid}:{st.st_gid} (era {image_owner[0]}:"
                         f"{image_owner[1]})")
    return found


def _staging_temps() -> set[Path]:
    return set(IMAGES_DIR.glob("*/.*.tmp")) if IMAGES_DIR.is_dir() else set()


# ----------------------------------------------------------------------------- one run


class _Lines:
    """Collects a child's output lines in a thread; ``wait_for(text)`` blocks until one contains it."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def seen(self, text: str) -> bool:
        with self._cond:
            return any(text in line for line in self.lines)

    def wait_for(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(text in line for line in self.lines):
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    return False
                self._cond.wait(left)
            return True


def _wait_for_dir(pattern_bases: list[Path], prefix: str, child: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        if any(base.is_dir() and any(base.glob(f"{prefix}-*")) for base in pattern_bases):
            return True
        time.sleep(0.005)
    return False


def run_once(scenario: str, index: int, *, workdir: Path) -> Run:
    """Start a child, kill -9 it at the scenario's moment, clean up once, and look for leftovers."""
    kind, backend = scenario.split("-")
    name = f"{PREFIX}{kind[0]}{backend[0]}{index}-{secrets.token_hex(2)}"
    run = Run(scenario, index, BENCH_TAG if kind == "bench" else name)
    before = labkit_dirs()
    staging = _staging_temps()
    image: Path | None = None
    image_owner: tuple[int, int] | None = None
    if kind == "disk":
        from labkit.devices.disks import create

        image = workdir / f"{name}.qcow2"
        create(image, "64M")
        st = image.stat()
        image_owner = (st.st_uid, st.st_gid)
    if kind == "bench":
        argv = [sys.executable, "-m", "labkit.cli", "bench", "--mode", "quick", "--rounds", "1", "--warmup", "0",
                "--boot-rounds", "1", "--workloads", "sha256,blockio,boot"]
    else:
        argv = [sys.executable, "-c", _GUEST_CHILD, backend, name, str(image or "")]
    child = subprocess.Popen(argv, cwd=ROOT, env=CHILD_ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE if kind == "bench" else subprocess.DEVNULL, text=True)
    out = _Lines(child.stdout)
    progress = _Lines(child.stderr) if kind == "bench" else out
    try:
        if kind == "boot":
            run.delay = BOOT_DELAYS[index % len(BOOT_DELAYS)]
            base = runtime_base() if backend == "qemu" else RUNTIME_DIR
            if not _wait_for_dir([base], name, child, 300):
                run.error = "el directorio del invitado no apareció"
            time.sleep(run.delay)
            run.phase = "ya arrancado" if out.seen("BOOTED") else "arrancando"
        elif kind == "disk":
            run.delay = WRITE_DELAYS[index % len(WRITE_DELAYS)]
            if not out.wait_for("WRITING", 600):
                run.error = "el invitado no llegó a escribir en el disco"
            time.sleep(run.delay)
            run.phase = "escribiendo en el disco"
        else:
            trigger, run.phase, run.delay = BENCH_PHASES[index % len(BENCH_PHASES)]
            if not progress.wait_for(trigger, 600):
                run.error = f"labkit bench no llegó a «{trigger}»"
            time.sleep(run.delay)
            if child.poll() is not None:
                run.phase = "terminó antes"
        mine = {d for d in labkit_dirs() if _owner_of(d) == child.pid or name in d.name}
        qemu_pids = _children(child.pid) | (_libvirt_pid(name) if backend == "libvirt" else set())
        t0 = time.monotonic()
        child.send_signal(signal.SIGKILL)
        run.killed = child.wait() == -signal.SIGKILL
        # what the child started in the last instant (e.g. a floor QEMU), now reparented
        mine |= {d for d in labkit_dirs() if _owner_of(d) == child.pid}
        if backend == "qemu":
            deadline = time.monotonic() + 5
            while any(_alive(p) for p in qemu_pids) and time.monotonic() < deadline:
                time.sleep(0.01)
            run.qemu_gone_s = time.monotonic() - t0
            # labkit sets the parent-death signal in the child before exec and checks its parent there;
            # a QEMU that outlives its owner here means that guarantee broke
            run.survivors = [f"{p.pid} {p.name}" for p in find_qemu_processes()
                             if p.pid in qemu_pids or p.owner == child.pid
                             or (p.owner is None and p.name.startswith(run.name))]
        first = labkit_cleanup()
        run.clean_s = time.monotonic() - t0
        keys = _keys(run, child.pid, mine)
        run.first_cleanup = _about(first, keys)
        run.leftovers = leftovers(run, child.pid, qemu_pids, mine, before, image, image_owner, staging)
        run.second_cleanup_text = labkit_cleanup()
        run.second_cleanup = _about(run.second_cleanup_text, keys)
        run.leftovers += [f"la 2.ª limpieza aún encontró: {line}" for line in run.second_cleanup]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
        if image is not None:
            image.unlink(missing_ok=True)
        if backend == "libvirt":
            (LIBVIRT_LOGS / f"{name}.log").unlink(missing_ok=True)  # libvirt keeps one log per domain name
    return run


def _libvirt_pid(name: str) -> set[int]:
    try:
        return {int((PID_DIR / f"{name}.pid").read_text().strip())}
    except (OSError, ValueError):
        return set()


def fault_workdir() -> Path:
    """Where disk images for the runs live: reachable by libvirt's QEMU user (not /root, not 0700)."""
    workdir = Path(tempfile.mkdtemp(prefix="faults-", dir="/var/tmp"))
    workdir.chmod(0o755)
    return workdir


# ----------------------------------------------------------------------------- the table


def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    rows = []
    for scenario in dict.fromkeys(r.scenario for r in runs):
        mine = [r for r in runs if r.scenario == scenario]
        phases: dict[str, int] = {}
        for r in mine:
            phases[r.phase] = phases.get(r.phase, 0) + 1
        gone = [r.qemu_gone_s for r in mine if r.qemu_gone_s is not None]
        clean = [r.clean_s for r in mine if r.clean_s is not None]
        rows.append({"scenario": scenario, "runs": len(mine), "killed": sum(r.killed for r in mine),
                     "survivors": sum(bool(r.survivors) for r in mine),
                     "with_leftovers": sum(bool(r.leftovers) for r in mine),
                     "leftovers": sum(len(r.leftovers) for r in mine),
                     "errors": sum(bool(r.error) for r in mine),
                     "phases": phases,
                     "first_cleanup_lines": statistics.median([len(r.first_cleanup) for r in mine]),
                     "second_cleanup_nothing": sum(r.second_cleanup_text == NOTHING for r in mine),
                     "qemu_gone_median": statistics.median(gone) if gone else None,
                     "clean_median": statistics.median(clean) if clean else None,
                     "clean_max": max(clean) if clean else None})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def s(value: float | None) -> str:
        return f"{value:.2f} s" if value is not None else "—"

    head = (f"{'escenario':<13} {'ejec.':>5} {'matados':>7} {'con restos':>10} {'restos':>6} {'QEMU vivo':>9} "
            f"{'QEMU muerto':>11} "
            f"{'hasta limpio':>12} {'peor':>7} {'1.ª limpieza':>12} {'2.ª «Nada»':>10}  fases")
    lines = [head, "-" * len(head)]
    for r in rows:
        phases = ", ".join(f"{k} {v}" for k, v in r["phases"].items())
        lines.append(f"{r['scenario']:<13} {r['runs']:>5} {r['killed']:>7} {r['with_leftovers']:>10} "
                     f"{r['leftovers']:>6} {r['survivors'] if r['scenario'].endswith('qemu') else '—':>9} "
                     f"{s(r['qemu_gone_median']):>11} {s(r['clean_median']):>12} "
                     f"{s(r['clean_max']):>7} {r['first_cleanup_lines']:>12g} "
                     f"{r['second_cleanup_nothing']:>4}/{r['runs']:<5}  {phases}")
    return "\n".join(lines)


LEGEND = """\
escenario: qué se mata (boot = arrancando, disk = con un disco conectado y escribiendo, bench = labkit bench)
matados: ejecuciones en que el proceso murió por SIGKILL en la fase buscada
con restos / restos: ejecuciones con algo sin limpiar tras «labkit cleanup», y cuántas cosas en total
QEMU vivo: ejecuciones en que un QEMU sobrevivió 5 s a su dueño (solo QEMU directo: labkit pone la señal de
  muerte del padre en el hijo antes de exec y comprueba allí que el padre sigue vivo; debe ser 0)
QEMU muerto: mediana desde kill -9 hasta que no queda ningún QEMU del proceso (solo QEMU directo)
hasta limpio: mediana desde kill -9 hasta el final de la primera «labkit cleanup» (peor: el máximo)
1.ª limpieza: mediana de líneas de esa limpieza sobre este invitado (lo que quedaba por diseño: directorios
  temporales hasta la siguiente limpieza o arranque; en libvirt, el dominio, que sobrevive a su dueño)
2.ª «Nada»: veces que una segunda «labkit cleanup» imprimió exactamente «Nada que limpiar.»
  (en una máquina compartida puede encontrar restos de otros; los de esta prueba cuentan en «restos»)"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20, help="ejecuciones por escenario (20)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"lista separada por comas: {','.join(SCENARIOS)}")
    ap.add_argument("--json", metavar="FICHERO", help="guarda cada ejecución en JSON")
    args = ap.parse_args(argv)
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        ap.error(f"escenarios desconocidos: {', '.join(unknown)} (elige entre {', '.join(SCENARIOS)})")
    if any(s.endswith("libvirt") for s in chosen) and not Path("/run/libvirt/libvirt-sock").exists():
        ap.error("libvirtd no está en marcha: arráncalo con ./lab setup")
    from labkit.guest.assets import ensure_assets

    ensure_assets()
    started = time.monotonic()
    print(f"{_dt.datetime.now().isoformat(timespec='seconds')} · {platform.node()} · {os.cpu_count()} CPU · "
          f"carga {os.getloadavg()[0]:.1f} · {args.runs} ejecuciones por escenario", flush=True)
    workdir = fault_workdir()
    runs: list[Run] = []
    try:
        for i in range(args.runs):  # interleaved: host noise hits every scenario alike
            for scenario in chosen:
                r = run_once(scenario, i, workdir=workdir)
                runs.append(r)
                status = "; ".join(r.leftovers) or "nada"
                if r.survivors:
                    status += f" · QEMU vivo tras el kill: {'; '.join(r.survivors)}"
                print(f"  {scenario} #{i + 1}: {r.phase}, +{r.delay:g} s · limpio en {r.clean_s or 0:.2f} s · "
                      f"restos: {status}" + (f" · ERROR: {r.error}" if r.error else ""), flush=True)
    except KeyboardInterrupt:
        print("\nInterrumpido: tabla de lo medido hasta aquí.")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = summarize(runs)
    print()
    print(table(rows))
    print()
    print(LEGEND)
    print(f"\nDuración: {time.monotonic() - started:.0f} s · carga al final {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "runs": [r.as_dict() for r in runs]}, indent=2,
                                              ensure_ascii=False) + "\n")
        print(f"JSON: {args.json}")
    return 1 if any(r["with_leftovers"] or r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

"""The QEMU-direct runner: starts QEMU, talks QMP and the guest agent, cleans up.

    with Guest(GuestSpec(memory="256M")) as g:
        print(g.run("uname -r").stdout)
        g.qmp("query-kvm")

QEMU is started so that it dies with the process that started it (the Linux
parent-death signal, PR_SET_PDEATHSIG, set in the child before exec), even after a ``kill -9``
of a notebook kernel. Its sockets and logs live in a private temp dir that
``stop()`` removes.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import HostError, InputError, ToolMissingError, os_reason
from . import argv as qargv
from .agent import AgentClient, AgentError, decode_exec_status
from .spec import GuestSpec

__all__ = ["Guest", "CommandResult", "GuestError", "GuestStartError", "CommandTimeout", "CommandFailed",
           "choose_accel", "runtime_base", "host_tsc_khz", "sweep_stale", "spawn_qemu", "spawn_dying_with_us",
           "terminate_qemu", "check_command", "sandbox_supported", "host_memory_mib", "preflight"]


class GuestError(HostError):
    """Something went wrong with a running guest."""


class GuestStartError(GuestError):
    """QEMU did not start, or the guest never answered."""


class CommandTimeout(GuestError):
    """A guest command outlived its timeout (it was killed; the guest is still usable)."""


class CommandFailed(GuestError):
    """A guest command ended with a non-zero status and ``check=True`` was asked."""


@dataclass(frozen=True)
class CommandResult:
    """What a command run in the guest produced."""

    command: str
    stdout: str
    stderr: str
    exit_status: int | None
    duration: float
    signal: int | None = None
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def __str__(self) -> str:
        return self.stdout


def runtime_base() -> Path:
    """Where guests keep sockets: $XDG_RUNTIME_DIR/labkit, else /tmp/labkit-<uid>."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(xdg) / "labkit" if xdg and Path(xdg).is_dir() else Path(tempfile.gettempdir()) / f"labkit-{os.getuid()}"
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        pass  # a file or a dangling symlink: refused just below
    st = base.lstat()
    # /tmp is shared: another user could have made /tmp/labkit-<uid> first (or a symlink) to reach our sockets
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise HostError(f"«{base}» no es una carpeta tuya (es un enlace o pertenece a otro usuario): quien la "
                        "controle podría conectarse a los sockets de tus invitados.",
                        f"Bórrala (como root: rm -r {base}) o define XDG_RUNTIME_DIR con una carpeta tuya.")
    if st.st_mode & 0o077:
        base.chmod(0o700)
    return base


#: qemu-ga's (GLib's) words when execve fails in the guest, e.g. "... child process “x” (No such file or directory)"
_EXEC_FAILED = re.compile(r"Failed to execute child process .(?:.*?). \((.*)\)")
#: Linux refuses an argument longer than MAX_ARG_STRLEN (32 pages) with E2BIG; labkit also caps the whole argv.
MAX_ARG_BYTES = 128 * 1024
MAX_ARGV_BYTES = 1024 * 1024
_TOO_LONG_HINT = "Pasa los datos por la entrada estándar (input=...) o copia un fichero con copy_to_guest()."


def check_command(argv: Sequence[str]) -> None:
    """Refuse what qemu-ga cannot hand to execve unchanged: a NUL byte (qemu-ga would turn it into
    two other bytes), text that is not UTF-8 (its JSON parser rejects it), arguments that are too long."""
    total = 0
    for arg in argv:
        if "\0" in arg:
            raise InputError("La orden contiene un byte NUL (\\0): un argumento de un programa no puede tenerlo.",
                             "Quítalo; para pasar datos binarios usa input=bytes o copy_to_guest().")
        try:
            size = len(arg.encode())
        except UnicodeEncodeError:
            raise InputError("La orden contiene bytes que no son UTF-8 (p. ej. un nombre de fichero leído con "
                             "os.fsdecode): el agente del invitado solo acepta texto UTF-8.",
                             "Escribe la orden en UTF-8 (renombra el fichero) o pasa los datos por "
                             "input=bytes.") from None
        if size >= MAX_ARG_BYTES:
            raise InputError(f"Un argumento de la orden ocupa {size} bytes: Linux no admite argumentos de 128 KiB "
                             "o más (MAX_ARG_STRLEN).", _TOO_LONG_HINT)
        total += size + 1
    if total > MAX_ARGV_BYTES:
        raise InputError(f"La orden ocupa {total} bytes con todos sus argumentos: labkit no pasa de 1 MiB.",
                         _TOO_LONG_HINT)


@functools.lru_cache(maxsize=None)
def sandbox_supported(binary: str = qargv.QEMU) -> bool:
    """Whether this QEMU has its seccomp filter (``-sandbox``): it parses the option before ``-version``
    and exits 0, or refuses the option (built without seccomp) and exits 1."""
    try:
        proc = subprocess.run([binary, "-sandbox", qargv.SANDBOX, "-version"], capture_output=True, timeout=30,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def host_memory_mib(meminfo: str | None = None) -> int | None:
    """The host's memory (MemTotal) in MiB, or None when /proc/meminfo cannot be read."""
    try:
        text = Path("/proc/meminfo").read_text() if meminfo is None else meminfo
    except OSError:
        text = ""
    m = re.search(r"^MemTotal:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) // 1024 if m else None


def preflight(spec: GuestSpec) -> None:
    """What can be checked before QEMU starts (both backends): the memory fits in the host, and every
    disk or USB image given at boot exists and is a file."""
    from ..devices.disks import _image_path

    total = host_memory_mib()
    if total is not None and spec.memory > total:
        raise InputError(f"El invitado pide {spec.memory} MiB de memoria y este equipo solo tiene {total} MiB.",
                         "Pide menos memoria: al invitado del curso le bastan 256 MiB (GuestSpec(memory=\"256M\")).")
    for path in [d.path for d in spec.disks] + [u.image for u in spec.usb if u.kind == "storage"]:
        _image_path(path, must_exist=True)


def host_tsc_khz(cpuinfo: str | None = None) -> int | None:
    """The host TSC frequency in kHz, from BogoMIPS (Linux derives it from the TSC: kHz = BogoMIPS·500)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    m = re.search(r"^bogomips\s*:\s*([\d.]+)", cpuinfo, re.M | re.I)
    if not m or "tsc" not in cpuinfo:
        return None
    return int(float(m.group(1)) * 500)


def _alive(pid: int) -> bool:
    """True for a running process; a zombie (dead, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def sweep_stale(base: Path | None = None) -> list[Path]:
    """Remove runtime dirs left by a process that died (e.g. ``kill -9`` of a notebook kernel).

    A dir is stale when the Python process that made it and its QEMU are both gone
    (QEMU itself dies with its parent, through the parent-death signal).
    """
    removed = []
    base = base or runtime_base()
    for directory in base.glob("labkit-*"):
        try:
            owner = int((directory / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        try:
            qemu = int((directory / "qemu.pid").read_text())
        except (OSError, ValueError):
            qemu = None
        if not _alive(owner) and (qemu is None or not _alive(qemu)):
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    return removed


def choose_accel(requested: str) -> tuple[str, str]:
    """Resolve "auto" with the host probe; returns (accelerator, Spanish reason)."""
    if requested in ("kvm", "tcg"):
        return requested, f"pedido explícitamente (accel={requested})"
    from ..host import probe

    report = probe()
    return report.accelerator, f"veredicto del anfitrión «{report.verdict}»: {report.reason}"


_spawner: Any = None
_spawner_lock = threading.Lock()


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn that sets PR_SET_PDEATHSIG=SIGKILL in the child and exits if we already died.

    ``setpriv --pdeathsig`` alone has a window: if the owner dies between fork and setpriv's
    prctl, the child is never signalled and QEMU lives on as an orphan (seen in 21 of 30 tight
    spawn-and-kill runs). Checking getppid() right after prctl closes it. The function is built
    here, before the fork, so the child only makes two system calls.
    """
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    getppid, exit_now = os.getppid, os._exit

    def preexec() -> None:
        if prctl(1, signal.SIGKILL, 0, 0, 0) != 0 or getppid() != parent:  # 1 = PR_SET_PDEATHSIG
            exit_now(127)

    return preexec


def spawn_dying_with_us(argv: list[str], **popen: Any) -> subprocess.Popen:
    """Popen(argv) so that the kernel SIGKILLs the child when this process dies, even by kill -9.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not the process. A
    guest started from a worker thread (a thread pool, a widget callback) would die with that
    thread; so every fork happens in one thread that lives as long as the process.
    """
    global _spawner
    preexec = _pdeathsig_preexec()
    if preexec is None:  # no ctypes/prctl: setpriv does it (with the small window above)
        setpriv = shutil.which("setpriv")
        argv = [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else argv
    with _spawner_lock:
        if _spawner is None:
            _spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="labkit-spawn")
    return _spawner.submit(subprocess.Popen, argv, close_fds=True, preexec_fn=preexec, **popen).result()


def spawn_qemu(argv: list[str], stderr: Any, interactive: bool) -> subprocess.Popen:
    """Start QEMU so that the kernel kills it when this process dies (PR_SET_PDEATHSIG)."""
    io = None if interactive else subprocess.DEVNULL
    return spawn_dying_with_us(argv, stdin=io, stdout=io, stderr=stderr)


def terminate_qemu(proc: subprocess.Popen | None, directory: Path | None) -> None:
    """SIGTERM, then SIGKILL after 3 s; then remove the runtime dir. Safe to call twice."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


class Guest:
    """A guest run by QEMU directly. Use it as a context manager, or call start()/stop()."""

    backend = "qemu"

    def __init__(self, spec: GuestSpec | None = None, *, assets: Any = None, boot_timeout: float = 60.0,
                 kvm_timeout: float = 20.0, console: str = "file", binary: str = qargv.QEMU,
                 progress: Callable[[str], None] | None = None) -> None:
        self.spec = spec or GuestSpec()
        if console not in ("file", "stdio"):
            raise InputError(f"Consola no válida: «{console}».", "Usa «file» o «stdio».")
        self._assets = assets
        self.boot_timeout = boot_timeout
        self.kvm_timeout = kvm_timeout
        self._console = console
        self._binary = binary
        self._progress = progress or (lambda _msg: None)
        self.accel: str | None = None
        self.accel_reason = ""
        self.fallback: str | None = None  # why a KVM boot was abandoned for TCG
        self.boot_seconds: float | None = None
        self.argv: list[str] = []
        self._proc: subprocess.Popen | None = None
        self._runtime: qargv.Runtime | None = None
        self._agent: AgentClient | None = None
        self._qmp: Any = None
        self._finalizer: Any = None
        self._last_console = ""
        self._hotplugged: dict[str, Any] = {}  # device id -> devices.disks.AttachedDisk
        self._disk_drivers = False
        self._daemons: list[Any] = []  # virtiofsd processes (devices.shares.VirtiofsDaemon)
        self._shares: dict[str, Any] = {}  # tag -> ShareSpec (boot and hot-plugged)
        self._usb: dict[str, Any] = {}  # device id -> devices.usb.AttachedUsb (hot-plugged)
        self._usb_drivers = False
        self._ports: dict[str, str] = {}  # device id -> pcie-root-port it took (q35 hot-plug)

    # ------------------------------------------------------------ lifecycle
    @property
    def pid(self) -> int | None:
        """PID of the QEMU process (the guest, as the host sees it)."""
        # the child execs QEMU (directly, or through setpriv), so the child's pid is QEMU's
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _boot_files(self) -> qargv.BootFiles:
        if self._assets is None:
            from .assets import ensure_assets

            self._assets = ensure_assets(progress=self._progress)
        kernel = self._assets.vmlinux or self._assets.bzimage
        return qargv.BootFiles(Path(kernel), Path(self._assets.initramfs))

    def start(self) -> "Guest":
        if self.running:
            return self
        preflight(self.spec)
        if shutil.which(self._binary) is None:
            raise ToolMissingError(self._binary, "qemu-system-x86")
        boot = self._boot_files()
        accel, self.accel_reason = choose_accel(self.spec.accel)
        if accel == "kvm":
            try:
                self._launch("kvm", boot, min(self.kvm_timeout, self.boot_timeout))
                return self
            except GuestStartError as err:
                if self.spec.accel == "kvm":
                    raise
                self.fallback = f"{err.message}\n→ se repite con TCG"
                self._progress(f"Aviso: {self.fallback}")
        self._launch("tcg", boot, self.boot_timeout)
        return self

    def _launch(self, accel: str, boot: qargv.BootFiles, timeout: float) -> None:
        sweep_stale()
        directory = Path(tempfile.mkdtemp(prefix=f"{self.spec.name}-", dir=runtime_base()))
        (directory / "owner.pid").write_text(str(os.getpid()))
        runtime = qargv.Runtime(directory, console=self._console)
        start = time.monotonic()
        try:
            self.argv = qargv.build_argv(self.spec, accel, boot, runtime,
                                         tsc_khz=host_tsc_khz() if accel == "tcg" else None, binary=self._binary,
                                         sandbox=sandbox_supported(self._binary))
            self._start_share_daemons(runtime)
        except Exception:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        stderr = open(directory / "qemu.stderr", "wb")
        try:
            proc = spawn_qemu(self.argv, stderr, interactive=self._console == "stdio")
        finally:
            stderr.close()
        (directory / "qemu.pid").write_text(str(proc.pid))
        self._proc, self._runtime, self.accel = proc, runtime, accel
        self._finalizer = weakref.finalize(self, terminate_qemu, proc, directory)
        agent = AgentClient(runtime.agent)
        try:
            agent.connect(start + timeout, alive=lambda: proc.poll() is None)
        except AgentError as err:
            message = self._failure_text()
            agent.close()
            self._stop_process()
            raise GuestStartError(f"El invitado no arrancó con {accel.upper()}: {err.message}\n{message}",
                                  err.hint) from err
        self._agent = agent
        self.boot_seconds = time.monotonic() - start

    def _failure_text(self) -> str:
        parts = []
        assert self._runtime is not None
        for label, path in (("QEMU dijo", self._runtime.directory / "qemu.stderr"),
                            ("Últimas líneas de la consola", self._runtime.console_log)):
            try:
                lines = path.read_text(errors="replace").strip().splitlines()[-12:]
            except OSError:
                continue
            if lines:
                parts.append(f"{label}:\n  " + "\n  ".join(lines))
        return "\n".join(parts)

    def _stop_process(self) -> None:
        if self._runtime is not None:
            try:
                self._last_console = self._runtime.console_log.read_text(errors="replace")
            except OSError:
                pass
        if self._qmp is not None:
            from .aio import run_sync

            try:
                run_sync(self._qmp.disconnect(), timeout=5)
            except Exception:  # noqa: BLE001 - the process is going away anyway
                pass
            self._qmp = None
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        if self._finalizer is not None:
            self._finalizer()  # terminate + remove the temp dir, exactly once
            self._finalizer = None
        for daemon in self._daemons:
            daemon.stop()
        self._daemons = []

    def stop(self) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL) and remove its sockets and temp dir. Safe to call twice."""
        self._stop_process()

    def __enter__(self) -> "Guest":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ talking to it
    def _need_agent(self) -> AgentClient:
        if self._agent is None or not self.running:
            raise GuestError("El invitado no está en marcha.", "Arráncalo con start() o con «with Guest(...)».")
        return self._agent

    def run(self, command: str | Sequence[str], *, timeout: float = 30.0, input: str | bytes | None = None,
            check: bool = False) -> CommandResult:
        """Run a command in the guest through qemu-ga (a string goes to /bin/sh -c)."""
        agent = self._need_agent()
        if isinstance(command, str):
            path, args, shown = "/bin/sh", ["-c", command], command
        else:
            if not command:
                raise InputError("La orden está vacía.", "Indica un programa, p. ej. ['uname', '-r'].")
            path, args, shown = command[0], list(command[1:]), qargv.shell_line(list(command))
        check_command([path, *args])
        extra: dict[str, Any] = {"capture-output": True}
        if input is not None:
            import base64

            # stdin carries bytes: a str from os.fsdecode keeps its non-UTF-8 bytes
            data = input.encode(errors="surrogateescape") if isinstance(input, str) else input
            extra["input-data"] = base64.b64encode(data).decode()
        start = time.monotonic()
        try:
            pid = agent.execute("guest-exec", path=path, arg=args, **extra)["pid"]
        except AgentError as err:
            m = _EXEC_FAILED.search(err.message)
            if m is None:
                raise
            raise CommandFailed(f"El invitado no pudo ejecutar «{path}»: {os_reason(m.group(1))}.",
                                "Comprueba el nombre del programa (este invitado solo tiene busybox: "
                                "g.run(\"ls /bin /sbin\")); para una línea de shell, pasa una cadena y no una "
                                "lista.") from err
        delay = 0.0005
        while True:
            status = decode_exec_status(agent.execute("guest-exec-status", pid=pid))
            if status.exited:
                break
            if time.monotonic() - start > timeout:
                try:
                    agent.execute("guest-exec", path="/bin/kill", arg=["-KILL", str(pid)])
                except AgentError:
                    pass
                raise CommandTimeout(f"La orden «{shown}» no terminó en {timeout:g} s; se ha matado en el invitado.",
                                     "El invitado sigue disponible. Sube el timeout si la orden necesita más.")
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        result = CommandResult(shown, status.stdout.decode(errors="replace"), status.stderr.decode(errors="replace"),
                               status.exit_code, time.monotonic() - start, status.signal, status.truncated)
        if result.truncated:
            import warnings

            warnings.warn(f"La salida de «{shown}» se ha cortado: qemu-ga devuelve como mucho 16 MiB por orden "
                          "(result.truncated es True). Redirige la salida a un fichero del invitado y cópialo "
                          "con labkit.devices.files.copy_from_guest.", stacklevel=2)
        if check and not result.ok:
            raise CommandFailed(f"La orden «{shown}» terminó con estado {result.exit_status}: "
                                f"{result.stderr.strip()[:300]}", "Revisa la orden y su salida de error.")
        return result

    def agent(self, command: str, **arguments: Any) -> Any:
        """Send a raw qemu-ga command (e.g. "guest-info") and return its answer."""
        return self._need_agent().execute(command, **arguments)

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Send a QMP command to QEMU (e.g. "query-kvm") and return its answer."""
        if not self.running or self._runtime is None:
            raise GuestError("El invitado no está en marcha.", "Arráncalo con start() o con «with Guest(...)».")
        from qemu.qmp import ExecuteError, QMPClient

        from .aio import run_sync

        try:  # a str from os.fsdecode (bytes that are not UTF-8) would cost the QMP connection
            json.dumps(arguments, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise InputError(f"«{command}» lleva texto que no es UTF-8 (p. ej. una ruta con bytes no UTF-8): QMP "
                             "solo admite UTF-8.", "Renombra el fichero con un nombre UTF-8 (mv) y repite.") from None
        if self._qmp is None:
            client = QMPClient(self.spec.name)
            run_sync(client.connect(str(self._runtime.qmp)), timeout=10)
            self._qmp = client
        try:
            return run_sync(self._qmp.execute(command, arguments or None), timeout=30)
        except ExecuteError as err:
            raise GuestError(f"QEMU rechazó «{command}»: {err.error.error.desc}",
                             "Revisa el nombre y los argumentos en la referencia de QMP.") from err

    def console_log(self) -> str:
        """Everything the guest kernel and init printed on the serial console."""
        if self._runtime is not None and self._runtime.console_log.exists():
            return self._runtime.console_log.read_text(errors="replace")
        return self._last_console

    # ------------------------------------------------------------ disks (hot-plug)
    def _hotplug_bus(self) -> str:
        """The bus a hot-plugged device goes on (PCI; on q35 through a free root port: :meth:`_on_port`)."""
        if self.spec.machine == "microvm":
            raise GuestError("Una máquina microvm no tiene bus PCI: no admite conectar discos en caliente.",
                             "Arranca el invitado con GuestSpec(machine=\"pc\").")
        return "pci"

    def _on_port(self, messages: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
        """On q35 the PCI ``device_add`` goes into a free ``pcie-root-port`` (pcie.0 takes no hot-plug);
        the port is taken by the device's id until it is unplugged. On pc the messages go as they are."""
        free = [p for p in qargv.hotplug_ports(self.spec) if p not in self._ports.values()]
        out = []
        for command, arguments in messages:
            if command == "device_add" and self.spec.machine == "q35" and "bus" not in arguments:
                if not free:
                    raise GuestError(f"No quedan puertos PCIe libres en esta máquina q35 (tiene {qargv.HOTPLUG_PORTS}, "
                                     "todos ocupados por dispositivos conectados en caliente).",
                                     "Desconecta alguno (detach_disk, detach_share) o arranca con los discos en "
                                     "GuestSpec(disks=...).")
                arguments = {**arguments, "bus": free.pop(0)}
                self._ports[arguments["id"]] = arguments["bus"]
            out.append((command, arguments))
        return out

    def disks(self) -> list[Any]:
        """The virtio disks of this guest: those given at boot (spec.disks) and those hot-plugged."""
        from ..devices.disks import AttachedDisk

        boot = [AttachedDisk(Path(d.path), d.format, d.serial, node_name=f"disk{i}", device_id=f"disk{i}",
                             readonly=d.readonly, file_node=f"disk{i}-file", hotplugged=False)
                for i, d in enumerate(self.spec.disks)]
        return boot + list(self._hotplugged.values())

    def attach_disk(self, image: str | os.PathLike[str], *, format: str | None = None, serial: str | None = None,
                    readonly: bool = False) -> Any:
        """Plug a disk image into the running guest: QMP ``blockdev-add`` (file node, format node) +
        ``device_add`` (virtio-blk-pci with a serial number). Loads virtio_blk in the guest first."""
        from ..devices import disks as dd

        bus = self._hotplug_bus()
        path = dd._image_path(image, must_exist=True).resolve()
        fmt = format or dd.info(path).format
        serial = dd.check_serial(serial) if serial else dd.new_serial()
        file_node, node, device = dd.hotplug_names(serial)
        if device in self._hotplugged or any(d.serial == serial for d in self.disks()):
            raise InputError(f"Ya hay un disco con número de serie «{serial}».", "Usa otro número de serie.")
        if not self._disk_drivers:
            dd.load_disk_drivers(self)
            self._disk_drivers = True
        messages = self._on_port(dd.attach_messages(path, fmt, serial, readonly=readonly, bus=bus))
        done: list[tuple[str, dict[str, Any]]] = []
        try:
            for command, arguments in messages:
                self.qmp(command, **arguments)
                done.append((command, arguments))
        except GuestError as err:
            self._ports.pop(device, None)
            for command, arguments in reversed(done):  # undo what was added
                try:
                    if command == "blockdev-add":
                        self.qmp("blockdev-del", **{"node-name": arguments["node-name"]})
                except GuestError:
                    pass
            if "lock" in err.message:
                raise dd.DiskInUseError(f"No se pudo conectar «{path.name}»: otra máquina la tiene abierta "
                                        f"(QEMU bloquea la imagen). {err.message}",
                                        "Desconéctala de la otra máquina, o conéctala con readonly=True en ambas.") from err
            raise
        target = dd.next_target(d.target or "" for d in self.disks())
        disk = dd.AttachedDisk(path, fmt, serial, node_name=node, device_id=device, readonly=readonly,
                               backend=self.backend, file_node=file_node, target=target,
                               commands=tuple(dd.qmp_text(c, a) for c, a in messages),
                               virsh=dd.virsh_attach_line(self.spec.name, path, target, serial=serial, fmt=fmt,
                                                          readonly=readonly))
        self._hotplugged[device] = disk
        return disk

    def _device_present(self, device: str) -> bool:
        return any(child.get("name") == device for child in self.qmp("qom-list", path="/machine/peripheral"))

    def _unplug(self, device_id: str, messages: list[tuple[str, dict[str, Any]]], timeout: float,
                stuck: GuestError) -> None:
        """``device_del`` (messages[0]), wait until the guest lets the device go, then the node
        removals (messages[1:]), retried while the block backend still holds the node."""
        command, arguments = messages[0]
        self.qmp(command, **arguments)
        deadline = time.monotonic() + timeout
        while self._device_present(device_id):
            if time.monotonic() > deadline:
                raise stuck
            time.sleep(0.02)
        self._ports.pop(device_id, None)
        for command, arguments in messages[1:]:
            while True:  # the device's block backend lets go of the node a moment after the device goes
                try:
                    self.qmp(command, **arguments)
                    break
                except GuestError as err:
                    if "in use" not in err.message or time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)

    def detach_disk(self, disk: Any, *, timeout: float = 15.0, force: bool = False) -> Any:
        """Unplug a hot-plugged disk: ``device_del`` (the guest's kernel must release it: we wait until
        the device is gone), then ``blockdev-del`` of both nodes. Refuses a disk mounted in the guest
        (its data may not be written yet) unless ``force=True``. Returns the disk with the commands used."""
        from ..devices import disks as dd

        if disk.device_id not in self._hotplugged:
            raise InputError(f"El disco «{disk.serial}» no está conectado en caliente a este invitado.",
                             "Mira guest.disks(); los discos del arranque no se desconectan así.")
        if not force and self._agent is not None:
            dd.ensure_not_mounted(self, disk)
        messages = dd.detach_messages(disk)
        self._unplug(disk.device_id, messages, timeout,
                     GuestError(f"El invitado no soltó el disco «{disk.serial}» en {timeout:g} s.",
                                "device_del necesita la colaboración del invitado (ACPI): mira dmesg en el "
                                "invitado; el disco se quitará cuando lo suelte."))
        del self._hotplugged[disk.device_id]
        target = disk.target or "vdX"
        return replace(disk, commands=tuple(dd.qmp_text(c, a) for c, a in messages),
                       virsh=dd.virsh_detach_line(self.spec.name, target))

    def resize_disk(self, disk: Any, size: int | str) -> Any:
        """Grow a disk while the guest runs (QMP ``block_resize``; ``qemu-img resize`` cannot: the image
        is locked). The guest's virtio-blk driver sees the new capacity at once. Shrinking is refused."""
        from ..devices import disks as dd

        new = dd.parse_size(size)
        node = disk.node_name
        current = next((n["image"]["virtual-size"] for n in self.qmp("query-named-block-nodes", flat=True)
                        if n.get("node-name") == node), None)
        if current is None:
            raise InputError(f"El disco «{disk.serial}» no está conectado a este invitado.", "Mira guest.disks().")
        if new < current:
            raise InputError(f"{dd.format_size(new)} es menos que el tamaño actual ({dd.format_size(current)}): "
                             "reducir un disco en uso borraría datos.", "Indica un tamaño mayor.")
        command, arguments = dd.resize_message(disk, new)
        self.qmp(command, **arguments)
        return dd.ResizeResult(disk, current, new, (dd.qmp_text(command, arguments),),
                               dd.virsh_resize_line(self.spec.name, disk.target or "vdX", new))

    # ------------------------------------------------------------ shared folders
    def _start_share_daemons(self, runtime: qargv.Runtime) -> None:
        from ..devices import shares as sh

        self._shares = {}
        for share in self.spec.shares:
            sh.check_share_path(share.path, allow_home=share.allow_home, allow_symlinks=share.allow_symlinks)
            self._shares[share.tag] = share
        for share in self.spec.shares:
            if share.kind == "virtiofs":
                self._daemons.append(sh.start_virtiofsd(share, runtime.virtiofs(share.tag),
                                                        log=runtime.directory / f"virtiofsd-{share.tag}.log"))

    def shares(self) -> list[Any]:
        """The shared folders of this guest (ShareSpec), given at boot or hot-plugged."""
        return list(self._shares.values())

    def mount_share(self, share: Any, mountpoint: str | None = None) -> Any:
        """Mount a share (a ShareSpec or its tag) in the guest; returns a MountedShare with the commands."""
        from ..devices import shares as sh

        spec = self._shares.get(share) if isinstance(share, str) else share
        if spec is None:
            raise InputError(f"Este invitado no tiene ninguna carpeta compartida con tag «{share}».",
                             "Mira guest.shares().")
        return sh.mount_share(self, spec, mountpoint, backend=self.backend)

    def attach_share(self, path: str | os.PathLike[str], *, tag: str = "", kind: str = "virtiofs",
                     readonly: bool = False, allow_home: bool = False, allow_symlinks: bool = False) -> Any:
        """Share a folder with the running guest (virtiofs only: start virtiofsd, QMP ``chardev-add`` +
        ``device_add vhost-user-fs-pci``). The guest must have been started with shared memory
        (GuestSpec(shared_memory=True) or a virtiofs share at boot). Returns an AttachedShare."""
        from ..devices import shares as sh
        from .spec import ShareSpec, needs_shared_memory

        share = ShareSpec(str(path), tag=tag, kind=kind, readonly=readonly, allow_home=allow_home,
                          allow_symlinks=allow_symlinks)
        if share.kind != "virtiofs":
            raise InputError("Una carpeta 9p no se puede conectar en caliente: QEMU no tiene orden QMP para crear "
                             "su -fsdev.", "Dala al arrancar (GuestSpec(shares=...)) o usa kind=\"virtiofs\".")
        bus = self._hotplug_bus()
        if not needs_shared_memory(self.spec):
            raise GuestError("virtiofs necesita que la RAM del invitado sea memoria compartida desde el arranque.",
                             "Arranca con GuestSpec(shared_memory=True) (o con una carpeta virtiofs).")
        if share.tag in self._shares:
            raise InputError(f"Ya hay una carpeta con tag «{share.tag}».", "Usa otro tag.")
        checked = sh.check_share_path(share.path, allow_home=allow_home, allow_symlinks=allow_symlinks)
        assert self._runtime is not None
        index = 100 + len(self._shares)
        socket = self._runtime.virtiofs(share.tag)
        daemon = sh.start_virtiofsd(share, socket, log=self._runtime.directory / f"virtiofsd-{share.tag}.log")
        self._daemons.append(daemon)
        messages = self._on_port(sh.hotplug_messages(share, index, socket, bus=bus))
        try:
            for command, arguments in messages:
                self.qmp(command, **arguments)
        except GuestError:
            self._ports.pop(f"share{index}", None)
            daemon.stop()
            raise
        self._shares[share.tag] = share
        from ..devices.disks import qmp_text

        return sh.AttachedShare(share, index, tuple(qmp_text(c, a) for c, a in messages), daemon.argv,
                                checked.warnings)

    def detach_share(self, attached: Any, *, timeout: float = 15.0) -> None:
        """Unplug a hot-plugged virtiofs share (unmount it in the guest first)."""
        from ..devices import shares as sh

        command, arguments = sh.unplug_messages(attached.index)[0]
        self.qmp(command, **arguments)
        deadline = time.monotonic() + timeout
        while self._device_present(f"share{attached.index}"):
            if time.monotonic() > deadline:
                raise GuestError("El invitado no soltó la carpeta compartida.", "¿Sigue montada? Desmóntala antes.")
            time.sleep(0.02)
        self._ports.pop(f"share{attached.index}", None)
        command, arguments = sh.unplug_messages(attached.index)[1]
        self.qmp(command, **arguments)
        self._shares.pop(attached.share.tag, None)

    # ------------------------------------------------------------ channels (issue 6)
    def channel(self, name: str, *, timeout: float = 10.0) -> Any:
        """The host end of virtio-serial channel ``name`` (a :class:`labkit.devices.channels.Channel`), connected."""
        from ..devices.channels import Channel

        if name not in {c.name for c in self.spec.channels}:
            raise InputError(f"El invitado no tiene el canal «{name}».",
                             "Decláralo al crear el invitado: GuestSpec(channels=(ChannelSpec(nombre),)).")
        if not self.running or self._runtime is None:
            raise GuestError("El invitado no está en marcha.", "Arráncalo con start() o con «with Guest(...)».")
        return Channel(self._runtime.channel(name), name, timeout=timeout).connect()

    @property
    def vnc_socket(self) -> Path | None:
        """QEMU's VNC unix socket (GuestSpec(vnc=True)), or None."""
        if not self.spec.vnc or self._runtime is None:
            return None
        return self._runtime.vnc

    # ------------------------------------------------------------ USB (hot-plug)
    def usb_devices(self) -> list[Any]:
        """The USB devices hot-plugged into this guest (AttachedUsb)."""
        return list(self._usb.values())

    def attach_usb(self, kind: str, *, image: str | os.PathLike[str] | None = None, serial: str | None = None,
                   readonly: bool = False, hostbus: int | None = None, hostaddr: int | None = None,
                   vendorid: int | None = None, productid: int | None = None) -> Any:
        """Plug a USB device into the running guest over QMP ``device_add`` (on the xHCI bus; the
        controller itself is hot-plugged first when the guest has none). Loads the guest's drivers."""
        from ..devices import disks as dd
        from ..devices import usb as du
        from .spec import UsbSpec, has_usb

        self._hotplug_bus()
        path = dd._image_path(image, must_exist=True).resolve() if image else None
        if kind == "storage" and serial is None:
            serial = dd.new_serial()
        spec = UsbSpec(kind, image=str(path or ""), serial=serial or "", readonly=readonly, hostbus=hostbus,
                       hostaddr=hostaddr, vendorid=vendorid, productid=productid)
        sent: list[tuple[str, dict[str, Any]]] = []
        if not has_usb(self.spec) and not self._device_present(qargv.XHCI_ID):
            ((command, arguments),) = self._on_port([du.xhci_message()])
            self.qmp(command, **arguments)
            sent.append((command, arguments))
        if not self._usb_drivers:
            du.load_usb_drivers(self)
            self._usb_drivers = True
        index = 10 + len(self._usb)
        while f"usb{index}" in self._usb:
            index += 1
        fmt = dd.info(path).format if path else "raw"
        messages = du.attach_messages(spec, index, fmt=fmt)
        done: list[tuple[str, dict[str, Any]]] = []
        try:
            for command, arguments in messages:
                self.qmp(command, **arguments)
                done.append((command, arguments))
        except GuestError as err:
            for command, arguments in reversed(done):
                if command == "blockdev-add":
                    try:
                        self.qmp("blockdev-del", **{"node-name": arguments["node-name"]})
                    except GuestError:
                        pass
            if kind == "host":
                raise GuestError(du.explain_qemu_error(err.message.split(": ", 1)[-1], spec),
                                 "Comprueba el bus y la dirección con lsusb (o labkit.devices.usb.host_devices()).") from err
            raise
        from .domxml import usb_xml

        xml = usb_xml(spec, index)
        attached = du.AttachedUsb(kind, f"usb{index}", path, spec.serial, readonly, self.backend,
                                  du.qmp_lines(sent + messages),
                                  f"virsh attach-device {self.spec.name} usb.xml --live", xml)
        self._usb[attached.device_id] = attached
        return attached

    def detach_usb(self, device: Any, *, timeout: float = 15.0) -> Any:
        """Unplug a hot-plugged USB device (``device_del``, wait until it is gone, then drop its nodes)."""
        from ..devices import usb as du

        if device.device_id not in self._usb:
            raise InputError(f"El dispositivo «{device.device_id}» no está conectado a este invitado.",
                             "Mira guest.usb_devices().")
        messages = du.detach_messages(device)
        self._unplug(device.device_id, messages, timeout,
                     GuestError(f"El invitado no soltó «{device.device_id}» en {timeout:g} s.", "Mira dmesg."))
        del self._usb[device.device_id]
        return replace(device, commands=du.qmp_lines(messages),
                       virsh=f"virsh detach-device {self.spec.name} usb.xml --live")

    def command_line(self) -> str:
        """The exact QEMU argv, shell-quoted, for display."""
        return qargv.shell_line(self.argv)

    def __repr__(self) -> str:
        state = "en marcha" if self.running else "parado"
        return f"<Guest {self.spec.name} ({state}, acelerador {self.accel or '?'})>"


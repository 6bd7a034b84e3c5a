"""The libvirt runner: the same guest as :class:`labkit.guest.Guest`, run as a libvirt domain.

    with LibvirtGuest(GuestSpec(name="demo")) as g:
        print(g.virsh_line("create"))     # virsh -c qemu:///system create .../labkit-demo.xml
        print(g.run("uname -r").stdout)
        g.qmp("query-status")             # through libvirt: virsh qemu-monitor-command

Domains are *transient* (``createXML``): libvirt forgets them when they stop, so
nothing is left defined. They are destroyed on ``stop()``, on leaving the ``with``
block and when the object is garbage-collected; since a libvirt domain does not
die with the notebook kernel that started it, each domain records its owner
(pid and start time) in its ``<metadata>``, and :func:`sweep_stale_domains`
(run at every start, and by ``labkit cleanup``) destroys those whose owner is gone.

Files: libvirt runs QEMU as another user (``libvirt-qemu`` on Debian, ``qemu`` on
Fedora), who cannot enter ``/root`` or a 0700 home. Run as root, the boot files
are hard-linked (or copied) from labkit's cache into :data:`IMAGES_DIR`, and the
console and channel sockets live in a directory under :data:`RUNTIME_DIR` owned
by that user. Every file is checked before the domain is created
(:func:`unreachable_reason`), with a Spanish explanation instead of libvirt's
bare "Permission denied".

The guest agent: libvirt itself connects to the ``org.qemu.guest_agent.0``
socket (a QEMU socket chardev serves one client at a time), so commands go
through ``virDomainQemuAgentCommand`` (``virsh qemu-agent-command``).
"""

from __future__ import annotations

import fcntl
import grp
import json
import math
import os
import pwd
import shlex
import shutil
import stat
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlparse

from ..errors import InputError, SetupError
from . import argv as qargv
from . import domxml
from .agent import AgentError
from .runner import (
    CommandResult,
    Guest,
    GuestError,
    GuestStartError,
    _alive,
    choose_accel,
    host_tsc_khz,
    preflight,
    sweep_stale,
)
from .spec import PREFIX, GuestSpec

__all__ = [
    "DEFAULT_URI",
    "IMAGES_DIR",
    "LOG_DIR",
    "PID_DIR",
    "RUNTIME_DIR",
    "ConnectionLost",
    "DomainDied",
    "DomainNameTaken",
    "FileAccessError",
    "LibvirtError",
    "LibvirtGuest",
    "LibvirtPermissionError",
    "LibvirtUnavailable",
    "connect",
    "owner_alive",
    "process_start_time",
    "qemu_user",
    "remove_domain",
    "sweep_stale_domains",
    "unreachable_reason",
]

DEFAULT_URI = "qemu:///system"
DEFAULT_SOCKET = Path("/run/libvirt/libvirt-sock")
#: Boot files staged for libvirt's QEMU (readable by it), one subdir per cached build.
IMAGES_DIR = Path("/var/lib/libvirt/images/labkit")
#: Per-domain dirs (console log, channel sockets), owned by libvirt's QEMU user.
RUNTIME_DIR = Path("/run/labkit-libvirt")
LOG_DIR = Path("/var/log/libvirt/qemu")
PID_DIR = Path("/run/libvirt/qemu")
_SETUP_HINT = ("Arráncalo con ./lab setup (que ejecuta «virtlogd -d; libvirtd -d») o, con systemd, "
               "sudo systemctl start libvirtd.")
_RESTART_HINT = ("libvirtd se reinició o se paró: vuelve a intentarlo en unos segundos. labkit se reconecta solo y "
                 "el dominio sigue en marcha (QEMU no se para con libvirtd). Si libvirtd no vuelve: " + _SETUP_HINT)


class LibvirtError(GuestError):
    """libvirt refused or failed something."""


class LibvirtUnavailable(LibvirtError):
    """libvirtd cannot be reached (not running, wrong socket)."""


class ConnectionLost(LibvirtUnavailable):
    """The connection to libvirtd broke (it restarted or stopped); the next call reconnects."""


class LibvirtPermissionError(LibvirtError):
    """libvirtd runs but this user may not talk to it."""


class DomainNameTaken(LibvirtError):
    """A domain with that name already exists."""


class DomainDied(GuestStartError):
    """The domain stopped while booting or running."""


class FileAccessError(LibvirtError):
    """libvirt's QEMU user cannot read a file the guest needs."""


# --------------------------------------------------------------------------- libvirt plumbing


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError as err:  # pragma: no cover - the course's venv has it
        raise SetupError("Falta el módulo de Python «libvirt» (libvirt-python).",
                         "Ejecuta ./lab setup, que lo instala en .venv (necesita libvirt-dev).") from err
    # libvirt prints every error on stderr by default: silence it, we raise our own
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def _socket_of(uri: str) -> Path | None:
    """The unix socket a qemu:///system URI goes through (None for other URIs)."""
    parsed = urlparse(uri)
    query = parse_qs(parsed.query)
    if "socket" in query:
        return Path(query["socket"][0])
    if parsed.scheme == "qemu" and parsed.path == "/system" and not parsed.netloc:
        return DEFAULT_SOCKET
    return None


def connect(uri: str = DEFAULT_URI) -> Any:
    """A libvirt connection, or a Spanish error saying why not and what to do."""
    libvirt = _libvirt()
    sock = _socket_of(uri)
    if sock is not None:
        if not sock.exists():
            raise LibvirtUnavailable(f"libvirtd no está en marcha: no existe su socket {sock} (URI {uri}).",
                                     _SETUP_HINT)
        if not os.access(sock, os.R_OK | os.W_OK):
            raise LibvirtPermissionError(
                f"No tienes permiso para hablar con libvirtd (socket {sock}).",
                f"Añade tu usuario al grupo libvirt: sudo usermod -aG libvirt {_user()} "
                "y vuelve a entrar en la sesión (o usa qemu:///session).")
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as err:
        text = err.get_error_message() or str(err)
        if "ermission denied" in text or "authentication" in text.lower():
            raise LibvirtPermissionError(f"libvirt no deja conectar a {uri}: {text}",
                                         f"Añade tu usuario al grupo libvirt: sudo usermod -aG libvirt {_user()} "
                                         "y vuelve a entrar en la sesión.") from err
        raise LibvirtUnavailable(f"No se puede conectar con libvirt ({uri}): {text}", _SETUP_HINT) from err


def _user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _is_system(uri: str) -> bool:
    return urlparse(uri).path == "/system"


def qemu_user() -> pwd.struct_passwd | None:
    """The user libvirt's system instance runs QEMU as: libvirt-qemu (Debian) or qemu (Fedora)."""
    for name in ("libvirt-qemu", "qemu"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


def _groups_of(user: pwd.struct_passwd) -> set[int]:
    gids = {user.pw_gid}
    for group in grp.getgrall():
        if user.pw_name in group.gr_mem:
            gids.add(group.gr_gid)
    return gids


def _allowed(st: os.stat_result, uid: int, gids: set[int], bits: tuple[int, int, int]) -> bool:
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & bits[0])
    if st.st_gid in gids:
        return bool(st.st_mode & bits[1])
    return bool(st.st_mode & bits[2])


def unreachable_reason(path: Path, user: pwd.struct_passwd, *, need_read: bool = True) -> str | None:
    """Why ``user`` cannot open ``path`` (a directory it cannot enter, or the file unreadable), or None."""
    path = Path(os.path.abspath(path))
    gids = _groups_of(user)
    for directory in reversed(path.parents):
        try:
            st = directory.stat()
        except OSError as err:
            return f"no se puede examinar {directory}: {err.strerror}"
        if not _allowed(st, user.pw_uid, gids, (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)):
            return (f"el usuario «{user.pw_name}» no puede entrar en {directory} "
                    f"(permisos {stat.filemode(st.st_mode)}, dueño {_owner_name(st.st_uid)})")
    try:
        st = path.stat()
    except OSError as err:
        return f"{path}: {err.strerror}"
    if need_read and not _allowed(st, user.pw_uid, gids, (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)):
        return f"el usuario «{user.pw_name}» no puede leer {path} (permisos {stat.filemode(st.st_mode)})"
    return None


def _owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def process_start_time(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks), 0 when the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[19])
    except (OSError, ValueError, IndexError):
        return 0


def owner_alive(owner: domxml.Owner) -> bool:
    """True while the process that started a domain runs (same pid *and* same start time)."""
    if not _alive(owner.pid):
        return False
    return not owner.start_time or process_start_time(owner.pid) == owner.start_time


def _domain_owner(dom: Any) -> domxml.Owner | None:
    libvirt = _libvirt()
    try:
        return domxml.parse_owner(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, domxml.METADATA_NS, 0))
    except libvirt.libvirtError:
        return None


def remove_domain(dom: Any) -> str:
    """Destroy a domain (if running) and undefine it (if persistent, with its NVRAM). Returns what was done."""
    libvirt = _libvirt()
    done = []
    try:
        if dom.isActive():
            dom.destroy()
            done.append("parado")
        if dom.isPersistent():
            flags = (libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                     | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
            dom.undefineFlags(flags)
            done.append("borrado (undefine --nvram)")
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise LibvirtError(f"No se pudo eliminar el dominio «{dom.name()}»: {err.get_error_message()}",
                               f"Prueba a mano: virsh destroy {dom.name()}; virsh undefine --nvram {dom.name()}") from err
    return " y ".join(done) or "ya estaba parado"


def sweep_stale_domains(conn: Any, *, everything: bool = False) -> list[tuple[str, str]]:
    """Remove ``labkit-`` domains whose owner process is gone (all of them with ``everything``).

    Returns (name, what was done) pairs. Domains without labkit's owner metadata (made by
    hand with virsh) are only touched with ``everything``.
    """
    removed = []
    for dom in conn.listAllDomains(0):
        name = dom.name()
        if not name.startswith(PREFIX):
            continue
        owner = _domain_owner(dom)
        if not everything and (owner is None or owner_alive(owner)):
            continue
        what = remove_domain(dom)
        if owner is not None and owner.runtime:
            _remove_runtime(Path(owner.runtime))
        removed.append((name, what))
    return removed


def _remove_runtime(directory: Path) -> None:
    # only ever a labkit dir under RUNTIME_DIR or the runtime base, never anything else
    if directory.name.startswith(PREFIX) and (directory.parent == RUNTIME_DIR
                                              or directory.parent.name.startswith("labkit")):
        shutil.rmtree(directory, ignore_errors=True)


def _tail(path: Path, lines: int = 12) -> list[str]:
    try:
        return path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return []


def _connection_alive(conn: Any) -> bool:
    """False once libvirt has seen the connection break (libvirtd restarted or stopped)."""
    libvirt = _libvirt()
    try:
        return conn is not None and bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


def _close(conn: Any) -> None:
    libvirt = _libvirt()
    try:
        conn.close()
    except libvirt.libvirtError:
        pass


def _destroy_at_exit(conn: Any, name: str, directory: Path, uri: str = DEFAULT_URI) -> None:
    """weakref.finalize target: must not reference the guest object. A connection broken by a
    libvirtd restart is opened again (the domain outlives the restart)."""
    libvirt = _libvirt()
    for retry in (False, True):
        try:
            conn.lookupByName(name).destroy()
            break
        except libvirt.libvirtError:
            if retry or _connection_alive(conn):
                break  # already gone
            _close(conn)
            try:
                conn = connect(uri)
            except LibvirtError:
                conn = None  # libvirtd is down: «labkit cleanup» removes the domain once we are gone
                break
    shutil.rmtree(directory, ignore_errors=True)
    if conn is not None:
        _close(conn)


class _LibvirtAgent:
    """qemu-ga through libvirt (``virDomainQemuAgentCommand``), with AgentClient's ``execute``."""

    def __init__(self, dom: Any) -> None:
        self._dom = dom

    def execute(self, command: str, timeout: float = 10.0, **arguments: Any) -> Any:
        import libvirt_qemu

        libvirt = _libvirt()
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        try:
            answer = libvirt_qemu.qemuAgentCommand(self._dom, json.dumps(msg), max(1, math.ceil(timeout)), 0)
        except libvirt.libvirtError as err:
            code = err.get_error_code()
            text = err.get_error_message() or str(err)
            if not _connection_alive(self._dom.connect()):
                raise ConnectionLost(f"Se perdió la conexión con libvirtd mientras se enviaba «{command}» al "
                                     f"agente: {text}", _RESTART_HINT) from err
            if code == libvirt.VIR_ERR_AGENT_UNRESPONSIVE:
                raise AgentError(f"El agente del invitado no responde: {text}",
                                 "El invitado puede seguir arrancando o estar colgado: mira console_log().") from err
            raise AgentError(f"El agente rechazó «{command}»: {text}", "Revisa los argumentos de la orden.") from err
        return json.loads(answer).get("return")

    def close(self) -> None:
        self._dom = None


# --------------------------------------------------------------------------- the guest


class LibvirtGuest:
    """A guest run as a transient libvirt domain; the same calls as :class:`~labkit.guest.Guest`."""

    backend = "libvirt"

    def __init__(self, spec: GuestSpec | None = None, uri: str = DEFAULT_URI, *, assets: Any = None,
                 boot_timeout: float = 60.0, progress: Callable[[str], None] | None = None) -> None:
        self.spec = spec or GuestSpec()
        self.uri = uri
        self._assets = assets
        self.boot_timeout = boot_timeout
        self._progress = progress or (lambda _msg: None)
        self.accel: str | None = None
        self.accel_reason = ""
        self.machine, self.machine_reason = domxml.libvirt_machine(self.spec.machine)
        self.fallback: str | None = None
        self.boot_seconds: float | None = None
        self.create_seconds: float | None = None  # createXML alone
        self._xml = ""
        self._xml_file: Path | None = None
        self._conn: Any = None
        self._dom: Any = None
        self._uuid = ""
        self._directory: Path | None = None
        self._agent: _LibvirtAgent | None = None
        self._finalizer: Any = None
        self._last_console = ""
        self._hotplugged: dict[str, Any] = {}  # target (vdb ...) -> devices.disks.AttachedDisk
        self._disk_drivers = False
        self._shares: dict[str, Any] = {}  # tag -> ShareSpec
        self._usb: dict[str, Any] = {}  # alias -> devices.usb.AttachedUsb
        self._usb_drivers = False

    # ------------------------------------------------------------ state
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def running(self) -> bool:
        """True while the domain runs. After a libvirtd restart it reconnects first; while libvirtd is
        down it raises :class:`ConnectionLost` (it cannot know)."""
        return self._dom is not None and self._active()

    def _active(self) -> bool:
        libvirt = _libvirt()
        try:
            return bool(self._dom.isActive())
        except libvirt.libvirtError as err:
            if _connection_alive(self._conn):
                return False
            self._reconnect(err)
        try:
            return self._dom is not None and bool(self._dom.isActive())
        except libvirt.libvirtError as err:
            raise ConnectionLost(f"libvirtd dejó de responder otra vez: {err.get_error_message()}",
                                 _RESTART_HINT) from err

    def _reconnect(self, cause: Exception) -> None:
        """A new connection after libvirtd restarted, and the same domain found again by UUID (a transient
        domain survives the restart: QEMU keeps running and the new libvirtd takes it back)."""
        libvirt = _libvirt()
        try:
            conn = connect(self.uri)
        except LibvirtError as err:
            raise ConnectionLost(f"Se perdió la conexión con libvirtd y aún no responde: {err.message}",
                                 _RESTART_HINT) from cause
        try:
            dom = conn.lookupByUUIDString(self._uuid)
        except libvirt.libvirtError:
            dom = None
        _close(self._conn)
        self._conn = conn
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _destroy_at_exit, conn, self.name, self._directory, self.uri)
        if dom is None:  # it stopped while libvirtd was away
            self._progress(f"libvirtd se reinició y el dominio «{self.name}» ya no existe.")
            self._dom = None
            self._stop_domain()
            return
        self._dom = dom
        if self._agent is not None:
            self._agent._dom = dom
            deadline = time.monotonic() + 30  # libvirtd reattaches to qemu-ga a moment after taking the domain back
            while time.monotonic() < deadline:
                try:
                    self._agent.execute("guest-ping", timeout=1)
                    break
                except AgentError:
                    time.sleep(0.05)
        self._progress(f"libvirtd se reinició: reconectado; el dominio «{self.name}» sigue en marcha.")

    @property
    def pid(self) -> int | None:
        """QEMU's pid, from libvirt's pidfile /run/libvirt/qemu/<name>.pid."""
        if not self.running:
            return None
        try:
            return int((PID_DIR / f"{self.name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    # ------------------------------------------------------------ files
    def _boot_files(self) -> qargv.BootFiles:
        if self._assets is None:
            from .assets import ensure_assets

            self._assets = ensure_assets(progress=self._progress)
        kernel = Path(self._assets.vmlinux or self._assets.bzimage)
        return qargv.BootFiles(kernel, Path(self._assets.initramfs))

    def _stage(self, boot: qargv.BootFiles) -> qargv.BootFiles:
        """Make the boot files reachable by libvirt's QEMU user (root: link them into IMAGES_DIR)."""
        user = qemu_user() if _is_system(self.uri) else None
        if user is None:
            return boot
        if all(unreachable_reason(p, user) is None for p in (boot.kernel, boot.initrd)):
            return boot
        if os.geteuid() != 0:
            reason = unreachable_reason(boot.kernel, user) or unreachable_reason(boot.initrd, user)
            raise FileAccessError(
                f"libvirt ejecuta QEMU como «{user.pw_name}» y no puede leer los ficheros de arranque: {reason}.",
                f"Da permiso de paso a tus directorios (chmod o+x en cada uno, o setfacl -m u:{user.pw_name}:x), "
                f"o pon la caché de labkit en un sitio legible con LABKIT_CACHE_DIR, o usa qemu:///session.")
        target = IMAGES_DIR / boot.kernel.parent.name
        target.mkdir(parents=True, exist_ok=True)
        for directory in (IMAGES_DIR, target):
            directory.chmod(0o755)
        staged = []
        # one stager at a time (guests started together share the temp names); the kernel drops the lock
        # when its holder dies, even by kill -9
        with open(target / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for source in (boot.kernel, boot.initrd):
                dest = target / source.name
                if not (dest.exists() and os.path.samestat(dest.stat(), source.stat())):
                    tmp = target / f".{source.name}.tmp"
                    tmp.unlink(missing_ok=True)
                    try:
                        os.link(source, tmp)
                    except OSError:
                        shutil.copyfile(source, tmp)
                    tmp.chmod(0o644)
                    tmp.replace(dest)
                staged.append(dest)
        return qargv.BootFiles(staged[0], staged[1])

    def _check_access(self, files: Sequence[Path] = (), images: Sequence[Path] = ()) -> None:
        user = qemu_user() if _is_system(self.uri) else None
        if user is None:
            return
        problems = [r for f in files if (r := unreachable_reason(f, user))]
        # libvirt relabels disk images for its user (dynamic ownership): only the directories must be passable
        problems += [r for i in images if (r := unreachable_reason(i, user, need_read=False))]
        if problems:
            raise FileAccessError(
                f"libvirt ejecuta QEMU como «{user.pw_name}», que no puede abrir lo que necesita el invitado:\n  "
                + "\n  ".join(problems),
                f"Pon las imágenes en un directorio accesible (p. ej. /var/lib/libvirt/images) o da permiso de "
                f"paso: chmod o+x DIRECTORIO, o setfacl -m u:{user.pw_name}:x DIRECTORIO.")

    def _make_runtime(self) -> Path:
        """A per-domain dir the QEMU user can write (sockets, console) and labkit can read."""
        user = qemu_user() if _is_system(self.uri) else None
        if user is not None and os.geteuid() == 0:
            RUNTIME_DIR.mkdir(mode=0o755, exist_ok=True)
            directory = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=RUNTIME_DIR))
            os.chown(directory, user.pw_uid, user.pw_gid)
            directory.chmod(0o700)  # its sockets (agent, channels, VNC) are for QEMU and root only
        else:
            from .runner import runtime_base

            directory = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=runtime_base()))
            if user is not None:
                reason = unreachable_reason(directory, user, need_read=False)
                if reason:
                    shutil.rmtree(directory, ignore_errors=True)
                    raise FileAccessError(
                        f"libvirt ejecuta QEMU como «{user.pw_name}», que no puede crear sus sockets: {reason}.",
                        "Ejecuta como root (el curso lo hace así) o usa qemu:///session.")
        return directory

    # ------------------------------------------------------------ lifecycle
    def start(self) -> LibvirtGuest:
        if self.running:
            return self
        preflight(self.spec)
        libvirt = _libvirt()
        conn = connect(self.uri)
        for name, what in sweep_stale_domains(conn):
            self._progress(f"Dominio huérfano {name}: {what}")
        if RUNTIME_DIR.is_dir():
            sweep_stale(RUNTIME_DIR)
        try:
            other = conn.lookupByName(self.name)
        except libvirt.libvirtError:
            other = None
        if other is not None:
            owner = _domain_owner(other)
            who = f"el proceso {owner.pid}" if owner else "alguien fuera de labkit"
            conn.close()
            raise DomainNameTaken(f"Ya existe un dominio libvirt llamado «{self.name}» (lo arrancó {who}).",
                                  "Usa otro nombre (GuestSpec(name=...)) o elimínalo con «labkit cleanup» "
                                  f"(o virsh destroy {self.name}).")
        boot = self._stage(self._boot_files())
        self._check_access([boot.kernel, boot.initrd], [Path(d.path) for d in self.spec.disks]
                           + [Path(u.image) for u in self.spec.usb if u.kind == "storage"])
        self._shares = {share.tag: self._check_share(share) for share in self.spec.shares}
        accel, self.accel_reason = choose_accel(self.spec.accel)
        directory = self._make_runtime()
        (directory / "owner.pid").write_text(str(os.getpid()))
        runtime = domxml.LibvirtRuntime(directory)
        owner = domxml.Owner(os.getpid(), process_start_time(os.getpid()), str(directory))
        self._xml = domxml.domain_xml(self.spec, accel, boot, runtime,
                                      tsc_khz=host_tsc_khz() if accel == "tcg" else None, owner=owner)
        self._xml_file = directory / f"{self.name}.xml"
        self._xml_file.write_text(self._xml)
        self._conn, self._directory, self.accel = conn, directory, accel
        start = time.monotonic()
        try:
            dom = conn.createXML(self._xml, 0)
        except libvirt.libvirtError as err:
            text = err.get_error_message() or str(err)
            log = _tail(LOG_DIR / f"{self.name}.log")
            shutil.rmtree(directory, ignore_errors=True)
            self._directory = None
            if "already exists" in text:
                raise DomainNameTaken(f"Ya existe un dominio libvirt llamado «{self.name}».",
                                      "Usa otro nombre o elimínalo con «labkit cleanup».") from err
            detail = ("\nRegistro de libvirt:\n  " + "\n  ".join(log)) if log else ""
            raise GuestStartError(f"libvirt no pudo crear el dominio «{self.name}»: {text}{detail}",
                                  "Mira el XML con xml() y el registro "
                                  f"{LOG_DIR / (self.name + '.log')}.") from err
        self.create_seconds = time.monotonic() - start
        self._dom, self._uuid = dom, dom.UUIDString()
        self._finalizer = weakref.finalize(self, _destroy_at_exit, conn, self.name, directory, self.uri)
        (directory / "qemu.pid").write_text(str(self.pid or ""))
        agent = _LibvirtAgent(dom)
        try:
            # the bound starts once the domain runs: createXML may first re-probe QEMU
            self._wait_agent(agent, time.monotonic() + self.boot_timeout)
        except (GuestStartError, ConnectionLost):
            try:
                self._stop_domain()
            except ConnectionLost:
                pass  # libvirtd is down: the finalizer (or «labkit cleanup» once we are gone) removes it
            raise
        self._agent = agent
        self.boot_seconds = time.monotonic() - start
        return self

    def _wait_agent(self, agent: _LibvirtAgent, deadline: float) -> None:
        while True:
            if not self.running:
                raise DomainDied(f"El dominio «{self.name}» se paró mientras arrancaba.\n{self._failure_text()}",
                                 "Lee las líneas de arriba (registro de libvirt y consola) para ver por qué.")
            try:
                agent.execute("guest-ping", timeout=1)
                return
            except AgentError:
                pass
            if time.monotonic() >= deadline:
                raise GuestStartError(
                    f"El agente del invitado no respondió en {self.boot_timeout:g} s.\n{self._failure_text()}",
                    "El invitado puede seguir arrancando: prueba con más tiempo (boot_timeout) o mira console_log().")
            time.sleep(0.02)

    def _failure_text(self) -> str:
        parts = []
        for label, lines in (("Registro de libvirt", _tail(LOG_DIR / f"{self.name}.log")),
                             ("Últimas líneas de la consola", self.console_log().strip().splitlines()[-12:])):
            if lines:
                parts.append(f"{label}:\n  " + "\n  ".join(lines))
        return "\n".join(parts)

    def _stop_domain(self) -> None:
        if self._dom is not None:
            self._active()  # reconnects after a libvirtd restart; ConnectionLost while it is down (call stop() again)
        if self._directory is not None:
            try:
                self._last_console = (self._directory / "console.log").read_text(errors="replace")
            except OSError:
                pass
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        if self._finalizer is not None:
            self._finalizer()  # destroy + remove the dir + close the connection, exactly once
            self._finalizer = None
        self._dom = None
        self._conn = None
        self._directory = None

    def stop(self) -> None:
        """Destroy the domain (transient: libvirt then forgets it) and remove its files. Safe to call twice."""
        self._stop_domain()

    def __enter__(self) -> LibvirtGuest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ talking to it
    def _need_agent(self) -> _LibvirtAgent:
        if self._agent is None or not self.running:
            raise GuestError("El invitado no está en marcha.", "Arráncalo con start() o con «with LibvirtGuest(...)».")
        return self._agent

    def run(self, command: str | Sequence[str], *, timeout: float = 30.0, input: str | bytes | None = None,
            check: bool = False) -> CommandResult:
        """Run a command in the guest through qemu-ga (a string goes to /bin/sh -c)."""
        # the protocol logic is the QEMU-direct runner's; only the agent transport differs
        return Guest.run(self, command, timeout=timeout, input=input, check=check)  # type: ignore[arg-type]

    def agent(self, command: str, **arguments: Any) -> Any:
        """Send a raw qemu-ga command (e.g. "guest-info") through libvirt and return its answer."""
        return self._need_agent().execute(command, **arguments)

    def qmp(self, command: str, **arguments: Any) -> Any:
        """A QMP command through libvirt (``virsh qemu-monitor-command``), e.g. "query-status"."""
        if not self.running:
            raise GuestError("El invitado no está en marcha.", "Arráncalo con start() o con «with LibvirtGuest(...)».")
        import libvirt_qemu

        libvirt = _libvirt()
        try:
            answer = json.loads(libvirt_qemu.qemuMonitorCommand(self._dom, self._qmp_json(command, arguments), 0))
        except libvirt.libvirtError as err:
            if not _connection_alive(self._conn):
                raise ConnectionLost(f"Se perdió la conexión con libvirtd mientras se enviaba «{command}» a QEMU: "
                                     f"{err.get_error_message()}", _RESTART_HINT) from err
            raise GuestError(f"libvirt no pudo enviar «{command}» a QEMU: {err.get_error_message()}",
                             "Comprueba que el invitado sigue en marcha.") from err
        if "error" in answer:
            raise GuestError(f"QEMU rechazó «{command}»: {answer['error'].get('desc', answer['error'])}",
                             "Revisa el nombre y los argumentos en la referencia de QMP.")
        return answer.get("return")

    @staticmethod
    def _qmp_json(command: str, arguments: dict[str, Any]) -> str:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        return json.dumps(msg)

    # ------------------------------------------------------------ shared folders
    def _check_share(self, share: Any) -> Any:
        """Path safety, then (9p) whether libvirt's QEMU user can use the directory."""
        from ..devices import shares as sh

        sh.check_share_path(share.path, allow_home=share.allow_home, allow_symlinks=share.allow_symlinks)
        user = qemu_user() if _is_system(self.uri) else None
        if share.kind == "9p" and user is not None:
            problem = sh.qemu_user_problem(Path(share.path).resolve(), user, write=not share.readonly)
            if problem:
                raise FileAccessError(
                    f"libvirt ejecuta QEMU como «{user.pw_name}», y con 9p es QEMU quien abre los ficheros: "
                    f"{problem}.",
                    f"Da la carpeta a ese usuario (chown {user.pw_name} CARPETA), o permiso de paso y escritura "
                    f"(chmod o+rwx, o setfacl -m u:{user.pw_name}:rwx CARPETA), o usa virtiofs (libvirt "
                    "lanza virtiofsd como root).")
        return share

    # the same calls as the QEMU-direct guest: they only use self._shares, self.backend and run()
    shares = Guest.shares
    mount_share = Guest.mount_share

    def attach_share(self, path: str | os.PathLike[str], *, tag: str = "", kind: str = "virtiofs",
                     readonly: bool = False, allow_home: bool = False, allow_symlinks: bool = False) -> Any:
        """Share a folder with the running domain: ``attachDeviceFlags(<filesystem>)`` (virtiofs only:
        libvirt cannot hot-plug 9p). The domain needs shared memory from boot."""
        from ..devices import shares as sh
        from .spec import ShareSpec, needs_shared_memory

        libvirt = _libvirt()
        share = ShareSpec(str(path), tag=tag, kind=kind, readonly=readonly, allow_home=allow_home,
                          allow_symlinks=allow_symlinks)
        if share.kind == "9p":
            raise InputError(sh.LIBVIRT_9P_HOTPLUG, "GuestSpec(shares=(ShareSpec(ruta, kind=\"9p\"),)) al arrancar.")
        if not needs_shared_memory(self.spec):
            raise GuestError("virtiofs necesita <memoryBacking> con memoria compartida desde el arranque.",
                             "Arranca con GuestSpec(shared_memory=True) (o con una carpeta virtiofs).")
        if share.tag in self._shares:
            raise InputError(f"Ya hay una carpeta con tag «{share.tag}».", "Usa otro tag.")
        checked = sh.check_share_path(share.path, allow_home=allow_home, allow_symlinks=allow_symlinks)
        xml = domxml.filesystem_xml(share)
        try:
            self._dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as err:
            raise GuestError(f"libvirt no pudo conectar la carpeta «{share.path}»: {err.get_error_message()}",
                             "Mira libvirt_log().") from err
        self._shares[share.tag] = share
        line = f"virsh attach-device {self.name} carpeta.xml --live"
        return sh.AttachedShare(share, len(self._shares), (line, f"attachDeviceFlags({xml}, VIR_DOMAIN_AFFECT_LIVE)"),
                                (), checked.warnings, line)

    def _detach_live(self, unplug: Callable[[], Any], failed: tuple[str, str], present: Callable[[str], bool],
                     timeout: float, stuck: GuestError, poll: float = 0.05) -> None:
        """Ask libvirt to unplug a device (``unplug()``, a ``detachDevice*`` call), then wait until
        ``present(live_xml)`` is False: the guest must let go first. ``failed``: message and hint
        when libvirt refuses; ``stuck``: raised when the guest does not let go in ``timeout`` s."""
        libvirt = _libvirt()
        try:
            unplug()
        except libvirt.libvirtError as err:
            raise GuestError(f"{failed[0]}: {err.get_error_message()}", failed[1]) from err
        deadline = time.monotonic() + timeout
        while present(self._dom.XMLDesc(0)):
            if time.monotonic() > deadline:
                raise stuck
            time.sleep(poll)

    def detach_share(self, attached: Any, *, timeout: float = 15.0) -> None:
        """Unplug a hot-plugged virtiofs share (``virsh detach-device --live``); unmount it first."""
        libvirt = _libvirt()
        xml = domxml.filesystem_xml(attached.share)
        tag = attached.share.tag
        self._detach_live(lambda: self._dom.detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE),
                          ("libvirt no pudo quitar la carpeta", "¿Sigue montada en el invitado? Desmóntala antes."),
                          lambda live: f"dir='{tag}'" in live or f'dir="{tag}"' in live, timeout,
                          GuestError("El invitado no soltó la carpeta compartida.", "Desmóntala en el invitado."))
        self._shares.pop(attached.share.tag, None)

    # ------------------------------------------------------------ USB (virsh attach-device --live)
    def usb_devices(self) -> list[Any]:
        """The USB devices hot-plugged into this domain (AttachedUsb)."""
        return list(self._usb.values())

    def attach_usb(self, kind: str, *, image: str | os.PathLike[str] | None = None, serial: str | None = None,
                   readonly: bool = False, hostbus: int | None = None, hostaddr: int | None = None,
                   vendorid: int | None = None, productid: int | None = None) -> Any:
        """Plug a USB device into the running domain: ``attachDeviceFlags`` of a ``<disk bus='usb'>``,
        ``<input bus='usb'>`` or ``<hostdev type='usb'>``. libvirt cannot hot-plug the USB controller:
        the domain must have one from boot (GuestSpec(usb_controller=True) or usb=...)."""
        from ..devices import disks as dd
        from ..devices import usb as du
        from .spec import UsbSpec, has_usb

        libvirt = _libvirt()
        if not has_usb(self.spec):
            raise GuestError("Este dominio no tiene controlador USB y libvirt no permite añadirlo en caliente.",
                             "Arráncalo con GuestSpec(usb_controller=True): <controller type='usb' "
                             "model='qemu-xhci'/>.")
        path = dd._image_path(image, must_exist=True).resolve() if image else None
        if path is not None:
            self._check_access(images=[path])
        if kind == "storage" and serial is None:
            serial = dd.new_serial()
        spec = UsbSpec(kind, image=str(path or ""), serial=serial or "", readonly=readonly, hostbus=hostbus,
                       hostaddr=hostaddr, vendorid=vendorid, productid=productid)
        if not self._usb_drivers:
            du.load_usb_drivers(self)
            self._usb_drivers = True
        index = 10 + len(self._usb)
        while f"ua-usb{index}" in self._usb:
            index += 1
        xml = domxml.usb_hostdev_xml(spec) if spec.kind == "host" else domxml.usb_xml(spec, index)
        try:
            self._dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as err:
            message = err.get_error_message()
            if spec.kind == "host":
                raise GuestError(du.explain_qemu_error(message, spec),
                                 "Comprueba el bus y la dirección con lsusb (o labkit.devices.usb.host_devices()).") from err
            raise GuestError(f"libvirt no pudo conectar el dispositivo USB: {message}", "Mira libvirt_log().") from err
        line = f"virsh attach-device {self.name} usb.xml --live"
        attached = du.AttachedUsb(kind, f"ua-usb{index}", path, spec.serial, readonly, self.backend,
                                  (line, f"attachDeviceFlags({xml}, VIR_DOMAIN_AFFECT_LIVE)"), line, xml)
        self._usb[attached.device_id] = attached
        return attached

    def detach_usb(self, device: Any, *, timeout: float = 15.0) -> Any:
        """Unplug a hot-plugged USB device: ``detachDeviceAlias`` (its ``ua-`` alias) and wait until it
        leaves the live XML."""
        libvirt = _libvirt()
        if device.device_id not in self._usb:
            raise InputError(f"El dispositivo «{device.device_id}» no está conectado a este invitado.",
                             "Mira guest.usb_devices().")
        alias = device.device_id
        self._detach_live(lambda: self._dom.detachDeviceAlias(alias, libvirt.VIR_DOMAIN_AFFECT_LIVE),
                          (f"libvirt no pudo quitar «{alias}»", "Mira libvirt_log()."),
                          lambda live: f"'{alias}'" in live or f'"{alias}"' in live, timeout,
                          GuestError(f"El invitado no soltó «{alias}» en {timeout:g} s.", "Mira dmesg."))
        del self._usb[device.device_id]
        line = f"virsh detach-device-alias {self.name} {device.device_id} --live"
        return replace(device, commands=(line, f"detachDeviceAlias('{device.device_id}', VIR_DOMAIN_AFFECT_LIVE)"),
                       virsh=line)

    # ------------------------------------------------------------ disks (virsh attach-disk --live ...)
    def disks(self) -> list[Any]:
        """The file-backed virtio disks of the running domain, read from its live XML."""
        from ..devices.disks import AttachedDisk

        if not self.running:
            raise GuestError("El invitado no está en marcha.", "Arráncalo con start() o con «with LibvirtGuest(...)».")
        return [self._hotplugged.get(d.target) or
                AttachedDisk(Path(d.source), d.format, d.serial, readonly=d.readonly, target=d.target,
                             backend=self.backend, hotplugged=False)
                for d in domxml.parse_disks(self._dom.XMLDesc(0))]

    def attach_disk(self, image: str | os.PathLike[str], *, format: str | None = None, serial: str | None = None,
                    readonly: bool = False) -> Any:
        """Plug a disk into the running domain: ``attachDeviceFlags(<disk>, VIR_DOMAIN_AFFECT_LIVE)``,
        what ``virsh attach-disk --live`` does (not ``--config``: a transient domain has no definition)."""
        from ..devices import disks as dd

        libvirt = _libvirt()
        path = dd._image_path(image, must_exist=True).resolve()
        self._check_access(images=[path])
        fmt = format or dd.info(path).format
        serial = dd.check_serial(serial) if serial else dd.new_serial()
        current = self.disks()
        if any(d.serial == serial for d in current):
            raise InputError(f"Ya hay un disco con número de serie «{serial}».", "Usa otro número de serie.")
        if not self._disk_drivers:
            dd.load_disk_drivers(self)
            self._disk_drivers = True
        target = dd.next_target(d.target or "" for d in current)
        xml = domxml.disk_xml(path, fmt, target, serial=serial, readonly=readonly)
        try:
            self._dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as err:
            message = err.get_error_message()
            if "lock" in message:
                raise dd.DiskInUseError(f"No se pudo conectar «{path.name}»: otra máquina la tiene abierta. {message}",
                                        "Desconéctala de la otra máquina, o conéctala con readonly=True.") from err
            raise GuestError(f"libvirt no pudo conectar «{path.name}»: {message}",
                             "Mira libvirt_log() y el formato de la imagen (qemu-img info).") from err
        line = dd.virsh_attach_line(self.name, path, target, serial=serial, fmt=fmt, readonly=readonly)
        disk = dd.AttachedDisk(path, fmt, serial, readonly=readonly, target=target, backend=self.backend,
                               commands=(line, f"attachDeviceFlags({xml}, VIR_DOMAIN_AFFECT_LIVE)"), virsh=line)
        self._hotplugged[target] = disk
        return disk

    def detach_disk(self, disk: Any, *, timeout: float = 15.0, force: bool = False) -> Any:
        """Unplug a hot-plugged disk (``virsh detach-disk --live``): libvirt asks the guest to let go
        and we wait until the disk leaves the live XML. Refuses a disk mounted in the guest unless ``force``."""
        from ..devices import disks as dd

        libvirt = _libvirt()
        if disk.target not in self._hotplugged:
            raise InputError(f"El disco «{disk.serial}» no está conectado en caliente a este invitado.",
                             "Mira guest.disks(); los discos del arranque no se desconectan así.")
        if not force:
            dd.ensure_not_mounted(self, disk)
        xml = domxml.disk_xml(disk.image, disk.format, disk.target, serial=disk.serial, readonly=disk.readonly)
        self._detach_live(lambda: self._dom.detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE),
                          (f"libvirt no pudo desconectar «{disk.serial}»", "Mira libvirt_log()."),
                          lambda live: any(d.target == disk.target for d in domxml.parse_disks(live)), timeout,
                          GuestError(f"El invitado no soltó el disco «{disk.serial}» en {timeout:g} s.",
                                     "La desconexión necesita la colaboración del invitado (ACPI): mira dmesg."),
                          poll=0.02)
        del self._hotplugged[disk.target]
        line = dd.virsh_detach_line(self.name, disk.target)
        return replace(disk, commands=(line, f"detachDeviceFlags({xml}, VIR_DOMAIN_AFFECT_LIVE)"), virsh=line)

    def resize_disk(self, disk: Any, size: int | str) -> Any:
        """Grow a disk while the guest runs: ``blockResize`` = ``virsh blockresize``. Shrinking is refused."""
        from ..devices import disks as dd

        libvirt = _libvirt()
        new = dd.parse_size(size)
        try:
            current = self._dom.blockInfo(disk.target)[0]
        except libvirt.libvirtError as err:
            raise InputError(f"El disco «{disk.serial}» no está conectado a este invitado.", "Mira guest.disks().") from err
        if new < current:
            raise InputError(f"{dd.format_size(new)} es menos que el tamaño actual ({dd.format_size(current)}): "
                             "reducir un disco en uso borraría datos.", "Indica un tamaño mayor.")
        self._dom.blockResize(disk.target, new, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
        line = dd.virsh_resize_line(self.name, disk.target, new)
        return dd.ResizeResult(disk, current, new, (line,), line)

    def console_log(self) -> str:
        """Everything the guest kernel and init printed on the serial console."""
        if self._directory is not None:
            try:
                return (self._directory / "console.log").read_text(errors="replace")
            except OSError:
                pass
        return self._last_console

    def libvirt_log(self) -> str:
        """libvirt's log of this domain (/var/log/libvirt/qemu/<name>.log): QEMU's command line and errors."""
        try:
            return (LOG_DIR / f"{self.name}.log").read_text(errors="replace")
        except OSError:
            return ""

    # ------------------------------------------------------------ showing it
    def xml(self) -> str:
        """The domain XML given to libvirt (empty before start())."""
        return self._xml

    def live_xml(self) -> str:
        """The XML libvirt holds for the running domain (``virsh dumpxml``), with every default filled in."""
        if not self.running:
            raise GuestError("El invitado no está en marcha.", "Arráncalo primero.")
        return self._dom.XMLDesc(0)

    def virsh_line(self, action: str, *args: str) -> str:
        """The ``virsh`` command equivalent to an action, for display (never executed through a shell).

        ``create`` (the XML file), ``destroy``, ``dumpxml``, ``console``, ``dominfo``,
        ``qemu-monitor-command CMD`` and ``qemu-agent-command CMD`` are spelled out; any other
        action is given the domain name and ``args``.
        """
        base = ["virsh", "-c", self.uri]
        if action == "create":
            return shlex.join(base + ["create", str(self._xml_file or f"{self.name}.xml")])
        if action in ("qemu-monitor-command", "qemu-agent-command") and args:
            payload = self._qmp_json(args[0], json.loads(args[1]) if len(args) > 1 else {})
            return shlex.join(base + [action, self.name, payload])
        return shlex.join(base + [action, self.name, *args])

    # ------------------------------------------------------------ channels (issue 6)
    def channel(self, name: str, *, timeout: float = 10.0) -> Any:
        """The host end of ``<channel type='unix'>`` ``name`` (a :class:`labkit.devices.channels.Channel`), connected."""
        from ..devices.channels import Channel

        if name not in {c.name for c in self.spec.channels}:
            raise InputError(f"El invitado no tiene el canal «{name}».",
                             "Decláralo al crear el invitado: GuestSpec(channels=(ChannelSpec(nombre),)).")
        if not self.running or self._directory is None:
            raise GuestError("El invitado no está en marcha.", "Arráncalo con start() o con «with LibvirtGuest(...)».")
        return Channel(domxml.LibvirtRuntime(self._directory).channel(name), name, timeout=timeout).connect()

    @property
    def vnc_socket(self) -> Path | None:
        """The VNC unix socket of ``<graphics type='vnc' socket=...>`` (GuestSpec(vnc=True)), or None."""
        if not self.spec.vnc or self._directory is None:
            return None
        return domxml.LibvirtRuntime(self._directory).vnc

    def command_line(self) -> str:
        """The virsh lines that start and stop this guest (the libvirt twin of the QEMU argv)."""
        return "\n".join([self.virsh_line("create"), self.virsh_line("destroy")])

    def __repr__(self) -> str:
        try:
            state = "en marcha" if self.running else "parado"
        except LibvirtError:
            state = "sin conexión con libvirtd"
        return f"<LibvirtGuest {self.name} ({state}, acelerador {self.accel or '?'}, {self.uri})>"

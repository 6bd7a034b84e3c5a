"""Shared folders: a host directory seen inside the guest, through virtio-9p or virtiofs.

Three layers, as in :mod:`labkit.devices.disks`::

    host side    check_share_path (what may be shared), virtiofsd_argv / start_virtiofsd,
                 qemu_user_problem (can libvirt's QEMU user use it?), host_view (owner, mode, xattrs)
    builders     labkit.guest.argv.share_args (-fsdev/-device), labkit.guest.domxml.filesystem_xml,
                 hotplug_messages (QMP chardev-add + device_add for virtiofs)   -- pure
    guest side   mount_command / mount_share / guest_view (through guest.run)

The two mechanisms:

- **virtio-9p** (``-fsdev local`` + ``virtio-9p-pci``): QEMU itself serves the files over the
  9P2000.L protocol. Simple, no daemon, slow-ish. The *security model* says how the guest's
  owners and permissions are stored on the host (see :data:`SECURITY_MODEL_TEXT`); labkit uses
  ``mapped-xattr`` unless told otherwise.
- **virtiofs** (``virtiofsd`` + ``vhost-user-fs-pci``): a separate daemon speaks FUSE over a
  vhost-user socket and reads guest memory directly, so the guest RAM must be a *shared*
  memory backend (``-object memory-backend-memfd,share=on`` + ``-numa node,memdev=mem``;
  libvirt: ``<memoryBacking><source type='memfd'/><access mode='shared'/>``). Faster, with
  local-file-system semantics; the modern replacement for 9p.

Symlinks: the guest resolves a symlink in *its own* tree (the server only answers readlink), and
both servers open each path component without following links (QEMU's 9p uses ``O_NOFOLLOW``
per component; virtiofsd pivots into the shared directory in its own mount namespace), so a
link cannot take the guest out of the share. A symlink pointing outside is still a surprise
(on the host it does lead out): :func:`check_share_path` refuses it unless ``allow_symlinks``.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import shlex
import shutil
import stat
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import HostError, InputError, ToolMissingError
from ..guest.argv import VIRTIOFSD, Runtime, share_args
from ..guest.spec import SECURITY_MODELS, ShareSpec

__all__ = [
    "LIBVIRT_9P_HOTPLUG",
    "MECHANISM_TEXT",
    "SECURITY_MODEL_TEXT",
    "AttachedShare",
    "FileView",
    "MountedShare",
    "ShareCheck",
    "ShareRefused",
    "VirtiofsDaemon",
    "argv_lines",
    "check_share_path",
    "escaping_symlinks",
    "guest_view",
    "host_view",
    "hotplug_messages",
    "mount_command",
    "mount_share",
    "qemu_user_problem",
    "start_virtiofsd",
    "umount_share",
    "unplug_messages",
    "virtiofsd_argv",
]

#: What each 9p security model does, in Spanish (shown by the notebook and by errors).
SECURITY_MODEL_TEXT = {
    "mapped-xattr": ("los ficheros se crean en el anfitrión con el usuario de QEMU y permisos privados (0600); "
                     "el dueño, grupo y modo que ve el invitado se guardan en atributos extendidos "
                     "(user.virtfs.*). QEMU no necesita ser root. Recomendado."),
    "mapped-file": ("como mapped-xattr, pero los metadatos van a ficheros ocultos .virtfs_metadata; "
                    "útil si el sistema de ficheros no admite xattr."),
    "passthrough": ("los dueños y permisos del invitado se aplican tal cual en el anfitrión (chown real): "
                    "QEMU tiene que ser root, y un root del invitado crea ficheros de root en el anfitrión. "
                    "El menos seguro (es el que usa el informe original)."),
    "none": ("como passthrough pero sin intentar cambiar dueños (los fallos se ignoran): el invitado ve "
             "los dueños del anfitrión y no puede cambiarlos."),
}

MECHANISM_TEXT = {
    "9p": "virtio-9p: QEMU sirve la carpeta con el protocolo 9P2000.L (sin demonio aparte)",
    "virtiofs": ("virtiofs: el demonio virtiofsd sirve la carpeta con FUSE por un socket vhost-user y lee la "
                 "memoria del invitado (memoria compartida memfd)"),
}

#: Why a 9p share cannot be hot-plugged through libvirt.
LIBVIRT_9P_HOTPLUG = ("libvirt no permite conectar una carpeta 9p en caliente (solo virtiofs; tampoco QEMU "
                      "tiene una orden QMP para crear un -fsdev en marcha). Dala al arrancar "
                      "(GuestSpec(shares=...)) o usa virtiofs.")


class ShareRefused(InputError):
    """This directory should not be shared (or cannot be)."""


@dataclass(frozen=True)
class ShareCheck:
    """What :func:`check_share_path` found: the resolved path and any warnings (Spanish)."""

    path: Path
    escaping: tuple[tuple[str, str], ...] = ()  # (link relative to the share, where it points)
    warnings: tuple[str, ...] = ()


def _home_dirs() -> set[Path]:
    homes = {Path(os.path.expanduser("~")).resolve()}
    try:
        for entry in pwd.getpwall():
            if entry.pw_uid == 0 or entry.pw_uid >= 1000:
                homes.add(Path(entry.pw_dir).resolve())
    except OSError:  # pragma: no cover
        pass
    return {h for h in homes if str(h) not in ("/", "/nonexistent")}


def escaping_symlinks(root: Path, *, limit: int = 10000) -> list[tuple[str, str]]:
    """Symlinks under ``root`` whose target (resolved on the host) is outside ``root``.

    Walks at most ``limit`` entries (a huge tree is not scanned to the end: a warning says so).
    """
    root = root.resolve()
    found: list[tuple[str, str]] = []
    seen = 0
    for directory, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            seen += 1
            if seen > limit:
                return found
            entry = Path(directory) / name
            if entry.is_symlink():
                target = Path(os.path.realpath(entry))
                if target != root and root not in target.parents:
                    found.append((str(entry.relative_to(root)), os.readlink(entry)))
    return found


def check_share_path(path: str | os.PathLike[str], *, allow_home: bool = False,
                     allow_symlinks: bool = False) -> ShareCheck:
    """Refuse what should not be shared: a missing path, a file, ``/``, a system directory, a whole
    home directory (unless ``allow_home``), symlinks that lead out (unless ``allow_symlinks``)."""
    raw = Path(path).expanduser()
    if not raw.exists():
        raise ShareRefused(f"La carpeta «{raw}» no existe.", f"Créala antes: mkdir -p {shlex.quote(str(raw))}")
    if not raw.is_dir():
        raise ShareRefused(f"«{raw}» no es una carpeta.", "Comparte la carpeta que contiene el fichero, o "
                           "copia el fichero con el agente (labkit.devices.files.copy_to_guest).")
    resolved = raw.resolve()
    if resolved == Path("/"):
        raise ShareRefused("No se comparte «/»: el invitado vería (y podría cambiar) todo el anfitrión.",
                           "Crea una carpeta solo para compartir, p. ej. /srv/compartida, y comparte esa.")
    system = [Path(p) for p in ("/etc", "/usr", "/bin", "/sbin", "/lib", "/boot", "/dev", "/proc", "/sys",
                                "/var", "/run", "/root/.ssh")]
    if resolved in system:
        raise ShareRefused(f"No se comparte «{resolved}»: es una carpeta del sistema.",
                           "Crea una carpeta solo para compartir y comparte esa.")
    if resolved in _home_dirs() and not allow_home:
        raise ShareRefused(f"«{resolved}» es una carpeta personal completa: el invitado vería tus claves SSH, "
                           "tu navegador, tus documentos...",
                           "Comparte una subcarpeta (p. ej. ~/compartida) o, si de verdad quieres toda tu "
                           "carpeta personal, pasa allow_home=True.")
    warnings = []
    escaping = escaping_symlinks(resolved)
    if escaping and not allow_symlinks:
        shown = ", ".join(f"{link} -> {target}" for link, target in escaping[:5])
        raise ShareRefused(f"Hay enlaces simbólicos que salen de «{resolved}»: {shown}"
                           + (" ..." if len(escaping) > 5 else "") + ".",
                           "El invitado no puede seguirlos hasta el anfitrión (los resuelve en su propio árbol, "
                           "y QEMU/virtiofsd no siguen enlaces fuera de la carpeta), pero en el anfitrión sí "
                           "llevan fuera. Quítalos, o pasa allow_symlinks=True si sabes lo que hay.")
    if escaping:
        warnings.append(f"{len(escaping)} enlace(s) simbólico(s) apuntan fuera de la carpeta; el invitado los "
                        "verá rotos o apuntando a sus propios ficheros.")
    return ShareCheck(resolved, tuple(escaping), tuple(warnings))


def qemu_user_problem(path: Path, user: pwd.struct_passwd, *, write: bool) -> str | None:
    """Why ``user`` (libvirt's QEMU user) cannot use a 9p share at ``path``, or None.

    virtiofsd is started by libvirt as root, so only 9p needs this; writes need ``w`` too."""
    from ..guest.libvirt import _allowed, _groups_of, unreachable_reason

    reason = unreachable_reason(path, user)
    if reason:
        return reason
    st = path.stat()
    gids = _groups_of(user)
    if not _allowed(st, user.pw_uid, gids, (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)):
        return f"el usuario «{user.pw_name}» no puede entrar en {path} (permisos {stat.filemode(st.st_mode)})"
    if write and not _allowed(st, user.pw_uid, gids, (stat.S_IWUSR, stat.S_IWGRP, stat.S_IWOTH)):
        return (f"el usuario «{user.pw_name}» no puede escribir en {path} (permisos {stat.filemode(st.st_mode)}, "
                f"dueño {pwd.getpwuid(st.st_uid).pw_name if st.st_uid in {p.pw_uid for p in pwd.getpwall()} else st.st_uid})")
    return None


# --------------------------------------------------------------------------- virtiofsd


def virtiofsd_argv(share: ShareSpec, socket: Path, *, binary: str = VIRTIOFSD) -> list[str]:
    """The daemon's command line: the shared directory, the vhost-user socket, the sandbox.

    ``sandbox=namespace`` (the default, spelled out): virtiofsd pivots into the shared directory in
    its own mount namespace, so no path the guest sends can reach outside it. QEMU 7.2's C
    virtiofsd has no read-only option: labkit bind-mounts the directory read-only in the daemon's
    own mount namespace instead (see :func:`start_virtiofsd`)."""
    return [binary, f"--socket-path={socket}", "-o", f"source={share.path}", "-o", "cache=auto",
            "-o", "sandbox=namespace", "-o", "log_level=warn"]


_MS_RDONLY, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
_CLONE_NEWNS = 0x00020000
_PR_SET_PDEATHSIG = 1


def _preexec(readonly_dir: str | None) -> Any:
    def setup() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0)  # die with the process that started it
        if readonly_dir is None:
            return
        src = readonly_dir.encode()
        if libc.unshare(_CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
        if libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
            raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
        if libc.mount(src, src, None, _MS_BIND | _MS_REC, None) != 0:
            raise OSError(ctypes.get_errno(), "mount --bind")
        if libc.mount(None, src, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY, None) != 0:
            raise OSError(ctypes.get_errno(), "mount -o remount,ro")
    return setup


@dataclass(frozen=True)
class AttachedShare:
    """A virtiofs share hot-plugged into a running guest: what was sent."""

    share: ShareSpec
    index: int
    commands: tuple[str, ...]
    daemon_argv: Sequence[str] = ()
    warnings: tuple[str, ...] = ()
    virsh: str = ""


@dataclass
class VirtiofsDaemon:
    """A running virtiofsd for one share (ends by itself when QEMU disconnects)."""

    share: ShareSpec
    socket: Path
    argv: list[str]
    process: subprocess.Popen
    readonly_how: str = ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(3)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(3)


def start_virtiofsd(share: ShareSpec, socket: Path, *, binary: str = VIRTIOFSD, timeout: float = 10.0,
                    log: Path | None = None) -> VirtiofsDaemon:
    """Start virtiofsd and wait for its socket. Needs root (namespaces, file ownership) or the right
    capabilities; dies with this Python process (parent-death signal)."""
    if not Path(binary).exists():
        raise ToolMissingError(binary, "qemu-system-common")
    if os.geteuid() != 0:
        raise HostError("virtiofsd necesita ser root (o las capacidades para crear espacios de nombres y "
                        "cambiar dueños) para servir una carpeta.",
                        "Ejecuta el curso como root, usa libvirt (que lanza virtiofsd como root) o usa 9p.")
    argv = virtiofsd_argv(share, socket, binary=binary)
    readonly_how = ""
    if share.readonly:
        readonly_how = ("virtiofsd 7.2 no tiene opción de solo lectura: labkit lo arranca en su propio espacio de "
                        "nombres de montaje con la carpeta montada de nuevo en solo lectura (mount --bind -o ro)")
    err = open(log, "ab") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                close_fds=True, preexec_fn=_preexec(share.path if share.readonly else None))
    finally:
        if log:
            err.close()  # type: ignore[union-attr]
    deadline = time.monotonic() + timeout
    while not socket.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            detail = log.read_text(errors="replace").strip()[-400:] if log and log.exists() else ""
            if proc.poll() is None:
                proc.kill()
                proc.wait(3)
            raise HostError(f"virtiofsd no arrancó para «{share.path}»: {detail or 'sin mensaje'}",
                            "Comprueba la carpeta y que se ejecuta como root.")
        time.sleep(0.01)
    return VirtiofsDaemon(share, socket, argv, proc, readonly_how)


# --------------------------------------------------------------------------- hot-plug (pure)


def hotplug_messages(share: ShareSpec, index: int, socket: Path, *, bus: str = "pci") -> list[tuple[str, dict[str, Any]]]:
    """QMP for a virtiofs share into a running guest (started with shared memory): ``chardev-add``
    (a unix socket to virtiofsd) + ``device_add vhost-user-fs-pci``. 9p has no QMP way to add its
    ``-fsdev``: it is refused."""
    if share.kind != "virtiofs":
        raise InputError("Una carpeta 9p no se puede conectar en caliente: QEMU no tiene orden QMP para crear "
                         "su -fsdev (y libvirt tampoco lo permite).", "Dala al arrancar o usa kind=\"virtiofs\".")
    return [("chardev-add", {"id": f"vfs{index}", "backend": {"type": "socket", "data": {
                "addr": {"type": "unix", "data": {"path": str(socket)}}, "server": False}}}),
            ("device_add", {"driver": f"vhost-user-fs-{bus}", "id": f"share{index}", "chardev": f"vfs{index}",
                            "tag": share.tag})]


def unplug_messages(index: int) -> list[tuple[str, dict[str, Any]]]:
    return [("device_del", {"id": f"share{index}"}), ("chardev-remove", {"id": f"vfs{index}"})]


def argv_lines(share: ShareSpec, index: int = 0, *, bus: str = "pci", runtime: Runtime | None = None) -> list[str]:
    """The QEMU options for one share, one option+value per line (for display)."""
    args = share_args(share, index, bus, runtime)
    lines = [f"{args[i]} {args[i + 1]}" for i in range(0, len(args), 2)]
    if share.kind == "virtiofs":
        lines = ["-object memory-backend-memfd,id=mem,size=<RAM>M,share=on", "-numa node,memdev=mem", *lines]
    return lines


# --------------------------------------------------------------------------- guest side


class _Runs(Protocol):
    def run(self, command: Any, *, timeout: float = ..., check: bool = ...) -> Any: ...


@dataclass(frozen=True)
class MountedShare:
    """A share mounted in the guest: where, how, and the exact commands."""

    share: ShareSpec
    mountpoint: str
    mechanism: str  # "9p" or "virtiofs"
    commands: tuple[str, ...]
    backend: str = "qemu"

    @property
    def explanation(self) -> str:
        text = MECHANISM_TEXT[self.mechanism]
        if self.mechanism == "9p":
            text += f"; modelo de seguridad {self.share.security_model}"
        return text + ("; solo lectura" if self.share.readonly else "")


def mount_command(share: ShareSpec, mountpoint: str) -> list[str]:
    """The guest's mount line (a 512 KiB msize makes 9p much faster than its 8 KiB default).

    A read-only share is mounted read-write on purpose: the refusal then comes from the host
    (QEMU's ``readonly=on``, or virtiofsd's read-only view), not from the guest's good will."""
    if share.kind == "9p":
        return ["mount", "-t", "9p", "-o", "trans=virtio,version=9p2000.L,msize=524288,cache=none",
                share.tag, mountpoint]
    return ["mount", "-t", "virtiofs", share.tag, mountpoint]


def mount_share(guest: _Runs, share: ShareSpec, mountpoint: str | None = None, *,
                backend: str = "qemu", wait: float = 10.0) -> MountedShare:
    """Load the modules (no udev in this guest), create the mount point and mount the share
    (retrying for up to ``wait`` seconds: a hot-plugged device takes a moment to appear)."""
    mountpoint = mountpoint or f"/mnt/{share.tag}"
    modules = ["9pnet_virtio", "9p"] if share.kind == "9p" else ["virtiofs"]
    steps = [["modprobe", "-a", *modules], ["mkdir", "-p", mountpoint], mount_command(share, mountpoint)]
    for step in steps:
        result = guest.run(step, timeout=60)
        deadline = time.monotonic() + wait
        while not result.ok and step[0] == "mount" and time.monotonic() < deadline:
            # a device plugged in a moment ago may not be probed yet: the tag is unknown (EINVAL/ENOENT)
            time.sleep(0.2)
            result = guest.run(step, timeout=60)
        if not result.ok:
            raise HostError(f"No se pudo montar «{share.tag}» en el invitado: {shlex.join(step)} → "
                            f"{(result.stderr or result.stdout).strip()}",
                            "¿Se dio la carpeta al arrancar (GuestSpec(shares=...)) con ese tag? Mira dmesg.")
    return MountedShare(share, mountpoint, share.kind, tuple(shlex.join(s) for s in steps), backend)


def umount_share(guest: _Runs, mounted: MountedShare) -> None:
    guest.run(["umount", mounted.mountpoint], check=True)


@dataclass(frozen=True)
class FileView:
    """A file's owner and mode as one side sees it."""

    side: str  # "anfitrión" or "invitado"
    path: str
    uid: int
    gid: int
    mode: str
    size: int
    xattrs: tuple[tuple[str, str], ...] = ()

    def line(self) -> str:
        extra = "  " + " ".join(f"{k}={v}" for k, v in self.xattrs) if self.xattrs else ""
        return f"{self.side:<10} {self.mode} uid={self.uid} gid={self.gid} {self.size:>6} B  {self.path}{extra}"


def _xattr_value(name: str, raw: bytes) -> str:
    if name in ("user.virtfs.uid", "user.virtfs.gid", "user.virtfs.mode") and len(raw) in (4, 8):
        value = int.from_bytes(raw, "little")
        return oct(value) if name.endswith("mode") else str(value)
    return raw.decode(errors="replace")


def host_view(path: str | os.PathLike[str]) -> FileView:
    """``ls -ln`` on the host, plus the ``user.virtfs.*`` attributes 9p's mapped-xattr model keeps."""
    p = Path(path)
    st = p.lstat()
    xattrs = []
    try:
        for name in sorted(os.listxattr(p, follow_symlinks=False)):
            if name.startswith("user.virtfs."):
                xattrs.append((name, _xattr_value(name, os.getxattr(p, name, follow_symlinks=False))))
    except OSError:
        pass
    return FileView("anfitrión", str(p), st.st_uid, st.st_gid, stat.filemode(st.st_mode), st.st_size, tuple(xattrs))


def guest_view(guest: _Runs, path: str) -> FileView:
    """``stat`` in the guest: owner and mode as the guest's kernel sees them."""
    out = guest.run(["stat", "-c", "%u %g %A %s", path], check=True).stdout.split()
    return FileView("invitado", path, int(out[0]), int(out[1]), out[2], int(out[3]))


def check_models() -> Sequence[str]:  # pragma: no cover - trivial
    return SECURITY_MODELS


def _which_virtiofsd() -> str | None:
    return VIRTIOFSD if Path(VIRTIOFSD).exists() else shutil.which("virtiofsd")

"""The files every guest boots: a Debian kernel, its ``vmlinux`` and a busybox initramfs.

Built once, cached under the user's cache directory and keyed by their inputs::

    find_kernel()            explicit path / $LABKIT_KERNEL -> labkit's cache -> /boot -> apt-get download
        |                    (a Debian ``linux-image-*`` package unpacked with dpkg-deb, no root)
        v
    extract_vmlinux()        the uncompressed ELF inside the bzImage, booted through its PVH
        |                    entry (``-kernel vmlinux``): no self-decompression in emulated code
        v
    resolve_load_order()     modules.dep + modules.softdep -> load order (deps first,
        |                    crc32c_generic before crc32c_intel, which fails under TCG)
        v
    build_initramfs()        newc cpio: busybox (static) + applet links, the modules with a
                             filtered modules.dep/alias (busybox modprobe works inside), qemu-ga
                             with its libraries, and INIT_SCRIPT as /init

The cache (``$LABKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/labkit``, else ``~/.cache/labkit``)::

    kernels/<version>/       unpacked kernel packages (boot/vmlinuz-*, lib/modules/<version>/)
    packages/<package>/      unpacked qemu-guest-agent / busybox-static when the host lacks them
    guest/<version>-<key>/   bzImage, vmlinux, initramfs.cpio, manifest.json (sizes + sha256)
    tmp/                     builds and downloads in progress (renamed into place when done)
    .lock                    one builder at a time (flock)

Nothing is written outside that directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Collection, Iterable, Iterator, Mapping, Sequence

from ..errors import LabkitError, SetupError, ToolMissingError

__all__ = [
    "GuestAssets",
    "KernelSource",
    "ensure_assets",
    "find_kernel",
    "resolve_load_order",
    "extract_vmlinux",
    "has_pvh_note",
    "kernel_version_of",
    "cache_root",
    "list_cpio",
    "read_cpio",
    "build_cli",
    "READY_MARKER",
    "AGENT_PORT",
    "BOOT_MODULES",
    "ON_DEMAND_MODULES",
    "INIT_SCRIPT",
]

#: Bump when the layout of the built files changes: every cached build is then rebuilt.
BUILDER_VERSION = 1

#: The line /init prints on the console once the agent is started (then " (<uptime> s)").
READY_MARKER = "labkit: listo"
#: The virtio-serial port name qemu-ga listens on.
AGENT_PORT = "org.qemu.guest_agent.0"

#: Loaded by /init at boot: the agent channel and, when they are modules, the virtio
#: transports (virtio_pci only when a virtio PCI device exists, virtio_mmio only on microvm).
BOOT_MODULES = ("virtio_pci", "virtio_mmio", "virtio_console")
_TRANSPORT_GROUPS = {"virtio_pci": "pci", "virtio_mmio": "mmio"}

#: Shipped in the initramfs for ``modprobe`` on demand (those this kernel has as modules).
ON_DEMAND_MODULES = (
    # disks and network
    "virtio_blk", "virtio_scsi", "virtio_net", "virtio_balloon", "virtio_rng", "virtio_input",
    "sd_mod", "scsi_mod", "loop",
    # shared folders: 9p and virtiofs
    "9p", "9pnet_virtio", "9pnet", "netfs", "fscache", "virtiofs", "fuse",
    # file systems
    "ext4", "jbd2", "mbcache", "crc16", "crc32c_generic", "libcrc32c",
    "vfat", "fat", "nls_cp437", "nls_iso8859_1", "nls_utf8",
    # USB (emulated controllers and devices)
    "xhci_pci", "xhci_hcd", "usb_storage", "uas", "usbhid", "hid_generic", "hid",
    # host <-> guest channels over vsock
    "vsock", "vmw_vsock_virtio_transport",
)

_KERNEL_META = "package"
_INITRAMFS = "initramfs.cpio"
_MANIFEST = "manifest.json"
_KEEP_BUILDS = 3

Progress = Callable[[str], None]


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class GuestAssets:
    """The files a guest boots, all inside ``cache_dir``."""

    kernel_version: str
    bzimage: Path
    vmlinux: Path | None  # None when the bzImage holds no extractable ELF with a PVH entry
    initramfs: Path
    modules: tuple[str, ...]  # loaded by /init, in load order (transports only when needed)
    available_modules: tuple[str, ...]  # everything in the initramfs, for modprobe
    cache_dir: Path


@dataclass(frozen=True)
class KernelSource:
    """A kernel image with its modules, and where it was found."""

    path: Path  # the bzImage (vmlinuz-<version>)
    version: str
    modules_dir: Path  # .../lib/modules/<version>
    origin: str  # "explicit", "env", "cache", "boot" or "download"

    def describe(self) -> str:
        """Where the kernel comes from, in Spanish."""
        where = {
            "explicit": "indicado por ti",
            "env": "indicado en LABKIT_KERNEL",
            "cache": "de la caché de labkit",
            "boot": "de /boot",
            "download": "descargado ahora",
        }.get(self.origin, self.origin)
        return f"kernel {self.version} ({where}: {self.path})"


# --------------------------------------------------------------------------- small helpers


def cache_root() -> Path:
    """labkit's cache directory: $LABKIT_CACHE_DIR, $XDG_CACHE_HOME/labkit or ~/.cache/labkit."""
    env = os.environ.get("LABKIT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "labkit"


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


_HASH_MEMO: dict[str, str] = {}  # "path|inode|size|mtime_ns" -> sha256
_HASHES_FILE = "hashes.json"
_HASHES_LOADED: set[Path] = set()


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}"


def _sha256(path: Path, *, fresh: bool = False) -> str:
    """sha256 of a file, remembered per (path, inode, size, mtime); ``fresh`` reads it anyway."""
    memo_key = _stat_key(path)
    digest = None if fresh else _HASH_MEMO.get(memo_key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = _HASH_MEMO[memo_key] = h.hexdigest()
    return digest


def _load_hashes(root: Path) -> None:
    """Input hashes remembered by earlier processes (a fresh CLI process then skips ~25 MB of hashing)."""
    try:
        stored = json.loads((root / _HASHES_FILE).read_text())
        if isinstance(stored, dict):
            for key, value in stored.items():
                _HASH_MEMO.setdefault(str(key), str(value))
    except (OSError, ValueError):
        pass


def _save_hashes(root: Path, used: Iterable[Path]) -> None:
    entries = {}
    for path in used:
        with contextlib.suppress(OSError):
            key = _stat_key(path)
            if key in _HASH_MEMO:
                entries[key] = _HASH_MEMO[key]
    target = root / _HASHES_FILE
    with contextlib.suppress(OSError, ValueError):
        if json.loads(target.read_text()) == entries:
            return
    with contextlib.suppress(OSError):
        root.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{_HASHES_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps(entries, indent=0, sort_keys=True))
        os.replace(tmp, target)


def _version_key(version: str) -> list[tuple[int, object]]:
    """Natural sort key: 6.1.0-10 < 6.1.0-9 is wrong, this gets it right."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", version) if p]


def _run(argv: Sequence[str], *, cwd: Path | None = None, what: str) -> subprocess.CompletedProcess[str]:
    """Run an argument list; a missing program or a failure becomes a Spanish SetupError."""
    try:
        result = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        package = {"apt-get": "apt", "apt-cache": "apt", "dpkg-deb": "dpkg", "ldd": "libc-bin"}.get(argv[0], argv[0])
        raise ToolMissingError(argv[0], package) from err
    if result.returncode != 0:
        tail = " ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise SetupError(f"Falló {what}: {' '.join(argv)}\n  {tail}",
                         "Revisa el mensaje de arriba; si es un problema de red o de apt, "
                         "ejecuta «sudo apt-get update» y vuelve a intentarlo.")
    return result


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One builder at a time per cache directory (an flock on ``root/.lock``)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _tempdir(root: Path, prefix: str) -> Path:
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root / "tmp"))


def _replace_dir(new: Path, final: Path, root: Path) -> None:
    """Move a finished directory into place; an old one there is moved aside and removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = _tempdir(root, "old-")
        os.rename(final, old / "dir")
        os.rename(new, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, final)


# --------------------------------------------------------------------------- kernel discovery


def kernel_version_of(bzimage: Path) -> str | None:
    """The version in a bzImage's setup header ("6.1.0-56-amd64"), or None if it has none."""
    try:
        with open(bzimage, "rb") as f:
            head = f.read(0x4000 + 0x200)
    except OSError:
        return None
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        return None
    ptr = struct.unpack_from("<H", head, 0x20E)[0]
    if not ptr:
        return None
    text = head[ptr + 0x200: ptr + 0x200 + 256].split(b"\0", 1)[0].decode("ascii", "replace")
    return text.split(" ", 1)[0] or None


def _version_from_name(path: Path) -> str | None:
    name = path.name
    return name[len("vmlinuz-"):] if name.startswith("vmlinuz-") and len(name) > 8 else None


def _modules_dir_for(bzimage: Path, version: str) -> Path | None:
    """Modules next to the image (<root>/boot/vmlinuz-V -> <root>/lib/modules/V), else the host's."""
    for candidate in (bzimage.parent.parent / "lib" / "modules" / version,
                      bzimage.parent.parent / "usr" / "lib" / "modules" / version,
                      Path("/lib/modules") / version):
        if (candidate / "kernel").is_dir() or (candidate / "modules.dep").is_file():
            return candidate
    return None


def _explicit_kernel(spec: str, origin: str) -> KernelSource:
    path = Path(spec).expanduser()
    if path.is_dir():  # an unpacked package or a root with boot/vmlinuz-*
        images = sorted(path.glob("boot/vmlinuz-*"), key=lambda p: _version_key(p.name))
        if not images:
            raise SetupError(f"En {path} no hay ningún boot/vmlinuz-*.",
                             "Indica la ruta del fichero vmlinuz-<versión> directamente.")
        path = images[-1]
    if not path.is_file() or not os.access(path, os.R_OK):
        raise SetupError(f"No puedo leer el kernel {path}.",
                         "Comprueba la ruta (y los permisos) o quita LABKIT_KERNEL para que labkit lo busque.")
    version = kernel_version_of(path) or _version_from_name(path)
    if not version:
        raise SetupError(f"{path} no parece un kernel Linux (bzImage): no tiene cabecera «HdrS».",
                         "Indica un vmlinuz-<versión> de un paquete linux-image.")
    modules = _modules_dir_for(path, version)
    if modules is None:
        raise SetupError(f"Encontré el kernel {version} ({path}) pero no sus módulos.",
                         f"Pon sus módulos en {path.parent.parent}/lib/modules/{version} "
                         f"o en /lib/modules/{version} (paquete linux-image-{version}).")
    return KernelSource(path, version, modules, origin)


def _cached_kernel(root: Path) -> KernelSource | None:
    found = []
    for meta in (root / "kernels").glob(f"*/{_KERNEL_META}.json"):
        tree = meta.parent
        version = tree.name
        image = tree / "boot" / f"vmlinuz-{version}"
        modules = tree / "lib" / "modules" / version
        if image.is_file() and (modules / "modules.dep").is_file():
            found.append(KernelSource(image, version, modules, "cache"))
    return max(found, key=lambda k: _version_key(k.version)) if found else None


def _boot_kernel(boot: Path = Path("/boot"), modules_root: Path = Path("/lib/modules")) -> KernelSource | None:
    found = []
    for image in boot.glob("vmlinuz-*"):
        version = _version_from_name(image)
        modules = modules_root / version if version else None
        if version and modules and modules.is_dir() and image.is_file() and os.access(image, os.R_OK):
            found.append(KernelSource(image, version, modules, "boot"))
    return max(found, key=lambda k: _version_key(k.version)) if found else None


def find_kernel(explicit: str | os.PathLike[str] | None = None, *, download: bool = True,
                progress: Progress | None = None) -> KernelSource:
    """Find a kernel with its modules: explicit, $LABKIT_KERNEL, cache, /boot, else download it.

    The download fetches the package behind ``linux-image-amd64`` with ``apt-get download``
    and unpacks it with ``dpkg-deb -x`` into labkit's cache (no root needed).
    """
    if explicit:
        return _explicit_kernel(os.fspath(explicit), "explicit")
    env = os.environ.get("LABKIT_KERNEL")
    if env:
        return _explicit_kernel(env, "env")
    root = cache_root()
    found = _cached_kernel(root) or _boot_kernel()
    if found:
        return found
    if not download:
        raise SetupError("No hay ningún kernel con módulos en la caché de labkit ni en /boot.",
                         "Ejecuta «labkit guest build» para descargar uno, o indica uno con LABKIT_KERNEL.")
    return _download_kernel(root, progress)


def _kernel_package() -> str:
    """The versioned package behind the linux-image-amd64 metapackage (candidate version)."""
    if shutil.which("apt-cache") is None:
        raise SetupError(
            "No encuentro ningún kernel para el invitado y este equipo no tiene apt para descargarlo.",
            "Indica uno con LABKIT_KERNEL=/ruta/vmlinuz-<versión> (con sus módulos en "
            "/lib/modules/<versión>), o usa Debian/Ubuntu, donde labkit lo descarga solo.")
    out = _run(["apt-cache", "depends", "linux-image-amd64"], what="la consulta del paquete del kernel").stdout
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if m and m.group(1) != "linux-image-amd64":
            return m.group(1)
    raise SetupError("apt no conoce el paquete linux-image-amd64.",
                     "Ejecuta «sudo apt-get update» (o instala linux-image-amd64) y vuelve a intentarlo.")


def _apt_download(package: str, into: Path) -> Path:
    argv = ["apt-get", "download", package]
    if os.geteuid() == 0:  # apt would drop to user _apt, who cannot write into our private temp dir
        argv[1:1] = ["-o", "APT::Sandbox::User=root"]
    try:
        _run(argv, cwd=into, what=f"la descarga de {package}")
    except SetupError as err:
        raise SetupError(err.message,
                         f"¿Hay red y apt funciona? Prueba «sudo apt-get update». Sin red, instala el paquete "
                         f"a mano (sudo apt-get install {package}) o, para el kernel, indica uno con "
                         "LABKIT_KERNEL=/ruta/vmlinuz-<versión>.") from err
    debs = sorted(into.glob("*.deb"))
    if not debs:
        raise SetupError(f"apt-get download {package} no dejó ningún .deb.",
                         "Ejecuta «sudo apt-get update» y vuelve a intentarlo.")
    return debs[0]


def _unpack(deb: Path, into: Path) -> None:
    _run(["dpkg-deb", "-x", str(deb), str(into)], what=f"el desempaquetado de {deb.name}")


def _download_kernel(root: Path, progress: Progress | None) -> KernelSource:
    package = _kernel_package()
    version = package[len("linux-image-"):]
    with _locked(root):
        cached = _cached_kernel(root)
        if cached is not None and cached.version == version:
            return cached
        work = _tempdir(root, "kernel-")
        try:
            _say(progress, f"Descargando {package}…")
            deb = _apt_download(package, work)
            _say(progress, f"Desempaquetando {package}…")
            tree = work / "tree"
            _unpack(deb, tree)
            deb.unlink()
            modules = tree / "lib" / "modules" / version
            if not (tree / "boot" / f"vmlinuz-{version}").is_file() or not modules.is_dir():
                raise SetupError(f"El paquete {package} no trae boot/vmlinuz-{version} y sus módulos.",
                                 "Indica un kernel con LABKIT_KERNEL.")
            if not (modules / "modules.dep").is_file():
                _say(progress, "Calculando las dependencias de los módulos…")
                write_module_index(modules)
            (tree / f"{_KERNEL_META}.json").write_text(json.dumps(
                {"package": package, "version": version, "fetched": time.strftime("%Y-%m-%dT%H:%M:%S")}))
            _replace_dir(tree, root / "kernels" / version, root)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    found = _cached_kernel(root)
    assert found is not None
    return KernelSource(found.path, found.version, found.modules_dir, "download")


# --------------------------------------------------------------------------- modules: index


_MODULE_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")


def module_name(path_or_name: str) -> str:
    """The kernel's name for a module: basename without .ko(.xz|.zst|.gz), '-' -> '_'."""
    base = path_or_name.rpartition("/")[2]
    cut = base.find(".ko")
    if cut > 0 and base[cut:] in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
        base = base[:cut]
    return base.replace("-", "_")


def _read_module(path: Path) -> bytes:
    """A module's ELF bytes, decompressing .ko.xz / .ko.gz / .ko.zst."""
    data = path.read_bytes()
    name = path.name
    if name.endswith(".xz"):
        return lzma.decompress(data)
    if name.endswith(".gz"):
        return gzip.decompress(data)
    if name.endswith(".zst"):
        return _zstd_decompress(data) or b""
    return data


def read_modinfo(data: bytes) -> list[tuple[str, str]]:
    """The ``key=value`` pairs of a module's .modinfo section (ELF64 little endian)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return []
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if not shoff or shoff + shnum * shentsize > len(data):
        return []

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size

    _, str_off, str_size = section(shstrndx)
    names = data[str_off: str_off + str_size]
    for i in range(shnum):
        name_off, offset, size = section(i)
        if names[name_off: names.find(b"\0", name_off)] == b".modinfo":
            pairs = []
            for item in data[offset: offset + size].split(b"\0"):
                key, sep, value = item.decode("utf-8", "replace").partition("=")
                if sep:
                    pairs.append((key, value))
            return pairs
    return []


def write_module_index(modules_dir: Path) -> None:
    """Write modules.dep, modules.softdep and modules.alias like depmod, from each .modinfo.

    For unpacked packages (depmod runs in the package's postinst, so they ship none) and for
    hosts without kmod. Dependencies come from the ``depends=`` field modpost records.
    """
    infos: dict[str, tuple[str, list[str], list[str], list[str]]] = {}
    for path in sorted(modules_dir.rglob("*.ko*")):
        if not path.name.endswith(_MODULE_SUFFIXES):
            continue
        rel = path.relative_to(modules_dir).as_posix()
        pairs = read_modinfo(_read_module(path))
        depends = [module_name(d) for p in pairs if p[0] == "depends" for d in p[1].split(",") if d]
        softdeps = [v for k, v in pairs if k == "softdep"]
        aliases = [v for k, v in pairs if k == "alias"]
        infos[module_name(rel)] = (rel, depends, softdeps, aliases)
    dep_lines, soft_lines, alias_lines = [], [], []
    for name, (rel, _deps, softdeps, aliases) in infos.items():
        closure = _closure(name, {n: i[1] for n, i in infos.items()})
        dep_lines.append(f"{rel}: " + " ".join(infos[d][0] for d in reversed(closure) if d in infos))
        soft_lines += [f"softdep {name} {s}" for s in softdeps]
        alias_lines += [f"alias {a} {name}" for a in aliases]
    (modules_dir / "modules.dep").write_text("\n".join(line.rstrip() for line in dep_lines) + "\n")
    (modules_dir / "modules.softdep").write_text("\n".join(soft_lines) + "\n")
    (modules_dir / "modules.alias").write_text("\n".join(alias_lines) + "\n")


def _closure(name: str, direct: Mapping[str, Sequence[str]]) -> list[str]:
    """Transitive dependencies of ``name`` in load order (without ``name``); cycles are cut."""
    order: list[str] = []
    seen = {name}

    def visit(n: str) -> None:
        for d in direct.get(n, ()):
            if d not in seen:
                seen.add(d)
                visit(d)
                order.append(d)

    visit(name)
    return order


# --------------------------------------------------------------------------- modules: load order


def parse_modules_dep(text: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """modules.dep -> {name: (path, dependency names as listed)}."""
    table = {}
    for line in text.splitlines():
        path, sep, deps = line.partition(":")
        if sep and path.strip():
            table[module_name(path.strip())] = (path.strip(), tuple(module_name(d) for d in deps.split()))
    return table


def parse_softdep(text: str) -> dict[str, tuple[str, ...]]:
    """modules.softdep (``softdep NAME pre: A B post: C``) -> {name: pre names}."""
    pre: dict[str, list[str]] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) < 3 or words[0] != "softdep":
            continue
        current = None
        for word in words[2:]:
            if word in ("pre:", "post:"):
                current = word
            elif current == "pre:":
                pre.setdefault(module_name(words[1]), []).append(word)
    return {k: tuple(v) for k, v in pre.items()}


def parse_aliases(text: str) -> dict[str, tuple[str, ...]]:
    """modules.alias (``alias PATTERN NAME``) -> {pattern with '-' as '_': module names}."""
    table: dict[str, list[str]] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "alias":
            table.setdefault(words[1].replace("-", "_"), []).append(words[2].replace("-", "_"))
    return {k: tuple(v) for k, v in table.items()}


def parse_builtin(text: str) -> set[str]:
    """modules.builtin (one path per line) -> names."""
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


class _Graph:
    """Who must be loaded before whom: modules.dep, softdep ``pre:``, generic crypto first."""

    def __init__(self, dep_text: str, softdep_text: str, builtin: Collection[str], aliases_text: str) -> None:
        self.dep = parse_modules_dep(dep_text)
        self.soft = parse_softdep(softdep_text)
        self._aliases_text = aliases_text
        self._aliases: dict[str, tuple[str, ...]] | None = None
        self.builtin = {module_name(b) for b in builtin}

    @property
    def aliases(self) -> dict[str, tuple[str, ...]]:
        """modules.alias, parsed on first use (it is large and rarely needed)."""
        if self._aliases is None:
            self._aliases = parse_aliases(self._aliases_text)
        return self._aliases

    def known(self, name: str) -> bool:
        return name in self.dep

    def hard(self, name: str) -> list[str]:
        # depmod lists the module loaded first last: walk it backwards for a stable order.
        return [d for d in reversed(self.dep[name][1]) if d not in self.builtin and d != name]

    def soft_pre(self, name: str) -> list[str]:
        found: list[str] = []
        for wanted in self.soft.get(name, ()):
            found += [m for m in self.provider(wanted) if m not in found and m != name]
        return found + [g for g in self.generic_partners(name) if g not in found]

    def provider(self, wanted: str) -> list[str]:
        """Modules for a softdep name (a module or an alias such as ``crypto-crc32c``).

        Among several candidates the ``*_generic`` one wins: the CPU-specific ones
        (crc32c_intel ...) need instructions that TCG's default CPU does not have.
        """
        key = wanted.replace("-", "_")
        if key in self.builtin:
            return []
        if key in self.dep:
            return [key]
        candidates = [m for m in self.aliases.get(key, ()) if m in self.dep or m in self.builtin]
        if not candidates:
            candidates = [m for pattern, mods in self.aliases.items()
                          if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(key, pattern)
                          for m in mods if m in self.dep or m in self.builtin]
        if not candidates:
            bare = key[len("crypto_"):] if key.startswith("crypto_") else key
            candidates = [c for c in (bare, f"{bare}_generic") if c in self.dep or c in self.builtin]
        if any(c in self.builtin for c in candidates):
            return []
        generic = [c for c in candidates if c.endswith("_generic")]
        return sorted(set(generic or candidates))

    def generic_partners(self, name: str) -> list[str]:
        """For a CPU-specific crypto module (under arch/*/crypto/), its generic version."""
        path = self.dep[name][0]
        if not re.search(r"(^|/)arch/[^/]+/crypto/", path):
            return []
        partners = set()
        stem = name.rsplit("_", 1)[0]
        if f"{stem}_generic" in self.dep:
            partners.add(f"{stem}_generic")
        for mods in self.aliases.values():
            if name in mods:
                partners.update(m for m in mods if m.endswith("_generic") and m in self.dep)
        return sorted(partners)


def resolve_load_order(wanted: Iterable[str], modules_dep_text: str, softdep_text: str = "",
                       builtin: Collection[str] = frozenset(), aliases_text: str = "") -> list[str]:
    """Load order for ``wanted`` and everything they need: each module after its dependencies.

    Hard dependencies come from modules.dep, ``pre:`` soft dependencies from modules.softdep
    (names may be aliases, resolved through modules.alias when given, preferring
    ``*_generic``), and a CPU-specific crypto module always follows its generic version
    (``crc32c_generic`` before ``crc32c_intel``, which fails under TCG). Built-in modules are
    skipped. A wanted or required module that does not exist, or a cycle of hard
    dependencies, raises SetupError. A soft dependency that is missing or would close a
    cycle is dropped (it is optional).
    """
    return _load_order(_Graph(modules_dep_text, softdep_text, builtin, aliases_text), wanted)


def _load_order(graph: _Graph, wanted: Iterable[str]) -> list[str]:
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: list[str], soft: bool) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "active":
            if soft:
                return
            cycle = chain[chain.index(name):] + [name]
            raise SetupError(f"Dependencias circulares entre módulos: {' -> '.join(cycle)}.",
                             "modules.dep está dañado: regenera el índice (depmod) o reconstruye con --rebuild.")
        if not graph.known(name):
            raise SetupError(f"El módulo «{name}», que necesita {chain[-1]}, no está en modules.dep.",
                             "El índice de módulos está incompleto: reconstruye con «labkit guest build --rebuild».")
        state[name] = "active"
        for dep in graph.soft_pre(name):
            visit(dep, chain + [name], True)
        for dep in graph.hard(name):
            visit(dep, chain + [name], False)
        state[name] = "done"
        order.append(name)

    for item in wanted:
        name = module_name(item)
        if name in graph.builtin:
            continue
        if not graph.known(name):
            raise SetupError(f"El módulo «{item}» no existe en este kernel (ni como módulo ni integrado).",
                             "Comprueba el nombre (lsmod / modinfo en un Linux con ese kernel) o usa otro kernel.")
        visit(name, [], False)
    return order


# --------------------------------------------------------------------------- vmlinux


_PAYLOAD_MAGICS = (
    ("xz", b"\xfd7zXZ\x00"),
    ("gzip", b"\x1f\x8b\x08"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
)


def _zstd_decompress(data: bytes) -> bytes | None:
    try:
        import zstandard  # type: ignore[import-not-found]
    except ImportError:
        zstandard = None
    if zstandard is not None:
        try:
            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
        except zstandard.ZstdError:
            return None
    if shutil.which("zstd") is None:
        return None
    # Trailing bytes after the frame make zstd fail after it wrote the frame: keep the output.
    result = subprocess.run(["zstd", "-dcq"], input=data, capture_output=True, check=False)
    return result.stdout or None


def _decompress(kind: str, data: bytes) -> bytes | None:
    try:
        if kind == "xz":
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
        if kind == "gzip":
            return zlib.decompressobj(wbits=31).decompress(data)
        return _zstd_decompress(data)
    except (lzma.LZMAError, zlib.error, EOFError):
        return None


def extract_vmlinux(image: bytes) -> bytes | None:
    """The ELF vmlinux compressed inside a bzImage (like the kernel's scripts/extract-vmlinux).

    Tries each xz, gzip and zstd magic found in the image, in file order, until one
    decompresses to an ELF file. None when nothing does.
    """
    hits = []
    for kind, magic in _PAYLOAD_MAGICS:
        start = image.find(magic)
        while start != -1:
            hits.append((start, kind))
            start = image.find(magic, start + 1)
    for start, kind in sorted(hits):
        out = _decompress(kind, image[start:])
        if out and out[:4] == b"\x7fELF":
            return out
    return None


XEN_ELFNOTE_PHYS32_ENTRY = 18


def has_pvh_note(elf: bytes) -> bool:
    """True if a 64-bit x86 ELF has the Xen PVH entry note QEMU needs for ``-kernel vmlinux``."""
    if len(elf) < 64 or elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False
    machine, = struct.unpack_from("<H", elf, 0x12)
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    if machine != 62:
        return False
    for i in range(phnum):
        base = phoff + i * phentsize
        if base + 56 > len(elf):
            return False
        p_type, _flags, offset, _vaddr, _paddr, filesz = struct.unpack_from("<IIQQQQ", elf, base)
        if p_type == 4 and _notes_have(elf[offset: offset + filesz], b"Xen", XEN_ELFNOTE_PHYS32_ENTRY):
            return True
    return False


def _notes_have(notes: bytes, owner: bytes, note_type: int) -> bool:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
        name = notes[pos + 12: pos + 12 + namesz].rstrip(b"\0")
        if name == owner and ntype == note_type:
            return True
        pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


# --------------------------------------------------------------------------- cpio (newc)


class CpioWriter:
    """A newc ("070701") archive, what the kernel unpacks as initramfs. Deterministic."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name_b = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
                  0, 0, rdev[0], rdev[1], len(name_b), 0)
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + name_b + b"\0" * (-(len(header) + len(name_b)) % 4))
        self._out.write(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str, mode: int = 0o755) -> None:
        name = name.strip("/")
        if not name or name in self._dirs:
            return
        self.dir(name.rsplit("/", 1)[0] if "/" in name else "")
        self._dirs.add(name)
        self._entry(name, stat.S_IFDIR | mode)

    def _parent(self, name: str) -> str:
        name = name.strip("/")
        if "/" in name:
            self.dir(name.rsplit("/", 1)[0])
        return name

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(self._parent(name), stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(self._parent(name), stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(self._parent(name), stat.S_IFCHR | mode, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)


def list_cpio(path: Path) -> dict[str, int]:
    """{name: mode} of a newc cpio (plain or gzip). Raises SetupError when it is truncated."""
    return {name: mode for name, mode, _data in read_cpio(path)}


def read_cpio(path: Path) -> list[tuple[str, int, bytes]]:
    """(name, mode, data) of each entry of a newc cpio (plain or gzip); SetupError if damaged."""
    hint = "Reconstrúyelo: labkit guest build --rebuild"
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise SetupError(f"El initramfs {path} está dañado ({err}).", hint) from err
    entries = []
    pos = 0
    while True:
        if pos + 110 > len(data) or data[pos: pos + 6] != b"070701":
            raise SetupError(f"El initramfs {path} está truncado o dañado (byte {pos}).", hint)
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_end = pos + 110 + namesize
        name = data[pos + 110: name_end - 1].decode()
        pos = name_end + (-name_end % 4)
        if name == "TRAILER!!!":
            return entries
        if pos + size > len(data):
            raise SetupError(f"El initramfs {path} está truncado ({name}).", hint)
        entries.append((name, mode, data[pos: pos + size]))
        pos += size + (-size % 4)


# --------------------------------------------------------------------------- guest userland


INIT_SCRIPT = r"""#!/bin/sh
# /init of the labkit guest (busybox sh), written by labkit.guest.assets.
# Under TCG every fork+exec costs ~5x more than on the host: builtins wherever possible.
# Kernel command line: labkit.agent=0 (no qemu-ga), labkit.shell=1 (a shell on the console),
# labkit.modules=a,b (modprobe these at boot).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=linux PS1='\h:\w\$ '
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /dev/virtio-ports
mount -a
echo labkit > /proc/sys/kernel/hostname

agent=1 shell=0 extra=
read -r cmdline < /proc/cmdline
set -f
for word in $cmdline; do
    case $word in
        labkit.agent=0) agent=0 ;;
        labkit.shell=1) shell=1 ;;
        labkit.modules=*) extra=${word#labkit.modules=} ;;
    esac
done
set +f

# virtio transports, only for the bus this machine has (pc/q35: PCI, microvm: MMIO via ACPI)
pci= mmio=
for d in /sys/bus/pci/devices/*; do
    [ -r "$d/vendor" ] || continue
    read -r vendor < "$d/vendor"
    if [ "$vendor" = 0x1af4 ]; then pci=1; break; fi
done
for d in /sys/bus/acpi/devices/LNRO0005:*; do
    [ -e "$d" ] && mmio=1
    break
done
while read -r group module; do
    case $group in
        pci) [ -n "$pci" ] || continue ;;
        mmio) [ -n "$mmio" ] || continue ;;
    esac
    insmod "$module"
done < /etc/labkit/boot-modules
if [ -n "$extra" ]; then
    IFS=, ; set -- $extra ; IFS=' 	
'
    modprobe -a "$@"
fi

if [ "$agent" = 1 ] && [ -d /sys/bus/virtio/drivers/virtio_console ]; then
    # Ports and their names arrive asynchronously after virtio_console loads: poll (bounded).
    n=0
    while :; do
        . /usr/sbin/labkit-ports
        [ -e /dev/virtio-ports/org.qemu.guest_agent.0 ] && break
        n=$((n + 1))
        if [ $n -gt 400 ]; then
            echo "labkit: aviso: no aparece el puerto org.qemu.guest_agent.0; qemu-ga no arranca"
            agent=0
            break
        fi
        [ $n -gt 20 ] && sleep 0.01
    done
    if [ "$agent" = 1 ]; then
        setsid qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 \
            -t /run -f /run/qemu-ga.pid -l /run/qemu-ga.log </dev/null >/dev/null 2>&1 &
    fi
fi

read -r up idle < /proc/uptime
echo "labkit: listo ($up s)"

if [ "$shell" = 1 ]; then
    # interactive use (labkit guest boot on a terminal): leaving the shell powers the guest off
    setsid cttyhack sh -l
    sync
    poweroff -f
fi
while :; do
    wait
    sleep 60
done
"""

_PORTS_SCRIPT = r"""#!/bin/sh
# /dev/virtio-ports/<name> -> ../vportNpM links from sysfs (there is no udev in this guest).
# Run it (or source it) again after hot-plugging a virtserialport.
for _p in /sys/class/virtio-ports/vport*; do
    [ -r "$_p/name" ] || continue
    read -r _n < "$_p/name"
    [ -n "$_n" ] && [ ! -e "/dev/virtio-ports/$_n" ] && ln -s "../${_p##*/}" "/dev/virtio-ports/$_n"
done
"""

_SHUTDOWN_SCRIPT = r"""#!/bin/sh
# qemu-ga's guest-shutdown runs "/sbin/shutdown -P|-H|-r +0 ..."; busybox has no shutdown.
sync
case $1 in
    -r) exec reboot -f ;;
    -H) exec halt -f ;;
    *) exec poweroff -f ;;
esac
"""

_FSTAB = """\
proc    /proc     proc    nosuid,nodev,noexec  0 0
sysfs   /sys      sysfs   nosuid,nodev,noexec  0 0
devpts  /dev/pts  devpts  gid=5,mode=620,ptmxmode=666  0 0
tmpfs   /dev/shm  tmpfs   mode=1777,nosuid,nodev  0 0
tmpfs   /run      tmpfs   mode=755,nosuid,nodev  0 0
tmpfs   /tmp      tmpfs   mode=1777,nosuid,nodev  0 0
"""

_ETC = {
    "etc/fstab": _FSTAB,
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\ntty:x:5:\n",
    "etc/hostname": "labkit\n",
    "etc/profile": "export PS1='\\h:\\w\\$ '\n",
}


def _is_dynamic(binary: Path) -> bool:
    """An ELF file with a PT_INTERP program header (it needs ld.so and libraries)."""
    with open(binary, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:
            return False
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return any(struct.unpack_from("<I", table, i * phentsize)[0] == 3
               for i in range(len(table) // max(phentsize, 1)))


def _is_static_elf(binary: Path) -> bool:
    with open(binary, "rb") as f:
        is_elf = f.read(4) == b"\x7fELF"
    return is_elf and not _is_dynamic(binary)


def shared_libraries(binary: Path) -> list[Path]:
    """The libraries (and ELF interpreter) a dynamic binary loads, from ``ldd``."""
    if not _is_dynamic(binary):
        return []
    out = _run(["ldd", str(binary)], what=f"ldd de {binary}").stdout
    libs, missing = [], []
    for line in out.splitlines():
        line = line.strip()
        if "=>" in line:
            name, _, rest = line.partition("=>")
            rest = rest.strip()
            if rest.startswith("not found"):
                missing.append(name.strip())
            elif rest.startswith("/"):
                libs.append(Path(rest.split(" (", 1)[0]))
        elif line.startswith("/"):
            libs.append(Path(line.split(" (", 1)[0]))
    if missing:
        raise SetupError(f"A {binary} le faltan bibliotecas: {', '.join(missing)}.",
                         "Instala el programa con apt (sudo apt-get install qemu-guest-agent) para que "
                         "apt traiga sus bibliotecas.")
    return libs


def _host_or_package(env: str, candidates: Sequence[str], package: str, inside: str, root: Path,
                     progress: Progress | None, accept: Callable[[Path], bool] = lambda p: True) -> Path:
    """A program from $ENV, the host, or else unpacked from its Debian package into the cache."""
    if os.environ.get(env):
        path = Path(os.environ[env])
        if not path.is_file():
            raise SetupError(f"{env}={path} no existe.", f"Corrige {env} o quítala.")
        return path
    for candidate in candidates:
        path = Path(candidate)
        if path.is_file() and os.access(path, os.X_OK) and accept(path):
            return path
    unpacked = root / "packages" / package
    target = unpacked / inside
    if target.is_file():
        return target
    if shutil.which("apt-get") is None:
        raise ToolMissingError(Path(candidates[0]).name, package)
    with _locked(root):
        if not target.is_file():
            work = _tempdir(root, "package-")
            try:
                _say(progress, f"Descargando {package}…")
                deb = _apt_download(package, work)
                _unpack(deb, work / "tree")
                if not (work / "tree" / inside).is_file():
                    raise SetupError(f"El paquete {package} no trae /{inside}.",
                                     f"Instálalo con: sudo apt-get install {package}")
                _replace_dir(work / "tree", unpacked, root)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    return target


def find_busybox(root: Path, progress: Progress | None = None) -> Path:
    """A static busybox: $LABKIT_BUSYBOX, the host's (busybox-static), or the package's."""
    return _host_or_package("LABKIT_BUSYBOX", ["/bin/busybox", "/usr/bin/busybox"], "busybox-static",
                            "bin/busybox", root, progress, accept=_is_static_elf)


def find_qemu_ga(root: Path, progress: Progress | None = None) -> Path:
    """qemu-ga: $LABKIT_QEMU_GA, the host's /usr/sbin/qemu-ga, or unpacked from qemu-guest-agent."""
    return _host_or_package("LABKIT_QEMU_GA", ["/usr/sbin/qemu-ga"], "qemu-guest-agent",
                            "usr/sbin/qemu-ga", root, progress)


def busybox_applets(busybox: Path) -> list[str]:
    """Install paths of the applets ("bin/sh", "sbin/modprobe" ...), from ``busybox --list-full``."""
    out = _run([str(busybox), "--list-full"], what="busybox --list-full").stdout
    return [line.strip().lstrip("/") for line in out.splitlines() if line.strip()]


# --------------------------------------------------------------------------- the build


@dataclass(frozen=True)
class _ModuleIndex:
    """A kernel's module index, read (and parsed) once per process while its files don't change."""

    text: str  # modules.dep + softdep + alias, for the cache key
    graph: _Graph
    builtin_text: str


_INDEX_MEMO: dict[tuple[object, ...], _ModuleIndex] = {}
_INDEX_FILES = ("modules.dep", "modules.softdep", "modules.alias", "modules.builtin")


def _read_index(modules_dir: Path) -> _ModuleIndex:
    stamp: list[object] = [str(modules_dir)]
    for name in _INDEX_FILES:
        try:
            st = (modules_dir / name).stat()
            stamp.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            stamp.append(None)
    memo_key = tuple(stamp)
    if memo_key not in _INDEX_MEMO:
        _INDEX_MEMO[memo_key] = _parse_index(modules_dir)
    return _INDEX_MEMO[memo_key]


def _parse_index(modules_dir: Path) -> _ModuleIndex:
    def text(name: str) -> str:
        path = modules_dir / name
        return path.read_text() if path.is_file() else ""

    dep, softdep, alias = text("modules.dep"), text("modules.softdep"), text("modules.alias")
    if not dep:
        # A kernel outside labkit's cache without depmod output: index it in a temp copy.
        (cache_root() / "tmp").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="index-", dir=cache_root() / "tmp") as tmp:
            _index_copy(modules_dir, Path(tmp))
            dep, softdep, alias = ((Path(tmp) / n).read_text()
                                   for n in ("modules.dep", "modules.softdep", "modules.alias"))
    builtin_text = text("modules.builtin")
    graph = _Graph(dep, softdep, parse_builtin(builtin_text), alias)
    return _ModuleIndex(dep + "\0" + softdep + "\0" + alias, graph, builtin_text)


def _index_copy(modules_dir: Path, tmp: Path) -> None:
    """write_module_index over a read-only tree: symlink its files into tmp first."""
    for path in modules_dir.rglob("*.ko*"):
        link = tmp / path.relative_to(modules_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    write_module_index(tmp)


@dataclass(frozen=True)
class _Plan:
    """Everything the build depends on; its digest names the cache entry."""

    kernel: KernelSource
    boot: tuple[tuple[str, str], ...]  # (group, name) in load order; group: all, pci or mmio
    shipped: tuple[str, ...]  # load order
    paths: Mapping[str, str]  # name -> path relative to modules_dir
    index: _ModuleIndex
    busybox: Path
    qemu_ga: Path
    libs: tuple[Path, ...]
    compression: str

    def guest_path(self, name: str) -> str:
        """Where a module goes in the initramfs (relative to lib/modules/<version>).

        Uncompressed for the boot modules; gzip (.ko.gz, which busybox modprobe reads) for
        the on-demand ones: the kernel copies every initramfs byte at boot, so 8 MB of
        modules nobody loads yet cost ~0.1 s under TCG, and ~2.5 MB cost a third of that.
        """
        rel = self.paths[name]
        for suffix in (".xz", ".zst", ".gz"):
            if rel.endswith(".ko" + suffix):
                rel = rel[: -len(suffix)]
        if any(name == m for _group, m in self.boot):
            return rel
        return rel + ".gz"

    def input_files(self) -> list[Path]:
        modules = self.kernel.modules_dir
        return ([self.kernel.path, self.busybox, self.qemu_ga, *self.libs]
                + [modules / self.paths[m] for m in self.shipped])

    def key(self) -> str:
        modules = self.kernel.modules_dir
        inputs = {
            "builder": BUILDER_VERSION,
            "kernel": [self.kernel.version, _sha256(self.kernel.path)],
            "modules": [[self.guest_path(m), _sha256(modules / self.paths[m])] for m in self.shipped],
            "boot": [list(b) for b in self.boot],
            "index": hashlib.sha256(self.index.text.encode()).hexdigest(),
            "busybox": _sha256(self.busybox),
            "qemu_ga": _sha256(self.qemu_ga),
            "libs": [[str(p), _sha256(p)] for p in self.libs],
            "init": hashlib.sha256((INIT_SCRIPT + _PORTS_SCRIPT + _SHUTDOWN_SCRIPT
                                    + json.dumps(_ETC, sort_keys=True)).encode()).hexdigest(),
            "compression": self.compression,
        }
        return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _boot_plan(graph: _Graph) -> tuple[tuple[str, str], ...]:
    """Boot modules in load order, each tagged with the bus that needs it (all, pci, mmio)."""
    if not graph.known("virtio_console") and "virtio_console" not in graph.builtin:
        raise SetupError("Este kernel no tiene virtio_console (ni módulo ni integrado): "
                         "sin él no hay canal para el agente.",
                         "Usa un kernel de Debian (linux-image-amd64) o indica otro con LABKIT_KERNEL.")
    always = set(_load_order(graph, ["virtio_console"]))
    groups: dict[str, str] = {}
    for transport, group in _TRANSPORT_GROUPS.items():
        if graph.known(transport):
            for m in _load_order(graph, [transport]):
                if m not in always:
                    groups.setdefault(m, group)
    order = _load_order(graph, [m for m in BOOT_MODULES if graph.known(m)])
    return tuple((groups.get(m, "all"), m) for m in order)


def _plan(kernel: KernelSource, root: Path, progress: Progress | None, compression: str) -> _Plan:
    index = _read_index(kernel.modules_dir)
    graph = index.graph
    boot = _boot_plan(graph)
    wanted = [m for _g, m in boot] + [m for m in ON_DEMAND_MODULES if graph.known(m)]
    shipped = tuple(_load_order(graph, wanted))
    busybox = find_busybox(root, progress)
    qemu_ga = find_qemu_ga(root, progress)
    return _Plan(kernel, boot, shipped, {m: graph.dep[m][0] for m in shipped}, index, busybox, qemu_ga,
                 tuple(shared_libraries(qemu_ga)), compression)


def _guest_modules_dep(plan: _Plan) -> str:
    """modules.dep for the shipped modules, softdep pre folded in (busybox modprobe has no softdep).

    busybox loads a line's dependencies from the last to the first, as depmod writes them.
    """
    lines = []
    for name in plan.shipped:
        needs = [m for m in _load_order(plan.index.graph, [name]) if m != name and m in plan.paths]
        lines.append(f"{plan.guest_path(name)}: " + " ".join(plan.guest_path(m) for m in reversed(needs)))
    return "\n".join(line.rstrip() for line in lines) + "\n"




def _guest_aliases(plan: _Plan) -> str:
    """modules.alias for the shipped modules (crc32c_intel is not shipped: crypto-crc32c -> generic)."""
    shipped = set(plan.shipped)
    lines = [f"alias {pattern} {m}" for pattern, mods in plan.index.graph.aliases.items()
             for m in mods if m in shipped]
    return "\n".join(lines) + "\n"


def build_initramfs(plan: _Plan, out: IO[bytes]) -> None:
    """Write the newc cpio of the guest's root file system to ``out``."""
    cpio = CpioWriter(out)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/labkit", "proc", "sys", "dev", "run", "root",
              "var", "mnt", "lib", "lib64"):
        cpio.dir(d)
    cpio.dir("tmp", 0o1777)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.symlink("var/run", "../run")
    cpio.symlink("etc/mtab", "/proc/mounts")
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)
    cpio.file("bin/busybox", plan.busybox.read_bytes(), 0o755)
    own = {"sbin/shutdown", "usr/sbin/labkit-ports", "usr/sbin/qemu-ga", "init"}
    for applet in busybox_applets(plan.busybox):
        if applet not in own and applet != "bin/busybox":
            cpio.symlink(applet, "/bin/busybox")
    cpio.file("sbin/shutdown", _SHUTDOWN_SCRIPT.encode(), 0o755)
    cpio.file("usr/sbin/labkit-ports", _PORTS_SCRIPT.encode(), 0o755)
    for name, text in _ETC.items():
        cpio.file(name, text.encode())
    cpio.file("usr/sbin/qemu-ga", plan.qemu_ga.read_bytes(), 0o755)
    for lib in plan.libs:
        cpio.file(str(lib).lstrip("/"), lib.read_bytes(), 0o755)
    base = f"lib/modules/{plan.kernel.version}"
    for name in plan.shipped:
        data = _read_module(plan.kernel.modules_dir / plan.paths[name])
        if plan.guest_path(name).endswith(".gz"):
            data = gzip.compress(data, compresslevel=9, mtime=0)
        cpio.file(f"{base}/{plan.guest_path(name)}", data)
    cpio.file(f"{base}/modules.dep", _guest_modules_dep(plan).encode())
    cpio.file(f"{base}/modules.alias", _guest_aliases(plan).encode())
    cpio.file(f"{base}/modules.builtin", plan.index.builtin_text.encode())
    boot_lines = "".join(f"{group} /{base}/{plan.guest_path(m)}\n" for group, m in plan.boot)
    cpio.file("etc/labkit/boot-modules", boot_lines.encode())
    cpio.close()


def _file_record(path: Path) -> dict[str, object]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(path)}


def _manifest_ok(build: Path, key: str, *, full: bool = False) -> dict[str, object] | None:
    """The manifest if every file it lists is intact (size + mtime, or sha256 if those moved)."""
    try:
        manifest = json.loads((build / _MANIFEST).read_text())
        if manifest.get("key") != key or manifest.get("builder") != BUILDER_VERSION:
            return None
        for name, record in manifest["files"].items():
            path = build / name
            st = path.stat()
            if st.st_size != record["size"]:
                return None
            if full or st.st_mtime_ns != record["mtime_ns"]:
                if _sha256(path, fresh=True) != record["sha256"]:
                    return None
        if full:
            list_cpio(build / manifest["initramfs"])
        return manifest
    except (OSError, ValueError, KeyError, TypeError, LabkitError):
        return None


def _assets_from(build: Path, manifest: Mapping[str, object]) -> GuestAssets:
    return GuestAssets(
        kernel_version=str(manifest["kernel_version"]),
        bzimage=build / "bzImage",
        vmlinux=build / "vmlinux" if manifest.get("vmlinux") else None,
        initramfs=build / str(manifest["initramfs"]),
        modules=tuple(manifest["modules"]),  # type: ignore[arg-type]
        available_modules=tuple(manifest["available_modules"]),  # type: ignore[arg-type]
        cache_dir=build,
    )


def _build(plan: _Plan, key: str, root: Path, final: Path, progress: Progress | None) -> None:
    work = _tempdir(root, "build-")
    try:
        shutil.copyfile(plan.kernel.path, work / "bzImage")
        _say(progress, "Extrayendo vmlinux…")
        elf = extract_vmlinux((work / "bzImage").read_bytes())
        vmlinux_ok = elf is not None and has_pvh_note(elf)
        if vmlinux_ok:
            assert elf is not None
            (work / "vmlinux").write_bytes(elf)
        else:
            _say(progress, "Aviso: no hay vmlinux con entrada PVH en este kernel; se arrancará el bzImage (más lento).")
        del elf
        _say(progress, f"Construyendo initramfs ({len(plan.shipped)} módulos)…")
        name = _INITRAMFS + (".gz" if plan.compression == "gzip" else "")
        with open(work / name, "wb") as raw:
            if plan.compression == "gzip":
                with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
                    build_initramfs(plan, gz)  # type: ignore[arg-type]
            else:
                build_initramfs(plan, raw)
        files = ["bzImage", name] + (["vmlinux"] if vmlinux_ok else [])
        manifest = {
            "builder": BUILDER_VERSION,
            "key": key,
            "kernel_version": plan.kernel.version,
            "kernel": str(plan.kernel.path),
            "kernel_origin": plan.kernel.origin,
            "busybox": str(plan.busybox),
            "qemu_ga": str(plan.qemu_ga),
            "initramfs": name,
            "vmlinux": vmlinux_ok,
            "compression": plan.compression,
            "modules": [m for _g, m in plan.boot],
            "boot_groups": [list(b) for b in plan.boot],
            "available_modules": list(plan.shipped),
            "files": {f: _file_record(work / f) for f in files},
            "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (work / _MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        work.chmod(0o755)  # readable by QEMU running as another user (libvirt-qemu)
        _replace_dir(work, final, root)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _prune(root: Path, keep: Path) -> None:
    """Keep the newest builds only (each is ~80 MB); never touch anything else in the cache."""
    builds = [p for p in (root / "guest").glob("*") if (p / _MANIFEST).is_file() and p != keep]
    builds.sort(key=lambda p: (p / _MANIFEST).stat().st_mtime, reverse=True)
    for old in builds[_KEEP_BUILDS - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def ensure_assets(kernel: str | os.PathLike[str] | None = None, *, progress: Progress | None = None,
                  rebuild: bool = False, verify: bool = False, compression: str = "none") -> GuestAssets:
    """The guest's kernel, vmlinux and initramfs: from the cache, or built now (once).

    ``kernel``: a bzImage path (else $LABKIT_KERNEL, the cache, /boot, or a download).
    ``rebuild``: build again even if the cache is intact. ``verify``: check every sha256
    (otherwise sizes and mtimes, and the sha256 of files whose mtime moved).
    ``compression``: "none" (boots faster under TCG) or "gzip".
    """
    if compression not in ("none", "gzip"):
        raise ValueError(f"compression must be 'none' or 'gzip', not {compression!r}")
    root = cache_root()
    source = find_kernel(kernel, progress=progress)
    plan = _plan(source, root, progress, compression)
    if root not in _HASHES_LOADED:
        _load_hashes(root)
        _HASHES_LOADED.add(root)
    key = plan.key()
    _save_hashes(root, plan.input_files())
    final = root / "guest" / f"{source.version}-{key}"
    if not rebuild:
        manifest = _manifest_ok(final, key, full=verify)
        if manifest is not None:
            _say(progress, "Listo (en caché)")
            return _assets_from(final, manifest)
    with _locked(root):
        manifest = None if rebuild else _manifest_ok(final, key, full=verify)
        if manifest is None:
            if final.exists() and not rebuild:
                _say(progress, "La caché estaba incompleta o dañada: se reconstruye.")
            _build(plan, key, root, final, progress)
            manifest = _manifest_ok(final, key, full=True)
            if manifest is None:
                raise SetupError(f"Acabo de construir {final} y no pasa la comprobación.",
                                 "¿Se está llenando el disco? Mira «df -h» y vuelve a intentarlo.")
            _prune(root, final)
            _say(progress, f"Listo ({source.describe()})")
        else:
            _say(progress, "Listo (en caché)")
    return _assets_from(final, manifest)


def build_cli(kernel: str | None = None, *, rebuild: bool = False, out: IO[str] | None = None) -> int:
    """``labkit guest build``: progress lines on ``out``, 0 on success, 1 with a Spanish error."""
    stream = out if out is not None else sys.stderr

    def say(message: str) -> None:
        print(f"[labkit] {message}", file=stream, flush=True)

    try:
        assets = ensure_assets(kernel, progress=say, rebuild=rebuild, verify=True)
    except LabkitError as err:
        print(f"labkit: error: {err}", file=stream)
        return 1
    say(f"kernel {assets.kernel_version}: {assets.vmlinux or assets.bzimage}")
    say(f"initramfs: {assets.initramfs} ({len(assets.available_modules)} módulos; "
        f"al arrancar: {' '.join(assets.modules)})")
    return 0

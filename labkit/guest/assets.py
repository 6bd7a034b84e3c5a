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

Nothing is written outside that directory. The steps live in their own modules:
:mod:`.kernel` (find/fetch, vmlinux), :mod:`.kmod` (module metadata and load order),
:mod:`.cpio` (the archive) and :mod:`.cache` (the directory and its lock); this module
holds the guest's userland (/init) and the build.
"""


from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Mapping, Sequence

from ..errors import LabkitError, SetupError, ToolMissingError
from .cache import (_HASHES_LOADED, Progress, _load_hashes, _locked, _replace_dir, _run, _save_hashes, _say,
                    _sha256, _tempdir, cache_root)
from .cpio import CpioWriter, list_cpio, read_cpio
from .kernel import KernelSource, _apt_download, _unpack, extract_vmlinux, find_kernel, has_pvh_note, kernel_version_of
from .kmod import _Graph, _load_order, _read_module, parse_builtin, resolve_load_order, write_module_index

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

_INITRAMFS = "initramfs.cpio"
_MANIFEST = "manifest.json"
_KEEP_BUILDS = 3


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

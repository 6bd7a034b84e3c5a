"""The guest kernel: found (explicit path, $LABKIT_KERNEL, cache, /boot) or fetched as a
Debian package without root, and its uncompressed ``vmlinux`` with the PVH entry point.
"""

from __future__ import annotations

import json
import lzma
import os
import re
import shutil
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import SetupError
from .cache import Progress, _locked, _replace_dir, _run, _say, _tempdir, _version_key, cache_root
from .kmod import _zstd_decompress, write_module_index

__all__ = ["KernelSource", "find_kernel", "kernel_version_of", "extract_vmlinux", "has_pvh_note"]

_KERNEL_META = "package"


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


# --------------------------------------------------------------------------- vmlinux


_PAYLOAD_MAGICS = (
    ("xz", b"\xfd7zXZ\x00"),
    ("gzip", b"\x1f\x8b\x08"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
)





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

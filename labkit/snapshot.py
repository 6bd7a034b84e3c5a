"""A ``labkit doctor`` snapshot as ONE file: ``--save equipo.tar.gz`` and ``--root equipo.tar.gz``.

The student runs ``labkit doctor --save equipo.tar.gz`` and sends the file; the instructor runs
``labkit doctor --root equipo.tar.gz`` and sees the student's diagnosis. The archive holds the
folder :func:`labkit.host.save_tree` writes, under one top folder.

An archive comes from someone else, so it is opened defensively: it is read into a fresh
temporary folder, and refused whole if any entry is an absolute path, goes up with ``..``, is
a link (a snapshot never has one; a link could point outside), a device node or a FIFO, or if
it is implausibly large. Files are written by labkit (mode 0644, owned by whoever runs it),
not restored with the archive's modes or owners, so nothing depends on the ``tarfile`` data
filter (missing in Python 3.11.2, Debian 12's).
"""

from __future__ import annotations

import os
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from .errors import InputError, os_reason
from .host import MANIFEST, save_tree

__all__ = ["ARCHIVE_SUFFIXES", "extract_archive", "is_archive_name", "opened", "save", "save_archive"]

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
MAX_BYTES = 64 * 2**20  # a real snapshot is well under 1 MiB
MAX_MEMBERS = 20_000
_HINT = "Pide que lo vuelvan a generar con «labkit doctor --save equipo.tar.gz» y envíalo sin tocarlo."


def is_archive_name(path: str | os.PathLike[str]) -> bool:
    """True for ``*.tar.gz`` / ``*.tgz`` (the names ``--save`` turns into one archive)."""
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def _top_name(dest: Path) -> str:
    name = dest.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name or "labkit-doctor"


def _normalized(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o755 if info.isdir() else 0o644
    return info


def save_archive(dest: str | os.PathLike[str], root: str = "/") -> Path:
    """Save the doctor's files as one ``.tar.gz``; an existing ``dest`` is never overwritten."""
    out = Path(dest)
    if out.exists() or out.is_symlink():
        raise InputError(f"«{out}» ya existe: no lo sobrescribo.",
                         "Elige otro nombre, p. ej. labkit doctor --save equipo2.tar.gz.")
    if not out.parent.is_dir():
        raise InputError(f"La carpeta «{out.parent}» no existe.", "Guarda el archivo en una carpeta que exista.")
    top = _top_name(out)
    with tempfile.TemporaryDirectory(prefix="labkit-doctor-") as tmp:
        tree = save_tree(str(Path(tmp) / top), root=root)
        try:  # "x": fails instead of replacing a file created meanwhile
            with open(out, "xb") as fh, tarfile.open(fileobj=fh, mode="w:gz") as tar:
                tar.add(str(tree), arcname=top, filter=_normalized)
        except FileExistsError as err:
            raise InputError(f"«{out}» ya existe: no lo sobrescribo.", "Elige otro nombre.") from err
        except BaseException:
            out.unlink(missing_ok=True)  # ours, half written
            raise
    return out


def save(dest: str, root: str = "/") -> Path:
    """``labkit doctor --save``: one archive for ``*.tar.gz``/``*.tgz``, else a folder."""
    return save_archive(dest, root) if is_archive_name(dest) else save_tree(dest, root=root)


def _refuse(archive: Path, what: str) -> InputError:
    return InputError(f"No abro «{archive}»: {what}.", _HINT)


def _checked_path(archive: Path, info: tarfile.TarInfo) -> PurePosixPath:
    name = info.name
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise _refuse(archive, f"la entrada «{name}» es una ruta absoluta")
    if ".." in path.parts or "\\" in name:
        raise _refuse(archive, f"la entrada «{name}» sale de su carpeta («..»)")
    if info.issym() or info.islnk():
        target = info.linkname
        outside = (target.startswith("/") or ".." in PurePosixPath(target).parts)
        where = "que apunta fuera del archivo" if outside else "y un diagnóstico de labkit no tiene enlaces"
        raise _refuse(archive, f"la entrada «{name}» es un enlace a «{target}», {where}")
    if info.ischr() or info.isblk() or info.isfifo():
        raise _refuse(archive, f"la entrada «{name}» es un dispositivo o una tubería (FIFO)")
    if not (info.isreg() or info.isdir()):
        raise _refuse(archive, f"la entrada «{name}» no es ni un fichero ni una carpeta")
    return path


def extract_archive(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Check every entry of ``archive``, then write it below ``dest``; returns the snapshot's root.

    Raises :class:`~labkit.errors.InputError` (and writes nothing) if any entry is unsafe.
    """
    src, base = Path(archive), Path(dest)
    try:
        with tarfile.open(src, "r:*") as tar:
            members = tar.getmembers()
            if len(members) > MAX_MEMBERS:
                raise _refuse(src, f"tiene {len(members)} entradas (un diagnóstico tiene menos de 200)")
            paths = [_checked_path(src, m) for m in members]
            if sum(m.size for m in members if m.isreg()) > MAX_BYTES:
                raise _refuse(src, f"ocupa más de {MAX_BYTES // 2**20} MiB descomprimido")
            for info, rel in zip(members, paths):
                target = base.joinpath(*rel.parts) if rel.parts else base
                if info.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                data = tar.extractfile(info)
                with target.open("wb") as fh:
                    fh.write(data.read() if data is not None else b"")
    except (tarfile.TarError, EOFError, zlib.error) as err:
        raise InputError(f"«{src}» no es un archivo .tar.gz válido ({err}).", _HINT) from err
    except OSError as err:
        raise InputError(f"No se puede leer «{src}»: {os_reason(err)}.", _HINT) from err
    return _snapshot_root(src, base)


def _snapshot_root(archive: Path, base: Path) -> Path:
    if (base / MANIFEST).is_file():
        return base
    found = [d for d in base.iterdir() if d.is_dir() and (d / MANIFEST).is_file()]
    if len(found) == 1:
        return found[0]
    raise InputError(f"«{archive}» no parece un diagnóstico de labkit: no encuentro {MANIFEST}.", _HINT)


@contextmanager
def opened(root: str) -> Iterator[str]:
    """The folder to probe for ``root``: ``root`` itself, or a checked extraction of an archive.

    The extraction lives in a temporary folder removed on exit.
    """
    path = Path(root)
    if not path.is_file():
        yield root  # a folder (or a missing path: probe() says so in Spanish)
        return
    if not tarfile.is_tarfile(path):
        raise InputError(f"«{root}» no es una carpeta ni un archivo .tar.gz.",
                         "Indica la carpeta o el archivo que creó «labkit doctor --save».")
    with tempfile.TemporaryDirectory(prefix="labkit-doctor-") as tmp:
        yield str(extract_archive(path, tmp))

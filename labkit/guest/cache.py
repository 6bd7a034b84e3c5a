"""labkit's cache directory and the small helpers every build step shares
(subprocesses as argument lists, atomic renames, one builder at a time).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from ..errors import SetupError, ToolMissingError

__all__ = ["cache_root", "Progress"]

Progress = Callable[[str], None]


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

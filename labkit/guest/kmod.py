"""Kernel modules without kmod: their metadata, ``modules.dep``/``softdep``/``alias``
written in pure Python, and the load order (dependencies first, softdep ``pre:``
honoured, ``crc32c_generic`` before the CPU-specific ``crc32c_intel``, which fails under TCG).
"""

from __future__ import annotations

import fnmatch
import gzip
import lzma
import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Collection, Iterable, Mapping, Sequence

from ..errors import SetupError

__all__ = ["resolve_load_order", "read_modinfo", "write_module_index", "parse_modules_dep", "parse_softdep",
           "parse_aliases", "parse_builtin", "module_name"]

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

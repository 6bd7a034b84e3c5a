"""Explain the CPU flags of /proc/cpuinfo, in Spanish.

Pure functions over sets of flag names (no I/O besides reading the packaged
data file ``labkit/data/cpu_flags.json``), so they work with any cpuinfo text:
a live host, a guest, or a fixture from another machine.

- :func:`explain` looks one flag up.
- :func:`classify` turns the ``flags`` (x86) / ``Features`` (arm64) line and the
  ``vmx flags`` line into sorted :class:`FlagRow` rows.
- :func:`search` filters rows (case- and accent-insensitive).
- :func:`virt_summary` says, in plain Spanish, which hardware virtualization
  features are present and which key ones are missing; :func:`format_summary`
  prints it.
- :func:`flags_table` renders rows as a deterministic plain-text table.

Input is plain iterables of strings; ``labkit.host.parse_cpuinfo`` gives
``.flags``, ``.vmx_flags`` and ``.architecture`` that fit straight in.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Iterable, Mapping, Optional

__all__ = [
    "ALL",
    "CATEGORIES",
    "FlagInfo",
    "FlagRow",
    "NO_DESCRIPTION",
    "all_flags",
    "classify",
    "explain",
    "flags_table",
    "format_summary",
    "guess_arch",
    "normalize_arch",
    "search",
    "virt_summary",
]

#: The fixed set of categories, in display order.
CATEGORIES: tuple[str, ...] = (
    "virtualización",
    "virtualización: memoria",
    "virtualización: interrupciones",
    "virtualización: anidada",
    "indica un hipervisor",
    "seguridad",
    "SIMD",
    "criptografía",
    "memoria",
    "otros",
)
#: Category value meaning "no filter" in :func:`search` and in the widget.
ALL = "todas"
#: Explanation used for flags the data file does not know.
NO_DESCRIPTION = "sin descripción"

_SOURCE_ORDER = {"flags": 0, "vmx flags": 1, "Features": 2}
_X86_MARKERS = frozenset({"fpu", "tsc", "pae", "cx8", "sse", "sse2", "lm", "vmx", "svm"})
_ARM_MARKERS = frozenset({"fp", "asimd", "evtstrm", "atomics", "pmull", "sha1", "sha2", "crc32"})


@dataclass(frozen=True)
class FlagInfo:
    """One entry of the data file: what a flag means."""

    name: str
    arch: str  # "x86" or "arm64"
    category: str
    text: str  # Spanish explanation
    virt: bool
    title: str = ""  # expanded name, e.g. "Extended Page Tables"
    lines: tuple[str, ...] = ()  # cpuinfo lines where it appears; () = not a cpuinfo flag
    ref: str = ""
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class FlagRow:
    """One flag seen in a cpuinfo, ready to show."""

    name: str
    source: str  # "flags", "vmx flags" or "Features"
    category: str
    explanation: str
    virt: bool
    title: str = ""
    ref: str = ""
    known: bool = True


# --------------------------------------------------------------------- data


@lru_cache(maxsize=1)
def _load() -> tuple[tuple[FlagInfo, ...], dict[tuple[str, str], FlagInfo]]:
    raw = resources.files("labkit").joinpath("data/cpu_flags.json").read_text("utf-8")
    doc = json.loads(raw)
    if tuple(doc["categories"]) != CATEGORIES:
        raise ValueError("cpu_flags.json: categories differ from labkit.cpuflags.CATEGORIES")
    infos = []
    index: dict[tuple[str, str], FlagInfo] = {}
    for e in doc["flags"]:
        info = FlagInfo(
            name=e["name"],
            arch=e["arch"],
            category=e["category"],
            text=e["text"],
            virt=bool(e["virt"]),
            title=e.get("title", ""),
            lines=tuple(e.get("lines", ())),
            ref=e.get("ref", ""),
            aliases=tuple(e.get("aliases", ())),
        )
        if info.category not in CATEGORIES:
            raise ValueError(f"cpu_flags.json: {info.name}: unknown category {info.category!r}")
        infos.append(info)
        for key in (info.name, *info.aliases):
            index.setdefault((info.arch, key.lower()), info)
    return tuple(infos), index


def all_flags() -> tuple[FlagInfo, ...]:
    """Every entry of the data file, in file order."""
    return _load()[0]


# --------------------------------------------------------------------- arch


def normalize_arch(arch: Optional[str]) -> Optional[str]:
    """Map ``uname -m`` style names to "x86" or "arm64" (None if unknown)."""
    if not arch:
        return None
    a = arch.strip().lower()
    if a in {"x86", "x86_64", "amd64", "i386", "i486", "i586", "i686", "x86-64"}:
        return "x86"
    if a in {"arm64", "aarch64", "armv8", "armv8l"}:
        return "arm64"
    return None


def guess_arch(flags: Iterable[str]) -> str:
    """Guess "x86" or "arm64" from the flag names themselves (default "x86")."""
    names = {f.lower() for f in flags}
    if len(names & _ARM_MARKERS) > len(names & _X86_MARKERS):
        return "arm64"
    return "x86"


def _arch_for(flags: Iterable[str], arch: Optional[str]) -> str:
    return normalize_arch(arch) or guess_arch(flags)


# --------------------------------------------------------------------- lookup


def explain(flag: str, arch: Optional[str] = None) -> Optional[FlagInfo]:
    """What ``flag`` means, or None if unknown.

    ``arch`` ("x86_64", "aarch64", ...) picks between same-named flags of both
    architectures (``aes``, ``sme``, ``cpuid``...); without it x86 wins.
    Aliases work too: ``explain("sse3")`` gives ``pni``, ``explain("VT-x")``
    gives ``vmx``.
    """
    index = _load()[1]
    key = flag.strip().lower()
    wanted = normalize_arch(arch)
    order = (wanted,) if wanted else ("x86", "arm64")
    for a in order:
        info = index.get((a, key))
        if info is not None:
            return info
    return None


def classify(
    flags: Iterable[str],
    vmx_flags: Optional[Iterable[str]] = (),
    *,
    arch: Optional[str] = None,
) -> list[FlagRow]:
    """Explain every flag of a cpuinfo, sorted by line and then by name.

    ``flags`` is the ``flags`` line (x86) or the ``Features`` line (arm64);
    ``vmx_flags`` the ``vmx flags`` line (None or empty if absent). A name in
    both lines gets one row per line. Unknown flags get :data:`NO_DESCRIPTION`;
    unknown names in ``vmx flags`` still count as virtualization.
    """
    flags = [f.strip() for f in flags if f and f.strip()]
    vmx = [f.strip() for f in (vmx_flags or ()) if f and f.strip()]
    a = _arch_for(flags, arch)
    main_source = "Features" if a == "arm64" else "flags"
    rows = {_row(name, main_source, a) for name in flags}
    rows |= {_row(name, "vmx flags", "x86") for name in vmx}
    return sorted(rows, key=lambda r: (_SOURCE_ORDER.get(r.source, 9), r.name))


def _row(name: str, source: str, arch: str) -> FlagRow:
    info = explain(name, arch)
    in_vmx = source == "vmx flags"
    if info is None:
        return FlagRow(
            name=name,
            source=source,
            category="virtualización" if in_vmx else "otros",
            explanation=NO_DESCRIPTION,
            virt=in_vmx,
            known=False,
        )
    return FlagRow(
        name=name,
        source=source,
        category=info.category,
        explanation=info.text,
        virt=info.virt or in_vmx,
        title=info.title,
        ref=info.ref,
    )


def _fold(text: str) -> str:
    """Lower-case and strip accents: "Virtualización" -> "virtualizacion"."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def search(
    rows: Iterable[FlagRow],
    text: str = "",
    category: Optional[str] = None,
    only_virt: bool = False,
) -> list[FlagRow]:
    """Filter rows, keeping their order.

    ``text`` is split into words; a row matches when every word appears in its
    name, title, category or explanation, ignoring case and accents.
    ``category`` None or :data:`ALL` means any category.
    """
    words = _fold(text).split()
    wanted = None if category in (None, "", ALL) else category
    out = []
    for row in rows:
        if only_virt and not row.virt:
            continue
        if wanted is not None and row.category != wanted:
            continue
        if words:
            hay = _fold(" ".join((row.name, row.title, row.category, row.explanation)))
            if not all(w in hay for w in words):
                continue
        out.append(row)
    return out


# --------------------------------------------------------------------- summary


def _feature(key: str, name: str, present: Optional[bool], flags: Iterable[str], detail: str) -> dict:
    return {"key": key, "name": name, "present": present, "flags": sorted(flags), "detail": detail}


def _intel_features(seen: frozenset[str], vmx: frozenset[str]) -> list[dict]:
    has_vmx_line = bool(vmx)
    unknown_line = "no se sabe (solo lo muestra la línea «vmx flags», que falta aquí)"
    ept = "ept" in seen
    vpid = "vpid" in seen
    if has_vmx_line:
        ug: Optional[bool] = "unrestricted_guest" in vmx
        apicv: Optional[bool] = "apicv" in vmx or {"vapic_reg", "vid", "posted_intr"} <= vmx
    else:
        ug = apicv = None
    return [
        _feature("slat", "Paginación anidada (EPT)", ept, {"ept"} & seen,
                 "el hardware traduce la memoria del invitado, sin tablas de páginas sombra" if ept
                 else "sin EPT, KVM usa tablas de páginas sombra: cada cambio en las tablas del "
                      "invitado cuesta salidas de VM"),
        _feature("tlb", "Etiquetas de TLB (VPID)", vpid, {"vpid"} & seen,
                 "las entradas y salidas de la VM no vacían la TLB" if vpid
                 else "sin VPID, hay que vaciar la TLB en cada entrada y salida de la VM"),
        _feature("real_mode", "Invitado sin restricciones (unrestricted_guest)", ug,
                 {"unrestricted_guest"} & vmx,
                 "el modo real del invitado (BIOS, arranque) corre directamente en VT-x" if ug
                 else unknown_line if ug is None
                 else "KVM tiene que emular el código en modo real (BIOS, arranque): arranques lentos"),
        _feature("apic", "Virtualización del APIC (APICv)", apicv,
                 {"apicv", "vapic_reg", "vid", "posted_intr", "flexpriority"} & seen,
                 "la mayoría de accesos al APIC e interrupciones no provocan salidas de VM" if apicv
                 else unknown_line if apicv is None
                 else "sin APICv, muchos accesos al APIC e interrupciones del invitado provocan "
                      "salidas de VM" + (" (hay FlexPriority, que solo cubre el TPR)"
                                         if "flexpriority" in seen else "")),
    ]


def _amd_features(seen: frozenset[str]) -> list[dict]:
    npt = "npt" in seen
    fba = "flushbyasid" in seen
    avic = "avic" in seen
    return [
        _feature("slat", "Paginación anidada (NPT)", npt, {"npt"} & seen,
                 "el hardware traduce la memoria del invitado, sin tablas de páginas sombra" if npt
                 else "sin NPT, KVM usa tablas de páginas sombra: cada cambio en las tablas del "
                      "invitado cuesta salidas de VM"),
        _feature("tlb", "Etiquetas de TLB (ASID + flushbyasid)", fba, {"flushbyasid"} & seen,
                 "cada VM tiene su ASID y se puede invalidar solo su parte de la TLB" if fba
                 else "hay ASID, pero invalidar la TLB de una VM obliga a vaciarla entera"),
        _feature("real_mode", "Modo real del invitado", True, set(),
                 "AMD-V ejecuta el modo real del invitado directamente (con NPT, o con «modo real "
                 "paginado» sin él); no necesita una capacidad aparte como unrestricted_guest"),
        _feature("apic", "Virtualización del APIC (AVIC)", avic, {"avic", "x2avic"} & seen,
                 ("la mayoría de accesos al APIC e interrupciones entre vCPU no provocan #VMEXIT"
                  + (", también en modo x2APIC" if "x2avic" in seen else "")) if avic
                 else "sin AVIC, muchos accesos al APIC e interrupciones del invitado provocan #VMEXIT"),
    ]


def virt_summary(
    flags: Iterable[str],
    vmx_flags: Optional[Iterable[str]] = (),
    *,
    arch: Optional[str] = None,
) -> dict:
    """What the flags say about hardware virtualization, in plain Spanish.

    Returns a dict with keys:

    - ``arch``: "x86" or "arm64"; ``vendor``: "Intel", "AMD" or None;
      ``technology``: "Intel VT-x", "AMD-V" or None.
    - ``hardware_virt``: True/False, or None when cpuinfo cannot tell (arm64).
    - ``in_vm``: the ``hypervisor`` flag is set; ``nested``: in a VM *and*
      VT-x/AMD-V is visible (nested virtualization exposed).
    - ``verdict``: one Spanish sentence.
    - ``features``: list of dicts (``key``, ``name``, ``present`` True/False/None,
      ``flags``, ``detail``) for the key features: the technology itself,
      second-level paging, TLB tagging, real-mode guests, APIC virtualization.
    - ``present`` / ``missing`` / ``unknown``: Spanish lines derived from them.
    - ``notes``: further Spanish remarks (firmware, PVM, where to look).
    """
    flags = [f.strip() for f in flags if f and f.strip()]
    vmx = frozenset(f.strip() for f in (vmx_flags or ()) if f and f.strip())
    a = _arch_for(flags, arch)
    main = frozenset(flags)
    seen = main | vmx
    in_vm = "hypervisor" in main
    summary: dict = {
        "arch": a, "vendor": None, "technology": None, "hardware_virt": None,
        "in_vm": in_vm, "nested": False, "verdict": "", "features": [],
        "present": [], "missing": [], "unknown": [], "notes": [],
    }
    notes = summary["notes"]

    if a == "arm64":
        summary["verdict"] = (
            "En ARM la virtualización por hardware no aparece en «Features»: la aporta el nivel "
            "de excepción EL2, y KVM solo funciona si el firmware arranca el núcleo en EL2."
        )
        notes.append("Compruébalo con dmesg («CPU: All CPU(s) started at EL2», «kvm [1]: … "
                     "initialized successfully») y viendo si existe /dev/kvm.")
        notes.append("En ARM, /proc/cpuinfo tampoco dice si estás dentro de una máquina virtual.")
        if "ecv" in main:
            notes.append("Tiene ecv (Enhanced Counter Virtualization), que abarata la "
                         "virtualización del temporizador.")
        return summary

    if "vmx" in main:
        vendor, tech, hw_flag = "Intel", "Intel VT-x", "vmx"
        details = _intel_features(seen, vmx)
    elif "svm" in main:
        vendor, tech, hw_flag = "AMD", "AMD-V", "svm"
        details = _amd_features(seen)
    else:
        vendor = tech = hw_flag = None
        details = []

    summary["hardware_virt"] = tech is not None
    summary["vendor"], summary["technology"] = vendor, tech
    summary["nested"] = in_vm and tech is not None
    summary["features"] = [
        _feature("hw", tech or "VT-x / AMD-V", tech is not None, {hw_flag} if hw_flag else set(),
                 f"el procesador anuncia {tech} (flag «{hw_flag}»)" if tech
                 else "no aparecen ni «vmx» (Intel) ni «svm» (AMD)"),
        *details,
    ]
    for feat in summary["features"]:
        line = f"{feat['name']}: {feat['detail']}"
        bucket = {True: "present", False: "missing", None: "unknown"}[feat["present"]]
        summary[bucket].append(line)

    if tech and not in_vm:
        summary["verdict"] = (f"Este procesador tiene {tech}: KVM puede usar virtualización por "
                              "hardware (si además existe /dev/kvm).")
    elif tech and in_vm:
        summary["verdict"] = (f"Estás dentro de una máquina virtual cuyo hipervisor expone {tech}: "
                              "se puede usar KVM dentro de ella (virtualización anidada).")
        notes.append("En la VM anidada cada salida de VM la atiende primero el hipervisor exterior: "
                     "funciona, pero más lento que en el anfitrión.")
    elif in_vm:
        summary["verdict"] = ("Estás dentro de una máquina virtual y su hipervisor no expone VT-x ni "
                              "AMD-V: aquí KVM no tiene virtualización por hardware y QEMU tendrá que "
                              "usar TCG (emulación por software).")
        notes.append("Para tener KVM aquí, el anfitrión debe activar la virtualización anidada "
                     "(parámetro nested de kvm_intel/kvm_amd) y pasar la CPU a la VM (p. ej. "
                     "-cpu host).")
        notes.append("Aun así puede existir /dev/kvm si lo crea KVM PVM (virtualización "
                     "paravirtual, que no necesita vmx/svm); labkit.host lo detecta.")
    else:
        summary["verdict"] = ("El procesador no anuncia VT-x ni AMD-V: o no lo tiene, o el firmware "
                              "(BIOS/UEFI) lo tiene desactivado.")
        notes.append("Los núcleos Linux modernos ocultan el flag si el firmware dejó la "
                     "virtualización desactivada: busca en dmesg «VMX (outside TXT) disabled by "
                     "BIOS» (Intel) o «SVM disabled (by BIOS) in MSR_VM_CR» (AMD).")

    if vendor == "Intel" and not in_vm:
        notes.append("En núcleos modernos, ver «vmx» implica además que el firmware no ha "
                     "bloqueado VT-x (si lo hubiera hecho, el núcleo quitaría el flag).")
    if vendor == "AMD" and not in_vm:
        notes.append("Con núcleos antiguos, ver «svm» no garantiza que AMD-V esté activado: el "
                     "firmware puede apagarlo (bit SVMDIS del MSR VM_CR, lo que comprueba kvm-ok); "
                     "los recientes quitan entonces el flag.")
    if vendor == "Intel" and not vmx:
        notes.append("Este cpuinfo no trae la línea «vmx flags» (núcleo antiguo o compilado sin "
                     "CONFIG_X86_VMX_FEATURE_NAMES); con ella se sabría si hay unrestricted_guest "
                     "y APICv.")
    return summary


def format_summary(summary: Mapping) -> str:
    """Render a :func:`virt_summary` result as plain Spanish text."""
    out = [summary["verdict"]]
    marks = (("present", "[sí]"), ("missing", "[no]"), ("unknown", "[¿?]"))
    for key, mark in marks:
        out.extend(f"  {mark} {line}" for line in summary.get(key, ()))
    out.extend(f"  Nota: {note}" for note in summary.get("notes", ()))
    return "\n".join(out)


# --------------------------------------------------------------------- text table


def _cut(text: str, width: Optional[int]) -> str:
    if width is None or len(text) <= width:
        return text
    return text[: max(width - 1, 0)].rstrip() + "…"


def flags_table(rows: Iterable[FlagRow], *, max_text: Optional[int] = 70) -> str:
    """A deterministic plain-text table of rows; ``*`` marks virtualization flags.

    ``max_text`` cuts each explanation to that many characters (None: whole).
    """
    rows = list(rows)
    if not rows:
        return "(ningún flag)"
    w_name = max(len("flag"), *(len(r.name) for r in rows)) + 2
    w_src = max(len("línea"), *(len(r.source) for r in rows))
    w_cat = max(len("categoría"), *(len(r.category) for r in rows))
    lines = [f"  {'flag':<{w_name}}{'línea':<{w_src}}  {'categoría':<{w_cat}}  explicación"]
    for r in rows:
        mark = "*" if r.virt else " "
        lines.append(f"{mark} {r.name:<{w_name}}{r.source:<{w_src}}  {r.category:<{w_cat}}  "
                     f"{_cut(r.explanation, max_text)}")
    return "\n".join(lines)

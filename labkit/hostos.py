"""Which host operating systems run QEMU, and with which accelerator (notebook 07).

Two tables of data, checked against QEMU's documentation (*System Emulation →
Introduction → Virtualisation Accelerators* and *Supported build platforms*,
https://www.qemu.org/docs/master/), and a look at this host: what
``qemu-system-x86_64 -accel help`` lists (compiled in) and what the probe says
(usable here, and why).

KVM is a Linux kernel module, so "KVM" as such only exists on Linux (plus an old
port to illumos). QEMU is a portable user-space program: it runs on Linux,
Windows, macOS and the BSDs, and on each it uses that system's own hypervisor
interface as its accelerator, or TCG (its binary translator) everywhere.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Accelerator",
    "HostSystem",
    "ACCELERATORS",
    "HOST_SYSTEMS",
    "SOURCES",
    "ThisHost",
    "accelerator",
    "format_accelerators",
    "format_hosts",
    "host_notes",
    "this_host",
    "explain_this_host",
    "detect_wsl",
    "AccelTry",
    "try_accelerator",
    "try_argv",
]

SOURCES = (
    "https://www.qemu.org/docs/master/system/introduction.html (tabla «Supported Accelerators»)",
    "https://www.qemu.org/docs/master/about/build-platforms.html (sistemas y arquitecturas anfitrionas)",
    "https://www.qemu.org/docs/master/system/whpx.html (Windows Hypervisor Platform)",
    "https://learn.microsoft.com/windows/wsl/wsl-config (.wslconfig: nestedVirtualization)",
    "https://github.com/TritonDataCenter/illumos-kvm (el port de KVM a illumos)",
)


@dataclass(frozen=True)
class Accelerator:
    """A QEMU accelerator (``-accel <name>``): whose hypervisor it uses, on which host OS."""

    name: str
    title: str
    host_os: str
    host_arch: str
    note: str
    current: bool = True


ACCELERATORS: tuple[Accelerator, ...] = (
    Accelerator("kvm", "Kernel-based Virtual Machine", "Linux",
                "x86, Arm (64 bits), RISC-V, s390x, PPC, MIPS",
                "Un módulo del núcleo Linux que QEMU usa a través de /dev/kvm."),
    Accelerator("xen", "Xen", "Linux como dom0", "x86, Arm",
                "El hipervisor es Xen; QEMU pone los dispositivos emulados de los invitados."),
    Accelerator("hvf", "Hypervisor.framework", "macOS", "x86_64, Arm64 (Apple Silicon)",
                "La interfaz de Apple; solo acelera invitados de la misma arquitectura que el Mac."),
    Accelerator("whpx", "Windows Hypervisor Platform", "Windows 10/11", "x86_64 (arm64 en QEMU reciente)",
                "La API de Hyper-V para otros VMM; hay que activar la característica de Windows."),
    Accelerator("nvmm", "NetBSD Virtual Machine Monitor", "NetBSD", "x86_64",
                "El hipervisor del núcleo de NetBSD (desde NetBSD 9)."),
    Accelerator("tcg", "Tiny Code Generator", "todos (Linux, Windows, macOS, BSD)",
                "x86, Arm, RISC-V, PPC, s390x, MIPS, LoongArch, SPARC64",
                "Traducción binaria en QEMU: no usa el hardware de virtualización; más lento."),
    Accelerator("hax", "Intel HAXM", "Windows, macOS", "x86",
                "Abandonado por Intel en 2023 y retirado de QEMU en la versión 8.2.", current=False),
)


@dataclass(frozen=True)
class HostSystem:
    """A host operating system: does it have KVM (short answer, then the detail), which
    accelerators QEMU uses on it, its own native hypervisor, and how QEMU is installed there."""

    name: str
    kvm: str
    accelerators: tuple[str, ...]
    native: str
    install: str
    note: str = ""


HOST_SYSTEMS: tuple[HostSystem, ...] = (
    HostSystem("Linux", "sí", ("kvm", "xen", "tcg"), "KVM (y Xen, si Linux arranca como dom0)",
               "apt install qemu-system-x86 · dnf install qemu-kvm · pacman -S qemu-full",
               "KVM es un módulo del núcleo Linux desde la versión 2.6.20 (2007)."),
    HostSystem("Windows 10/11", "no", ("whpx", "tcg"), "Hyper-V",
               "instalador de QEMU para Windows (compilado con MSYS2/MinGW)",
               "Para usar WHPX hay que activar «Plataforma del hipervisor de Windows»."),
    HostSystem("Windows 11 + WSL2", "sí, anidado", ("kvm", "tcg"), "Hyper-V (WSL2 es una VM de Hyper-V)",
               "apt install qemu-system-x86 dentro de la distribución de WSL2",
               "KVM funciona dentro de la VM Linux de WSL2 si la virtualización anidada está activa "
               "(.wslconfig: [wsl2] nestedVirtualization=true, solo Windows 11)."),
    HostSystem("macOS en Intel", "no", ("hvf", "tcg"), "Hypervisor.framework",
               "brew install qemu · port install qemu", "HVF acelera invitados x86_64."),
    HostSystem("macOS en Apple Silicon", "no", ("hvf", "tcg"), "Hypervisor.framework",
               "brew install qemu · port install qemu",
               "HVF solo acelera invitados Arm64 (qemu-system-aarch64); un invitado x86_64 va con TCG."),
    HostSystem("FreeBSD", "no", ("tcg",), "bhyve", "pkg install qemu",
               "bhyve es el hipervisor de FreeBSD, pero QEMU no lo usa como acelerador."),
    HostSystem("NetBSD", "no", ("nvmm", "tcg"), "NVMM", "pkgin install qemu"),
    HostSystem("OpenBSD", "no", ("tcg",), "vmm(4) con vmd", "pkg_add qemu"),
    HostSystem("illumos (SmartOS, OmniOS)", "port antiguo", ("kvm (port)",), "bhyve (portado de FreeBSD)",
               "paquetes de la distribución",
               "illumos-kvm (Joyent, 2011) deriva del KVM de Linux 2.6.34 y usa su propio QEMU; hoy "
               "SmartOS y OmniOS ofrecen sobre todo bhyve. No es una plataforma oficial de QEMU."),
)


def accelerator(name: str) -> Accelerator | None:
    """The table row of an accelerator by its ``-accel`` name, or None."""
    return next((a for a in ACCELERATORS if a.name == name), None)


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    lines.insert(1, "-" * max(len(line.rstrip()) for line in lines))
    return "\n".join(line.rstrip() for line in lines)


def format_accelerators(accelerators: Sequence[Accelerator] = ACCELERATORS) -> str:
    """The accelerators as a plain-text table: -accel, name, host OS, host CPUs."""
    rows = [("-accel", "qué es", "sistema anfitrión", "CPU anfitriona")]
    for a in accelerators:
        title = a.title if a.current else f"{a.title} (retirado)"
        rows.append((a.name, title, a.host_os, a.host_arch))
    return _table(rows)


def format_hosts(hosts: Sequence[HostSystem] = HOST_SYSTEMS) -> str:
    """The host systems as a plain-text table: KVM?, QEMU's accelerators, native hypervisor."""
    rows = [("anfitrión", "¿KVM?", "aceleradores de QEMU", "hipervisor propio")]
    for h in hosts:
        rows.append((h.name, h.kvm, ", ".join(h.accelerators), h.native))
    return _table(rows)


def host_notes(hosts: Sequence[HostSystem] = HOST_SYSTEMS) -> str:
    """One paragraph per host system: how to install QEMU there, and the fine print."""
    parts = []
    for h in hosts:
        text = f"{h.name}: {h.install}."
        if h.note:
            text += f" {h.note}"
        parts.append(text)
    return "\n".join(parts)


def detect_wsl(proc_version: str | None = None, env: dict[str, str] | None = None) -> bool:
    """True inside WSL (its kernel says "microsoft" in /proc/version; WSL sets WSL_DISTRO_NAME)."""
    env = os.environ if env is None else env
    if "WSL_DISTRO_NAME" in env or "WSL_INTEROP" in env:
        return True
    if proc_version is None:
        try:
            proc_version = Path("/proc/version").read_text()
        except OSError:
            return False
    return "microsoft" in proc_version.lower()


@dataclass(frozen=True)
class ThisHost:
    """This host as notebook 07 shows it."""

    system: str
    release: str
    machine: str
    compiled: tuple[str, ...]
    verdict: str
    accelerator: str
    reason: str
    in_vm: bool
    wsl: bool


def this_host(report: Any = None, compiled: Sequence[str] | None = None) -> ThisHost:
    """Gather the facts: the OS (platform), QEMU's compiled-in accelerators (-accel help) and
    the probe's verdict. ``report`` and ``compiled`` can be given (tests, saved hosts)."""
    if report is None:
        from .host import probe

        report = probe()
    if compiled is None:
        from .tools import qemu_accelerators

        compiled = qemu_accelerators()
    return ThisHost(platform.system(), platform.release(), platform.machine(), tuple(compiled),
                    report.verdict, report.accelerator, report.reason, bool(report.in_vm), detect_wsl())


def explain_this_host(host: ThisHost) -> str:
    """In Spanish: which accelerators this QEMU brings, which one labkit will use, and why."""
    lines = [f"Sistema anfitrión: {host.system} {host.release} ({host.machine})"]
    if host.compiled:
        lines.append("QEMU trae compilados (-accel help): " + ", ".join(host.compiled))
    else:
        lines.append("No se encuentra qemu-system-x86_64: instálalo (paquete qemu-system-x86).")
    for name in host.compiled:
        row = accelerator(name)
        if row is not None:
            lines.append(f"  {name:<5} {row.title}: {row.note}")
    lines.append(f"Veredicto de labkit: {host.verdict} → se usará {host.accelerator}")
    lines.append(f"  Por qué: {host.reason}")
    if host.wsl:
        lines.append("Estás dentro de WSL2: este Linux es a su vez una máquina virtual de Hyper-V.")
    elif host.in_vm:
        lines.append("Este anfitrión es a su vez una máquina virtual (la CPU muestra el flag hypervisor).")
    return "\n".join(lines)


@dataclass(frozen=True)
class AccelTry:
    """What QEMU answered when asked to start with one accelerator."""

    name: str
    ok: bool
    message: str

    def __str__(self) -> str:
        return f"-accel {self.name:<5} → {'se inicializa' if self.ok else 'falla'}: {self.message}"


def try_argv(name: str, binary: str = "qemu-system-x86_64") -> list[str]:
    """QEMU with an empty board (``-machine none``) and one accelerator; its monitor on stdin
    receives ``quit``, so QEMU exits as soon as the accelerator is up (or at once if it fails)."""
    return [binary, "-machine", "none", "-accel", name, "-display", "none", "-nodefaults", "-monitor", "stdio"]


def try_accelerator(name: str, binary: str = "qemu-system-x86_64", timeout: float = 30.0) -> AccelTry:
    """Ask QEMU itself whether it can initialise ``name`` on this host. Initialising only proves
    that the interface answers (e.g. /dev/kvm opens and creates a VM), not that guests run well."""
    from .tools import find_program

    path = find_program(binary)
    if path is None:
        return AccelTry(name, False, f"no se encuentra {binary} (paquete qemu-system-x86)")
    try:
        done = subprocess.run(try_argv(name, path), input="quit\n", capture_output=True, text=True, check=False,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return AccelTry(name, False, f"QEMU no respondió en {timeout:g} s")
    errors = [line.split(": ", 2)[-1] for line in done.stderr.splitlines() if line.strip()]
    if done.returncode == 0:
        return AccelTry(name, True, "QEMU arrancó con este acelerador y salió con «quit»")
    return AccelTry(name, False, "; ".join(errors[:2]) or f"QEMU terminó con estado {done.returncode}")

"""The programs the course uses, where they come from, and whether they are here."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

__all__ = ["Tool", "TOOLS", "ToolStatus", "check_tools", "find_program", "format_tools", "qemu_accelerators"]


@dataclass(frozen=True)
class Tool:
    program: str
    package: str  # Debian/Ubuntu package
    purpose: str
    required: bool = True


TOOLS: tuple[Tool, ...] = (
    Tool("qemu-system-x86_64", "qemu-system-x86", "el emulador/virtualizador que arranca los invitados"),
    Tool("qemu-img", "qemu-utils", "crear e inspeccionar discos virtuales"),
    Tool("virsh", "libvirt-clients", "gestionar máquinas con libvirt"),
    Tool("libvirtd", "libvirt-daemon-system", "el servicio de libvirt"),
    Tool("virt-host-validate", "libvirt-clients", "la comprobación del anfitrión de libvirt"),
    Tool("virt-xml-validate", "libvirt-clients", "validar el XML de libvirt"),
    Tool("kvm-ok", "cpu-checker", "la comprobación clásica de Ubuntu", required=False),
    Tool("osinfo-query", "libosinfo-bin", "el catálogo de sistemas invitados", required=False),
    Tool("busybox", "busybox-static", "el espacio de usuario mínimo del invitado"),
)


@dataclass(frozen=True)
class ToolStatus:
    tool: Tool
    path: str | None

    @property
    def found(self) -> bool:
        return self.path is not None


def find_program(program: str) -> str | None:
    """PATH first, then the sbin folders a non-root PATH may lack."""
    return shutil.which(program) or next(
        (p for p in (f"/usr/sbin/{program}", f"/sbin/{program}", f"/bin/{program}") if shutil.which(p)), None)


def check_tools(tools: tuple[Tool, ...] = TOOLS) -> list[ToolStatus]:
    return [ToolStatus(t, find_program(t.program)) for t in tools]


def format_tools(statuses: list[ToolStatus]) -> str:
    """A plain table: program, state, package, what it is for; then the install line if needed."""
    lines = []
    for s in statuses:
        state = "ok" if s.found else ("FALTA" if s.tool.required else "falta (opcional)")
        lines.append(f"  {s.tool.program:<20} {state:<17} {s.tool.package:<22} {s.tool.purpose}")
    missing = sorted({s.tool.package for s in statuses if not s.found})
    if missing:
        lines.append("")
        lines.append("Para instalar lo que falta: sudo apt-get install " + " ".join(missing))
        lines.append("(o ejecuta ./lab course, que lo instala por ti)")
    return "\n".join(lines)


def qemu_accelerators(binary: str = "qemu-system-x86_64") -> list[str]:
    """The accelerators compiled into QEMU (``-accel help``): built in, not necessarily usable."""
    path = find_program(binary)
    if path is None:
        return []
    out = subprocess.run([path, "-accel", "help"], capture_output=True, text=True, timeout=30).stdout
    return [line.strip() for line in out.splitlines()[1:] if line.strip()]

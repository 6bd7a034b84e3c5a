"""The other tools that check a host (``virt-host-validate qemu`` and ``kvm-ok``),
run for real and compared with labkit's own probe, line by line.

Parsing and comparing are pure; only :func:`run_tool` starts a process.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from .host import HostReport
from .tools import find_program

__all__ = ["ToolRun", "PeerLine", "Comparison", "run_tool", "parse_virt_host_validate", "compare",
           "explain_kvm_ok"]


@dataclass(frozen=True)
class ToolRun:
    """A peer tool's run: its argv, exit status and output (None output: not installed)."""

    argv: tuple[str, ...]
    returncode: int | None
    output: str | None
    package: str

    @property
    def installed(self) -> bool:
        return self.output is not None


def run_tool(argv: list[str], package: str, timeout: float = 60) -> ToolRun:
    """Run a peer tool (argument list, no shell); a missing tool is reported, not raised."""
    path = find_program(argv[0])
    if path is None:
        return ToolRun(tuple(argv), None, None, package)
    proc = subprocess.run([path, *argv[1:]], capture_output=True, text=True, timeout=timeout)
    return ToolRun(tuple(argv), proc.returncode, (proc.stdout + proc.stderr).strip(), package)


@dataclass(frozen=True)
class PeerLine:
    check_id: str | None
    text: str
    status: str
    detail: str


_VHV_IDS = [
    (r"hardware virtualization", "hw-virt"),
    (r"/dev/kvm exists", "kvm-device"),
    (r"/dev/kvm is accessible", "kvm-access"),
    (r"/dev/vhost-net", "vhost-net"),
    (r"/dev/net/tun", "tun"),
    (r"cgroup '(\w+)' controller", "cgroup-{0}"),
    (r"IOMMU", "iommu"),
    (r"secure guest", "secure-guest"),
]
_LINE = re.compile(r"^\s*(?P<drv>[A-Z]+):\s+(?P<text>.*?)\s*:\s+(?P<status>PASS|WARN|FAIL|NOTE)\s*(?:\((?P<detail>.*)\))?\s*$")


def parse_virt_host_validate(text: str) -> list[PeerLine]:
    """The lines of ``virt-host-validate qemu`` output, mapped to labkit check ids."""
    lines = []
    for raw in text.splitlines():
        m = _LINE.match(raw)
        if not m:
            continue
        check_id = None
        for pattern, cid in _VHV_IDS:
            found = re.search(pattern, m["text"])
            if found:
                check_id = cid.format(*found.groups())
                break
        lines.append(PeerLine(check_id, m["text"], m["status"], m["detail"] or ""))
    return lines


# Why a labkit check can differ from virt-host-validate's, by check id.
_WHY = {
    "hw-virt": "virt-host-validate solo busca vmx/svm en cpuinfo; labkit además mira ARM y el propio /dev/kvm.",
    "kvm-device": "virt-host-validate no comprueba /dev/kvm si no ve vmx/svm: aquí se comprueba siempre.",
    "kvm-access": "virt-host-validate no comprueba el acceso a /dev/kvm si no ve vmx/svm: aquí se comprueba siempre.",
    "iommu": "Ambos buscan las tablas ACPI DMAR/IVRS y los grupos de IOMMU; sin ellos, ninguno puede saberlo.",
    "secure-guest": "Ambos miran SEV (kvm_amd) y TDX/PV; labkit lo marca como no necesario en el curso.",
    "kvm-module": "Solo labkit: qué módulo de KVM hay (kvm_intel, kvm_amd, kvm_pvm o ARM).",
    "nested": "Solo labkit: el parámetro nested del módulo (si los invitados pueden usar KVM a su vez).",
    "firmware": "Solo labkit (como kvm-ok): el MSR que dice si el firmware bloqueó VT-x/AMD-V.",
    "hypervisor": "Solo labkit: si este sistema es ya una máquina virtual (flag hypervisor).",
    "kvm-api": "Solo labkit: abre /dev/kvm y le pregunta su versión de API y su CPUID.",
    "kvm-run": "Solo labkit: ejecuta instrucciones reales con KVM_RUN y las cronometra.",
    "qemu": "Solo labkit: si QEMU está instalado (virt-host-validate da por hecho que sí).",
    "cpuinfo": "Solo labkit: si /proc/cpuinfo se puede leer y entender.",
}


@dataclass(frozen=True)
class Comparison:
    check_id: str
    title: str
    labkit: str
    peer: str | None  # None: the peer did not make this check
    note: str

    @property
    def agrees(self) -> bool:
        return self.peer == self.labkit


def compare(report: HostReport, vhv_text: str) -> list[Comparison]:
    """labkit's checks beside virt-host-validate's, with why each difference exists."""
    peer = {line.check_id: line for line in parse_virt_host_validate(vhv_text) if line.check_id}
    rows = []
    for c in report.checks:
        theirs = peer.get(c.id)
        if theirs is None:
            note = _WHY.get(c.id, "virt-host-validate no hace esta comprobación.")
            rows.append(Comparison(c.id, c.title, c.status, None, note))
        elif theirs.status == c.status:
            rows.append(Comparison(c.id, c.title, c.status, theirs.status, "Coinciden."))
        else:
            note = _WHY.get(c.id, "Distinto criterio.") + f" virt-host-validate dice: {theirs.detail or theirs.text}"
            rows.append(Comparison(c.id, c.title, c.status, theirs.status, note))
    return rows


def explain_kvm_ok(report: HostReport, output: str) -> str:
    """One paragraph: what kvm-ok concluded and why labkit's verdict agrees or not."""
    says_no = "can NOT be used" in output or "does not support" in output
    ok = report.accelerator == "kvm"
    if report.verdict == "kvm-pvm":
        return ("kvm-ok dice que la CPU no tiene extensiones KVM porque solo mira vmx/svm en cpuinfo, y aquí "
                "no están; no ve que /dev/kvm existe y funciona gracias a kvm_pvm. Su conclusión práctica "
                "(no usar KVM con un kernel normal) coincide con la de labkit, pero por una razón incompleta.")
    if says_no and not ok:
        return f"kvm-ok y labkit coinciden: no se puede usar KVM aquí (veredicto de labkit: {report.verdict})."
    if not says_no and ok:
        return "kvm-ok y labkit coinciden: KVM se puede usar."
    return (f"kvm-ok y labkit discrepan (veredicto de labkit: {report.verdict}); kvm-ok solo mira cpuinfo, "
            "el MSR del firmware y /dev/kvm.")

"""Host probe: can this machine run guests with KVM, and if not, why?

``parse_cpuinfo`` is pure. ``probe(root)`` reads only files below ``root``
(``/`` for this machine, or a tree saved with :func:`save_tree` from another
one), runs every QEMU check that ``virt-host-validate qemu`` runs, adds the
ones no other tool makes (the KVM module and its ``nested`` parameter,
firmware-disabled VT-x/AMD-V from the MSRs, PVM, the KVM API itself) and
reaches a verdict with the accelerator labkit will use.

Device nodes cannot be saved in a tree (or in git), so a saved tree carries a
manifest, ``labkit-snapshot.json``, describing them and what /dev/kvm
answered; see :func:`save_tree`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .errors import InputError, os_reason

__all__ = [
    "CpuInfo",
    "Check",
    "HostReport",
    "Device",
    "VERDICTS",
    "parse_cpuinfo",
    "probe",
    "save_tree",
    "decode_msr",
    "sample_cpus",
    "MANIFEST",
]

MANIFEST = "labkit-snapshot.json"

PASS, WARN, FAIL, NOTE = "PASS", "WARN", "FAIL", "NOTE"
REQUIRED, RECOMMENDED, NOT_NEEDED = "required", "recommended", "not-needed"
IMPORTANCE_ES = {REQUIRED: "necesaria", RECOMMENDED: "recomendada", NOT_NEEDED: "no necesaria en este curso"}

# ARM "CPU implementer" codes (arch/arm64/include/asm/cputype.h)
_ARM_IMPLEMENTERS = {
    "0x41": "ARM", "0x42": "Broadcom", "0x43": "Cavium", "0x46": "Fujitsu", "0x48": "HiSilicon",
    "0x4e": "NVIDIA", "0x50": "APM", "0x51": "Qualcomm", "0x61": "Apple", "0x6d": "Microsoft",
    "0xc0": "Ampere",
}


# ---------------------------------------------------------------- cpuinfo

@dataclass(frozen=True)
class CpuInfo:
    """What /proc/cpuinfo says about the processor."""

    architecture: str  # x86_64, i686, aarch64, armv7l, unknown
    vendor: str | None  # GenuineIntel, AuthenticAMD, ARM, Ampere ...
    model_name: str | None
    flags: frozenset[str]
    vmx_flags: frozenset[str] | None  # the "vmx flags" line (Linux >= 5.8, Intel)
    cpus: int

    @property
    def virtualization(self) -> str | None:
        """"VT-x", "AMD-V" or None (ARM shows no cpuinfo flag for it)."""
        if "vmx" in self.flags:
            return "VT-x"
        if "svm" in self.flags:
            return "AMD-V"
        return None

    @property
    def hypervisor(self) -> bool:
        """The CPUID hypervisor bit: this OS runs inside a virtual machine."""
        return "hypervisor" in self.flags

    @property
    def understood(self) -> bool:
        return self.architecture != "unknown" and (bool(self.flags) or self.vendor is not None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "vendor": self.vendor,
            "model_name": self.model_name,
            "virtualization": self.virtualization,
            "hypervisor": self.hypervisor,
            "cpus": self.cpus,
            "flags": sorted(self.flags),
            "vmx_flags": sorted(self.vmx_flags) if self.vmx_flags is not None else None,
        }


def _blocks(text: str) -> list[dict[str, str]]:
    blocks, cur = [], {}
    for line in text.splitlines():
        if not line.strip():
            if cur:
                blocks.append(cur)
                cur = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            cur.setdefault(key.strip().lower(), value.strip())
    if cur:
        blocks.append(cur)
    return blocks


def parse_cpuinfo(text: str) -> CpuInfo:
    """Parse /proc/cpuinfo of an x86 or ARM Linux machine. Never raises on garbage."""
    blocks = _blocks(text)
    merged: dict[str, str] = {}
    for b in blocks:
        for k, v in b.items():
            merged.setdefault(k, v)
    cpus = sum(1 for b in blocks if "processor" in b and b["processor"].isdigit())
    if "vendor_id" in merged and "flags" in merged:  # x86
        flags = frozenset(merged["flags"].split())
        vmx = frozenset(merged["vmx flags"].split()) if "vmx flags" in merged else None
        arch = "x86_64" if "lm" in flags else "i686"
        return CpuInfo(arch, merged["vendor_id"], merged.get("model name"), flags, vmx, cpus)
    if "features" in merged and ("cpu implementer" in merged or "cpu architecture" in merged):
        flags = frozenset(merged["features"].split())
        arch_v = merged.get("cpu architecture", "8")
        arch = "aarch64" if arch_v in ("8", "AArch64") or "asimd" in flags else "armv7l"
        impl = merged.get("cpu implementer", "").lower()
        vendor = _ARM_IMPLEMENTERS.get(impl, impl or None)
        model = merged.get("model name") or merged.get("hardware") or merged.get("model")
        return CpuInfo(arch, vendor, model, flags, None, cpus)
    return CpuInfo("unknown", merged.get("vendor_id"), merged.get("model name"), frozenset(), None, cpus)


_SAMPLES = {
    "intel-laptop": "Portátil Intel (Core i5-7200U)",
    "amd-desktop-nested": "Sobremesa AMD (Ryzen 9 5950X)",
    "nested-guest-vmx": "VM en la nube con VT-x anidado (Xeon 8358)",
    "cloud-vm-no-nesting": "VM en la nube sin anidación (Xeon 8259CL)",
    "aarch64-server": "Servidor ARM64 (Cavium ThunderX)",
}


def sample_cpus() -> dict[str, CpuInfo]:
    """Real /proc/cpuinfo files of other machines, shipped with labkit, for comparison."""
    from importlib.resources import files

    folder = files("labkit") / "data" / "cpuinfo"
    return {label: parse_cpuinfo((folder / f"{name}.txt").read_text()) for name, label in _SAMPLES.items()}


# ---------------------------------------------------------------- reading a tree

@dataclass(frozen=True)
class Device:
    """A device node as the probe saw it."""

    path: str
    exists: bool
    is_char: bool = False
    readable: bool = False
    writable: bool = False
    major: int | None = None
    minor: int | None = None


class _Tree:
    """Read-only access to the files below ``root``; problems are collected, not raised."""

    def __init__(self, root: str) -> None:
        self.root = Path(root)
        self.live = self.root.resolve() == Path("/")
        self.problems: list[str] = []
        self.manifest: dict[str, Any] = {}
        mpath = self.root / MANIFEST
        if not self.live and mpath.is_file():
            try:
                self.manifest = json.loads(mpath.read_text())
            except (OSError, ValueError) as err:
                self.problems.append(f"{MANIFEST} no se puede leer ({err}); se ignora")

    def path(self, rel: str) -> Path:
        return self.root / rel

    def read(self, rel: str) -> str | None:
        try:
            return self.path(rel).read_text(errors="replace")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeError) as err:
            self.problems.append(f"{rel}: {err.strerror if isinstance(err, OSError) else err}")
            return None

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def listdir(self, rel: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(rel)))
        except OSError:
            return []

    def param(self, module: str, name: str) -> str | None:
        value = self.read(f"sys/module/{module}/parameters/{name}")
        return value.strip() if value is not None else None

    def device(self, rel: str) -> Device:
        saved = self.manifest.get("devices", {}).get(rel)
        if saved is not None:
            return Device(rel, True, saved.get("type") == "char", bool(saved.get("readable")),
                          bool(saved.get("writable")), saved.get("major"), saved.get("minor"))
        p = self.path(rel)
        try:
            st = p.stat()
        except FileNotFoundError:
            return Device(rel, False)
        except OSError as err:
            self.problems.append(f"{rel}: {err.strerror}")
            return Device(rel, True)
        is_char = stat.S_ISCHR(st.st_mode)
        return Device(rel, True, is_char, os.access(p, os.R_OK), os.access(p, os.W_OK),
                      os.major(st.st_rdev) if is_char else None, os.minor(st.st_rdev) if is_char else None)

    def msr(self, address: int) -> int | None:
        saved = self.manifest.get("msr")
        if saved is not None:
            value = saved.get(hex(address))
            return int(value) if value is not None else None
        if not self.live:
            return None
        try:
            fd = os.open(self.path("dev/cpu/0/msr"), os.O_RDONLY)
        except OSError:
            return None
        try:
            data = os.pread(fd, 8, address)
        except OSError:
            return None
        finally:
            os.close(fd)
        return int.from_bytes(data, "little") if len(data) == 8 else None


# ---------------------------------------------------------------- report

@dataclass(frozen=True)
class Check:
    """One line of the doctor: what was checked, the result and what to do."""

    id: str
    title: str
    status: str  # PASS WARN FAIL NOTE
    importance: str  # required recommended not-needed
    message: str
    hint: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "title": self.title, "status": self.status,
                "importance": self.importance, "message": self.message, "hint": self.hint}


# verdict -> (accelerator, reason, what the student can do)
VERDICTS: dict[str, tuple[str, str, str]] = {
    "kvm": ("kvm", "La CPU tiene virtualización por hardware y /dev/kvm funciona: los invitados usarán KVM.",
            "Nada: este equipo está listo para KVM."),
    "kvm-nested": ("kvm", "Este sistema es a su vez una máquina virtual y su hipervisor le ofrece VT-x/AMD-V "
                   "(virtualización anidada): KVM funciona, algo más lento que en hardware real.",
                   "Nada imprescindible; para medir rendimiento, compara con un equipo físico."),
    "kvm-pvm": ("tcg", "Este equipo es una máquina virtual cuyo /dev/kvm lo ofrece kvm_pvm, un KVM "
                "paravirtual que no usa VT-x/AMD-V y solo sirve a kernels invitados preparados para PVM. "
                "Un kernel invitado normal se cuelga con -accel kvm aquí, así que labkit usa TCG "
                "(emulación por software): más lento, pero los experimentos funcionan igual.",
                "Para ver KVM con hardware, repite el curso en un portátil o PC con VT-x/AMD-V."),
    "disabled-in-firmware": ("tcg", "La CPU tiene virtualización por hardware, pero el firmware (BIOS/UEFI) "
                             "la ha desactivado y bloqueado: KVM no puede usarla.",
                             "Entra en la configuración del firmware y activa «Intel Virtualization "
                             "Technology (VT-x)» o «SVM Mode»/«AMD-V»; guarda y reinicia."),
    "module-not-loaded": ("tcg", "La CPU admite virtualización por hardware, pero el módulo de KVM no está "
                          "cargado y no existe /dev/kvm.",
                          "Carga el módulo: sudo modprobe kvm_intel (Intel) o sudo modprobe kvm_amd (AMD); "
                          "mira dmesg si falla."),
    "no-permission": ("tcg", "KVM está disponible, pero tu usuario no puede abrir /dev/kvm.",
                      "Añádete al grupo kvm: sudo usermod -aG kvm $USER, y vuelve a iniciar sesión."),
    "no-nested-support": ("tcg", "Este sistema es una máquina virtual y su hipervisor no le ofrece VT-x/AMD-V "
                          "(sin virtualización anidada): aquí solo hay emulación.",
                          "Activa la virtualización anidada en el hipervisor anfitrión (p. ej. nested=1 en "
                          "kvm_intel/kvm_amd, o un tipo de instancia que la permita) o usa un equipo físico."),
    "no-hardware-support": ("tcg", "No se encuentra virtualización por hardware en esta CPU: los invitados "
                            "se ejecutarán con TCG (emulación por software).",
                            "Si la CPU es moderna, revisa el firmware; si no, el curso funciona con TCG, "
                            "más despacio."),
}


@dataclass(frozen=True)
class HostReport:
    """The probe's result: checks, a verdict and the accelerator labkit will use."""

    root: str
    cpu: CpuInfo
    checks: tuple[Check, ...]
    verdict: str
    kvm_module: str | None
    nested: bool | None
    in_vm: bool
    kvm: dict[str, Any] | None
    qemu: dict[str, Any] | None
    problems: tuple[str, ...] = field(default=())

    @property
    def accelerator(self) -> str:
        return VERDICTS[self.verdict][0]

    @property
    def reason(self) -> str:
        return VERDICTS[self.verdict][1]

    @property
    def advice(self) -> str:
        return VERDICTS[self.verdict][2]

    @property
    def can_run_guests(self) -> bool:
        """False only when QEMU is known to be missing."""
        return self.check("qemu").status != FAIL

    def check(self, check_id: str) -> Check:
        for c in self.checks:
            if c.id == check_id:
                return c
        raise KeyError(check_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "accelerator": self.accelerator,
            "reason": self.reason,
            "advice": self.advice,
            "checks": [c.to_dict() for c in self.checks],
            "cpu": self.cpu.to_dict(),
            "kvm_module": self.kvm_module,
            "nested": self.nested,
            "in_vm": self.in_vm,
            "kvm": self.kvm,
            "qemu": self.qemu,
            "problems": list(self.problems),
        }


def _check(cid: str, title: str, ok: bool | None, importance: str, message: str, hint: str = "",
           bad: str = FAIL) -> Check:
    status = NOTE if ok is None else (PASS if ok else bad)
    return Check(cid, title, status, importance, message, "" if status == PASS else hint)


def _truthy(value: str | None) -> bool | None:
    if value is None:
        return None
    return value.strip().upper() in ("Y", "1", "YES", "ON")


# ---------------------------------------------------------------- the checks

def _cpu_checks(tree: _Tree, cpu: CpuInfo, cpu_text: str | None) -> list[Check]:
    if cpu_text is None:
        msg = "No se pudo leer proc/cpuinfo"
        if tree.problems:
            msg += f" ({tree.problems[-1]})"
        return [Check("cpuinfo", "Información de la CPU", FAIL, RECOMMENDED, msg,
                      "Comprueba que /proc está montado (o que el árbol guardado incluye proc/cpuinfo).")]
    if not cpu.understood:
        return [Check("cpuinfo", "Información de la CPU", FAIL, RECOMMENDED,
                      "proc/cpuinfo no tiene el formato esperado (ni x86 ni ARM)",
                      "Copia el fichero /proc/cpuinfo tal cual, sin editarlo.")]
    model = cpu.model_name or cpu.vendor or "CPU"
    return [Check("cpuinfo", "Información de la CPU", PASS, RECOMMENDED,
                  f"{model} ({cpu.architecture}, {cpu.cpus} CPU)")]


def _hw_check(cpu: CpuInfo, kvm_dev: Device, in_vm: bool) -> Check:
    title = "Virtualización por hardware (VT-x / AMD-V)"
    if cpu.architecture in ("aarch64", "armv7l"):
        if kvm_dev.exists:
            return _check("hw-virt", title, True, RECOMMENDED, "ARM: el kernel arrancó en EL2 y ofrece KVM")
        if in_vm:
            return _check("hw-virt", title, False, RECOMMENDED,
                          "ARM: máquina virtual sin /dev/kvm: su hipervisor no ofrece EL2 anidado",
                          "Usa una instancia física (p. ej. *.metal) o un hipervisor con anidación.")
        return _check("hw-virt", title, False, RECOMMENDED,
                      "ARM: no hay /dev/kvm (el kernel no arrancó en EL2 o no tiene KVM)",
                      "En ARM la virtualización no aparece en cpuinfo: el firmware debe arrancar Linux en EL2.")
    if cpu.virtualization:
        flag = "vmx" if cpu.virtualization == "VT-x" else "svm"
        return _check("hw-virt", title, True, RECOMMENDED, f"{cpu.virtualization} presente (flag {flag})")
    if in_vm:
        return _check("hw-virt", title, False, RECOMMENDED,
                      "La CPU virtual no muestra vmx ni svm: el hipervisor de debajo no ofrece anidación",
                      "Sin VT-x/AMD-V, QEMU usa TCG (emulación).")
    return _check("hw-virt", title, False, RECOMMENDED, "La CPU no muestra vmx ni svm",
                  "Puede faltar en la CPU o estar desactivada en el firmware (Linux ≥ 5.6 oculta vmx en ese caso).")


def _kvm_module(tree: _Tree, cpu: CpuInfo, kvm_dev: Device) -> tuple[str | None, Check]:
    title = "Módulo de KVM"
    modules_text = tree.read("proc/modules")
    loaded = {line.split()[0] for line in (modules_text or "").splitlines() if line.strip()}
    for name in ("kvm_pvm", "kvm_intel", "kvm_amd"):
        if name in loaded or tree.exists(f"sys/module/{name}"):
            if name in loaded:
                where = "cargado como módulo"
            elif modules_text is None:
                where = "presente en sys/module (no hay /proc/modules: kernel sin módulos cargables)"
            else:
                where = "integrado en el kernel"
            if name == "kvm_pvm":
                return name, Check("kvm-module", title, WARN, RECOMMENDED,
                                   f"kvm_pvm {where}: KVM paravirtual (PVM), no usa VT-x/AMD-V",
                                   "Los kernels invitados normales no arrancan con PVM: labkit usará TCG.")
            return name, Check("kvm-module", title, PASS, RECOMMENDED, f"{name} {where}")
    if cpu.architecture in ("aarch64", "armv7l") and kvm_dev.exists:
        return "kvm (ARM)", Check("kvm-module", title, PASS, RECOMMENDED, "KVM integrado en el kernel (ARM)")
    if "kvm" in loaded or tree.exists("sys/module/kvm"):
        return "kvm", Check("kvm-module", title, WARN, RECOMMENDED,
                            "Solo está el módulo genérico kvm, sin kvm_intel ni kvm_amd",
                            "Carga kvm_intel o kvm_amd (sudo modprobe ...) y mira dmesg si falla.")
    if cpu.virtualization:
        mod = "kvm_intel" if cpu.virtualization == "VT-x" else "kvm_amd"
        return None, Check("kvm-module", title, FAIL, RECOMMENDED, "No hay ningún módulo de KVM cargado",
                           f"sudo modprobe {mod}; si falla, mira dmesg (p. ej. «disabled by bios»).")
    return None, Check("kvm-module", title, NOTE, RECOMMENDED, "No hay ningún módulo de KVM cargado")


def _nested_check(tree: _Tree, module: str | None) -> tuple[bool | None, Check]:
    title = "Virtualización anidada (parámetro nested)"
    if module in ("kvm_intel", "kvm_amd"):
        value = tree.param(module, "nested")
        nested = _truthy(value)
        if nested is None:
            return None, Check("nested", title, NOTE, NOT_NEEDED, f"{module} no expone el parámetro nested")
        if nested:
            return True, Check("nested", title, PASS, NOT_NEEDED,
                               f"{module} nested={value}: los invitados pueden usar KVM a su vez")
        return False, Check("nested", title, NOTE, NOT_NEEDED, f"{module} nested={value}: desactivada",
                            f"Para activarla: echo 'options {module} nested=1' | sudo tee "
                            f"/etc/modprobe.d/{module}.conf y recarga el módulo.")
    if module == "kvm_pvm":
        return None, Check("nested", title, NOTE, NOT_NEEDED,
                           "PVM no tiene parámetro nested: sus invitados no pueden usar VT-x/AMD-V")
    return None, Check("nested", title, NOTE, NOT_NEEDED, "Sin módulo kvm_intel/kvm_amd: no aplica")


def decode_msr(address: int, value: int) -> dict[str, bool]:
    """Decode the firmware-lock MSRs that kvm-ok reads.

    IA32_FEATURE_CONTROL (0x3a, Intel): bit 0 lock, bit 1 VMX inside SMX, bit 2
    VMX outside SMX. VM_CR (0xc0010114, AMD): bit 3 lock, bit 4 SVMDIS.
    ``disabled`` is True when the firmware has locked virtualization off.
    """
    if address == 0x3A:
        bits = {"lock": bool(value & 0x1), "vmx_in_smx": bool(value & 0x2), "vmx_outside_smx": bool(value & 0x4)}
        return {**bits, "disabled": bits["lock"] and not bits["vmx_outside_smx"]}
    if address == 0xC0010114:
        bits = {"lock": bool(value & 0x8), "svmdis": bool(value & 0x10)}
        return {**bits, "disabled": bits["svmdis"]}
    raise InputError(f"El MSR {address:#x} no es uno de los que se decodifican aquí.",
                     "Usa 0x3a (Intel, IA32_FEATURE_CONTROL) o 0xc0010114 (AMD, VM_CR).")


_FIRMWARE_MSR = {  # vendor -> (address, name, text when disabled, text when allowed, BIOS option)
    "GenuineIntel": (0x3A, "IA32_FEATURE_CONTROL", "bloqueado con VMX desactivado", "VMX permitido",
                     "Activa «Intel Virtualization Technology» en la BIOS/UEFI."),
    "AuthenticAMD": (0xC0010114, "VM_CR", "SVMDIS activo", "SVM permitido",
                     "Activa «SVM Mode» (AMD-V) en la BIOS/UEFI."),
}


def _firmware_check(tree: _Tree, cpu: CpuInfo, in_vm: bool) -> tuple[bool | None, Check]:
    """True when firmware has VT-x/AMD-V locked off (as kvm-ok reads it).

    Inside a VM the register is virtual: a Linux guest without VMX locks it
    itself at boot (arch/x86/kernel/cpu/feat_ctl.c), so it proves nothing
    about any BIOS.
    """
    title = "Virtualización activada en el firmware (MSR)"
    known = _FIRMWARE_MSR.get(cpu.vendor or "")
    if known is None:
        return None, Check("firmware", title, NOTE, RECOMMENDED,
                           "No aplica a esta CPU (solo x86 Intel/AMD tienen estos MSR)")
    address, name, off_text, on_text, hint = known
    value = tree.msr(address)
    if in_vm:
        seen = f" ({name} = {value:#x}, virtual)" if value is not None else ""
        return None, Check("firmware", title, NOTE, RECOMMENDED,
                           f"Máquina virtual: el firmware que cuenta es el del anfitrión{seen}")
    if value is not None:
        disabled = decode_msr(address, value)["disabled"]
        return disabled, _check("firmware", title, not disabled, RECOMMENDED,
                                f"{name} ({address:#x}) = {value:#x}: {off_text if disabled else on_text}", hint)
    return None, Check("firmware", title, NOTE, RECOMMENDED, "No se puede leer dev/cpu/0/msr",
                       "Como root: modprobe msr, y vuelve a ejecutar el diagnóstico.")


# DMI names of virtual platforms (sys_vendor or product_name, lowercase substrings)
_VIRTUAL_DMI = ("qemu", "kvm", "amazon ec2", "google compute engine", "virtual machine", "vmware",
                "virtualbox", "innotek", "xen", "digitalocean", "openstack", "bochs", "parallels",
                "cloud hypervisor", "firecracker")


def _dmi(tree: _Tree) -> str:
    vendor = (tree.read("sys/class/dmi/id/sys_vendor") or "").strip()
    product = (tree.read("sys/class/dmi/id/product_name") or "").strip()
    return " ".join(x for x in (vendor, product) if x)


def _in_vm(cpu: CpuInfo, dmi: str) -> bool:
    """The CPUID hypervisor bit (x86), or DMI naming a virtual platform (ARM has no such bit)."""
    low = dmi.lower()
    if cpu.hypervisor:
        return True
    return any(name in low for name in _VIRTUAL_DMI) and not low.endswith(".metal")


def _hypervisor_check(cpu: CpuInfo, dmi: str, in_vm: bool) -> Check:
    title = "¿Se ejecuta dentro de una máquina virtual?"
    if cpu.hypervisor:
        return Check("hypervisor", title, NOTE, NOT_NEEDED,
                     "Sí: la CPU muestra el flag hypervisor" + (f" (DMI: {dmi})" if dmi else ""))
    if in_vm:
        return Check("hypervisor", title, NOTE, NOT_NEEDED, f"Sí: el firmware (DMI) dice «{dmi}»")
    return Check("hypervisor", title, PASS, NOT_NEEDED,
                 "No: sin flag hypervisor (máquina física)" + (f", {dmi}" if dmi else ""))


def _kvm_api(tree: _Tree, kvm_dev: Device) -> tuple[dict[str, Any] | None, Check]:
    title = "API de KVM (ioctl sobre /dev/kvm)"
    info = tree.manifest.get("kvm")
    if info is None and tree.live and kvm_dev.is_char and kvm_dev.readable and kvm_dev.writable:
        from . import kvmapi
        try:
            k = kvmapi.kvm_info(str(tree.path(kvm_dev.path)))
            info = {"api_version": k.api_version, "cpuid_signature": k.cpuid_signature,
                    "vcpu_offers_vmx": k.vcpu_offers_vmx, "vcpu_offers_svm": k.vcpu_offers_svm}
        except OSError as err:
            return None, Check("kvm-api", title, FAIL, RECOMMENDED,
                               f"/dev/kvm no responde a KVM_GET_API_VERSION ({err.strerror})",
                               "Mira dmesg: el módulo de KVM puede haber fallado.")
    if info is None:
        return None, Check("kvm-api", title, NOTE, RECOMMENDED, "No se pudo abrir /dev/kvm: sin datos")
    nested = info.get("vcpu_offers_vmx") or info.get("vcpu_offers_svm")
    msg = (f"KVM_GET_API_VERSION = {info.get('api_version')}; CPUID para invitados: "
           f"firma «{info.get('cpuid_signature') or '?'}», "
           + ("ofrece VT-x/AMD-V a los invitados" if nested else "no ofrece VT-x/AMD-V a los invitados"))
    ok = info.get("api_version") == 12
    return info, _check("kvm-api", title, ok, RECOMMENDED, msg, "Una API distinta de 12 no es estándar.")


def _device_check(cid: str, title: str, dev: Device, importance: str, hint: str, bad: str = WARN) -> Check:
    if not dev.exists:
        return _check(cid, title, False, importance, f"/{dev.path} no existe", hint, bad)
    if not dev.is_char:
        return _check(cid, title, False, importance, f"/{dev.path} existe pero no es un dispositivo de caracteres",
                      "Algo ha sustituido el dispositivo por un fichero normal: bórralo y recarga el módulo.", bad)
    return _check(cid, title, True, importance, f"/{dev.path} existe ({dev.major}:{dev.minor})")


def _cgroup_checks(tree: _Tree) -> list[Check]:
    v2 = tree.read("sys/fs/cgroup/cgroup.controllers")
    if v2 is None:  # hybrid layout: v1 controllers plus a v2 tree at .../unified
        v2 = tree.read("sys/fs/cgroup/unified/cgroup.controllers") if tree.read("proc/cgroups") is None else None
    v1 = tree.read("proc/cgroups")
    available: set[str] | None = None
    source = ""
    if v2 is not None:
        ctrls = set(v2.split())
        # cgroup v2: cpuacct is part of cpu, blkio is io, devices is done with eBPF
        available = ctrls | {"devices"} | ({"cpuacct"} if "cpu" in ctrls else set()) | (
            {"blkio"} if "io" in ctrls else set())
        source = "cgroup v2"
    elif v1 is not None:
        available = set()
        for line in v1.splitlines():
            parts = line.split()
            if len(parts) == 4 and not line.startswith("#") and parts[3] == "1":
                available.add(parts[0])
        source = "cgroup v1"
    checks = []
    for ctrl in ("cpu", "cpuacct", "cpuset", "memory", "devices", "blkio"):
        title = f"Controlador de cgroup «{ctrl}»"
        if available is None:
            checks.append(Check(f"cgroup-{ctrl}", title, NOTE, NOT_NEEDED, "No se encuentran datos de cgroups"))
        else:
            checks.append(_check(f"cgroup-{ctrl}", title, ctrl in available, NOT_NEEDED,
                                 f"{'disponible' if ctrl in available else 'no disponible'} ({source})",
                                 "libvirt lo usa para limitar recursos; actívalo en el kernel o en el montaje de cgroups.",
                                 WARN))
    return checks


def _iommu_check(tree: _Tree, cpu: CpuInfo) -> Check:
    title = "IOMMU para asignar dispositivos PCI"
    tables = set(tree.listdir("sys/firmware/acpi/tables"))
    groups = tree.listdir("sys/kernel/iommu_groups")
    cmdline = tree.read("proc/cmdline") or ""
    hw = "DMAR" in tables or "IVRS" in tables
    if groups:
        return Check("iommu", title, PASS, NOT_NEEDED, f"IOMMU activo ({len(groups)} grupos)")
    if hw:
        opt = "intel_iommu=on" if "DMAR" in tables else "amd_iommu=on"
        return Check("iommu", title, WARN, NOT_NEEDED,
                     "El firmware declara un IOMMU (tabla ACPI " + ("DMAR" if "DMAR" in tables else "IVRS")
                     + ") pero el kernel no lo usa", f"Añade {opt} a la línea de arranque del kernel.")
    if "iommu" in cmdline:
        return Check("iommu", title, WARN, NOT_NEEDED, "La línea de arranque pide IOMMU pero no hay grupos",
                     "Activa VT-d / AMD-Vi en el firmware.")
    return Check("iommu", title, WARN, NOT_NEEDED, "No se sabe si hay IOMMU (sin tabla DMAR/IVRS ni grupos)",
                 "Solo hace falta para pasar dispositivos PCI a un invitado.")


def _secure_guest_check(tree: _Tree, cpu: CpuInfo) -> Check:
    title = "Invitados cifrados (AMD SEV / Intel TDX)"
    if "sev" in cpu.flags and _truthy(tree.param("kvm_amd", "sev")):
        return Check("secure-guest", title, PASS, NOT_NEEDED, "AMD SEV disponible y activado en kvm_amd")
    if _truthy(tree.param("kvm_intel", "tdx")):
        return Check("secure-guest", title, PASS, NOT_NEEDED, "Intel TDX activado en kvm_intel")
    if "sev" in cpu.flags:
        return Check("secure-guest", title, WARN, NOT_NEEDED, "La CPU tiene SEV pero kvm_amd no lo activa",
                     "Solo hace falta para máquinas confidenciales (kvm_amd sev=1).")
    return Check("secure-guest", title, WARN, NOT_NEEDED, "No hay soporte de invitados cifrados",
                 "Solo hace falta para máquinas confidenciales.")


_QEMU_BINARY = {"aarch64": "qemu-system-aarch64", "armv7l": "qemu-system-arm"}


def _qemu_info(binary: str) -> dict[str, Any] | None:
    path = shutil.which(binary)
    if path is None:
        return None
    info: dict[str, Any] = {"path": path, "version": None}
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"version (\S+)", out)
        info["version"] = m.group(1) if m else None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _qemu_check(tree: _Tree, cpu: CpuInfo) -> tuple[dict[str, Any] | None, Check]:
    """In a saved tree, "qemu": {...} installed, false not installed, null or absent unknown."""
    binary = _QEMU_BINARY.get(cpu.architecture, "qemu-system-x86_64")
    title = f"QEMU instalado ({binary})"
    fix = f"sudo apt-get install {'qemu-system-arm' if 'arm' in binary or 'aarch64' in binary else 'qemu-system-x86'}"
    if tree.live:
        info = _qemu_info(binary)
        if info is None:
            return None, Check("qemu", title, FAIL, REQUIRED, f"No se encuentra {binary}",
                               fix + " (o ejecuta ./lab course).")
    else:
        info = tree.manifest.get("qemu")
        if info is False:
            return None, Check("qemu", title, FAIL, REQUIRED, "QEMU no estaba instalado", fix)
        if not info:
            return None, Check("qemu", title, NOTE, REQUIRED, "El árbol guardado no dice si QEMU estaba instalado")
    return info, Check("qemu", title, PASS, REQUIRED,
                       f"{info.get('path')} (versión {info.get('version') or 'desconocida'})")


def _run_check(tree: _Tree, kvm_dev: Device) -> Check:
    title = "Prueba funcional: código real ejecutado con KVM_RUN"
    if not (tree.live and kvm_dev.is_char and kvm_dev.readable and kvm_dev.writable):
        return Check("kvm-run", title, NOTE, NOT_NEEDED, "No se puede ejecutar: /dev/kvm no está disponible aquí")
    from . import kvmapi
    r = kvmapi.run_check(str(tree.path(kvm_dev.path)))
    if not r.ok:
        return Check("kvm-run", title, FAIL, NOT_NEEDED, f"KVM_RUN falló: {r.error}",
                     "KVM no ejecuta código de invitado: usa TCG.")
    if r.looks_emulated:
        return Check("kvm-run", title, WARN, NOT_NEEDED,
                     f"{r.instructions} instrucciones a {r.ns_per_instruction:.0f} ns cada una: emuladas, "
                     "no ejecutadas por el hardware", "Con VT-x/AMD-V reales serían ~1 ns por instrucción.")
    return Check("kvm-run", title, PASS, NOT_NEEDED,
                 f"{r.instructions} instrucciones a {r.ns_per_instruction:.1f} ns cada una: hardware")


# ---------------------------------------------------------------- verdict

def _verdict(cpu: CpuInfo, in_vm: bool, module: str | None, kvm_dev: Device, firmware_off: bool | None) -> str:
    usable = kvm_dev.exists and kvm_dev.is_char
    if module == "kvm_pvm":
        return "kvm-pvm"
    if firmware_off:
        return "disabled-in-firmware"
    is_arm = cpu.architecture in ("aarch64", "armv7l")
    if cpu.virtualization or is_arm or usable:
        if usable:
            if not (kvm_dev.readable and kvm_dev.writable):
                return "no-permission"
            return "kvm-nested" if in_vm else "kvm"
        if is_arm:
            return "no-nested-support" if in_vm else "no-hardware-support"
        return "module-not-loaded"
    return "no-nested-support" if in_vm else "no-hardware-support"


def probe(root: str = "/", *, functional: bool = False) -> HostReport:
    """Diagnose the host whose files are below ``root``.

    ``functional=True`` also runs a few real-mode instructions through
    KVM_RUN and times them (only for the live machine, ``root="/"``).
    Raises :class:`~labkit.errors.InputError` only when ``root`` is not a directory.
    """
    if not Path(root).is_dir():
        raise InputError(f"La carpeta «{root}» no existe o no es una carpeta.",
                         "Indica la raíz de un árbol guardado con «labkit doctor --save», o / para este equipo.")
    tree = _Tree(root)
    cpu_text = tree.read("proc/cpuinfo")
    cpu = parse_cpuinfo(cpu_text or "")
    kvm_dev = tree.device("dev/kvm")
    dmi = _dmi(tree)
    in_vm = _in_vm(cpu, dmi)
    checks = _cpu_checks(tree, cpu, cpu_text)
    checks.append(_hw_check(cpu, kvm_dev, in_vm))
    checks.append(_device_check("kvm-device", "Existe /dev/kvm", kvm_dev, RECOMMENDED,
                                "Carga el módulo de KVM (kvm_intel o kvm_amd).", FAIL))
    if kvm_dev.exists and kvm_dev.is_char:
        checks.append(_check("kvm-access", "Acceso de lectura y escritura a /dev/kvm",
                             kvm_dev.readable and kvm_dev.writable, RECOMMENDED,
                             "lectura y escritura permitidas" if kvm_dev.readable and kvm_dev.writable
                             else "sin permiso de lectura/escritura para este usuario",
                             "sudo usermod -aG kvm $USER y vuelve a iniciar sesión."))
    else:
        checks.append(Check("kvm-access", "Acceso de lectura y escritura a /dev/kvm", NOTE, RECOMMENDED,
                            "No aplica: no hay dispositivo /dev/kvm"))
    module, mod_check = _kvm_module(tree, cpu, kvm_dev)
    checks.append(mod_check)
    nested, nested_check = _nested_check(tree, module)
    checks.append(nested_check)
    firmware_off, fw_check = _firmware_check(tree, cpu, in_vm)
    checks.append(fw_check)
    checks.append(_hypervisor_check(cpu, dmi, in_vm))
    kvm, api_check = _kvm_api(tree, kvm_dev)
    checks.append(api_check)
    if functional:
        checks.append(_run_check(tree, kvm_dev))
    checks.append(_device_check("vhost-net", "Existe /dev/vhost-net", tree.device("dev/vhost-net"), NOT_NEEDED,
                                "Carga vhost_net para una red virtio más rápida."))
    checks.append(_device_check("tun", "Existe /dev/net/tun", tree.device("dev/net/tun"), NOT_NEEDED,
                                "Carga el módulo tun para dar red a los invitados."))
    checks.extend(_cgroup_checks(tree))
    checks.append(_iommu_check(tree, cpu))
    checks.append(_secure_guest_check(tree, cpu))
    qemu, qemu_check = _qemu_check(tree, cpu)
    checks.append(qemu_check)
    verdict = _verdict(cpu, in_vm, module, kvm_dev, firmware_off)
    return HostReport(str(root), cpu, tuple(checks), verdict, module, nested, in_vm, kvm, qemu,
                      tuple(tree.problems))


# ---------------------------------------------------------------- saving a tree

_SAVED_FILES = ("proc/cpuinfo", "proc/modules", "proc/cmdline", "proc/cgroups", "proc/version",
                "sys/fs/cgroup/cgroup.controllers", "sys/class/dmi/id/sys_vendor",
                "sys/class/dmi/id/product_name")
_SAVED_DEVICES = ("dev/kvm", "dev/net/tun", "dev/vhost-net", "dev/cpu/0/msr")


def _saved_modules(root: Path) -> Iterable[Path]:
    mod = root / "sys/module"
    for name in ("kvm", "kvm_intel", "kvm_amd", "kvm_pvm"):
        params = mod / name / "parameters"
        if params.is_dir():
            yield from sorted(params.iterdir())
        elif (mod / name).is_dir():
            yield mod / name


def save_tree(dest: str, root: str = "/") -> Path:
    """Save the files the probe reads (and a manifest of devices) into ``dest``.

    ``dest`` must not exist or be an empty directory: nothing is overwritten.
    The result can be diagnosed anywhere with ``probe(dest)`` or
    ``labkit doctor --root dest``.
    """
    out = Path(dest)
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise InputError(f"«{dest}» ya existe y no está vacío: no se sobrescribe nada.",
                             "Elige una carpeta nueva para guardar el diagnóstico.")
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # no permission, a read-only or virtual file system (/proc) ...
        raise InputError(f"No se puede crear la carpeta «{dest}»: {os_reason(err)}.",
                         "Guarda el diagnóstico en una carpeta en la que puedas escribir, p. ej. ~/diagnostico.") from err
    src = Path(root)
    tree = _Tree(root)

    def copy(path: Path) -> None:
        rel = path.relative_to(src)
        target = out / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            (target / ".keep").touch()
            return
        try:
            data = path.read_bytes()
        except OSError:
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    for rel in _SAVED_FILES:
        if (src / rel).is_file():
            copy(src / rel)
    for p in _saved_modules(src):
        copy(p)
    for sub in ("sys/firmware/acpi/tables", "sys/kernel/iommu_groups"):
        for name in tree.listdir(sub):
            target = out / sub / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if (src / sub / name).is_dir():
                target.mkdir(exist_ok=True)
                (target / ".keep").touch()
            else:
                target.touch()  # only the table's name matters
    devices = {}
    for rel in _SAVED_DEVICES:
        d = tree.device(rel)
        if d.exists:
            devices[rel] = {"type": "char" if d.is_char else "other", "major": d.major, "minor": d.minor,
                            "readable": d.readable, "writable": d.writable}
    report = probe(root)
    manifest: dict[str, Any] = {"format": 1, "source": f"labkit doctor --save en {os.uname().nodename}",
                                "devices": devices, "kvm": report.kvm,
                                "qemu": report.qemu if report.qemu is not None else False}
    msr = {hex(a): tree.msr(a) for a in (0x3A, 0xC0010114)}
    msr = {k: v for k, v in msr.items() if v is not None}
    if msr:
        manifest["msr"] = msr
    if report.kvm is None:
        del manifest["kvm"]
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return out


"""The workloads: one busybox shell script each, run unchanged in the guest and on the host.

The script is timed from inside the shell that runs it, reading the kernel's monotonic clock
(the "now at N nsecs" line of ``/proc/timer_list``) before and after, so neither the guest
agent's round trip nor Python's process start is part of the number. On a host where
``/proc/timer_list`` cannot be read (it is root-only) the native side falls back to Python's
clock around the whole ``busybox sh -c`` (the fork and exec of one shell, ~1 ms, included).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "APPLETS",
    "BLOCK_DEVICE",
    "BOOT_WORKLOADS",
    "SIZES",
    "WORKLOADS",
    "Workload",
    "parse_timed",
    "script",
    "timed_script",
]

#: where the block workload reads: replaced by the guest's /dev/vdX or the host's image file
BLOCK_DEVICE = "@DISK@"
#: a directory for data files: /tmp in the guest (its root is in RAM), the bench's temp dir natively
TMP = "@TMP@"
#: busybox applets the scripts use (the native run gets a PATH of links to the host's busybox)
APPLETS = ("dd", "sha256sum", "md5sum", "cat", "true", "sync", "rm")
_MARK = "LKB"


@dataclass(frozen=True)
class Workload:
    """A named workload: a busybox command template sized by ``units`` (``{n}``)."""

    name: str
    label: str  # Spanish, for tables and plots
    kind: str  # "cpu" | "syscall" | "memory" | "io" | "boot"
    template: str
    units: int = 0  # quick-mode size; "full" multiplies it
    what: str = ""  # Spanish: what it stresses
    setup: str = ""  # run before the clock starts (e.g. a data file in RAM)
    cleanup: str = ""  # run after the clock stops

    def _fill(self, text: str, scale: float, device: str, tmp: str) -> str:
        n = max(1, int(self.units * scale))
        return text.format(n=n).replace(BLOCK_DEVICE, device).replace(TMP, tmp)

    def command(self, scale: float = 1.0, device: str = BLOCK_DEVICE, tmp: str = "/tmp") -> str:
        return self._fill(self.template, scale, device, tmp)

    def timed(self, scale: float, device: str = BLOCK_DEVICE, tmp: str = "/tmp") -> str:
        """The command between two clock reads, with its setup before and its cleanup after."""
        return timed_script(self.command(scale, device, tmp), self._fill(self.setup, scale, device, tmp),
                            self._fill(self.cleanup, scale, device, tmp))


WORKLOADS: tuple[Workload, ...] = (
    Workload("sha256", "CPU: sha256", "cpu", "sha256sum @TMP@/lkb.dat >/dev/null", 256,
             "aritmética entera y lógica: el traductor la convierte en código nativo una vez y la reutiliza",
             setup="dd if=/dev/zero of=@TMP@/lkb.dat bs=64k count={n} 2>/dev/null", cleanup="rm -f @TMP@/lkb.dat"),
    Workload("syscalls", "llamadas al sistema", "syscall",
             "dd if=/dev/zero of=/dev/null bs=1 count={n} 2>/dev/null", 300_000,
             "read()/write() de 1 byte: cada llamada entra y sale del núcleo del invitado"),
    Workload("memcopy", "copia de memoria", "memory",
             "i=0; while [ $i -lt {n} ]; do dd if=@TMP@/lkb.mem of=/dev/null bs=1M 2>/dev/null; i=$((i+1)); done",
             40, "copias de 1 MiB de la caché de páginas (RAM) al programa: ancho de banda de memoria",
             setup="dd if=/dev/zero of=@TMP@/lkb.mem bs=1M count=64 2>/dev/null", cleanup="rm -f @TMP@/lkb.mem"),
    Workload("blockio", "E/S de bloque directa", "io",
             f"dd if={BLOCK_DEVICE} of=/dev/null bs=4k count={{n}} iflag=direct 2>/dev/null", 4096,
             "lecturas O_DIRECT de 4 KiB: en el invitado cada una es una petición virtio que atiende QEMU"),
)

BOOT_WORKLOADS: tuple[Workload, ...] = (
    Workload("boot_vmlinux", "arranque: vmlinux (PVH)", "boot", "", 0,
             "QEMU en marcha → /init del invitado, núcleo sin comprimir"),
    Workload("boot_bzimage", "arranque: bzImage", "boot", "", 0,
             "lo mismo con el bzImage comprimido: la descompresión también es código emulado"),
)

#: size multipliers per mode
SIZES = {"quick": 1.0, "full": 4.0}


def script(workload: Workload, scale: float, device: str = BLOCK_DEVICE) -> str:
    """The plain command (what a student would type)."""
    return workload.command(scale, device)


def timed_script(command: str, setup: str = "", cleanup: str = "") -> str:
    """The command between two reads of the kernel's monotonic clock; prints ``LKB <ns> <status>``."""
    now = "{ read -r _; read -r _; read -r _ _ T _; } < /proc/timer_list"
    before = f"{setup}; " if setup else ""
    after = f"; {cleanup}" if cleanup else ""
    return (f"{before}now() {{ {now}; }}; now; A=$T; {{ {command}; }}; S=$?; now; "
            f"echo \"{_MARK} $((T - A)) $S\"{after}")


def parse_timed(stdout: str) -> tuple[float, int] | None:
    """(seconds, exit status) from the ``LKB`` line, or None."""
    for line in reversed(stdout.splitlines()):
        parts = line.split()
        if len(parts) == 3 and parts[0] == _MARK:
            try:
                return int(parts[1]) / 1e9, int(parts[2])
            except ValueError:
                return None
    return None

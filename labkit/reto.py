"""The closing challenge (notebook 12): an automatic checker that looks inside a running guest.

The challenge: a guest with

1. two extra virtio disks, of 64 MiB and 128 MiB;
2. both formatted and mounted, each with a file ``reto.txt`` (the student writes it);
3. a shared folder mounted in the guest, working both ways;
4. a USB stick that the guest sees on its USB bus and can read.

:func:`check` inspects the guest **from inside**, through ``guest.run`` (qemu-ga), the way a
student would: ``/sys/block`` (sizes, serials), ``/proc/mounts``, real writes and reads on each
mounted disk (with the guest's page cache dropped in between), a fresh random file created on the
host side of the share (and one created by the guest, read on the host), and the sysfs path of
each ``sd*`` disk (a USB stick hangs below a USB device). It changes nothing it does not clean up.
It works on both backends (:class:`labkit.guest.Guest` and ``LibvirtGuest``): it only needs
``run()``, ``shares()``, ``disks()``, ``usb_devices()`` and ``spec``.

The result has one :class:`Requirement` per item: ok or what is missing, with a hint that names
the labkit call to make. Its text/plain is deterministic (for nbval); in a notebook it renders as
an HTML checklist (✔/✘).
"""

from __future__ import annotations

import html
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .devices import disks as dd
from .devices import usb as du

__all__ = ["DISK_SIZES", "MARKER", "ChallengeResult", "Mount", "Requirement", "check", "match_disks", "parse_mounts"]

MiB = 1 << 20
#: The two extra disks the challenge asks for, in bytes.
DISK_SIZES = (64 * MiB, 128 * MiB)
#: The file the student writes in the root of each disk.
MARKER = "reto.txt"
#: File systems a share is mounted with.
SHARE_TYPES = ("9p", "virtiofs")
_READ_BYTES = 1 * MiB  # read from the USB stick to prove it is readable

TITLES = {
    "discos": "Dos discos virtio más, de 64 MiB y de 128 MiB",
    "montados": f"Los dos discos con formato, montados y con un fichero {MARKER}",
    "carpeta": "Una carpeta compartida montada, en los dos sentidos",
    "usb": "Una memoria USB en el bus USB del invitado, legible",
}


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class Requirement:
    """One item of the challenge: ``ok``, what was found or is missing (``detail``) and, when
    something is missing, what to do (``hint``: one or more lines naming the labkit call)."""

    key: str
    number: int
    title: str
    ok: bool
    detail: str
    hint: str = ""

    def text(self) -> str:
        lines = [f"{'✔' if self.ok else '✘'} {self.number}. {self.title}", f"    {self.detail}"]
        lines += [f"    → {line}" for line in self.hint.splitlines()]
        return "\n".join(lines)


@dataclass(frozen=True)
class ChallengeResult:
    """The checklist: one :class:`Requirement` per item, in the challenge's order."""

    requirements: tuple[Requirement, ...]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.requirements)

    @property
    def missing(self) -> list[str]:
        """Keys of the items not met yet ("discos", "montados", "carpeta", "usb")."""
        return [r.key for r in self.requirements if not r.ok]

    def __getitem__(self, key: str) -> Requirement:
        for r in self.requirements:
            if r.key == key:
                return r
        raise KeyError(key)

    def headline(self) -> str:
        done, total = sum(r.ok for r in self.requirements), len(self.requirements)
        if self.ok:
            return f"¡Reto superado! {done} de {total} requisitos cumplidos."
        return f"Reto final: {done} de {total} requisitos cumplidos."

    def __str__(self) -> str:
        return "\n".join([self.headline(), *(r.text() for r in self.requirements)])

    __repr__ = __str__

    def _repr_html_(self) -> str:
        items = []
        for r in self.requirements:
            color = "#1a7f37" if r.ok else "#cf222e"
            hints = "".join(f"<div style='margin-left:1.6em'>→ {_code_html(line)}</div>" for line in r.hint.splitlines())
            items.append(
                f"<li style='margin:0.4em 0'><span style='color:{color};font-weight:bold'>{'✔' if r.ok else '✘'}</span> "
                f"<b>{r.number}. {html.escape(r.title)}</b>"
                f"<div style='margin-left:1.6em'>{_code_html(r.detail)}</div>{hints}</li>")
        color = "#1a7f37" if self.ok else "#9a6700"
        return (f"<div><b style='color:{color}'>{html.escape(self.headline())}</b>"
                f"<ul style='list-style:none;padding-left:0.5em'>{''.join(items)}</ul></div>")


def _code_html(text: str) -> str:
    """Escape, and turn `code` spans into <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


# --------------------------------------------------------------------------- pure parsing


@dataclass(frozen=True)
class Mount:
    """One line of the guest's /proc/mounts."""

    source: str
    mountpoint: str
    fstype: str
    options: tuple[str, ...]

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


def _unescape(field: str) -> str:
    """/proc/mounts writes a space as \\040, a tab as \\011, a backslash as \\134."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mounts(text: str) -> list[Mount]:
    """Parse /proc/mounts (source, mount point, type, options; octal escapes decoded)."""
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        found.append(Mount(_unescape(parts[0]), _unescape(parts[1]), parts[2], tuple(parts[3].split(","))))
    return found


def match_disks(devices: Sequence[dd.GuestBlockDevice], sizes: Sequence[int] = DISK_SIZES
                ) -> tuple[dict[int, dd.GuestBlockDevice], list[dd.GuestBlockDevice]]:
    """Pair each wanted size with a distinct disk of exactly that size (a mounted one first).

    Returns ({size: disk} for the sizes found, the disks left over)."""
    left = list(devices)
    found: dict[int, dd.GuestBlockDevice] = {}
    for size in sizes:
        candidates = sorted((d for d in left if d.size == size), key=lambda d: d.mountpoint is None)
        if candidates:
            found[size] = candidates[0]
            left.remove(candidates[0])
    return found, left


def _sizes_text(sizes: Sequence[int]) -> str:
    names = [dd.format_size(s) for s in sizes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " y " + names[-1]


def _dedupe(lines: Sequence[str]) -> str:
    return "\n".join(dict.fromkeys(line for line in lines if line))


# --------------------------------------------------------------------------- the four checks


def _hotplug_hint(guest: Any) -> str:
    if getattr(guest.spec, "machine", "") == "microvm":
        return ("Una máquina microvm no tiene bus PCI ni USB: arranca el invitado con "
                "`GuestSpec(machine=\"pc\", shared_memory=True)`.")
    return ""


def _check_disks(guest: Any, devices: Sequence[dd.GuestBlockDevice], sizes: Sequence[int]) -> Requirement:
    found, left = match_disks(devices, sizes)
    if len(found) == len(sizes):
        detail = " y ".join(f"{found[s].name} ({dd.format_size(s)}, serie {found[s].serial or '—'})" for s in sizes)
        return Requirement("discos", 1, TITLES["discos"], True, f"El invitado ve {detail}.")
    absent = [s for s in sizes if s not in found]
    parts = [f"Falta{'n los discos' if len(absent) > 1 else ' el disco'} de {_sizes_text(absent)}."]
    if left:
        parts.append("El invitado ve " + ", ".join(f"{d.name} ({dd.format_size(d.size)})" for d in left)
                     + f", que no mide{'n' if len(left) > 1 else ''} lo pedido.")
    hints = [_hotplug_hint(guest)]
    attached = len(guest.disks())
    if attached > len(devices):
        parts.append(f"El anfitrión tiene {attached} disco(s) conectados y el invitado solo ve {len(devices)}.")
        hints.append("Carga el controlador en el invitado: `disks.load_disk_drivers(g)`.")
    for size in absent:
        mib = size // MiB
        hints.append(f"Crea la imagen y conéctala: `d{mib} = disks.create(carpeta / \"reto-{mib}.qcow2\", "
                     f"\"{mib}M\")` y `g.attach_disk(d{mib}.path, serial=\"RETO{mib}\")`.")
    return Requirement("discos", 1, TITLES["discos"], False, " ".join(parts), _dedupe(hints))


#: In the guest: is the marker there; write a token, sync, drop the page cache, read it back.
_DISK_SCRIPT = (
    'm=$1; f="$m/.reto-comprobacion"; '
    '[ -s "$m/$3" ] && echo marker=1 || echo marker=0; '
    'if printf %s "$2" 2>/dev/null > "$f" && sync; then echo 3 > /proc/sys/vm/drop_caches; '
    'back=; read -r back < "$f"; echo "back=$back"; else echo back=; fi; rm -f "$f"'
)


def _fields(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _check_mounted(guest: Any, devices: Sequence[dd.GuestBlockDevice], sizes: Sequence[int],
                   marker: str) -> Requirement:
    found, _left = match_disks(devices, sizes)
    good, problems, hints = [], [], []
    for size in sizes:
        dev = found.get(size)
        label = dd.format_size(size)
        if dev is None:
            problems.append(f"Falta el disco de {label} (requisito 1).")
            continue
        if not dev.mountpoint:
            mnt = f"/mnt/reto{size // MiB}"
            problems.append(f"{dev.name} ({label}) no está montado.")
            hints.append(f"Dale formato y móntalo: `g.run(\"mke2fs {dev.path}\")` y "
                         f"`g.run(\"modprobe ext4 && mkdir -p {mnt} && mount {dev.path} {mnt}\")`.")
            continue
        token = secrets.token_hex(8)
        answer = _fields(guest.run(["/bin/sh", "-c", _DISK_SCRIPT, "sh", dev.mountpoint, token, marker],
                                   timeout=60).stdout)
        where = f"{dev.name} → {dev.mountpoint} ({dev.fstype})"
        if answer.get("back") != token:
            problems.append(f"{where}: no se pudo escribir y volver a leer un fichero.")
            hints.append(f"¿Está montado en solo lectura? `g.run(\"mount -o remount,rw {dev.mountpoint}\")`; "
                         "si no, mira `g.run(\"dmesg\")`.")
        elif answer.get("marker") != "1":
            problems.append(f"{where}: falta {dev.mountpoint}/{marker}.")
            hints.append(f"Escribe el fichero: `g.run(\"echo hola > {dev.mountpoint}/{marker}\")`.")
        else:
            good.append(where)
    if not problems:
        return Requirement("montados", 2, TITLES["montados"], True,
                           "; ".join(good) + f": {marker} presente, y se escribió y se leyó de vuelta un fichero.")
    detail = " ".join(problems) + (f" Bien: {'; '.join(good)}." if good else "")
    return Requirement("montados", 2, TITLES["montados"], False, detail, _dedupe(hints))


#: In the guest: read the file the host just made; write one for the host.
_SHARE_SCRIPT = (
    'seen=; read -r seen 2>/dev/null < "$1/$2"; echo "seen=$seen"; '
    'if printf %s "$3" 2>/dev/null > "$1/$2-invitado"; then echo wrote=1; else echo wrote=0; fi'
)


def _share_round_trip(guest: Any, mount: Mount, share: Any) -> tuple[str, str] | None:
    """Host → guest and guest → host with fresh random files: None when both ways work, else (why, hint)."""
    name = f"reto-{secrets.token_hex(4)}.txt"
    to_guest, to_host = secrets.token_hex(8), secrets.token_hex(8)
    host_dir = Path(share.path)
    host_file, back_file = host_dir / name, host_dir / f"{name}-invitado"
    where = f"«{share.tag}» en {mount.mountpoint}"
    try:
        host_file.write_text(to_guest + "\n")
    except OSError as err:
        return (f"{where}: no se pudo crear un fichero en su carpeta del anfitrión ({err.strerror}).",
                "Comparte una carpeta en la que tu usuario pueda escribir, p. ej. una dentro de `carpeta`.")
    try:
        answer = _fields(guest.run(["/bin/sh", "-c", _SHARE_SCRIPT, "sh", mount.mountpoint, name, to_host],
                                   timeout=60).stdout)
        if answer.get("seen") != to_guest:
            return (f"{where}: el invitado no ve el fichero nuevo que se acaba de crear en el anfitrión.",
                    "¿Está montada ahí la carpeta correcta? Compara `g.run(\"cat /proc/mounts\")` con `g.shares()`.")
        if answer.get("wrote") != "1":
            return (f"{where}: el invitado no puede escribir (¿carpeta de solo lectura?).",
                    "El reto pide los dos sentidos: compártela sin `readonly=True`.")
        try:
            seen = back_file.read_text().strip()
        except OSError:
            seen = ""
        if seen != to_host:
            return (f"{where}: el anfitrión no ve el fichero que acaba de escribir el invitado.",
                    f"Desmóntala y vuelve a montarla con `g.mount_share(\"{share.tag}\")` (sin caché en el invitado).")
        return None
    finally:
        guest.run(["rm", "-f", f"{mount.mountpoint}/{name}", f"{mount.mountpoint}/{name}-invitado"])
        for leftover in (host_file, back_file):
            try:
                leftover.unlink(missing_ok=True)
            except OSError:
                pass


def _check_share(guest: Any, mounts: Sequence[Mount]) -> Requirement:
    shares = {s.tag: s for s in guest.shares()}
    key, title = "carpeta", TITLES["carpeta"]
    mounted = [m for m in mounts if m.fstype in SHARE_TYPES]
    problems, hints = [], []
    for mount in mounted:
        share = shares.get(mount.source)
        if share is None:
            problems.append(f"«{mount.source}» está montada en {mount.mountpoint}, pero no es una carpeta que "
                            "labkit haya conectado: no se sabe de qué carpeta del anfitrión se trata.")
            hints.append("Conéctala con labkit: `g.attach_share(...)` o `GuestSpec(shares=...)`.")
            continue
        failed = _share_round_trip(guest, mount, share)
        if failed is None:
            return Requirement(key, 3, title, True,
                               f"«{share.tag}» ({share.kind}) montada en {mount.mountpoint}: el invitado leyó un "
                               "fichero nuevo del anfitrión y el anfitrión, uno nuevo del invitado.")
        problems.append(failed[0])
        hints.append(failed[1])
    unmounted = [tag for tag in shares if tag not in {m.source for m in mounted}]
    if unmounted:
        problems.append(f"La carpeta «{unmounted[0]}» está conectada, pero el invitado no la ha montado.")
        hints.append(f"Móntala: `g.mount_share(\"{unmounted[0]}\")`.")
    if problems:
        return Requirement(key, 3, title, False, " ".join(problems), _dedupe(hints))
    hints = [_hotplug_hint(guest)]
    spec = guest.spec
    if not getattr(spec, "shared_memory", False) and spec.machine != "microvm":
        hints.append("virtiofs en caliente necesita memoria compartida desde el arranque: arranca con "
                     "`GuestSpec(..., shared_memory=True)` (o da la carpeta al arrancar: `GuestSpec(shares=...)`).")
    hints.append("Crea una carpeta en el anfitrión, compártela y móntala: `(carpeta / \"compartida\").mkdir()`, "
                 "`g.attach_share(carpeta / \"compartida\", tag=\"reto\")` y `g.mount_share(\"reto\")`.")
    return Requirement(key, 3, title, False, "El invitado no tiene ninguna carpeta compartida.", _dedupe(hints))


def _check_usb(guest: Any, devices: Sequence[du.GuestUsbDevice]) -> Requirement:
    key, title = "usb", TITLES["usb"]
    sticks = [d for d in devices if d.disk]
    problems = []
    for stick in sticks:
        result = guest.run(["dd", f"if=/dev/{stick.disk}", "of=/dev/null", "bs=64k", f"count={_READ_BYTES >> 16}"],
                           timeout=60)
        if result.ok:
            return Requirement(key, 4, title, True,
                               f"{stick.disk} cuelga del dispositivo USB {stick.name} («{stick.product}», "
                               f"{stick.ids}, serie {stick.serial or '—'}) y se leyó su primer MiB.")
        problems.append(f"{stick.disk} cuelga del USB {stick.name}, pero no se pudo leer: "
                        f"{result.stderr.strip()[:120]}")
    if problems:
        return Requirement(key, 4, title, False, "; ".join(problems) + ".", "Mira `g.run(\"dmesg\")` en el invitado.")
    detail = "El invitado no ve ninguna memoria USB."
    others = sorted({d.product for d in devices if not d.ids.startswith("1d6b:") and d.product})
    if others:
        detail += f" Sí ve otros dispositivos USB: {', '.join(others)}."
    hints = [_hotplug_hint(guest)]
    attached = [u for u in guest.usb_devices() if u.kind == "storage"]
    if attached:
        detail += " labkit ya conectó una, pero el invitado aún no la muestra."
        hints.append("Carga los controladores y espera un momento: `usb.load_usb_drivers(g)`, "
                     f"`usb.find_usb_disk(g, \"{attached[0].serial}\")`.")
    else:
        if getattr(guest, "backend", "") == "libvirt" and not (guest.spec.usb or guest.spec.usb_controller):
            hints.append("libvirt no conecta el controlador USB en caliente: arranca con "
                         "`GuestSpec(..., usb_controller=True)`.")
        hints.append("Crea una imagen y conéctala como memoria: `memoria = disks.create(carpeta / \"memoria.img\", "
                     "\"32M\", \"raw\")` y `g.attach_usb(\"storage\", image=memoria.path, serial=\"RETOUSB\")`.")
    return Requirement(key, 4, title, False, detail, _dedupe(hints))


def check(guest: Any, *, sizes: Sequence[int] = DISK_SIZES, marker: str = MARKER) -> ChallengeResult:
    """Check the challenge on a running guest (either backend), from inside; see the module docstring."""
    devices = dd.guest_block_devices(guest)
    mounts = parse_mounts(guest.run(["cat", "/proc/mounts"], check=True).stdout)
    usb_devices = du.guest_usb_devices(guest)
    return ChallengeResult((
        _check_disks(guest, devices, sizes),
        _check_mounted(guest, devices, sizes, marker),
        _check_share(guest, mounts),
        _check_usb(guest, usb_devices),
    ))

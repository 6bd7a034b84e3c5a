"""A small disk lab (notebook 10): create an image, plug it into a running guest, unplug it,
and see what the guest sees after each action.

``disk_lab(guest, directory)`` returns a widget with a size box, a format dropdown, the buttons
«Crear y conectar» and «Desconectar», a log of the commands used and an ``lsblk``-like table
read from the guest's sysfs. Its actions are methods (``create_and_attach()``, ``detach()``,
``refresh()``), so tests and students can drive it without a browser; its text/plain repr is
short and deterministic, for nbval.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from ..devices import disks as dd
from ..errors import LabkitError

__all__ = ["DiskLab", "disk_lab"]


class DiskLab(widgets.VBox):
    """Controls: ``size``, ``format``, ``create_button``, ``detach_button``; outputs: ``table``
    (the guest's disks), ``history`` (commands and errors); ``attached`` lists the disks plugged in here."""

    def __init__(self, guest: Any, directory: str | Path, *, prefix: str = "widget") -> None:
        self.guest = guest
        self.directory = Path(directory)
        self.prefix = prefix
        self.attached: list[dd.AttachedDisk] = []
        self.devices: list[dd.GuestBlockDevice] = []
        self.messages: list[str] = []
        self._count = 0
        self.size = widgets.Text(value="64M", description="Tamaño:", placeholder="p. ej. 64M, 1G")
        self.format = widgets.Dropdown(options=[("qcow2", "qcow2"), ("raw", "raw")], value="qcow2",
                                       description="Formato:")
        self.create_button = widgets.Button(description="Crear y conectar", button_style="primary", icon="plus")
        self.detach_button = widgets.Button(description="Desconectar", icon="minus")
        self.table = widgets.HTML()
        self.history = widgets.HTML()
        self.create_button.on_click(lambda _b: self.create_and_attach())
        self.detach_button.on_click(lambda _b: self.detach())
        controls = widgets.HBox([self.size, self.format, self.create_button, self.detach_button],
                                layout=widgets.Layout(flex_flow="row wrap"))
        super().__init__([widgets.HTML("<h4>Discos del invitado</h4>"), controls, self.table, self.history])
        self.refresh()

    # ------------------------------------------------------------ actions
    def create_and_attach(self) -> dd.AttachedDisk | None:
        """Create an image with the chosen size and format and plug it in; None (and a message) on error."""
        try:
            self._count += 1
            serial = f"LKW{self._count}"
            suffix = "qcow2" if self.format.value == "qcow2" else "img"
            image = dd.create(self.directory / f"{self.prefix}{self._count}.{suffix}", self.size.value,
                              self.format.value)
            disk = self.guest.attach_disk(image.path, format=image.format, serial=serial)
            dd.find_by_serial(self.guest, serial)  # the guest needs a moment to see a new device
        except LabkitError as err:
            self._say(f"✗ {err.message} — {err.hint}")
            return None
        self.attached.append(disk)
        self._say(f"✓ {image.command}")
        self.refresh()
        return disk

    def detach(self) -> dd.AttachedDisk | None:
        """Unplug the last disk plugged in from here; None (and a message) when there is none or on error."""
        if not self.attached:
            self._say("✗ No hay discos conectados desde aquí.")
            return None
        disk = self.attached[-1]
        try:
            done = self.guest.detach_disk(disk)
        except LabkitError as err:
            self._say(f"✗ {err.message} — {err.hint}")
            return None
        self.attached.pop()
        self._say(f"✓ desconectado {disk.serial} ({disk.image.name})")
        self.refresh()
        return done

    def refresh(self) -> None:
        """Read the guest's disks again (sysfs) and redraw the table."""
        try:
            self.devices = dd.guest_block_devices(self.guest)
        except LabkitError as err:
            self.devices = []
            self._say(f"✗ {err.message}")
        self.table.value = f"<pre>{html.escape(dd.block_table(self.devices))}</pre>"

    def table_text(self) -> str:
        return dd.block_table(self.devices)

    def _say(self, line: str) -> None:
        self.messages.append(line)
        self.history.value = "<br>".join(f"<code>{html.escape(m)}</code>" for m in self.messages[-6:])

    # A stable text/plain for nbval and static viewers.
    def __repr__(self) -> str:
        return "<Laboratorio de discos: tamaño, formato, «Crear y conectar», «Desconectar» y la tabla del invitado>"

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        data = super()._repr_mimebundle_(**kwargs) or {}
        data["text/plain"] = repr(self)
        return data


def disk_lab(guest: Any, directory: str | Path, *, prefix: str = "widget") -> DiskLab:
    """The disk widget over a running guest (machine "pc"), with its images in ``directory``."""
    return DiskLab(guest, directory, prefix=prefix)

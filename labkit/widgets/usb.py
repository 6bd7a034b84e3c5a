"""The USB table (notebook 09): the host's USB devices, or why there are none, and the generated
configuration (QEMU argv, libvirt XML, udev fix) for the selected one.

``usb_table(report=None)`` reads the host (``labkit.devices.usb.host_devices()``) unless given a
report (tests pass one built from a fixture sysfs tree). ``select(index)`` does what clicking a row
does; ``config_text()`` is the configuration shown. The text/plain repr is deterministic for nbval.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets

from ..devices import usb as du

__all__ = ["UsbTable", "usb_table"]


class UsbTable(widgets.VBox):
    def __init__(self, report: du.HostUsbReport | None = None, *, domain: str = "labkit-guest") -> None:
        self.report = report or du.host_devices()
        self.domain = domain
        self.devices = list(self.report.passthrough_candidates)
        self.selected: du.HostUsbDevice | None = None
        options = [(f"{d.lsusb_line()}{'' if d.openable else '  (sin permiso)'}", i)
                   for i, d in enumerate(self.devices)]
        self.picker = widgets.Select(options=options, rows=min(8, max(2, len(options))),
                                     layout=widgets.Layout(width="100%"))
        self.config = widgets.HTML()
        self.picker.observe(lambda change: self.select(change["new"]), names="value")
        header = widgets.HTML(f"<b>USB del anfitrión</b>: {html.escape(self.report.explanation)}")
        children: list[Any] = [header]
        if self.devices:
            children += [self.picker, self.config]
            self.select(0)
        super().__init__(children)

    def select(self, index: int | None) -> str:
        """Choose a device (as clicking its row does) and return its configuration text."""
        if index is None or not self.devices:
            self.selected = None
            return ""
        self.selected = self.devices[index]
        text = self.config_text()
        self.config.value = f"<pre>{html.escape(text)}</pre>"
        return text

    def config_text(self) -> str:
        d = self.selected
        if d is None:
            return self.report.explanation
        lines = [f"# {d.lsusb_line()}  ({d.speed} Mb/s)",
                 "# QEMU, por bus y dirección (este puerto, esta conexión):",
                 " ".join(du.qemu_host_args(d)),
                 "# QEMU, por fabricante y producto (ese modelo, donde esté):",
                 " ".join(du.qemu_host_args(d, by="id")),
                 "# libvirt (virsh attach-device DOMINIO usb.xml --live):",
                 du.libvirt_hostdev_xml(d)]
        if not d.openable:
            lines += [f"# Aviso: {d.reason}", "# Arreglo: " + du.fix_hint(d).replace("\n", "\n# ")]
        return "\n".join(lines)

    def __repr__(self) -> str:
        if not self.report.bus_present:
            return "<Tabla USB: este anfitrión no tiene bus USB; se explica por qué y qué hacer>"
        return f"<Tabla USB: {len(self.devices)} dispositivo(s) para elegir y su configuración QEMU/libvirt>"

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        data = super()._repr_mimebundle_(**kwargs) or {}
        data["text/plain"] = repr(self)
        return data


def usb_table(report: du.HostUsbReport | None = None, *, domain: str = "labkit-guest") -> UsbTable:
    return UsbTable(report, domain=domain)

"""Two clipboards side by side (notebook 11): the host's and the guest's, kept in sync through
QEMU's ``qemu-vdagent`` and the virtio-serial port ``com.redhat.spice.0``.

``clipboard_sync(link)`` takes a running :class:`labkit.devices.clipboard.ClipboardLink` (or
anything with ``host_copy(text)`` / ``guest_copy(text)`` returning transfers with ``received``,
``seconds`` and ``messages``). Its actions are methods (``copy_from_host()``,
``copy_from_guest()``), so tests and students can drive it without a browser; its text/plain
repr is deterministic, for nbval.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets

from ..errors import LabkitError

__all__ = ["ClipboardSync", "clipboard_sync"]


class ClipboardSync(widgets.VBox):
    """Controls: ``host`` and ``guest`` (text boxes), ``to_guest`` and ``to_host`` (buttons);
    ``history`` shows each transfer and its VD-Agent messages; ``transfers`` keeps them."""

    def __init__(self, link: Any) -> None:
        self.link = link
        self.transfers: list[Any] = []
        self.messages: list[str] = []
        self.host = widgets.Textarea(value="", description="Anfitrión:", placeholder="Texto copiado en el anfitrión",
                                     layout=widgets.Layout(width="48%"))
        self.guest = widgets.Textarea(value="", description="Invitado:", placeholder="Texto copiado en el invitado",
                                      layout=widgets.Layout(width="48%"))
        self.to_guest = widgets.Button(description="Copiar en el anfitrión →", button_style="primary")
        self.to_host = widgets.Button(description="← Copiar en el invitado")
        self.history = widgets.HTML()
        self.to_guest.on_click(lambda _b: self.copy_from_host())
        self.to_host.on_click(lambda _b: self.copy_from_guest())
        boxes = widgets.HBox([self.host, self.guest])
        buttons = widgets.HBox([self.to_guest, self.to_host])
        super().__init__([widgets.HTML("<h4>Portapapeles compartido</h4>"), boxes, buttons, self.history])

    # ------------------------------------------------------------ actions
    def copy_from_host(self, text: str | None = None) -> Any:
        """The host copies its box's text (or ``text``); the guest's box shows what the guest received."""
        if text is not None:
            self.host.value = text
        return self._transfer(self.link.host_copy, self.host.value, self.guest)

    def copy_from_guest(self, text: str | None = None) -> Any:
        """The guest copies its box's text (or ``text``); the host's box shows what the host received."""
        if text is not None:
            self.guest.value = text
        return self._transfer(self.link.guest_copy, self.guest.value, self.host)

    def _transfer(self, action: Any, text: str, target: widgets.Textarea) -> Any:
        try:
            transfer = action(text)
        except LabkitError as err:
            self.messages.append(f"Error: {err.message} ({err.hint})")
            self._render()
            return None
        target.value = transfer.received
        self.transfers.append(transfer)
        self.messages.append(f"{transfer.direction}: {transfer.received!r} en {transfer.seconds * 1000:.0f} ms")
        self.messages += [f"    {m}" for m in transfer.messages]
        self._render()
        return transfer

    def _render(self) -> None:
        rows = "<br>".join(html.escape(m).replace("  ", "&nbsp;&nbsp;") for m in self.messages[-12:])
        self.history.value = f"<div style='font-family:monospace;font-size:90%'>{rows}</div>"

    # A stable text/plain for nbval and static viewers.
    def __repr__(self) -> str:
        return (f"<Portapapeles compartido: anfitrión={self.host.value!r}, invitado={self.guest.value!r}, "
                f"{len(self.transfers)} copias>")

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        data = super()._repr_mimebundle_(**kwargs) or {}
        data["text/plain"] = repr(self)
        return data


def clipboard_sync(link: Any) -> ClipboardSync:
    """The two-clipboard widget over a started ClipboardLink."""
    return ClipboardSync(link)

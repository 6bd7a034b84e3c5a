"""The shared-folder lab (notebook 09): edit a file on one side, read it on the other.

``share_lab(guest, mounted, host_dir)``: a file name, a text box and the buttons «Escribir en el
anfitrión» / «Escribir en el invitado»; after each write both sides are read back and shown side
by side. The actions are methods (``write_host(text)``, ``write_guest(text)``, ``read_both()``) so
it works without a browser; the text/plain repr is deterministic for nbval.
"""

from __future__ import annotations

import html
import shlex
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from ..devices import shares as sh
from ..errors import InputError, LabkitError

__all__ = ["ShareLab", "share_lab"]


class ShareLab(widgets.VBox):
    def __init__(self, guest: Any, mounted: sh.MountedShare, host_dir: str | Path, *,
                 filename: str = "nota.txt") -> None:
        self.guest = guest
        self.mounted = mounted
        self.host_dir = Path(host_dir)
        self.filename = widgets.Text(value=filename, description="Fichero:")
        self.text = widgets.Textarea(value="Hola desde el anfitrión", layout=widgets.Layout(width="100%"))
        self.host_button = widgets.Button(description="Escribir en el anfitrión", icon="desktop")
        self.guest_button = widgets.Button(description="Escribir en el invitado", icon="server")
        self.view = widgets.HTML()
        self.messages: list[str] = []
        self.host_button.on_click(lambda _b: self.write_host(self.text.value))
        self.guest_button.on_click(lambda _b: self.write_guest(self.text.value))
        title = widgets.HTML(f"<b>Carpeta compartida</b> ({html.escape(mounted.explanation)})")
        super().__init__([title, self.filename, self.text, widgets.HBox([self.host_button, self.guest_button]),
                          self.view])

    def _name(self) -> str:
        name = self.filename.value.strip()
        if not name or "/" in name or name in (".", ".."):
            raise InputError(f"Nombre de fichero no válido: «{name}».", "Usa un nombre sin «/», p. ej. nota.txt.")
        return name

    def write_host(self, text: str) -> dict[str, str]:
        """Write the file on the host side, then read both sides."""
        try:
            (self.host_dir / self._name()).write_text(text + "\n")
            self.messages.append(f"anfitrión: echo … > {self.host_dir / self._name()}")
        except (LabkitError, OSError) as err:
            self.messages.append(f"✗ {err}")
        return self.read_both()

    def write_guest(self, text: str) -> dict[str, str]:
        """Write the file inside the guest (through the agent), then read both sides."""
        try:
            path = f"{self.mounted.mountpoint}/{self._name()}"
            result = self.guest.run(f"cat > {shlex.quote(path)}", input=text + "\n")
            self.messages.append(f"invitado: cat > {path}" + ("" if result.ok else f"  ✗ {result.stderr.strip()}"))
        except LabkitError as err:
            self.messages.append(f"✗ {err.message}")
        return self.read_both()

    def read_both(self) -> dict[str, str]:
        """What each side reads now: {"anfitrión": ..., "invitado": ...}."""
        name = self.filename.value.strip()
        try:
            host = (self.host_dir / name).read_text()
        except OSError as err:
            host = f"(no se puede leer: {err.strerror})"
        result = self.guest.run(["cat", f"{self.mounted.mountpoint}/{name}"])
        guest = result.stdout if result.ok else f"(no se puede leer: {result.stderr.strip()})"
        sides = {"anfitrión": host, "invitado": guest}
        self.view.value = ("<table><tr><th>anfitrión</th><th>invitado</th></tr><tr>"
                           + "".join(f"<td><pre>{html.escape(v)}</pre></td>" for v in sides.values())
                           + "</tr></table><br>" + "<br>".join(f"<code>{html.escape(x)}</code>" for x in self.messages[-4:]))
        return sides

    def __repr__(self) -> str:
        return (f"<Laboratorio de carpeta compartida ({self.mounted.mechanism}): escribe en un lado y lee en "
                "el otro>")

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        data = super()._repr_mimebundle_(**kwargs) or {}
        data["text/plain"] = repr(self)
        return data


def share_lab(guest: Any, mounted: sh.MountedShare, host_dir: str | Path, *, filename: str = "nota.txt") -> ShareLab:
    return ShareLab(guest, mounted, host_dir, filename=filename)

"""The one error tree of labkit.

Every error says, in Spanish, what happened (``message``) and what to do next
(``hint``), and keeps its cause (``raise ... from err``)::

    LabkitError
     ├── InputError            bad value given by the user (size, path, name ...)
     ├── HostError             the host cannot do what was asked
     │    ├── ProbeError       a host file could not be read or made sense of
     │    ├── guest.GuestError          a running guest failed (start, command timeout/failure)
     │    ├── guest.agent.AgentError    qemu-ga did not answer
     │    └── kvmapi.KvmError           the teaching VMM: KvmUnavailableError,
     │                                  GuestTimeoutError, VmExitError
     ├── ToolMissingError      a program (qemu, virsh, qemu-img ...) is not installed
     └── SetupError            the course environment is incomplete
"""

from __future__ import annotations

import errno
import os

__all__ = [
    "os_reason",
    "LabkitError",
    "InputError",
    "HostError",
    "ProbeError",
    "ToolMissingError",
    "SetupError",
]


class LabkitError(Exception):
    """Base of every labkit error: a Spanish message plus a hint."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  Qué hacer: {self.hint}"
        return self.message

    def _repr_markdown_(self) -> str:  # short display in notebooks
        text = f"**Error:** {self.message}"
        if self.hint:
            text += f"\n\n**Qué hacer:** {self.hint}"
        return text


class InputError(LabkitError, ValueError):
    """A value given by the user is not valid."""


class HostError(LabkitError):
    """The host cannot do what was asked."""


class ProbeError(HostError):
    """A host file could not be read or understood."""


class ToolMissingError(LabkitError):
    """A required program is not installed."""

    def __init__(self, tool: str, package: str, message: str = "") -> None:
        super().__init__(
            message or f"No se encuentra el programa «{tool}».",
            f"Instálalo con: sudo apt-get install {package}  (o ejecuta ./lab course, que lo instala).",
        )
        self.tool = tool
        self.package = package


class SetupError(LabkitError):
    """The course environment is incomplete."""


_OS_REASONS = {
    errno.ENOENT: "no existe",
    errno.EACCES: "permiso denegado",
    errno.EPERM: "operación no permitida",
    errno.EISDIR: "es una carpeta",
    errno.ENOTDIR: "una parte de la ruta no es una carpeta",
    errno.EEXIST: "ya existe",
    errno.EROFS: "el sistema de ficheros es de solo lectura",
    errno.ENOSPC: "no queda espacio en el disco",
    errno.ENAMETOOLONG: "el nombre es demasiado largo",
    errno.ELOOP: "demasiados enlaces simbólicos seguidos",
    errno.E2BIG: "la lista de argumentos es demasiado larga",
    errno.ENOEXEC: "no es un ejecutable válido",
}


def os_reason(err: OSError | int | str) -> str:
    """An operating-system error in Spanish: from an OSError, an errno, or the C library's English text
    (as another program quotes it, e.g. "No such file or directory"); unknown ones are kept as given."""
    if isinstance(err, OSError):
        code, text = err.errno, err.strerror or str(err)
    elif isinstance(err, int):
        code, text = err, os.strerror(err)
    else:
        text = str(err)
        code = next((c for c in _OS_REASONS if os.strerror(c) == text), None)
    return _OS_REASONS.get(code, text) if code is not None else text

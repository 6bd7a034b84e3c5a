"""A client for the QEMU guest agent (qemu-ga) over its virtio-serial port.

The protocol is QMP-like JSON, one message a line. The host side of the port
is a unix socket that QEMU serves; bytes written before the guest opens the
port may arrive half-read, so every conversation starts with
``guest-sync-delimited``: the host sends 0xFF (which resets qemu-ga's parser)
and a random id, and qemu-ga answers 0xFF followed by the same id.

Message builders are pure (:func:`make_command`, :func:`decode_exec_status`);
:class:`AgentClient` owns the socket.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import HostError

__all__ = ["AgentClient", "AgentError", "ExecStatus", "make_command", "decode_exec_status"]

_SENTINEL = b"\xff"


class AgentError(HostError):
    """qemu-ga did not answer, or answered with an error."""


def make_command(execute: str, **arguments: Any) -> bytes:
    """One qemu-ga command as the bytes sent on the wire."""
    msg: dict[str, Any] = {"execute": execute}
    if arguments:
        msg["arguments"] = arguments
    return json.dumps(msg).encode() + b"\n"


@dataclass(frozen=True)
class ExecStatus:
    exited: bool
    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    truncated: bool


def decode_exec_status(ret: dict[str, Any]) -> ExecStatus:
    """Decode a ``guest-exec-status`` answer (outputs come base64-encoded)."""
    return ExecStatus(
        exited=bool(ret.get("exited")),
        exit_code=ret.get("exitcode"),
        signal=ret.get("signal"),
        stdout=base64.b64decode(ret.get("out-data", "")),
        stderr=base64.b64decode(ret.get("err-data", "")),
        truncated=bool(ret.get("out-truncated") or ret.get("err-truncated")),
    )


class AgentClient:
    """Synchronous qemu-ga client: safe to call from a notebook cell (no event loop needed)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._sock: socket.socket | None = None
        self._buf = b""
        self._stale = False  # a late answer may still come: resynchronise before the next command

    # ----------------------------------------------------------- connection
    def connect(self, deadline: float, alive: Any = lambda: True) -> None:
        """Connect and synchronise; retries until ``deadline`` (time.monotonic) or ``alive()`` is False."""
        while True:
            if not alive():
                raise AgentError("QEMU terminó antes de que respondiera el agente del invitado.",
                                 "Mira el registro de la consola (console_log()) para ver por qué.")
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.connect(str(self.path))
                    self._sock, self._buf = sock, b""
                if self._sync(min(deadline, time.monotonic() + 0.5)):
                    return
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.01)
            except OSError:
                self.close()
                time.sleep(0.02)
            if time.monotonic() >= deadline:
                raise AgentError("El agente del invitado (qemu-ga) no respondió a tiempo.",
                                 "El invitado puede seguir arrancando: prueba con más tiempo (boot_timeout) "
                                 "o mira console_log().")

    def _sync(self, deadline: float) -> bool:
        token = random.randrange(1, 2**31)
        assert self._sock is not None
        self._sock.sendall(_SENTINEL + make_command("guest-sync-delimited", id=token))
        while time.monotonic() < deadline:
            # skip everything up to the agent's 0xFF, then read one answer
            idx = self._buf.find(_SENTINEL)
            if idx >= 0:
                self._buf = self._buf[idx + 1:]
                try:
                    msg = self._read_message(deadline)
                except TimeoutError:
                    return False
                if msg.get("return") == token:
                    return True
                continue
            if not self._fill(deadline):
                return False
        return False

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    # ----------------------------------------------------------- messages
    def _fill(self, deadline: float) -> bool:
        assert self._sock is not None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self._sock.settimeout(remaining)
        try:
            chunk = self._sock.recv(1 << 20)
        except socket.timeout:
            return False
        if not chunk:
            raise ConnectionResetError("el socket del agente se cerró")
        self._buf += chunk
        return True

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self._buf:
            if not self._fill(deadline):
                raise TimeoutError
        line, _, self._buf = self._buf.partition(b"\n")
        line = line.strip().lstrip(_SENTINEL)
        if not line:
            return self._read_message(deadline)
        return json.loads(line)

    def execute(self, command: str, timeout: float = 10.0, **arguments: Any) -> Any:
        """Send one command and return its ``return`` value; errors become :class:`AgentError`."""
        if self._sock is None:
            raise AgentError("No hay conexión con el agente del invitado.", "Arranca el invitado primero.")
        deadline = time.monotonic() + timeout
        if self._stale:
            if not self._sync(deadline):
                raise AgentError("El agente del invitado no responde.", "Mira console_log() o reinicia el invitado.")
            self._stale = False
        self._sock.sendall(make_command(command, **arguments))
        try:
            msg = self._read_message(deadline)
        except TimeoutError:
            self._stale = True
            raise AgentError(f"El agente no respondió a «{command}» en {timeout:g} s.",
                             "El invitado puede estar colgado: mira console_log().") from None
        if "error" in msg:
            err = msg["error"]
            raise AgentError(f"El agente rechazó «{command}»: {err.get('desc', err)}",
                             "Revisa los argumentos de la orden.")
        return msg.get("return")

"""Guests: specs (data) -> pure builders (QEMU argv) -> runners (processes)."""

from .argv import build_argv, kernel_cmdline, qopt
from .runner import CommandFailed, CommandResult, CommandTimeout, Guest, GuestError, GuestStartError
from .spec import ChannelSpec, DiskSpec, GuestSpec

__all__ = [
    "Guest",
    "GuestSpec",
    "DiskSpec",
    "ChannelSpec",
    "CommandResult",
    "GuestError",
    "GuestStartError",
    "CommandTimeout",
    "CommandFailed",
    "build_argv",
    "kernel_cmdline",
    "qopt",
]

"""Guests: specs (data) -> pure builders (QEMU argv) -> runners (processes)."""

from .argv import build_argv, kernel_cmdline, qopt
from .runner import CommandFailed, CommandResult, CommandTimeout, Guest, GuestError, GuestStartError
from .spec import ChannelSpec, DiskSpec, GuestSpec, ShareSpec, UsbSpec


def __getattr__(name: str):  # LibvirtGuest loads libvirt only when asked for
    if name == "LibvirtGuest":
        from .libvirt import LibvirtGuest

        return LibvirtGuest
    raise AttributeError(name)


__all__ = [
    "Guest",
    "LibvirtGuest",
    "GuestSpec",
    "DiskSpec",
    "ChannelSpec",
    "ShareSpec",
    "UsbSpec",
    "CommandResult",
    "GuestError",
    "GuestStartError",
    "CommandTimeout",
    "CommandFailed",
    "build_argv",
    "kernel_cmdline",
    "qopt",
]

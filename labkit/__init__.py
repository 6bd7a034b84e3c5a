"""labkit: make virtualization visible (the Lab KVM course).

The public face: probe the host and read its verdict; describe a guest
(``GuestSpec``) and boot it (``Guest``). Devices and benchmarks join as the
course grows.
"""

from __future__ import annotations

import logging

from .errors import HostError, InputError, LabkitError, ProbeError, SetupError, ToolMissingError
from .guest import CommandResult, Guest, GuestSpec
from .host import Check, CpuInfo, HostReport, parse_cpuinfo, probe, save_tree

__all__ = [
    "probe",
    "parse_cpuinfo",
    "save_tree",
    "HostReport",
    "Check",
    "CpuInfo",
    "Guest",
    "GuestSpec",
    "CommandResult",
    "LabkitError",
    "InputError",
    "HostError",
    "ProbeError",
    "ToolMissingError",
    "SetupError",
]

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

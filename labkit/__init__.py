"""labkit: make virtualization visible (the Lab KVM course).

The public face: probe the host, read the verdict, compare with the classic
tools. Guests, devices and benchmarks join as the course grows.
"""

from __future__ import annotations

import logging

from .errors import HostError, InputError, LabkitError, ProbeError, SetupError, ToolMissingError
from .host import Check, CpuInfo, HostReport, parse_cpuinfo, probe, save_tree

__all__ = [
    "probe",
    "parse_cpuinfo",
    "save_tree",
    "HostReport",
    "Check",
    "CpuInfo",
    "LabkitError",
    "InputError",
    "HostError",
    "ProbeError",
    "ToolMissingError",
    "SetupError",
]

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

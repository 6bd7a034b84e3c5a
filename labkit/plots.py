"""Plots for the notebooks (matplotlib). Each function returns a Figure and does no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from .devices.disks import GrowthPoint

__all__ = ["thin_provisioning"]

_MIB = 1 << 20


def thin_provisioning(points: Sequence[GrowthPoint], *, title: str = "Aprovisionamiento fino") -> Figure:
    """Space an image takes on the host (solid) vs the disk size the guest sees (dashed), as the
    guest writes data, one colour per image (from :func:`labkit.devices.disks.measure_growth`)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    labels = list(dict.fromkeys(p.label for p in points))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for i, label in enumerate(labels):
        mine = [p for p in points if p.label == label]
        x = [p.written / _MIB for p in mine]
        color = colors[i % len(colors)]
        ax.plot(x, [p.actual_size / _MIB for p in mine], marker="o", color=color,
                label=f"{label}: ocupa en el anfitrión")
        ax.plot(x, [p.virtual_size / _MIB for p in mine], linestyle="--", color=color, alpha=0.6,
                label=f"{label}: tamaño virtual")
    ax.set_xlabel("MiB escritos por el invitado")
    ax.set_ylabel("MiB")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center right")
    return fig

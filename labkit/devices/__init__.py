"""Devices a guest can use: virtual disks (qemu-img, hot-plug, guest-side helpers).

USB devices, shared folders and channels live in their own modules beside ``disks``.
"""

from .disks import (
                    AttachedDisk,
                    CheckResult,
                    DiskInUseError,
                    GuestBlockDevice,
                    ImageInfo,
                    QemuImgError,
                    ResizeResult,
                    check,
                    convert,
                    create,
                    info,
                    parse_size,
                    resize,
)

__all__ = [
                    "AttachedDisk",
                    "CheckResult",
                    "DiskInUseError",
                    "GuestBlockDevice",
                    "ImageInfo",
                    "QemuImgError",
                    "ResizeResult",
                    "check",
                    "convert",
                    "create",
                    "info",
                    "parse_size",
                    "resize",
]

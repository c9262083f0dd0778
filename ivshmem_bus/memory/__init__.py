"""Memory windows that map things: the I/O edge under the core's ``MemoryWindow``.

``core.window`` defines the interface and stays sans-I/O; the three kinds here map memory
(BAR2 views, sysfs resource files, VFIO regions, shared files) and so must never be imported
by the core. ``open_window`` is what ``--mem WINDOW --mem-offset N`` calls:

========================  ===========================  ========================================
WINDOW                    kind                         driver address A is at
========================  ===========================  ========================================
``pool``                  ``pool.PoolWindow``          BAR2 offset A of the doorbell device
                                                       (A >= 0x2000, above the message queues)
``DDDD:BB:DD.F``,         ``plain.PlainWindow``        BAR2 offset A - mem-offset of that
``BB:DD.F``                                            ivshmem-plain function
anything else (a path)    ``file.FileWindow``          file offset A - mem-offset
========================  ===========================  ========================================

A file named ``pool`` or like a PCI address is given with a directory (``./pool``,
``./00:11.0``). The kinds and their address rules are docs/virtqueues.md §4.
"""

from __future__ import annotations

import os
import re
from typing import Literal, overload

from ..backends.base import IvshmemDevice
from .file import FileWindow
from .plain import PlainWindow
from .pool import POOL_ADDRESSING, POOL_OFFSET, PoolAllocator, PoolWindow, Role

__all__ = [
    "POOL_ADDRESSING",
    "POOL_OFFSET",
    "FileWindow",
    "PlainWindow",
    "PoolAllocator",
    "PoolWindow",
    "open_window",
]

_BDF = re.compile(r"([0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]")


@overload
def open_window(
    spec: Literal["pool"],
    *,
    device: IvshmemDevice | None = None,
    mem_offset: int = 0,
    role: Role = "device",
    sysfs: str = "/sys",
    dev: str = "/dev",
) -> PoolWindow: ...


@overload
def open_window(
    spec: str | os.PathLike[str],
    *,
    device: IvshmemDevice | None = None,
    mem_offset: int = 0,
    role: Role = "device",
    sysfs: str = "/sys",
    dev: str = "/dev",
) -> PoolWindow | PlainWindow | FileWindow: ...


def open_window(
    spec: str | os.PathLike[str],
    *,
    device: IvshmemDevice | None = None,
    mem_offset: int = 0,
    role: Role = "device",
    sysfs: str = "/sys",
    dev: str = "/dev",
) -> PoolWindow | PlainWindow | FileWindow:
    """Open the window ``spec`` names (see the module table). Close it before ``device``.

    Args:
        spec: ``"pool"``, a PCI address of an ivshmem-plain function, or a file path.
        device: the doorbell device; needed (only) for ``"pool"``.
        mem_offset: the driver address of the window's first byte, for a plain function or
            a file. The pool's addresses are BAR2 offsets on both sides, so it must be 0.
        role: ``"device"`` or ``"driver"``; the driver's pool window has an ``allocator``.
        sysfs, dev: roots of /sys and /dev (tests use fake trees).

    Raises:
        ValueError: a bad role or mem_offset, or ``"pool"`` without a device.
        MemoryFileError, PciError, VfioError, DeviceNotFound: from the window's opener.
    """
    if role not in ("device", "driver"):
        raise ValueError(f"role must be 'device' or 'driver', not {role!r}")
    text = os.fspath(spec)
    if text == "pool":
        if device is None:
            raise ValueError(
                "--mem pool needs the doorbell device: the pool is in its BAR2 above the "
                "message queues; open the device first (or name a BDF or file instead)"
            )
        if mem_offset:
            raise ValueError(
                f"--mem pool takes no --mem-offset (got 0x{mem_offset:x}): its addresses are "
                f"fixed, {POOL_ADDRESSING}"
            )
        return PoolWindow(device, role=role)
    if _BDF.fullmatch(text):
        return PlainWindow.open(text, mem_offset, sysfs=sysfs, dev=dev)
    return FileWindow(text, mem_offset)

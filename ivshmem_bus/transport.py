"""The virtio-msg transport's names, where earlier code imports them from.

The device side now lives in ``devices`` (``VirtioMsgDevice``, ``RngDevice``,
``ConsoleDevice``), the driver side in ``drivers`` (``VirtioMsgDriver``, ``RngDriver``,
``ConsoleDriver``), and the virtio names and status bits in ``core.virtio``. This module only
re-exports them.
"""

from __future__ import annotations

from .core.virtio import (
    ACKNOWLEDGE,
    DEVICE_NAMES,
    DRIVER,
    DRIVER_OK,
    FAILED,
    FEATURE_NAMES,
    FEATURES_OK,
    NEEDS_RESET,
    STATUS_NAMES,
    VIRTIO_F_VERSION_1,
    VIRTIO_MSG_VENDOR_ID,
    feature_names,
    status_names,
)
from .devices import QEMU_MAX_QUEUE_SIZE, ConsoleDevice, RngDevice, VirtioMsgDevice
from .drivers import DeviceDescription, QueueInfo, VirtioMsgDriver

__all__ = [
    "ACKNOWLEDGE",
    "DEVICE_NAMES",
    "DRIVER",
    "DRIVER_OK",
    "FAILED",
    "FEATURES_OK",
    "FEATURE_NAMES",
    "NEEDS_RESET",
    "QEMU_MAX_QUEUE_SIZE",
    "STATUS_NAMES",
    "VIRTIO_F_VERSION_1",
    "VIRTIO_MSG_VENDOR_ID",
    "ConsoleDevice",
    "DeviceDescription",
    "QueueInfo",
    "RngDevice",
    "VirtioMsgDevice",
    "VirtioMsgDriver",
    "feature_names",
    "status_names",
]

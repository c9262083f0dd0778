"""Virtio's names and numbers that both roles share: device ids, feature bits, status bits.

From the virtio 1.x specification: "Device Types" (ids), "Reserved Feature Bits" and "Device
Status Field". Names only, no I/O: the device framework (``devices``) and the Python driver
(``drivers``) both print and test with them.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ACKNOWLEDGE",
    "DEVICE_NAMES",
    "DRIVER",
    "DRIVER_OK",
    "FAILED",
    "FEATURES_OK",
    "FEATURE_NAMES",
    "NEEDS_RESET",
    "STATUS_NAMES",
    "VIRTIO_F_ACCESS_PLATFORM",
    "VIRTIO_F_VERSION_1",
    "VIRTIO_MSG_VENDOR_ID",
    "feature_names",
    "status_names",
]

VIRTIO_MSG_VENDOR_ID: Final = 0x554D4551  # "QEMU", what QEMU's device answers

# Virtio device ids (virtio spec, "Device Types").
DEVICE_NAMES: Final = {
    1: "network", 2: "block", 3: "console", 4: "entropy", 5: "balloon", 8: "scsi",
    9: "9p", 16: "gpu", 18: "input", 19: "vsock", 20: "crypto", 26: "fs", 29: "mem",
    34: "i2c", 35: "scmi", 41: "gpio", 42: "rpmb", 49: "sound",
}  # fmt: skip

# Device-independent feature bits (virtio spec, "Reserved Feature Bits").
FEATURE_NAMES: Final = {
    24: "NOTIFY_ON_EMPTY", 27: "ANY_LAYOUT", 28: "RING_INDIRECT_DESC", 29: "RING_EVENT_IDX",
    32: "VERSION_1", 33: "ACCESS_PLATFORM", 34: "RING_PACKED", 35: "IN_ORDER",
    36: "ORDER_PLATFORM", 37: "SR_IOV", 38: "NOTIFICATION_DATA", 39: "NOTIF_CONFIG_DATA",
    40: "RING_RESET", 41: "ADMIN_VQ",
}  # fmt: skip

# Device status bits (virtio spec, "Device Status Field").
ACKNOWLEDGE: Final = 1
DRIVER: Final = 2
DRIVER_OK: Final = 4
FEATURES_OK: Final = 8
NEEDS_RESET: Final = 64
FAILED: Final = 128
STATUS_NAMES: Final = {
    ACKNOWLEDGE: "ACKNOWLEDGE", DRIVER: "DRIVER", DRIVER_OK: "DRIVER_OK",
    FEATURES_OK: "FEATURES_OK", NEEDS_RESET: "NEEDS_RESET", FAILED: "FAILED",
}  # fmt: skip
VIRTIO_F_VERSION_1: Final = 1 << 32
# The device reaches the driver's buffers through a translation (the bus's window: BAR2, a
# plain device, a RAM file at mem-offset), which is what every address of ours goes through.
# A driver here accepts it whenever it is offered: QEMU's devices with iommu_platform=on (what
# the linux-user bus needs) refuse FEATURES_OK to a driver that does not.
VIRTIO_F_ACCESS_PLATFORM: Final = 1 << 33


def feature_names(features: int) -> list[str]:
    """Names of the set bits; device-specific or unknown bits as ``bit N``."""
    return [
        FEATURE_NAMES.get(bit, f"bit {bit}")
        for bit in range(features.bit_length())
        if features >> bit & 1
    ]


def status_names(status: int) -> str:
    """``"ACKNOWLEDGE|DRIVER"``, or ``"0"`` for a reset device."""
    names = [name for bit, name in STATUS_NAMES.items() if status & bit]
    unknown = status & ~sum(STATUS_NAMES)
    if unknown:
        names.append(f"0x{unknown:x}")
    return "|".join(names) or "0"

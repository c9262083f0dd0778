"""Virtio devices in Python over virtio-msg: the framework (``base``, ``serve``) and the device
types (``rng``, ``console``); ``hub``: several devices on one bus, and the bus messages. A new
device type is a subclass of ``VirtioMsgDevice`` that sets its id, features, config and one
chain handler per queue."""

from .base import QEMU_MAX_QUEUE_SIZE, ChainHandler, VirtioMsgDevice
from .console import ConsoleDevice
from .hub import DeviceHub
from .rng import RngDevice
from .serve import serve_device

__all__ = [
    "QEMU_MAX_QUEUE_SIZE",
    "ChainHandler",
    "ConsoleDevice",
    "DeviceHub",
    "RngDevice",
    "VirtioMsgDevice",
    "serve_device",
]

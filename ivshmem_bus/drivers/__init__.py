"""The driver role in Python: the transport (``base``), virtqueues in a memory window
(``queue``), and drivers for the rng and console devices."""

from .base import DeviceDescription, QueueInfo, VirtioMsgDriver
from .console import ConsoleDriver
from .queue import DriverVirtqueue, allocator_for
from .rng import RngDriver

__all__ = [
    "ConsoleDriver",
    "DeviceDescription",
    "DriverVirtqueue",
    "QueueInfo",
    "RngDriver",
    "VirtioMsgDriver",
    "allocator_for",
]

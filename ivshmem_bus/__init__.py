"""ivshmem_bus: a virtio-msg bus over QEMU's ivshmem PCI device.

This module only re-exports. Reading order: ``cli`` -> ``bus`` -> ``device`` -> ``queue`` and
``protocol`` (the sans-I/O core, which imports nothing from the I/O edge).
"""

__version__ = "0.1.0"  # first: _ffi stamps the compiled helper with it

from .core.queue import SLOT_SIZE, SpscQueue
from .errors import IvshmemBusError, ProtocolError, QueueCorrupt

__all__ = [
    "SLOT_SIZE",
    "IvshmemBusError",
    "ProtocolError",
    "QueueCorrupt",
    "SpscQueue",
    "__version__",
]

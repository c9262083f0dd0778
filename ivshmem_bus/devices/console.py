"""virtio-console (virtio id 3): port 0 without MULTIPORT, bridged to a host byte stream.

Virtio spec, "Console Device": queue 0 is receiveq (port 0: device -> driver, the driver
posts writable buffers), queue 1 is transmitq (driver -> device, readable buffers). Without
VIRTIO_CONSOLE_F_MULTIPORT there are no control queues. Config (little-endian):

    cols u16 @0, rows u16 @2 (valid with VIRTIO_CONSOLE_F_SIZE, bit 0),
    max_nr_ports u32 @4 (MULTIPORT only; 1 here), emerg_wr u32 @8 (EMERG_WRITE only)

``resize`` changes cols/rows: a new config generation and EVENT_CONFIG.

Nothing is dropped in either direction (``hostio``): host bytes wait until the driver posts
receive buffers (receiveq is not ready while none are pending); transmit chains stay in the
ring while the host writer is behind (transmitq is not ready until it has room).
"""

from __future__ import annotations

import struct

from ..core.virtio import VIRTIO_F_VERSION_1
from ..core.virtqueue import Chain
from ..core.window import MemoryWindow
from .base import VirtioMsgDevice
from .hostio import HostIO

__all__ = [
    "RECEIVEQ",
    "TRANSMITQ",
    "VIRTIO_CONSOLE_F_EMERG_WRITE",
    "VIRTIO_CONSOLE_F_MULTIPORT",
    "VIRTIO_CONSOLE_F_SIZE",
    "ConsoleDevice",
    "console_config",
]

VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_MULTIPORT = 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2
RECEIVEQ = 0
TRANSMITQ = 1
_CONFIG = struct.Struct("<HHII")  # cols, rows, max_nr_ports, emerg_wr


def console_config(cols: int, rows: int) -> bytes:
    """The 12-byte config space for port 0 (max_nr_ports 1, emerg_wr 0)."""
    return _CONFIG.pack(cols, rows, 1, 0)


class ConsoleDevice(VirtioMsgDevice):
    """virtio-console port 0 over ``io`` (``hostio.FdIO()`` for stdin/stdout).

    Args:
        io: the host byte stream; the device does not close it.
        cols, rows: the console size in the config space.
    """

    device_id = 3
    device_features = VIRTIO_F_VERSION_1 | 1 << VIRTIO_CONSOLE_F_SIZE
    num_queues = 2

    def __init__(
        self,
        io: HostIO,
        profile: str = "qemu-v0",
        *,
        cols: int = 80,
        rows: int = 25,
        window: MemoryWindow | None = None,
        ring_features: int = 0,
    ) -> None:
        super().__init__(profile, console_config(cols, rows), window, ring_features=ring_features)
        self.io = io
        self._pending = bytearray()  # host bytes taken from io, not yet in a receive buffer
        self.received = 0  # bytes the driver transmitted
        self.delivered = 0  # bytes put in receive buffers
        self.handlers[RECEIVEQ] = self._receive
        self.handlers[TRANSMITQ] = self._transmit

    def queue_ready(self, index: int) -> bool:
        if index == RECEIVEQ:
            if not self._pending:
                self._pending += self.io.read_nowait()
            return bool(self._pending)
        return self.io.write_room()

    def _receive(self, chain: Chain) -> int:
        n = chain.write(memoryview(self._pending)[: chain.writable_len])
        del self._pending[:n]
        self.delivered += n
        return n

    def _transmit(self, chain: Chain) -> int:
        data = chain.read_all()  # copied: the driver may reuse the buffer once it is used
        self.io.write_nowait(data)
        self.received += len(data)
        return 0

    def resize(self, cols: int, rows: int) -> None:
        """New cols/rows: the driver gets EVENT_CONFIG with the new generation."""
        self.set_config(0, struct.pack("<HH", cols, rows))

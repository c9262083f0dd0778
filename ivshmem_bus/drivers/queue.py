"""A driver's virtqueue with its buffers, placed in a memory window (the pool by default).

``DriverVirtqueue`` allocates the queue's three areas (``VirtqLayout.packed_at``, one
page-aligned block) and ``buffers`` buffers of ``buffer_size`` bytes from an allocator over
the window, builds the ``DriverQueue`` (which zeroes the rings), and sends SET_VQUEUE with the
window's addresses (in the pool: BAR2 offsets, which the device's pool window reads the
same). Tokens are buffer numbers; ``kick`` publishes and sends EVENT_AVAIL when the device
wants it.
"""

from __future__ import annotations

import collections
from typing import Protocol

from ..core import protocol as p
from ..core.virtqueue import DriverQueue, VirtqLayout
from ..core.window import MemoryWindow
from ..memory.pool import PoolAllocator
from .base import VirtioMsgDriver

__all__ = ["Allocator", "DriverVirtqueue", "allocator_for"]

PAGE = 4096
BUFFER_ALIGN = 64


class Allocator(Protocol):
    def alloc(self, size: int, align: int = ...) -> int: ...

    def free(self, addr: int) -> None: ...


def allocator_for(window: MemoryWindow) -> Allocator:
    """The driver pool window's own allocator, or a fresh one over any other window."""
    own = getattr(window, "allocator", None)
    return own if own is not None else PoolAllocator(window)


class DriverVirtqueue:
    """One virtqueue of a Python driver, set up on the device (SET_VQUEUE, checked).

    Args:
        driver: the transport driver (after ``negotiate``, before ``driver_ok``).
        index: the queue index.
        size: the queue size (a power of two, at most the device's max_size).
        window, allocator: where the queue and its buffers live.
        buffers, buffer_size: the buffers to allocate (token = buffer number).
        event_idx, indirect: the negotiated ring features.

    Raises:
        DriverError: the device refused the queue. PoolExhausted: the window is too small.
    """

    def __init__(
        self,
        driver: VirtioMsgDriver,
        index: int,
        size: int,
        window: MemoryWindow,
        allocator: Allocator,
        *,
        buffers: int = 0,
        buffer_size: int = 0,
        event_idx: bool = False,
        indirect: bool = False,
    ) -> None:
        self.driver = driver
        self.index = index
        self.window = window
        self._alloc = allocator
        self._blocks: list[int] = []
        try:
            base = self._take(VirtqLayout.packed_at(0, size).total_bytes, PAGE)
            layout = VirtqLayout.packed_at(base, size)
            self.queue = DriverQueue(window, index, layout, event_idx=event_idx, indirect=indirect)
            self.buffer_size = buffer_size
            first = self._take(buffers * buffer_size, BUFFER_ALIGN) if buffers else 0
            self.addrs = [first + i * buffer_size for i in range(buffers)]
            self.free_buffers: collections.deque[int] = collections.deque(range(buffers))
            driver.set_vqueue(index, size, layout.desc_addr, layout.avail_addr, layout.used_addr)
        except BaseException:
            self.close()
            raise
        self.layout = layout

    def _take(self, size: int, align: int) -> int:
        addr = self._alloc.alloc(size, align)
        self._blocks.append(addr)
        return addr

    def view(self, buffer: int, length: int | None = None) -> memoryview:
        """Buffer ``buffer``'s bytes (its first ``length``)."""
        n = self.buffer_size if length is None else length
        return self.window.view(self.addrs[buffer], n)

    def post_writable(self, buffer: int, length: int | None = None) -> None:
        """Offer buffer ``buffer`` (its first ``length`` bytes) for the device to write."""
        n = self.buffer_size if length is None else length
        self.queue.add((), ((self.addrs[buffer], n),), buffer)

    def post_readable(self, buffer: int, length: int) -> None:
        """Offer the first ``length`` bytes of buffer ``buffer`` for the device to read."""
        self.queue.add(((self.addrs[buffer], length),), (), buffer)

    def kick(self) -> bool:
        """Publish what was added; EVENT_AVAIL when the device wants it. True if sent."""
        if self.queue.publish():
            self.driver.bus.send(p.EventAvail(index=self.index, next_offset_wrap=0))
            return True
        return False

    def reap(self) -> list[tuple[int, int]]:
        """(buffer, used length) of each chain the device returned, in used order."""
        return [(int(token), n) for token, n in self.queue.reap()]  # type: ignore[call-overload]

    def close(self) -> None:
        """Give the queue's and buffers' memory back (after a reset or RESET_VQUEUE) and drop
        the ring's views of the window (so the window, then BAR2, can close). Idempotent."""
        while self._blocks:
            self._alloc.free(self._blocks.pop())
        queue = self.__dict__.pop("queue", None)
        if queue is not None:
            queue.release()

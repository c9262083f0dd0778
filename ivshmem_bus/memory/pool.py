"""A pool in the doorbell device's own BAR2, above the two message queues.

BAR2 of the ivshmem-doorbell function carries the bus (docs/wire-format.md §3): the driver queue at
0x0000 and the device queue at 0x1000, 4 KiB each. Everything from ``POOL_OFFSET`` (0x2000,
page aligned) to the end of BAR2 (rounded down to a 4 KiB page) is free for virtqueues and
buffers: a Python driver talking to a Python device needs no second ivshmem function and no
shared guest RAM, on every backend (VFIO, server client, fake), because only ``dev.shmem`` is
used.

Address convention (``POOL_ADDRESSING``): **driver address = BAR2 offset.** The pool's first
byte is address 0x2000 on both sides; each side maps its own BAR2 and reads address A at BAR2
offset A (mem-offset 0). So the same numbers work on both sides with no negotiation, and
nothing but the pool is reachable: the window starts at 0x2000, so a descriptor or ring
address inside the message queues (0x0000..0x1FFF) is a ``WindowError`` on the device side,
never a write over the bus's own queues.

Allocation (``PoolAllocator``) is private to the driver process: the device side only needs
the window, since every address it uses arrives in SET_VQUEUE and the descriptors. First fit
over a sorted free list, neighbours merged on ``free``; alignments are the split virtqueue's
(descriptor table 16, available ring 2, used ring 4, ``ALIGN_QUEUE`` 4096 for whole queues).
Not thread-safe: one driver, one allocator.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Literal, Self

from ..backends.base import IvshmemDevice
from ..core.window import BufferWindow, MemoryWindow
from ..errors import PoolExhausted
from ..native.ffi import full_fence

__all__ = [
    "ALIGN_AVAIL",
    "ALIGN_DESC",
    "ALIGN_QUEUE",
    "ALIGN_USED",
    "PAGE",
    "POOL_ADDRESSING",
    "POOL_OFFSET",
    "PoolAllocator",
    "PoolWindow",
    "QueueAreas",
    "Role",
    "split_queue_sizes",
]

PAGE = 0x1000
POOL_OFFSET = 0x2000
"""BAR2 offset (and driver address) of the pool's first byte: the end of the two 4 KiB
message queues (bus.DEVICE_QUEUE_OFFSET + bus.QUEUE_SIZE)."""

POOL_ADDRESSING = "driver address = BAR2 offset (mem-offset 0), on both sides"
"""The pool's address convention, for messages and the CLI's help."""

ALIGN_DESC = 16  # descriptor table (virtio 1.x split virtqueue)
ALIGN_AVAIL = 2  # available ring
ALIGN_USED = 4  # used ring
ALIGN_QUEUE = PAGE  # a whole queue (legacy layout, or one page per queue)

MAX_QUEUE_SIZE = 32768

Role = Literal["device", "driver"]


def split_queue_sizes(n: int) -> tuple[int, int, int]:
    """Bytes of a split virtqueue's three areas for queue size ``n`` (virtio 1.x 2.7):
    descriptor table 16n, available ring 6 + 2n, used ring 6 + 8n. The rings include their
    trailing event field (used_event, avail_event), so EVENT_IDX never changes the layout.

    Raises:
        ValueError: ``n`` is not a power of two in 1..32768.
    """
    if not isinstance(n, int) or not 0 < n <= MAX_QUEUE_SIZE or n & (n - 1):
        raise ValueError(f"queue size must be a power of two in 1..{MAX_QUEUE_SIZE}, not {n!r}")
    return 16 * n, 6 + 2 * n, 6 + 8 * n


@dataclass(frozen=True, slots=True)
class QueueAreas:
    """Where one split virtqueue lives: the three SET_VQUEUE addresses and its size."""

    size: int
    desc: int
    avail: int
    used: int


class PoolWindow(BufferWindow):
    """The pool as a memory window over ``dev.shmem[0x2000 : end]``, base 0x2000.

    Both roles see the same window; the driver's also has ``allocator`` (the device side
    never allocates: ``allocator`` is ``None`` there). The device keeps owning BAR2: close
    the window before the device (its ``close`` would otherwise find the mapping in use).

    Args:
        dev: the doorbell device (any backend); only ``dev.shmem`` and ``dev.name`` are used.
        role: ``"driver"`` or ``"device"``: which side this process is.

    Raises:
        ValueError: BAR2 is too small to hold a pool above the queues, or a bad role.
    """

    def __init__(self, dev: IvshmemDevice, *, role: Role = "device") -> None:
        if role not in ("device", "driver"):
            raise ValueError(f"role must be 'device' or 'driver', not {role!r}")
        shm = dev.shmem
        end = len(shm) & ~(PAGE - 1)
        name = f"pool in {dev.name} BAR2"
        if end <= POOL_OFFSET:
            raise ValueError(
                f"{name}: BAR2 is {len(shm)} bytes, no room for a pool above the message "
                f"queues (0x{POOL_OFFSET:x}): give ivshmem a larger size (QEMU size=, "
                f"ivshmem-bus server -l)"
            )
        with shm[POOL_OFFSET:end] as pool:  # BufferWindow keeps its own view of it
            super().__init__(pool, POOL_OFFSET, name=name, fence=full_fence())
        self.role: Role = role
        self.allocator: PoolAllocator | None = PoolAllocator(self) if role == "driver" else None
        self._closed = False

    def close(self) -> None:
        """Release this window's views of BAR2 (the device keeps its mapping). Idempotent."""
        self._closed = True
        self.release()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PoolAllocator:
    """First-fit allocation of driver addresses in a window (the pool, or any window).

    Free extents are ``(start, end)`` pairs, sorted and never adjacent (merged on ``free``);
    live allocations map their address to their size. Every address returned lies in
    ``[window.base, window.base + window.size)`` with its whole size.
    """

    def __init__(self, window: MemoryWindow) -> None:
        self._name = window.name
        self.base = window.base
        self.end = window.base + window.size
        self._starts: list[int] = [self.base]  # free extents, by start
        self._ends: list[int] = [self.end]
        self._live: dict[int, int] = {}

    def alloc(self, size: int, align: int = ALIGN_DESC) -> int:
        """Reserve ``size`` bytes at an address that is a multiple of ``align``.

        The bytes are not cleared: a driver zeroes its rings before SET_VQUEUE.

        Raises:
            ValueError: ``size`` not positive, or ``align`` not a power of two.
            PoolExhausted: no free extent fits (the message gives the largest one).
        """
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"{self._name}: allocation size must be a positive int, not {size!r}")
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise ValueError(f"{self._name}: alignment must be a power of two, not {align!r}")
        for i, (start, end) in enumerate(zip(self._starts, self._ends, strict=True)):
            addr = (start + align - 1) & -align
            if addr + size <= end:
                self._take(i, addr, addr + size)
                self._live[addr] = size
                return addr
        raise PoolExhausted(self._name, size, align, self.largest_free)

    def alloc_queue(self, n: int) -> QueueAreas:
        """The three areas of a split virtqueue of size ``n``, each at its alignment.

        All or nothing: on ``PoolExhausted`` no area stays allocated.
        """
        sizes = split_queue_sizes(n)
        addrs: list[int] = []
        try:
            for size, align in zip(sizes, (ALIGN_DESC, ALIGN_AVAIL, ALIGN_USED), strict=True):
                addrs.append(self.alloc(size, align))
        except PoolExhausted:
            for addr in addrs:
                self.free(addr)
            raise
        return QueueAreas(n, *addrs)

    def free_queue(self, areas: QueueAreas) -> None:
        """Give back the three areas ``alloc_queue`` returned."""
        for addr in (areas.desc, areas.avail, areas.used):
            self.free(addr)

    def _take(self, i: int, lo: int, hi: int) -> None:
        """Cut ``[lo, hi)`` out of free extent ``i``, keeping what is left on each side."""
        start, end = self._starts[i], self._ends[i]
        del self._starts[i], self._ends[i]
        if hi < end:
            self._starts.insert(i, hi)
            self._ends.insert(i, end)
        if start < lo:
            self._starts.insert(i, start)
            self._ends.insert(i, lo)

    def free(self, addr: int) -> None:
        """Give back an allocation by the address ``alloc`` returned.

        Raises:
            ValueError: ``addr`` is not a live allocation (a double free, or a wrong address).
        """
        size = self._live.pop(addr, None)
        if size is None:
            raise ValueError(f"{self._name}: 0x{addr:x} is not an allocated address (freed twice?)")
        lo, hi = addr, addr + size
        i = bisect.bisect_left(self._starts, lo)
        if i < len(self._starts) and self._starts[i] == hi:  # merge with the next extent
            hi = self._ends[i]
            del self._starts[i], self._ends[i]
        if i > 0 and self._ends[i - 1] == lo:  # and with the previous one
            self._ends[i - 1] = hi
        else:
            self._starts.insert(i, lo)
            self._ends.insert(i, hi)

    @property
    def allocations(self) -> dict[int, int]:
        """Live allocations, address -> size (a copy)."""
        return dict(self._live)

    @property
    def free_extents(self) -> list[tuple[int, int]]:
        """Free ``(start, end)`` ranges, sorted, none adjacent to another."""
        return list(zip(self._starts, self._ends, strict=True))

    @property
    def free_bytes(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    @property
    def largest_free(self) -> int:
        return max((e - s for s, e in zip(self._starts, self._ends, strict=True)), default=0)

    def __repr__(self) -> str:
        return (
            f"<PoolAllocator {self._name} 0x{self.base:x}..0x{self.end:x} "
            f"{len(self._live)} live, {self.free_bytes} bytes free>"
        )

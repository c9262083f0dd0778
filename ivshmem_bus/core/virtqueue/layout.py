"""Split-virtqueue layout: where the three areas are and what their bytes mean.

From the virtio 1.x specification, "Split Virtqueues" (v1.2/v1.3 section 2.7), for a queue of
size N (a power of two, 1 .. 32768), all fields little-endian:

    area              alignment  size       layout
    descriptor table  16         16 * N     N x { addr le64 @0, len le32 @8, flags le16 @12,
                                                  next le16 @14 }
    available ring    2          6 + 2 * N  flags le16 @0, idx le16 @2, ring[N] le16 @4,
                                            used_event le16 @4 + 2N (only with EVENT_IDX)
    used ring         4          6 + 8 * N  flags le16 @0, idx le16 @2,
                                            ring[N] x { id le32, len le32 } @4,
                                            avail_event le16 @4 + 8N (only with EVENT_IDX)

The spec's size column counts the event words: they are reserved whether or not
VIRTIO_F_EVENT_IDX is negotiated, so a queue laid out here never changes size with a feature.

``idx`` fields are free-running u16 counters that wrap at 65536; the ring slot of index ``i``
is ``i mod N`` (``i & (N - 1)``, N being a power of two).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from ...errors import VirtqueueError, WindowError
from ..window import MemoryWindow

__all__ = [
    "MAX_QUEUE_SIZE",
    "VIRTIO_F_EVENT_IDX",
    "VIRTIO_F_INDIRECT_DESC",
    "VIRTIO_F_VERSION_1",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_USED_F_NO_NOTIFY",
    "RingViews",
    "VirtqLayout",
    "ring_views",
    "vring_need_event",
]

VIRTQ_DESC_F_NEXT: Final = 1
VIRTQ_DESC_F_WRITE: Final = 2
VIRTQ_DESC_F_INDIRECT: Final = 4
VIRTQ_AVAIL_F_NO_INTERRUPT: Final = 1
VIRTQ_USED_F_NO_NOTIFY: Final = 1

VIRTIO_F_INDIRECT_DESC: Final = 28
VIRTIO_F_EVENT_IDX: Final = 29
VIRTIO_F_VERSION_1: Final = 32

MAX_QUEUE_SIZE: Final = 32768

DESC_SIZE: Final = 16
USED_ELEM_SIZE: Final = 8
RING_HEADER: Final = 4  # flags u16, idx u16 before ring[0] in both rings
FLAGS_OFF: Final = 0
IDX_OFF: Final = 2

# Precompiled: one struct call per descriptor, ring entry or used element on the data path.
DESC: Final = struct.Struct("<QIHH")
U16: Final = struct.Struct("<H")
USED_ELEM: Final = struct.Struct("<II")

_ALIGN: Final = {"descriptor table": 16, "available ring": 2, "used ring": 4}


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """True when moving an index from ``old_idx`` to ``new_idx`` passed the peer's event index.

    The specification's helper (virtio-queue.h, VIRTIO_F_EVENT_IDX), in u16 arithmetic:
    ``(u16)(new_idx - event_idx - 1) < (u16)(new_idx - old_idx)``: the peer asked to be told
    once the entry at index ``event_idx`` is written, i.e. when ``event_idx`` lies in
    ``[old_idx, new_idx)`` modulo 65536.
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


def _is_queue_size(size: int) -> bool:
    return 0 < size <= MAX_QUEUE_SIZE and size & (size - 1) == 0


@dataclass(frozen=True, slots=True)
class VirtqLayout:
    """Where one split virtqueue lives, in driver addresses (what SET_VQUEUE carries).

    Attributes:
        size: the queue size N.
        desc_addr: the descriptor table (SET_VQUEUE descriptor_addr).
        avail_addr: the available ring (driver_addr).
        used_addr: the used ring (device_addr).
    """

    size: int
    desc_addr: int
    avail_addr: int
    used_addr: int

    @staticmethod
    def area_sizes(size: int) -> tuple[int, int, int]:
        """(descriptor table, available ring, used ring) bytes for queue size ``size``.

        The event words are included (the spec's table: 16N, 6 + 2N, 6 + 8N).
        """
        if size < 1:
            raise ValueError(f"a virtqueue has at least 1 entry, got size {size}")
        return DESC_SIZE * size, 6 + 2 * size, 6 + USED_ELEM_SIZE * size

    @classmethod
    def packed_at(cls, base: int, size: int) -> VirtqLayout:
        """The three areas back to back from ``base``, each at its minimum alignment.

        The descriptor table at ``base`` (which the caller 16-aligns), the available ring right
        after it (16N keeps it 2-aligned), the used ring at the next multiple of 4 after the
        available ring. ``total_bytes`` is then the allocation to make.
        """
        desc_len, avail_len, _ = cls.area_sizes(size)
        avail = base + desc_len
        used = (avail + avail_len + 3) & ~3
        return cls(size, base, avail, used)

    @property
    def total_bytes(self) -> int:
        """Bytes from the lowest area start to the highest area end (packed_at: the allocation)."""
        lengths = self.area_sizes(self.size)
        starts = (self.desc_addr, self.avail_addr, self.used_addr)
        return max(s + n for s, n in zip(starts, lengths, strict=True)) - min(starts)

    def areas(self) -> tuple[tuple[str, int, int], ...]:
        """(name, driver address, length) of the descriptor table, available and used rings."""
        desc_len, avail_len, used_len = self.area_sizes(self.size)
        return (
            ("descriptor table", self.desc_addr, desc_len),
            ("available ring", self.avail_addr, avail_len),
            ("used ring", self.used_addr, used_len),
        )

    def check(self, window: MemoryWindow, max_size: int, *, queue: int | None = None) -> None:
        """Refuse a layout the peer sent that cannot be used as is (SET_VQUEUE's checks).

        Raises:
            VirtqueueError: the size is 0, not a power of two, or above ``max_size`` (or
                32768); an area is misaligned (16 / 2 / 4); any byte of an area lies outside
                ``window``. ``queue`` names the virtqueue in the message.
        """
        size = self.size
        if not _is_queue_size(size) or size > max_size:
            raise VirtqueueError(
                queue,
                f"queue size {size} is not a power of two between 1 and "
                f"{min(max_size, MAX_QUEUE_SIZE)}: the driver must use a size GET_VQUEUE allows",
            )
        for name, addr, length in self.areas():
            align = _ALIGN[name]
            if addr % align:
                raise VirtqueueError(
                    queue,
                    f"{name} address 0x{addr:x} is not {align}-byte aligned "
                    f"(virtio requires it): the driver must align it",
                )
            try:
                window.view(addr, length)
            except WindowError:
                raise VirtqueueError(
                    queue,
                    f"{name} ({length} bytes at 0x{addr:x}) lies outside {window.name} "
                    f"({window.size} bytes at 0x{window.base:x}): the driver must place the "
                    f"queue inside the shared memory",
                ) from None


@dataclass(frozen=True, slots=True)
class RingViews:
    """One checked queue's three areas as views of its window, and the driver addresses of the
    six words both roles load and store (``window.load16`` / ``store16``, one access each).

    Attributes:
        desc, avail, used: the descriptor table, available ring and used ring (event words
            included: 16N, 6 + 2N and 6 + 8N bytes).
        avail_flags, avail_idx, used_event: avail ring flags @0, idx @2, used_event @4 + 2N.
        used_flags, used_idx, avail_event: used ring flags @0, idx @2, avail_event @4 + 8N.
    """

    desc: memoryview
    avail: memoryview
    used: memoryview
    avail_flags: int
    avail_idx: int
    used_event: int
    used_flags: int
    used_idx: int
    avail_event: int


def ring_views(window: MemoryWindow, layout: VirtqLayout, queue: int) -> RingViews:
    """Check ``layout`` against ``window`` (``VirtqLayout.check``) and map its three areas:
    what a ``DeviceQueue`` and a ``DriverQueue`` set up alike before their own state.

    Raises:
        VirtqueueError: the layout fails the check (``queue`` names the virtqueue).
    """
    layout.check(window, MAX_QUEUE_SIZE, queue=queue)
    size = layout.size
    desc_len, avail_len, used_len = layout.area_sizes(size)
    avail, used = layout.avail_addr, layout.used_addr
    return RingViews(
        desc=window.view(layout.desc_addr, desc_len),
        avail=window.view(avail, avail_len),
        used=window.view(used, used_len),
        avail_flags=avail + FLAGS_OFF,
        avail_idx=avail + IDX_OFF,
        used_event=avail + RING_HEADER + 2 * size,
        used_flags=used + FLAGS_OFF,
        used_idx=used + IDX_OFF,
        avail_event=used + RING_HEADER + USED_ELEM_SIZE * size,
    )

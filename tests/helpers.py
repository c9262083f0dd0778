"""Test helpers shared across the suite (h11's ConnectionPair idea, for queues)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ivshmem_bus.core.queue import SpscQueue

GUARD = 0xA5  # fill byte around a queue region: any write outside the region shows up
GUARD_LEN = 64


@dataclass
class QueuePair:
    """A producer end and a consumer end over one region framed by guard bytes.

    ``backing`` is the whole bytearray: GUARD_LEN guard bytes, the region, GUARD_LEN guard
    bytes. ``region`` is a memoryview of the middle part.
    """

    backing: bytearray
    region: memoryview
    producer: SpscQueue
    consumer: SpscQueue

    @classmethod
    def new(cls, slots: int = 62, blocks: Any = None) -> QueuePair:
        """``blocks``: the ``SpscQueue(blocks=)`` factory for both ends (None: pure Python)."""
        size = 0x80 + 64 * slots
        backing = bytearray([GUARD]) * (2 * GUARD_LEN + size)
        region = memoryview(backing)[GUARD_LEN : GUARD_LEN + size]
        region[:] = bytes(size)
        return cls(
            backing, region, SpscQueue(region, blocks=blocks), SpscQueue(region, blocks=blocks)
        )

    def guards_intact(self) -> bool:
        end = len(self.backing) - GUARD_LEN
        return set(self.backing[:GUARD_LEN]) == {GUARD} and set(self.backing[end:]) == {GUARD}

    def word(self, offset: int) -> int:
        """A little-endian u32 of the region, read independently of the queue."""
        return int.from_bytes(self.region[offset : offset + 4], "little")

    def set_word(self, offset: int, value: int) -> None:
        """What a hostile peer does: write any u32 into the region."""
        self.region[offset : offset + 4] = value.to_bytes(4, "little")

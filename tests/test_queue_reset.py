"""Queue reset, one implementation (core.queue.reset_queue) for the queue object and the bus's
reset-queues: every byte of the region zeroed, whatever the peer left there."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ivshmem_bus.backends.fake import fake_pair
from ivshmem_bus.bus import DEVICE_QUEUE_OFFSET, QUEUE_SIZE, reset_queues_of
from ivshmem_bus.core.queue import SpscQueue, reset_queue
from ivshmem_bus.errors import QueueCorrupt

REGION = 0x80 + 4 * 64  # header + 4 slots (docs/wire-format.md §3: head @0, tail @0x40)


@given(st.binary(min_size=REGION, max_size=REGION))
def test_reset_zeroes_any_region_even_with_corrupt_indexes(garbage: bytes) -> None:
    region = bytearray(garbage)
    reset_queue(region)
    assert region == bytes(REGION)
    q = SpscQueue(region)  # attaches: head 0, tail 0, empty
    assert q.get() is None


def test_reset_lets_a_queue_attach_that_refused_before() -> None:
    region = bytearray(REGION)
    region[0:4] = (4).to_bytes(4, "little")  # head == capacity: out of range
    with pytest.raises(QueueCorrupt):
        SpscQueue(region)
    reset_queue(region)
    assert SpscQueue(region).put(b"x" * 44)


def test_queue_reset_and_reset_queue_give_the_same_bytes() -> None:
    a, b = bytearray(REGION), bytearray(REGION)
    for buf in (a, b):
        q = SpscQueue(buf)
        q.put(b"\x01" * 64)
        buf[0x44:0x48] = (1).to_bytes(4, "little")  # the polling flag
        q.release()
    q = SpscQueue(a)
    q.reset()
    q.release()
    reset_queue(b)
    assert a == b == bytes(REGION)


def test_reset_queue_refuses_a_region_too_small_for_a_queue() -> None:
    with pytest.raises(ValueError, match="at least 2 are needed"):
        reset_queue(bytearray(0x80 + 64))


def test_reset_queues_of_zeroes_both_queues_and_nothing_past_them() -> None:
    a, b = fake_pair()
    with a, b:
        shm = a.shmem
        end = DEVICE_QUEUE_OFFSET + QUEUE_SIZE
        shm[: end + 16] = b"\xa5" * (end + 16)
        reset_queues_of(a)
        assert shm[:end] == bytes(end)
        assert shm[end : end + 16] == b"\xa5" * 16

"""Doorbell coalescing: the polling flag, the Dekker re-checks, and 10^6 messages that never stall.

The flag is an extension of the contract's layout (docs/wire-format.md §3.5, queue.py's
module doc): u32 at 0x44 of a queue, in the consumer's line, 1 while the consumer polls. The
default bus keeps QEMU's semantics (a doorbell after every send) whatever that word says.
"""

from __future__ import annotations

import multiprocessing
import random
import time

import pytest

from ivshmem_bus.backends.fake import fake_pair
from ivshmem_bus.bus import DEVICE_QUEUE_OFFSET, DRIVER_QUEUE_OFFSET, VirtioMsgBus
from ivshmem_bus.core import protocol as p
from ivshmem_bus.core.queue import SpscQueue
from ivshmem_bus.errors import QueueCorrupt
from ivshmem_bus.native import ffi as _ffi

from .helpers import QueuePair

needs_helper = pytest.mark.skipif(
    not _ffi.HAVE_COMPILED, reason="the compiled helper is not built (no C compiler at install)"
)
FLAG = 0x44


class FenceSpy:
    """A fence that records, each time it runs, the flag word and head as they are then."""

    def __init__(self, pair: QueuePair) -> None:
        self.pair = pair
        self.seen: list[tuple[int, int]] = []

    def __call__(self) -> None:
        self.seen.append((self.pair.word(FLAG), self.pair.word(0x00)))


# --- The queue's half ----------------------------------------------------------------------------


def test_set_polling_stores_one_word_and_clears_only_a_set_flag():
    pair = QueuePair.new(8)
    before = bytes(pair.region)
    pair.consumer.set_polling(False)
    assert bytes(pair.region) == before  # a consumer that never coalesces writes nothing
    pair.consumer.set_polling(True)
    assert pair.word(FLAG) == 1
    changed = [i for i, (x, y) in enumerate(zip(before, bytes(pair.region), strict=True)) if x != y]
    assert changed == [FLAG]
    pair.set_word(FLAG, 0xDEAD)  # left by someone else
    pair.consumer.set_polling(False)
    assert pair.word(FLAG) == 0
    assert pair.guards_intact()


def test_may_sleep_clears_the_flag_before_its_fence_then_rereads_head():
    pair = QueuePair.new(8)
    fence = FenceSpy(pair)
    pair.consumer.set_polling(True)
    assert pair.consumer.may_sleep(fence) is True
    assert fence.seen == [(0, 0)]  # the flag was already 0 when the fence ran
    pair.consumer.set_polling(True)
    pair.producer.put(b"m")  # arrives while the consumer decides to sleep
    assert pair.consumer.may_sleep(fence) is False
    assert pair.consumer.get(1) == b"m"


def test_needs_doorbell_fences_then_honours_the_flag():
    pair = QueuePair.new(8)
    fence = FenceSpy(pair)
    pair.consumer.set_polling(True)
    pair.producer.put(b"a")
    assert pair.producer.needs_doorbell(fence) is False  # consumer polls
    assert fence.seen == [(1, 1)]  # head published before the fence
    pair.consumer.set_polling(False)
    # The consumer has not taken "a": it will re-check before sleeping, so "b" needs no ring.
    pair.producer.put(b"b")
    assert pair.producer.needs_doorbell(fence) is False
    assert pair.consumer.get_many() == [b"a" + bytes(63), b"b" + bytes(63)]
    pair.producer.put(b"c")  # the consumer had taken everything: it may be asleep
    assert pair.producer.needs_doorbell(fence) is True


def test_needs_doorbell_for_a_batch_compares_with_the_start_of_the_batch():
    pair = QueuePair.new(8)
    fence = FenceSpy(pair)
    assert pair.producer.put_block(bytes(64 * 3)) == 3
    assert pair.producer.needs_doorbell(fence, sent=3) is True
    assert pair.producer.needs_doorbell(fence, sent=1) is False  # two before it, not taken


def test_a_queue_that_ignores_the_flag_gets_its_doorbells():
    """QEMU never writes 0x44 and a reset zeroes it: a coalescing producer rings each time
    the consumer has caught up."""
    pair = QueuePair.new(8)
    fence = FenceSpy(pair)
    rings = 0
    for n in range(20):
        pair.producer.put(bytes([n]))
        rings += pair.producer.needs_doorbell(fence)
        assert pair.consumer.get(1) == bytes([n])
    assert rings == 20


def test_reset_zeroes_a_polling_flag_with_the_rest_of_the_region():
    pair = QueuePair.new(8)
    pair.consumer.set_polling(True)
    pair.region[0x10] = 0x77  # other header padding too
    pair.producer.put(b"x")
    pair.producer.reset()
    assert bytes(pair.region) == bytes(len(pair.region))
    assert pair.guards_intact()


def test_needs_doorbell_checks_the_tail_it_loads():
    pair = QueuePair.new(8)
    pair.producer.put(b"x")
    pair.set_word(0x40, 8)
    with pytest.raises(QueueCorrupt):
        pair.producer.needs_doorbell(lambda: None)


# --- The bus's half ------------------------------------------------------------------------------


@pytest.fixture
def pair():
    a, b = fake_pair(16384)
    yield a, b
    a.close()
    b.close()


def flag_of(dev, offset: int) -> int:
    return int.from_bytes(dev.shmem[offset + FLAG : offset + FLAG + 4], "little")


def test_the_default_bus_rings_after_every_send_whatever_the_flag_says(pair):
    a, b = pair
    bus = VirtioMsgBus(a, "driver", b.vmid, reset_queues=True)
    b.shmem[DRIVER_QUEUE_OFFSET + FLAG] = 1  # a peer that claims to poll
    for n in range(5):
        bus.send(p.EventAvail(n, 0))
    assert (bus.stats.doorbells_rung, bus.stats.doorbells_suppressed) == (5, 0)
    assert b.drain() == {0}
    bus.close()


@needs_helper
def test_a_coalescing_bus_skips_the_doorbell_while_the_peer_polls(pair):
    a, b = pair
    driver = VirtioMsgBus(a, "driver", b.vmid, reset_queues=True, coalesce=True)
    device = VirtioMsgBus(b, "device", a.vmid, coalesce=True)
    assert flag_of(a, DEVICE_QUEUE_OFFSET) == 1  # the driver polls its receive queue
    assert flag_of(a, DRIVER_QUEUE_OFFSET) == 1  # and so does the device
    for n in range(5):
        driver.send(p.EventAvail(n, 0))
    assert (driver.stats.doorbells_rung, driver.stats.doorbells_suppressed) == (0, 5)
    assert b.drain() == set()
    assert [device.receive(0).index for _ in range(5)] == list(range(5))
    device.close()
    assert flag_of(a, DRIVER_QUEUE_OFFSET) == 0  # nobody polls now
    for n in range(2):
        driver.send(p.EventAvail(n, 0))
    # The first needs a ring (queue had been emptied); the second does not (first untaken).
    assert (driver.stats.doorbells_rung, driver.stats.doorbells_suppressed) == (1, 6)
    driver.close()


@needs_helper
def test_a_sleeping_coalescing_receiver_clears_its_flag_and_is_rung(pair):
    a, b = pair
    driver = VirtioMsgBus(a, "driver", b.vmid, reset_queues=True, coalesce=True)
    device = VirtioMsgBus(b, "device", a.vmid, coalesce=True, spin=0, poll_interval=0.001)
    assert device.receive(0.005) is None  # slept: the flag went down, then up on waking
    assert flag_of(a, DRIVER_QUEUE_OFFSET) == 1
    b.shmem[DRIVER_QUEUE_OFFSET + FLAG] = 0  # as it is while the device sleeps
    driver.send(p.EventAvail(7, 0))
    assert driver.stats.doorbells_rung == 1
    assert device.receive(1.0) == p.EventAvail(7, 0)
    assert device.stats.doorbell_wakeups == 0  # the message was there before it slept
    driver.close()
    device.close()


def test_a_bus_that_does_not_coalesce_clears_a_stale_flag(pair):
    a, b = pair
    a.shmem[DEVICE_QUEUE_OFFSET + FLAG] = 1  # left by a coalescing process that crashed
    bus = VirtioMsgBus(a, "driver", b.vmid)
    assert flag_of(a, DEVICE_QUEUE_OFFSET) == 0
    bus.close()


def test_coalescing_without_the_helper_is_refused_with_the_fix(pair, monkeypatch):
    a, b = pair
    monkeypatch.setattr(_ffi, "full_fence", lambda: None)
    with pytest.raises(ValueError, match=r"coalesce=True needs a StoreLoad fence.*compiler"):
        VirtioMsgBus(a, "driver", b.vmid, coalesce=True)
    bus = VirtioMsgBus(a, "driver", b.vmid)  # the default still works
    bus.close()


def test_a_message_found_by_the_poll_interval_counts_as_a_lost_doorbell(pair, monkeypatch):
    a, b = pair
    bus = VirtioMsgBus(a, "device", b.vmid, reset_queues=True, spin=0, poll_interval=0.002)
    peer = SpscQueue(b.shmem[DRIVER_QUEUE_OFFSET : DRIVER_QUEUE_OFFSET + 4096])
    sleeps = []

    def wait(timeout: float) -> set[int]:
        """A sleep during which the peer enqueues and never rings."""
        sleeps.append(timeout)
        if len(sleeps) == 1:
            peer.put(p.encode(p.EventAvail(3, 0)))
        return set()

    monkeypatch.setattr(a, "wait", wait)
    assert bus.receive(1.0) == p.EventAvail(3, 0)
    assert sleeps == [0.002]
    assert (bus.stats.lost_doorbells, bus.stats.doorbell_wakeups) == (1, 0)
    peer.release()
    bus.close()


def test_without_vectors_a_message_found_by_polling_is_not_a_lost_doorbell(monkeypatch):
    """ivshmem-plain has no interrupts: every message is found by the poll interval, and
    none of that is a doorbell lost."""
    a, b = fake_pair(16384)
    bus = VirtioMsgBus(a, "device", b.vmid, reset_queues=True, spin=0, poll_interval=0.001)
    peer = SpscQueue(b.shmem[DRIVER_QUEUE_OFFSET : DRIVER_QUEUE_OFFSET + 4096])
    monkeypatch.setattr(a, "vector_fds", lambda: [])

    def wait(timeout: float) -> set[int]:
        peer.put(p.encode(p.EventAvail(5, 0)))
        return set()

    monkeypatch.setattr(a, "wait", wait)
    assert bus.receive(1.0) == p.EventAvail(5, 0)
    assert bus.stats.lost_doorbells == 0
    peer.release()
    bus.close()
    a.close()
    b.close()


# --- 10^6 messages, random pauses on both sides, never a stall ----------------------------------

COUNT = 1_000_000
POLL = 5.0  # a lost wake-up would sleep this long: the stall the test looks for
STALL = 2 * POLL


def _pause(rng: random.Random) -> None:
    """One in 64 calls: a short spin, or a sleep (which lets the other side fall asleep)."""
    if rng.random() < 1 / 64:
        if rng.random() < 0.5:
            end = time.perf_counter() + rng.random() * 50e-6
            while time.perf_counter() < end:
                pass
        else:
            time.sleep(rng.random() * 200e-6)


def _consumer(b, vmid: int, conn) -> None:
    rng = random.Random(2)
    bus = VirtioMsgBus(b, "device", vmid, coalesce=True, spin=20e-6, poll_interval=POLL)
    conn.send("ready")
    expected = bad = 0
    stalled = False
    while expected < COUNT:
        t0 = time.monotonic()
        msg = bus.receive(STALL)
        if msg is None or time.monotonic() - t0 > POLL / 2:
            stalled = True
            break
        if msg.index != expected % 2**16 or msg.next_offset_wrap != expected:
            bad += 1
        expected += 1
        _pause(rng)
    conn.send((expected, bad, stalled, vars(bus.stats)))
    bus.close()


@needs_helper
@pytest.mark.slow
def test_a_million_coalesced_messages_with_random_pauses_never_stall():
    a, b = fake_pair(16384)
    ctx = multiprocessing.get_context("fork")
    parent_conn, child_conn = ctx.Pipe()
    bus = VirtioMsgBus(a, "driver", b.vmid, reset_queues=True, coalesce=True, spin=20e-6)
    try:
        child = ctx.Process(target=_consumer, args=(b, a.vmid, child_conn))
        child.start()
        assert parent_conn.poll(30) and parent_conn.recv() == "ready"

        def wait_for_space(raw: bytes, timeout: float) -> None:
            # The bus rings again while the queue is full; that would rescue a lost wake-up
            # and hide it, so here a full queue is only waited out.
            deadline = time.monotonic() + STALL
            while not bus._tx.put(raw):
                assert time.monotonic() < deadline, "the consumer stopped taking messages"

        bus._wait_for_space = wait_for_space  # type: ignore[method-assign]
        rng = random.Random(1)
        for n in range(COUNT):
            bus.send(p.EventAvail(n % 2**16, n))
            _pause(rng)
        assert parent_conn.poll(60), "the consumer did not finish"
        received, bad, stalled, stats = parent_conn.recv()
        child.join(10)
    finally:
        bus.close()
        a.close()
        b.close()
    assert (received, bad, stalled) == (COUNT, 0, False)
    assert stats["lost_doorbells"] == 0
    sent = bus.stats
    assert sent.doorbells_rung + sent.doorbells_suppressed == COUNT
    # Both paths ran many times: the consumer slept and was rung, and polled unrung.
    assert sent.doorbells_rung > 1000 and sent.doorbells_suppressed > 1000
    assert stats["doorbell_wakeups"] > 1000

"""SPSC queue tests.

Fuzz invariant: whatever the peer writes into the region (any head, any tail, any slot
bytes), the queue raises ``QueueCorrupt`` or behaves like a bounded FIFO; it never touches
a byte outside its region (guard bytes around it stay intact).

Expected bytes come from the spec's layout table (docs/wire-format.md §3.1): head u32 LE at
0x00, tail u32 LE at 0x40, slot i at 0x80 + 64*i, capacity (len - 128) // 64.
"""

from __future__ import annotations

import collections
import mmap

import pytest
from hypothesis import given, settings, stateful
from hypothesis import strategies as st

from ivshmem_bus.core.queue import SpscQueue, queue_capacity
from ivshmem_bus.errors import QueueCorrupt

from .helpers import QueuePair


def msg(n: int, size: int = 44) -> bytes:
    return n.to_bytes(4, "little") * (size // 4) + bytes(size % 4)


# --- Layout, from the spec table -------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "capacity"),
    [(4096, 62), (256, 2), (128 + 64 * 4096, 4096), (319, 2), (320, 3), (8192, 126)],
)
def test_capacity_is_region_minus_128_over_64(size, capacity):
    assert queue_capacity(size) == capacity
    assert SpscQueue(bytearray(size)).capacity == capacity


@pytest.mark.parametrize("size", [0, 64, 128, 191, 255])
def test_region_smaller_than_two_slots_is_refused(size):
    with pytest.raises(ValueError, match=rf"region of {size} bytes holds .* at least 2 are needed"):
        SpscQueue(bytearray(size))


def test_read_only_and_misaligned_regions_are_refused():
    with pytest.raises(ValueError, match="read-only"):
        SpscQueue(bytes(4096))
    with pytest.raises(ValueError, match="not 4-byte aligned"):
        SpscQueue(memoryview(bytearray(4100))[2:4098])


def test_put_writes_slot_then_head_exactly_as_the_spec_lays_them_out():
    pair = QueuePair.new()
    pair.region[0x80:] = b"\xcc" * (len(pair.region) - 0x80)  # stale slot contents
    data = bytes(range(44))
    assert pair.producer.put(data)
    assert pair.word(0x00) == 1  # head published
    assert pair.word(0x40) == 0  # tail untouched
    assert bytes(pair.region[0x80 : 0x80 + 44]) == data
    # exactly len(data) bytes written: the last 20 bytes of the slot keep what they held
    assert bytes(pair.region[0x80 + 44 : 0xC0]) == b"\xcc" * 20
    assert bytes(pair.region[0x04:0x40]) == bytes(60)  # padding never written
    assert pair.producer.put(b"\x01\x02")
    assert pair.word(0x00) == 2
    assert bytes(pair.region[0xC0:0xC2]) == b"\x01\x02"


def test_get_returns_the_slot_and_publishes_tail():
    pair = QueuePair.new()
    pair.producer.put(b"A" * 64)
    pair.producer.put(b"B" * 64)
    assert pair.consumer.get() == b"A" * 64
    assert pair.word(0x40) == 1
    assert pair.consumer.get(size=4) == b"BBBB"
    assert pair.word(0x40) == 2
    assert pair.consumer.get() is None


def test_full_at_capacity_minus_one_and_nothing_written_when_full():
    pair = QueuePair.new(slots=4)
    assert [pair.producer.put(msg(i)) for i in range(4)] == [True, True, True, False]
    before = bytes(pair.region)
    assert not pair.producer.put(b"x" * 44)
    assert bytes(pair.region) == before
    assert len(pair.producer) == 3


def test_indexes_wrap_at_capacity():
    pair = QueuePair.new(slots=3)
    seen = []
    for i in range(10):
        assert pair.producer.put(msg(i))
        seen.append(pair.consumer.get(44))
        assert pair.word(0x00) == (i + 1) % 3
        assert pair.word(0x40) == (i + 1) % 3
    assert seen == [msg(i) for i in range(10)]


def test_oversized_data_is_a_value_error():
    q = SpscQueue(bytearray(4096))
    with pytest.raises(ValueError, match="65 bytes do not fit a 64-byte slot"):
        q.put(bytes(65))
    with pytest.raises(ValueError, match=r"size must be 1\.\.64"):
        q.get(size=65)


def test_opening_an_existing_queue_picks_up_its_indexes():
    pair = QueuePair.new()
    for i in range(5):
        pair.producer.put(msg(i))
    pair.consumer.get()
    late = SpscQueue(pair.region)  # e.g. a process that attaches after a restart
    assert len(late) == 4
    assert late.get(44) == msg(1)


# --- The peer is untrusted ---------------------------------------------------------------------


@pytest.mark.parametrize(("offset", "name"), [(0x00, "head"), (0x40, "tail")])
def test_corrupt_index_at_open_raises_naming_index_and_value(offset, name):
    pair = QueuePair.new()
    pair.set_word(offset, 62)
    with pytest.raises(QueueCorrupt) as info:
        SpscQueue(pair.region)
    assert (info.value.index, info.value.value, info.value.capacity) == (name, 62, 62)
    assert f"{name} index 62" in str(info.value)
    assert "reset the queues" in str(info.value)


def test_consumer_raises_on_a_corrupt_head_and_reads_nothing():
    pair = QueuePair.new()
    pair.set_word(0x00, 0xFFFFFFFF)
    with pytest.raises(QueueCorrupt, match="head index 4294967295"):
        pair.consumer.get()
    with pytest.raises(QueueCorrupt):
        pair.consumer.drain(lambda view: None)
    assert pair.word(0x40) == 0  # tail was not moved


def test_producer_caches_tail_and_reads_it_only_when_full():
    pair = QueuePair.new(slots=4)
    # The peer writes a corrupt tail while the producer's cache says "not full": the
    # producer must not read it (QEMU's caching), so these puts succeed.
    pair.set_word(0x40, 999)
    assert pair.producer.put(msg(0))
    assert pair.producer.put(msg(1))
    assert pair.producer.put(msg(2))
    # Now the cache says full: the producer re-reads tail and finds it corrupt.
    with pytest.raises(QueueCorrupt) as info:
        pair.producer.put(msg(3))
    assert (info.value.index, info.value.value) == ("tail", 999)
    assert pair.word(0x00) == 3  # head not advanced by the failed put


def test_consumer_caches_head_and_reads_it_only_when_empty():
    pair = QueuePair.new(slots=8)
    for i in range(3):
        pair.producer.put(msg(i))
    assert pair.consumer.get(44) == msg(0)  # cache now says 3 available
    pair.set_word(0x00, 12345)  # corrupt head, unseen while the cache has slots
    assert pair.consumer.get(44) == msg(1)
    assert pair.consumer.get(44) == msg(2)
    with pytest.raises(QueueCorrupt, match="head index 12345"):
        pair.consumer.get()


def test_own_index_is_not_read_back_from_shared_memory():
    # The peer scribbles on OUR head: we keep writing where we know we are.
    pair = QueuePair.new(slots=8)
    pair.producer.put(msg(0))
    pair.set_word(0x00, 5)
    pair.producer.put(msg(1))
    assert pair.word(0x00) == 2
    assert bytes(pair.region[0xC0 : 0xC0 + 44]) == msg(1)


# --- Zero-copy and batch variants --------------------------------------------------------------


def test_peek_then_advance_is_zero_copy():
    pair = QueuePair.new()
    pair.producer.put(b"hello")
    view = pair.consumer.peek()
    assert isinstance(view, memoryview)
    assert len(view) == 64 and bytes(view[:5]) == b"hello"
    assert pair.word(0x40) == 0  # not consumed yet
    pair.region[0x80] = ord("j")  # the view aliases shared memory
    assert bytes(view[:5]) == b"jello"
    pair.consumer.advance()
    assert pair.word(0x40) == 1
    assert pair.consumer.peek() is None
    with pytest.raises(RuntimeError, match="advance\\(\\) on an empty queue"):
        pair.consumer.advance()


def test_consume_hands_a_view_and_gives_the_slot_back_even_on_error():
    pair = QueuePair.new()
    pair.producer.put(b"one")
    pair.producer.put(b"two")
    assert pair.consumer.consume(lambda v: bytes(v[:3])) == (True, b"one")

    def boom(view):
        raise KeyError("poison")

    with pytest.raises(KeyError):
        pair.consumer.consume(boom)
    assert pair.word(0x40) == 2  # the poison message is not delivered again
    assert pair.consumer.consume(bytes) == (False, None)


def test_put_many_publishes_head_once_after_all_slots():
    pair = QueuePair.new(slots=8)
    stores = []

    class Spy(bytes):
        """An item whose copy records what head was when it was copied into its slot."""

        def __len__(self):
            stores.append(pair.word(0x00))
            return bytes.__len__(self)

    assert pair.producer.put_many([Spy(msg(i)) for i in range(5)]) == 5
    assert stores == [0, 0, 0, 0, 0]  # head still 0 while slots were written
    assert pair.word(0x00) == 5
    assert pair.producer.put_many(msg(i) for i in range(10)) == 2  # 7 in flight max
    assert pair.consumer.get_many(size=44) == [msg(i) for i in range(5)] + [msg(0), msg(1)]


def test_put_many_publishes_what_fit_before_a_bad_item():
    pair = QueuePair.new()
    with pytest.raises(ValueError):
        pair.producer.put_many([b"a", b"b", bytes(65)])
    assert pair.word(0x00) == 2
    assert pair.consumer.get_many(size=1) == [b"a", b"b"]


def test_drain_publishes_tail_once_and_honours_limit():
    pair = QueuePair.new()
    pair.producer.put_many(msg(i) for i in range(6))
    tails = []
    got = []

    def fn(view):
        tails.append(pair.word(0x40))
        got.append(bytes(view[:44]))

    assert pair.consumer.drain(fn, limit=4) == 4
    assert tails == [0, 0, 0, 0]
    assert pair.word(0x40) == 4
    assert got == [msg(i) for i in range(4)]
    assert pair.consumer.drain(fn) == 2
    assert pair.consumer.drain(fn) == 0


def test_drain_gives_back_slots_up_to_the_one_that_raised():
    pair = QueuePair.new()
    pair.producer.put_many(msg(i) for i in range(5))
    seen = []

    def fn(view):
        seen.append(view[0])
        if len(seen) == 3:
            raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError):
        pair.consumer.drain(fn)
    assert pair.word(0x40) == 3
    assert pair.consumer.get(44) == msg(3)


def test_reset_zeroes_indexes_and_slots():
    pair = QueuePair.new(slots=4)
    pair.producer.put_many([b"\xff" * 64] * 3)
    pair.consumer.reset()
    assert bytes(pair.region) == bytes(len(pair.region))
    assert pair.guards_intact()
    pair.producer.resync()
    assert pair.producer.put(b"after")
    assert pair.consumer.get(5) == b"after"


def test_release_lets_the_owner_close_the_mmap():
    m = mmap.mmap(-1, 8192)
    q = SpscQueue(memoryview(m)[:4096])
    q.put(b"x")
    with pytest.raises(BufferError):
        m.close()
    q.release()
    q.release()  # idempotent
    m.close()
    with pytest.raises(ValueError):
        q.put(b"y")


# --- Property tests ------------------------------------------------------------------------------


class QueueModel(stateful.RuleBasedStateMachine):
    """Random put/get/put_many/get_many/drain/peek against a bounded deque."""

    @stateful.initialize(slots=st.integers(2, 70))
    def setup(self, slots):
        self.pair = QueuePair.new(slots)
        self.model: collections.deque[bytes] = collections.deque()
        self.limit = slots - 1

    @stateful.rule(data=st.binary(min_size=1, max_size=64))
    def put(self, data):
        ok = self.pair.producer.put(data)
        assert ok == (len(self.model) < self.limit)
        if ok:
            self.model.append(data)

    @stateful.rule(items=st.lists(st.binary(min_size=1, max_size=64), max_size=80))
    def put_many(self, items):
        n = self.pair.producer.put_many(items)
        assert n == min(len(items), self.limit - len(self.model))
        self.model.extend(items[:n])

    @stateful.rule()
    def get(self):
        got = self.pair.consumer.get()
        if not self.model:
            assert got is None
        else:
            want = self.model.popleft()
            assert got[: len(want)] == want

    @stateful.rule(limit=st.none() | st.integers(0, 80))
    def get_many(self, limit):
        got = self.pair.consumer.get_many(limit)
        n = len(self.model) if limit is None else min(limit, len(self.model))
        want = [self.model.popleft() for _ in range(n)]
        assert [g[: len(w)] for g, w in zip(got, want, strict=True)] == want

    @stateful.rule()
    def peek(self):
        view = self.pair.consumer.peek()
        assert (view is None) == (not self.model)
        if view is not None:
            assert bytes(view[: len(self.model[0])]) == self.model[0]

    @stateful.invariant()
    def consistent(self):
        if hasattr(self, "pair"):
            assert len(self.pair.consumer) == len(self.model)
            assert self.pair.guards_intact()


QueueModel.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestQueueModel = QueueModel.TestCase


@settings(max_examples=800, deadline=None)
@given(
    slots=st.integers(2, 40),
    head=st.integers(0, 2**32 - 1),
    tail=st.integers(0, 2**32 - 1),
    junk=st.binary(min_size=64, max_size=64),
    ops=st.lists(st.sampled_from(["put", "get", "put_many", "drain", "peek", "len"]), max_size=30),
)
def test_hostile_indexes_raise_queue_corrupt_or_stay_in_bounds(slots, head, tail, junk, ops):
    pair = QueuePair.new(slots)
    cap = slots
    pair.region[0x80:] = junk * slots  # arbitrary slot bytes too
    pair.set_word(0x00, head)
    pair.set_word(0x40, tail)
    if head >= cap or tail >= cap:
        with pytest.raises(QueueCorrupt):
            SpscQueue(pair.region)
        return
    producer, consumer = SpscQueue(pair.region), SpscQueue(pair.region)
    for op in ops:
        try:
            if op == "put":
                producer.put(junk[:44])
            elif op == "put_many":
                producer.put_many([junk] * 5)
            elif op == "get":
                consumer.get()
            elif op == "drain":
                consumer.drain(lambda view: bytes(view))
            elif op == "peek":
                view = consumer.peek()
                assert view is None or len(view) == 64
            else:
                assert 0 <= len(consumer) < cap
        except QueueCorrupt:
            pass
        assert pair.guards_intact()
        assert pair.word(0x00) < cap and pair.word(0x40) < cap


@settings(max_examples=500, deadline=None)
@given(slots=st.integers(2, 40), bad=st.integers(0, 2**32 - 1), which=st.sampled_from([0, 0x40]))
def test_any_out_of_range_value_written_later_is_detected(slots, bad, which):
    pair = QueuePair.new(slots)
    cap = slots
    pair.set_word(which, bad)
    corrupt = bad >= cap
    try:
        n = len(pair.consumer)  # __len__ loads both indexes from shared memory
    except QueueCorrupt as exc:
        assert corrupt
        assert exc.value == bad and exc.index == ("head" if which == 0 else "tail")
    else:
        assert not corrupt
        assert 0 <= n < cap

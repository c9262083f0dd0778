"""Block copies (``put_block`` / ``get_block``): pure Python and the compiled helper alike.

Every test runs against both implementations (``impl`` fixture): the queue's own slice
copies, and ``_ffi.QueueBlocks`` (C, ``cdefs/helper.c``). Expected bytes come from the spec's
layout table (docs/wire-format.md §3.1): head u32 LE at 0x00, tail u32 LE at 0x40, slot i
at 0x80 + 64*i.
"""

from __future__ import annotations

import collections
import mmap
import multiprocessing
import os
import struct
import time

import pytest
from hypothesis import given, settings, stateful
from hypothesis import strategies as st

from ivshmem_bus.core.queue import SpscQueue
from ivshmem_bus.errors import QueueCorrupt
from ivshmem_bus.native import ffi as _ffi

from .helpers import GUARD, QueuePair

IMPLS = {"python": None, "compiled": _ffi.queue_blocks()}
needs_helper = pytest.mark.skipif(
    not _ffi.HAVE_COMPILED, reason="the compiled helper is not built (no C compiler at install)"
)


@pytest.fixture(
    params=["python", pytest.param("compiled", marks=needs_helper)],
)
def impl(request):
    return IMPLS[request.param]


def slots(*fill: int) -> bytes:
    """Whole 64-byte slots, slot k filled with the byte ``fill[k]``."""
    return b"".join(bytes([f]) * 64 for f in fill)


def slot_at(pair: QueuePair, i: int) -> bytes:
    return bytes(pair.region[0x80 + 64 * i : 0x80 + 64 * (i + 1)])


def test_put_block_writes_whole_slots_at_spec_offsets_then_head(impl):
    pair = QueuePair.new(8, impl)
    assert pair.producer.put_block(slots(1, 2, 3)) == 3
    assert [slot_at(pair, i) for i in range(4)] == [bytes([b]) * 64 for b in (1, 2, 3, 0)]
    assert pair.word(0x00) == 3 and pair.word(0x40) == 0
    assert bytes(pair.region[0x04:0x40]) == bytes(60)  # nothing else in the header
    assert pair.guards_intact()


def test_put_block_wraps_and_stops_at_full(impl):
    pair = QueuePair.new(6, impl)  # 5 slots in flight at most
    pair.producer.put_block(slots(9, 9, 9, 9))
    assert pair.consumer.get_block(bytearray(4 * 64)) == 4  # head = tail = 4
    assert pair.producer.put_block(slots(1, 2, 3, 4, 5, 6, 7)) == 5  # room for 5 only
    assert [slot_at(pair, i)[0] for i in range(6)] == [3, 4, 5, 9, 1, 2]
    assert pair.word(0x00) == 3
    assert pair.producer.put_block(slots(8)) == 0  # full
    assert pair.word(0x00) == 3 and slot_at(pair, 3)[0] == 9
    assert pair.guards_intact()


def test_get_block_copies_in_order_across_the_wrap_and_publishes_tail(impl):
    pair = QueuePair.new(5, impl)
    pair.producer.put_block(slots(7, 7, 7))
    pair.consumer.get_block(bytearray(3 * 64))  # tail = 3
    pair.producer.put_block(slots(1, 2, 3, 4))  # slots 3, 4, 0, 1
    out = bytearray([0xEE]) * (6 * 64)
    assert pair.consumer.get_block(out) == 4
    assert out[: 4 * 64] == slots(1, 2, 3, 4)
    assert out[4 * 64 :] == bytes([0xEE]) * (2 * 64)  # beyond what was copied: untouched
    assert pair.word(0x40) == 2
    assert pair.consumer.get_block(out) == 0
    assert pair.word(0x40) == 2


def test_get_block_takes_at_most_what_the_buffer_holds(impl):
    pair = QueuePair.new(8, impl)
    pair.producer.put_block(slots(1, 2, 3))
    out = bytearray(2 * 64 + 63)  # the partial slot at the end is not used
    assert pair.consumer.get_block(out) == 2
    assert out[:128] == slots(1, 2) and out[128:] == bytes(63)
    assert pair.consumer.get(1) == b"\x03"  # per-call get sees the rest


def test_block_and_per_call_ends_share_one_queue(impl):
    pair = QueuePair.new(4, impl)
    for round_ in range(10):
        assert pair.producer.put(bytes([round_]) * 44)
        assert pair.producer.put_block(slots(100 + round_)) == 1
        out = bytearray(3 * 64)
        assert pair.consumer.get_block(out) == 2
        assert out[:44] == bytes([round_]) * 44 and out[64:128] == slots(100 + round_)


def test_a_block_is_whole_slots(impl):
    pair = QueuePair.new(4, impl)
    with pytest.raises(ValueError, match="whole 64-byte slots of unsigned bytes, not 65 items"):
        pair.producer.put_block(bytes(65))
    words = memoryview(bytearray(128)).cast("I")  # 32 items: a length that is not bytes
    with pytest.raises(ValueError, match="unsigned bytes"):
        pair.producer.put_block(words)
    with pytest.raises(ValueError, match="unsigned bytes"):
        pair.consumer.get_block(words)
    assert pair.word(0x00) == 0 and pair.word(0x40) == 0


def test_a_read_only_destination_is_refused_and_nothing_consumed(impl):
    pair = QueuePair.new(4, impl)
    pair.producer.put_block(slots(1))
    with pytest.raises((TypeError, BufferError)):
        pair.consumer.get_block(bytes(64))
    assert pair.word(0x40) == 0
    assert pair.consumer.get(1) == b"\x01"


def test_the_source_may_be_bytes_bytearray_or_memoryview(impl):
    pair = QueuePair.new(8, impl)
    block = bytearray(slots(1, 2, 3, 4))
    assert pair.producer.put_block(bytes(block[:64])) == 1
    assert pair.producer.put_block(block[64:128]) == 1
    assert pair.producer.put_block(memoryview(block)[128:]) == 2
    out = memoryview(bytearray(4 * 64))
    assert pair.consumer.get_block(out) == 4
    assert out.tobytes() == bytes(block)


@pytest.mark.parametrize(("offset", "name"), [(0x40, "tail"), (0x00, "head")])
def test_a_corrupt_peer_index_raises_and_nothing_moves(impl, offset, name):
    pair = QueuePair.new(6, impl)
    pair.producer.put_block(slots(1, 2))
    before = bytes(pair.region)
    pair.set_word(offset, 6)  # == capacity: corrupt
    before = before[:offset] + (6).to_bytes(4, "little") + before[offset + 4 :]
    out = bytearray([0xEE]) * (5 * 64)
    with pytest.raises(QueueCorrupt) as info:
        if name == "tail":
            pair.producer.put_block(slots(*range(5)))  # needs the tail: the cache says full
        else:
            pair.consumer.get_block(out)  # 2 by the cache < 5: needs the head
    assert (info.value.index, info.value.value) == (name, 6)
    assert bytes(pair.region) == before
    assert out == bytearray([0xEE]) * (5 * 64)


def test_release_frees_the_region_and_later_calls_raise(impl):
    m = mmap.mmap(-1, 4096)
    q = SpscQueue(memoryview(m), blocks=impl)
    assert q.put_block(slots(5)) == 1
    with pytest.raises(BufferError):
        m.close()
    q.release()
    q.release()
    m.close()  # no export left, the compiled copier's pointer included
    with pytest.raises(ValueError):
        q.put_block(slots(6))
    with pytest.raises(ValueError):
        q.get_block(bytearray(64))


def test_a_queue_refused_at_open_holds_no_copier():
    made = []

    def factory(view, capacity):
        made.append(capacity)
        raise AssertionError("not reached")

    region = bytearray(4096)
    region[0:4] = (62).to_bytes(4, "little")
    with pytest.raises(QueueCorrupt):
        SpscQueue(region, blocks=factory)
    assert made == []
    region.extend(b"x")  # a bytearray with an export left on it cannot resize


@needs_helper
def test_compiled_copier_returns_peer_index_and_count():
    region = bytearray(0x80 + 64 * 8)
    region[0x40:0x44] = (3).to_bytes(4, "little")  # tail 3
    region[0x00:0x04] = (3).to_bytes(4, "little")  # head 3: empty
    qb = _ffi.QueueBlocks(memoryview(region), 8)
    try:
        # By a stale cache (0) the queue looks full: the copier reloads tail and returns it.
        assert qb.put(3, 4, slots(1, 2), 2) == (3 << 32) | 2
        assert region[0x00:0x04] == (5).to_bytes(4, "little")
        out = bytearray(3 * 64)
        assert qb.get(3, 3, out, 3) == (5 << 32) | 2
        assert out[:128] == slots(1, 2) and region[0x40:0x44] == (5).to_bytes(4, "little")
        region[0x00:0x04] = (0xFFFFFFFF).to_bytes(4, "little")
        assert qb.get(5, 5, out, 1) == -1 - 0xFFFFFFFF
        assert qb.put(8, 0, slots(1), 1) == -(1 << 63)  # own index out of range: refused
        assert qb.get(0, 9, out, 1) == -(1 << 63)
        with pytest.raises(ValueError, match="more than the 64-byte source"):
            qb.put(5, 5, slots(1), 2)
        with pytest.raises(ValueError, match="more than the 128-byte destination"):
            qb.get(5, 5, bytearray(128), 3)
        with pytest.raises(BufferError):
            qb.get(5, 5, bytes(64), 1)
    finally:
        qb.release()
    region.extend(b"x")  # the export is gone
    with pytest.raises(ValueError, match="released queue"):
        qb.put(0, 0, slots(1), 1)


@needs_helper
def test_compiled_copier_refusing_its_arguments_is_a_value_error():
    q = SpscQueue(bytearray(4096), blocks=_ffi.queue_blocks())
    q._head = 62  # a bug of ours, simulated: the C side checks its own index too
    with pytest.raises(ValueError, match="refused its arguments"):
        q.put_block(slots(1))


# --- Property tests ------------------------------------------------------------------------------


class BlockModel(stateful.RuleBasedStateMachine):
    """Random put/put_block/get/get_block against a bounded deque of 64-byte slots."""

    BLOCKS = None

    @stateful.initialize(nslots=st.integers(2, 70))
    def setup(self, nslots):
        self.pair = QueuePair.new(nslots, self.BLOCKS)
        self.model: collections.deque[bytes] = collections.deque()
        self.limit = nslots - 1
        self.counter = 0

    def _fresh(self, n: int) -> list[bytes]:
        out = []
        for _ in range(n):
            self.counter += 1
            out.append(self.counter.to_bytes(8, "little") * 8)
        return out

    @stateful.rule()
    def put(self):
        (item,) = self._fresh(1)
        ok = self.pair.producer.put(item)
        assert ok == (len(self.model) < self.limit)
        if ok:
            self.model.append(item)

    @stateful.rule(n=st.integers(0, 80))
    def put_block(self, n):
        items = self._fresh(n)
        done = self.pair.producer.put_block(b"".join(items))
        assert done == min(n, self.limit - len(self.model))
        self.model.extend(items[:done])

    @stateful.rule()
    def get(self):
        got = self.pair.consumer.get()
        assert got == (self.model.popleft() if self.model else None)

    @stateful.rule(n=st.integers(0, 80))
    def get_block(self, n):
        out = bytearray(64 * n)
        done = self.pair.consumer.get_block(out)
        assert done == min(n, len(self.model))
        for k in range(done):
            assert out[64 * k : 64 * (k + 1)] == self.model.popleft()
        assert out[64 * done :] == bytes(64 * (n - done))

    @stateful.invariant()
    def consistent(self):
        if hasattr(self, "pair"):
            assert len(self.pair.consumer) == len(self.model)
            assert self.pair.guards_intact()


_MODEL_SETTINGS = settings(max_examples=150, stateful_step_count=60, deadline=None)


class PythonBlockModel(BlockModel):
    BLOCKS = None


class CompiledBlockModel(BlockModel):
    BLOCKS = IMPLS["compiled"]


PythonBlockModel.TestCase.settings = _MODEL_SETTINGS
CompiledBlockModel.TestCase.settings = _MODEL_SETTINGS
TestPythonBlockModel = PythonBlockModel.TestCase
TestCompiledBlockModel = needs_helper(CompiledBlockModel.TestCase)


@pytest.mark.parametrize("name", ["python", pytest.param("compiled", marks=needs_helper)])
@settings(max_examples=400, deadline=None)
@given(
    nslots=st.integers(2, 40),
    head=st.integers(0, 2**32 - 1),
    tail=st.integers(0, 2**32 - 1),
    ops=st.lists(st.tuples(st.sampled_from(["put", "get"]), st.integers(0, 50)), max_size=20),
    data=st.data(),
)
def test_hostile_indexes_with_blocks_raise_or_stay_in_bounds(name, nslots, head, tail, ops, data):
    """Whatever the peer does to the indexes between our calls, a block call raises
    QueueCorrupt or moves a bounded count, and never writes outside the region."""
    pair = QueuePair.new(nslots)
    pair.set_word(0x00, head % nslots)
    pair.set_word(0x40, tail % nslots)
    producer = SpscQueue(pair.region, blocks=IMPLS[name])
    consumer = SpscQueue(pair.region, blocks=IMPLS[name])
    for op, n in ops:
        # The hostile peer: rewrites the index it owns, sometimes out of range.
        if data.draw(st.booleans()):
            offset = 0x40 if op == "put" else 0x00
            pair.set_word(offset, data.draw(st.integers(0, 2**32 - 1) | st.integers(0, nslots)))
        try:
            if op == "put":
                done = producer.put_block(bytes([GUARD ^ 0xFF]) * (64 * n))
            else:
                out = bytearray(64 * n)
                done = consumer.get_block(out)
            assert 0 <= done <= min(n, nslots - 1)
        except QueueCorrupt as exc:
            assert exc.value >= nslots
        assert pair.guards_intact()
    producer.release()
    consumer.release()


# --- Two processes -------------------------------------------------------------------------------

COUNT = 1_000_000
REGION = 4096
SEQ = struct.Struct("<Q")
DEADLINE_S = 120.0


def _block_consumer(path: str, count: int, impl_name: str, conn) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, REGION) as mem:
            q = SpscQueue(memoryview(mem), blocks=IMPLS[impl_name])
            out = bytearray(64 * 61)
            expected = bad = 0
            deadline = time.monotonic() + DEADLINE_S
            while expected < count and time.monotonic() < deadline:
                n = q.get_block(out)
                for k in range(n):
                    (seq,) = SEQ.unpack_from(out, 64 * k)
                    if seq != expected:
                        bad += 1
                        expected = seq
                    expected += 1
            q.release()
            conn.send((expected, bad))
    finally:
        os.close(fd)
        conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["python", pytest.param("compiled", marks=needs_helper)])
def test_a_million_slots_in_random_blocks_between_two_processes(tmp_path, name):
    """Block sizes vary 1..61 per call on both sides; every slot arrives once, in order."""
    path = tmp_path / "queue.shm"
    path.write_bytes(bytes(REGION))
    ctx = multiprocessing.get_context("fork")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_block_consumer, args=(str(path), COUNT, name, child_conn))
    fd = os.open(path, os.O_RDWR)
    rng = __import__("random").Random(8)
    try:
        with mmap.mmap(fd, REGION) as mem:
            q = SpscQueue(memoryview(mem), blocks=IMPLS[name])
            child.start()
            block = bytearray(64 * 61)
            sent = 0
            deadline = time.monotonic() + DEADLINE_S
            while sent < COUNT and time.monotonic() < deadline:
                n = min(rng.randint(1, 61), COUNT - sent)
                for k in range(n):
                    SEQ.pack_into(block, 64 * k, sent + k)
                sent += q.put_block(memoryview(block)[: 64 * n])
            q.release()
        assert parent_conn.poll(DEADLINE_S), "the consumer did not finish"
        received, bad = parent_conn.recv()
    finally:
        os.close(fd)
        child.join(10)
        if child.is_alive():
            child.kill()
    assert sent == COUNT
    assert (received, bad) == (COUNT, 0)

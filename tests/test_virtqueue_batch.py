"""The batch forms of the virtqueue core against their one-at-a-time forms and the spec bytes.

``DeviceQueue.pop_many`` / ``push_many`` / ``unpop``, ``DriverQueue.add_buffers``,
``BufferWindow.word16`` / ``load16_reader`` and the device's ``run_batch`` are the data path's
fast forms: each is held here to what ``pop``, ``push``, ``add`` and ``load16`` do, for any
ring contents a hostile driver may write, and to the spec's byte layout (``RawRings``, written
from the spec's tables, not from the code under test).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ivshmem_bus.core.virtqueue import (
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Chain,
    DeviceQueue,
    DriverQueue,
    VirtqLayout,
)
from ivshmem_bus.core.window import BufferWindow, load16_reader
from ivshmem_bus.devices.queues import Vqueue, run_batch
from ivshmem_bus.errors import QueueFull, VirtqueueError, WindowError

from .test_virtqueue_hostile import hostile_queue
from .vq_helpers import BASE, AuditWindow, RawRings

NAME = "audit window"


def _describe(chain: Chain) -> tuple[int, list[tuple[bytes, bool]], list[tuple[int, bool]]]:
    return (
        chain.head,
        [(bytes(v), v.readonly) for v in chain.readable],
        [(len(v), v.readonly) for v in chain.writable],
    )


def _by_pop(dev: DeviceQueue, limit: int) -> tuple[str, object]:
    """What ``limit`` pop() calls return, stopping at the first empty or error."""
    out = []
    for _ in range(limit):
        try:
            chain = dev.pop()
        except VirtqueueError as exc:
            return "error", (out, str(exc))
        if chain is None:
            break
        out.append(_describe(chain))
    return "chains", out


def _by_pop_many(dev: DeviceQueue, limit: int) -> tuple[str, object]:
    """The same through pop_many calls: up to ``limit`` chains, however many calls it takes."""
    out: list[object] = []
    while len(out) < limit:
        try:
            batch = dev.pop_many(limit - len(out))
        except VirtqueueError as exc:
            return "error", (out, str(exc))
        if not batch:
            break
        out.extend(_describe(c) for c in batch)
    return "chains", out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(q=hostile_queue(), limit=st.integers(1, 40), audit=st.booleans())
def test_pop_many_returns_and_refuses_what_as_many_pops_do(
    q: tuple[int, bool, bool, bytearray, int], limit: int, audit: bool
) -> None:
    n, event_idx, indirect, buf, _ = q
    lay = VirtqLayout.packed_at(BASE, n)
    one_buf, many_buf = bytearray(buf), bytearray(buf)

    def window(b: bytearray) -> BufferWindow | AuditWindow:
        # AuditWindow is not a BufferWindow: pop_many then goes through pop() itself
        return AuditWindow(b, name=NAME) if audit else BufferWindow(b, BASE, name=NAME)

    one = DeviceQueue(window(one_buf), 0, lay, event_idx=event_idx, indirect=indirect)  # type: ignore[arg-type]
    many = DeviceQueue(window(many_buf), 0, lay, event_idx=event_idx, indirect=indirect)  # type: ignore[arg-type]
    for q_ in (one, many):
        q_.set_notify(False)  # pop_many is for a busy device: kicks off
    for _ in range(3):  # a few rounds, the used elements pushed between them
        got_one, got_many = _by_pop(one, limit), _by_pop_many(many, limit)
        assert got_many == got_one
        chains = got_one[1] if got_one[0] == "chains" else got_one[1][0]  # type: ignore[index]
        assert one.in_flight == many.in_flight == len(chains)  # type: ignore[arg-type]
        if got_one[0] == "error" or not chains:
            break
        for head, _, writable in chains:  # type: ignore[union-attr]
            written = min(sum(length for length, _ in writable), 0xFFFFFFFF)
            one.push(head, written)
        many.push_many(
            [Chain(h, [], []) for h, _, _ in chains],  # type: ignore[union-attr]
            [min(sum(length for length, _ in w), 0xFFFFFFFF) for _, _, w in chains],  # type: ignore[union-attr]
        )
        assert one.publish() == many.publish()
    assert one.broken == many.broken
    assert many_buf == one_buf  # the same used elements, indexes and flags


def _queue(n: int = 8) -> tuple[bytearray, BufferWindow, RawRings, DeviceQueue]:
    buf = bytearray(0x4000)
    lay = VirtqLayout.packed_at(BASE, n)
    w = BufferWindow(buf, BASE, name=NAME)
    raw = RawRings(buf, BASE, n, lay.desc_addr, lay.avail_addr, lay.used_addr)
    return buf, w, raw, DeviceQueue(w, 5, lay)


def _offer(raw: RawRings, heads: list[int], *, write: bool = False, length: int = 16) -> None:
    for head in heads:
        raw.put_desc(head, BASE + 0x2000 + 0x100 * head, length, VIRTQ_DESC_F_WRITE * write, 0)
        raw.offer(head)


def test_pop_many_stops_before_a_chain_of_two_and_the_next_call_takes_it() -> None:
    _, _, raw, dev = _queue()
    _offer(raw, [0, 1])
    raw.put_desc(2, BASE + 0x2200, 8, VIRTQ_DESC_F_NEXT, 3)
    raw.put_desc(3, BASE + 0x2300, 8, VIRTQ_DESC_F_WRITE, 0)
    raw.offer(2)
    _offer(raw, [4])
    first = dev.pop_many(8)
    assert [c.head for c in first] == [0, 1]
    second = dev.pop_many(8)  # the chain of two, through the general walk, alone
    assert [(c.head, len(c.readable), len(c.writable)) for c in second] == [(2, 1, 1)]
    assert [c.head for c in dev.pop_many(8)] == [4]
    assert dev.pop_many(8) == [] and dev.in_flight == 4


def test_pop_many_hands_back_the_good_chains_then_the_bad_one_breaks_the_queue() -> None:
    _, _, raw, dev = _queue(4)
    _offer(raw, [0])
    raw.put_avail_entry(1, 7)  # head 7 in a queue of 4
    raw.avail_idx = 2
    assert [c.head for c in dev.pop_many(4)] == [0]
    with pytest.raises(VirtqueueError, match=r"avail ring entry 1 head=7 is out of range"):
        dev.pop_many(4)
    assert dev.broken


def test_pop_many_limit_and_avail_idx_read_once_per_run() -> None:
    log: list[tuple[str, int]] = []

    class Logging(BufferWindow):  # view() not overridden: the direct path applies
        def load16(self, addr: int) -> int:
            log.append(("load16", addr))
            return super().load16(addr)

    buf = bytearray(0x4000)
    lay = VirtqLayout.packed_at(BASE, 8)
    w = Logging(buf, BASE, name=NAME, fence=lambda: log.append(("fence", 0)))
    raw = RawRings(buf, BASE, 8, lay.desc_addr, lay.avail_addr, lay.used_addr)
    dev = DeviceQueue(w, 0, lay)
    _offer(raw, [0, 1, 2, 3, 4])
    assert [c.head for c in dev.pop_many(3)] == [0, 1, 2]
    assert log == [("load16", lay.avail_addr + 2), ("fence", 0)]  # avail.idx once, acquire
    log.clear()
    assert [c.head for c in dev.pop_many(8)] == [3, 4]
    assert log == []  # the 5 seen are not re-read


def test_unpop_gives_chains_back_in_order_and_refuses_more_than_popped() -> None:
    _, _, raw, dev = _queue()
    _offer(raw, [0, 1, 2, 3])
    assert [c.head for c in dev.pop_many(4)] == [0, 1, 2, 3]
    dev.unpop(2)
    assert dev.in_flight == 2
    assert [c.head for c in dev.pop_many(4)] == [2, 3]
    with pytest.raises(ValueError, match="virtqueue 5: cannot give back 5 chains, 4 are popped"):
        dev.unpop(5)


def test_push_many_writes_the_spec_elements_and_one_publish_shows_them_all() -> None:
    _, _, raw, dev = _queue()
    _offer(raw, [3, 1, 6], write=True)
    chains = dev.pop_many(8)
    dev.push_many(chains, [16, 0, 5])
    assert raw.used_idx == 0  # not visible before publish
    assert dev.publish()
    assert raw.used_idx == 3
    assert [raw.used_elem(i) for i in range(3)] == [(3, 16), (1, 0), (6, 5)]
    assert dev.in_flight == 0


def test_push_many_pushes_only_as_many_as_written_and_refuses_bad_values() -> None:
    _, _, raw, dev = _queue()
    _offer(raw, [0, 1, 2], write=True)
    chains = dev.pop_many(8)
    dev.push_many(chains, [4])  # the first only
    assert dev.in_flight == 2
    with pytest.raises(ValueError, match="written length 4294967296 is not a u32"):
        dev.push_many(chains[1:], [1, 1 << 32])
    assert dev.in_flight == 1  # the element before the bad one was written
    dev.publish()
    assert raw.used_idx == 2 and raw.used_elem(1) == (1, 1)
    with pytest.raises(ValueError, match="3 written lengths for 1 chains"):
        dev.push_many(chains[2:], [0, 0, 0])
    dev.push_many(chains[2:], [0])
    with pytest.raises(ValueError, match="push without a popped chain to return"):
        dev.push_many(chains[2:], [0])


# -- run_batch: the time budget and a failing handler ------------------------------------------


def test_run_batch_cut_by_its_budget_gives_the_rest_back_and_loses_none() -> None:
    _, _, raw, dev = _queue(32)
    _offer(raw, list(range(32)))
    seen: list[int] = []

    def handler(chain: Chain) -> int:
        seen.append(chain.head)
        return 0

    vq = Vqueue(queue=dev, kicked=True)
    run_batch(vq, dev, handler, None, 256, 0.0)  # the budget is over after one chain
    assert seen == [0] and dev.in_flight == 0
    while vq.kicked:
        run_batch(vq, dev, handler, None, 256, 0.0)
        dev.publish()
    assert seen == list(range(32))  # each once, in ring order
    assert raw.used_idx == 32 and [raw.used_elem(i)[0] for i in range(32)] == seen


def test_run_batch_a_handler_that_raises_keeps_its_chain_and_pushes_the_ones_before() -> None:
    _, _, raw, dev = _queue(8)
    _offer(raw, [0, 1, 2, 3])

    def handler(chain: Chain) -> int:
        if chain.head == 2:
            raise RuntimeError("handler failed")
        return 0

    vq = Vqueue(queue=dev, kicked=True)
    with pytest.raises(RuntimeError, match="handler failed"):
        run_batch(vq, dev, handler, None, 256, 1.0)
    assert dev.in_flight == 1  # chain 2, popped and not pushed (as one pop per chain)
    dev.publish()
    assert raw.used_idx == 2
    assert [c.head for c in dev.pop_many(8)] == [3]  # given back, popped again


def test_run_batch_asks_a_ready_function_before_every_chain() -> None:
    _, _, raw, dev = _queue(8)
    _offer(raw, [0, 1, 2, 3])
    asked: list[int] = []

    def ready() -> bool:
        asked.append(dev.in_flight)
        return len(asked) <= 2

    run_batch(Vqueue(queue=dev, kicked=True), dev, lambda c: 0, ready, 256, 1.0)
    assert asked == [0, 0, 0]  # two chains taken, one at a time; the third refused
    assert dev.publish() and raw.used_idx == 2


# -- the driver's add_buffers --------------------------------------------------------------------


def _driver(n: int = 8) -> tuple[RawRings, DriverQueue]:
    buf = bytearray(0x4000)
    lay = VirtqLayout.packed_at(BASE, n)
    raw = RawRings(buf, BASE, n, lay.desc_addr, lay.avail_addr, lay.used_addr)
    return raw, DriverQueue(BufferWindow(buf, BASE), 1, lay)


@pytest.mark.parametrize("writable", [False, True])
def test_add_buffers_writes_what_add_writes(writable: bool) -> None:
    bufs = [(BASE + 0x2000 + 0x40 * i, 0x40 - i) for i in range(5)]
    (raw_a, one), (raw_b, many) = _driver(), _driver()
    for i, b in enumerate(bufs):
        one.add(() if writable else (b,), (b,) if writable else (), f"t{i}")
    many.add_buffers(bufs, [f"t{i}" for i in range(5)], writable=writable)
    assert one.publish() == many.publish()
    assert raw_b.buf == raw_a.buf  # descriptors, ring entries and avail.idx, byte for byte
    assert raw_b.avail_idx == 5
    head = raw_b.avail_entry(0)
    assert raw_b.get_desc(head) == (bufs[0][0], bufs[0][1], VIRTQ_DESC_F_WRITE * writable, 0)
    for k in range(5):  # the device returns them: same tokens, same checks on len
        raw_b.put_used_elem(k, raw_b.avail_entry(k), bufs[k][1] if writable else 0)
    raw_b.used_idx = 5
    assert many.reap() == [(f"t{k}", bufs[k][1] if writable else 0) for k in range(5)]
    assert many.free == 8


def test_add_buffers_refuses_without_changing_anything_when_the_queue_is_short() -> None:
    raw, drv = _driver(4)
    drv.add_buffers([(BASE + 0x2000, 8)] * 3, [0, 1, 2], writable=False)
    before = bytes(raw.buf)
    with pytest.raises(QueueFull):
        drv.add_buffers([(BASE + 0x2000, 8)] * 2, [3, 4], writable=False)
    assert bytes(raw.buf) == before and drv.free == 1 and drv.in_flight == 3
    with pytest.raises(ValueError, match="virtqueue 1: 2 tokens for 1 buffers"):
        drv.add_buffers([(BASE + 0x2000, 8)], [0, 1], writable=False)


def test_add_buffers_a_length_past_u32_adds_the_buffers_before_it_only() -> None:
    raw, drv = _driver(4)
    bufs = [(BASE + 0x2000, 8), (BASE + 0x2100, 1 << 32), (BASE + 0x2200, 8)]
    with pytest.raises(ValueError, match=r"buffer \(0x\w+, 4294967296\) does not fit"):
        drv.add_buffers(bufs, [0, 1, 2], writable=True)
    assert drv.in_flight == 1 and drv.free == 3
    assert drv.publish() is True and raw.avail_idx == 1


# -- 16-bit words --------------------------------------------------------------------------------


def test_load16_reader_reads_the_live_word_and_refuses_what_load16_refuses() -> None:
    buf = bytearray(64)
    w = BufferWindow(buf, BASE)
    read, word = load16_reader(w, BASE + 6)
    assert word is not None
    buf[6:8] = (0xBEEF).to_bytes(2, "little")
    assert read() == 0xBEEF
    buf[6:8] = (0x0102).to_bytes(2, "little")
    assert read() == 0x0102  # not cached: each call is a fresh 16-bit load
    word.release()
    for addr in (BASE + 7, BASE + 64, BASE - 2):  # odd, past the end, below the base
        bad, held = load16_reader(w, addr)
        assert held is None
        with pytest.raises(WindowError):
            bad()


def test_load16_reader_goes_through_a_window_with_its_own_load16() -> None:
    audit = AuditWindow(bytearray(64), name=NAME)
    read, held = load16_reader(audit, BASE + 4)  # type: ignore[arg-type]
    assert held is None and read() == 0
    assert audit.log == [("load16", BASE + 4, 2)]


def test_driver_reap_on_an_audit_window_still_loads_used_idx_through_it() -> None:
    buf = bytearray(0x4000)
    lay = VirtqLayout.packed_at(BASE, 4)
    audit = AuditWindow(buf, name=NAME)
    drv = DriverQueue(audit, 0, lay)  # type: ignore[arg-type]
    audit.reset_steps()
    assert drv.reap() == []
    assert ("load16", lay.used_addr + 2, 2) in audit.log

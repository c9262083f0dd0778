"""A hostile peer against the virtqueue core.

Invariant (the fuzz target of this file): whatever bytes the peer puts in its rings, tables
and indexes, ``DeviceQueue.pop`` and ``DriverQueue.reap`` return a value or raise
``VirtqueueError``; they touch nothing outside the window, write nothing outside their own
ring, and finish in a bounded number of steps (counted by the window, not timed).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ivshmem_bus.core.virtqueue import (
    MAX_INDIRECT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DeviceQueue,
    DriverQueue,
    VirtqLayout,
)
from ivshmem_bus.errors import VirtqueueError

from .vq_helpers import BASE, AuditWindow, RawRings

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
DATA = 0x1000  # window offset of the data area in the hand-written cases


def device(
    n: int = 8, *, indirect: bool = False, window_len: int = 0x2000, max_views: int | None = None
) -> tuple[AuditWindow, RawRings, DeviceQueue]:
    lay = VirtqLayout.packed_at(BASE, n)
    w = AuditWindow(bytearray(window_len))
    raw = RawRings(w.buf, BASE, n, lay.desc_addr, lay.avail_addr, lay.used_addr)
    dev = DeviceQueue(w, 7, lay, indirect=indirect)
    w.max_views = max_views  # counted from here: the constructor's own views are not steps
    w.reset_steps()
    return w, raw, dev


def d(off: int) -> int:
    return BASE + DATA + off


def refused(dev: DeviceQueue, match: str) -> None:
    """pop raises VirtqueueError naming queue 7 and ``match``; then the queue stays broken."""
    with pytest.raises(VirtqueueError, match=match) as info:
        dev.pop()
    assert info.value.queue == 7 and str(info.value).startswith("virtqueue 7: ")
    assert "reset the device" in str(info.value)
    assert dev.broken
    with pytest.raises(VirtqueueError, match=r"queue is broken \("):
        dev.pop()


# -- each hostile case of issue 15, item 1, by hand -----------------------------------------


def test_head_out_of_range() -> None:
    _, raw, dev = device()
    raw.offer(8)
    refused(dev, r"avail ring entry 0 head=8 is out of range \(queue size 8\)")


def test_next_out_of_range() -> None:
    _, raw, dev = device()
    raw.put_desc(3, d(0), 4, NEXT, 8)
    raw.offer(3)
    refused(dev, r"chain head=3: descriptor 3 next=8 is out of range")


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (BASE - 1, 1),  # below the window
        (BASE + 0x2000, 1),  # at its end
        (BASE + 0x1FFF, 2),  # crosses its end
        (0, 16),  # a typical guest-physical address elsewhere
        (2**64 - 1, 2),  # addr + len overflows 64 bits
        (BASE, 2**32 - 1),  # a huge length
    ],
)
def test_address_or_length_outside_the_window(addr: int, length: int) -> None:
    _, raw, dev = device()
    raw.put_desc(0, addr, length, 0, 0)
    raw.offer(0)
    refused(dev, rf"chain head=0: descriptor 0 addr=0x{addr:x} len={length} lies outside")


@pytest.mark.parametrize("n", [1, 2, 8, 256])
def test_a_looping_chain_raises_after_exactly_size_steps(n: int) -> None:
    """The walk's bound, proven by counting: the window allows ``n`` views and raises
    StepLimit on the next. Dropping (or loosening) the chain-length check makes this test
    fail with StepLimit instead of passing with VirtqueueError."""
    w, raw, dev = device(n, max_views=n)
    raw.put_desc(0, d(0), 1, NEXT, 0)  # 0 -> 0 forever
    raw.offer(0)
    w.reset_steps()
    refused(dev, rf"chain head=0 is longer than the queue size {n} \(descriptor 0 next=0")
    assert w.views == n


def test_a_two_cycle_raises_after_exactly_size_steps() -> None:
    w, raw, dev = device(4, max_views=4)
    raw.put_desc(1, d(0), 1, NEXT, 2)
    raw.put_desc(2, d(0), 1, NEXT, 1)
    raw.offer(1)
    w.reset_steps()
    with pytest.raises(VirtqueueError, match="longer than the queue size 4"):
        dev.pop()
    assert w.views == 4


def test_readable_after_writable() -> None:
    _, raw, dev = device()
    raw.put_desc(0, d(0), 4, WRITE | NEXT, 1)
    raw.put_desc(1, d(8), 4, 0, 0)
    raw.offer(0)
    refused(dev, r"chain head=0: descriptor 1 is device-readable after a device-writable one")


def test_avail_idx_jump_larger_than_the_size() -> None:
    _, raw, dev = device()
    raw.avail_idx = 9
    refused(dev, r"avail.idx jumped from 0 to 9, more than the queue size 8")


def test_avail_idx_jump_of_exactly_the_size_is_fine() -> None:
    _, raw, dev = device()
    for k in range(8):
        raw.put_desc(k, d(0), 1, 0, 0)
        raw.offer(k)
    assert dev.pending() == 8
    assert [dev.pop() is not None for _ in range(8)] == [True] * 8
    assert dev.pop() is None


def test_avail_idx_going_backwards_is_a_jump() -> None:
    _, raw, dev = device()
    raw.avail_idx = 0xFFFF  # "minus one": as u16 arithmetic, a jump of 65535
    refused(dev, r"avail.idx jumped from 0 to 65535")


def test_indirect_without_negotiation() -> None:
    _, raw, dev = device(indirect=False)
    raw.put_desc(0, d(0), 16, INDIRECT, 0)
    raw.offer(0)
    refused(dev, r"descriptor 0 has the INDIRECT flag but VIRTIO_F_INDIRECT_DESC was not")


def test_indirect_with_next() -> None:
    _, raw, dev = device(indirect=True)
    raw.put_desc(0, d(0), 16, INDIRECT | NEXT, 1)
    raw.offer(0)
    refused(dev, r"descriptor 0 has both INDIRECT and NEXT")


@pytest.mark.parametrize("length", [0, 8, 17, 24])
def test_indirect_table_length_not_a_multiple_of_16(length: int) -> None:
    _, raw, dev = device(indirect=True)
    raw.put_desc(0, d(0), length, INDIRECT, 0)
    raw.offer(0)
    refused(dev, rf"indirect table len={length} is not a non-zero multiple of 16")


def test_indirect_table_outside_the_window() -> None:
    _, raw, dev = device(indirect=True)
    raw.put_desc(0, BASE + 0x1FF0, 32, INDIRECT, 0)
    raw.offer(0)
    refused(dev, r"indirect table addr=0x40001ff0 len=32 lies outside")


def test_indirect_table_longer_than_the_limit() -> None:
    length = 16 * (MAX_INDIRECT + 1)
    _, raw, dev = device(indirect=True, window_len=DATA + length)
    raw.put_desc(0, d(0), length, INDIRECT, 0)
    raw.offer(0)
    refused(dev, rf"indirect table of {MAX_INDIRECT + 1} descriptors is longer than")


def test_indirect_table_inside_an_indirect_table() -> None:
    _, raw, dev = device(indirect=True)
    raw.put_desc(0, d(0), 32, INDIRECT, 0)
    raw.put_table(d(0), 0, d(0x100), 4, NEXT, 1)
    raw.put_table(d(0), 1, d(0x200), 16, INDIRECT, 0)
    raw.offer(0)
    refused(dev, r"indirect descriptor 1 is itself INDIRECT \(a table in a table\)")


def test_next_inside_an_indirect_table_is_bounded_by_its_count() -> None:
    _, raw, dev = device(indirect=True)
    raw.put_desc(0, d(0), 32, INDIRECT, 0)  # a table of 2
    raw.put_table(d(0), 0, d(0x100), 4, NEXT, 2)  # 2 is in the queue's range, not the table's
    raw.offer(0)
    refused(dev, r"indirect descriptor 0 next=2 is out of range \(table of 2\)")


def test_a_loop_inside_an_indirect_table_raises_after_its_count() -> None:
    # 1 view for the table + 3 for its descriptors: a fourth descriptor view is StepLimit.
    w, raw, dev = device(indirect=True, max_views=1 + 3)
    raw.put_desc(0, d(0), 48, INDIRECT, 0)
    for j in range(3):
        raw.put_table(d(0), j, d(0x100), 4, NEXT, (j + 1) % 3)
    raw.offer(0)
    w.reset_steps()
    refused(dev, r"the chain in the indirect table is longer than its 3 descriptors")
    assert w.views == 4


def test_readable_after_writable_across_an_indirect_table() -> None:
    _, raw, dev = device(indirect=True)
    raw.put_desc(0, d(0x100), 4, WRITE | NEXT, 1)
    raw.put_desc(1, d(0), 16, INDIRECT, 0)
    raw.put_table(d(0), 0, d(0x200), 4, 0, 0)
    raw.offer(0)
    refused(dev, r"indirect descriptor 0 is device-readable after a device-writable one")


def test_a_broken_queue_does_not_stop_the_others() -> None:
    w = AuditWindow(bytearray(0x4000))
    lays = [VirtqLayout.packed_at(BASE + 0x800 * q, 8) for q in range(2)]
    raws = [RawRings(w.buf, BASE, 8, x.desc_addr, x.avail_addr, x.used_addr) for x in lays]
    devs = [DeviceQueue(w, q, lay) for q, lay in enumerate(lays)]
    raws[0].offer(99)
    raws[1].put_desc(0, BASE + 0x2000, 4, 0, 0)
    raws[1].offer(0)
    with pytest.raises(VirtqueueError, match="virtqueue 0: avail ring entry 0 head=99"):
        devs[0].pop()
    chain = devs[1].pop()
    assert chain is not None and not devs[1].broken
    devs[1].push(chain.head, 0)
    assert devs[1].publish() and raws[1].used_idx == 1


# -- hypothesis: random descriptor tables and rings against DeviceQueue.pop -----------------

WINDOW = 0x1800  # bytes: rings for up to 32 entries, then a data area
DATA_AREA = 0x800


HOSTILE = ["desc bytes", "data bytes", "descriptors", "avail entries", "avail idx", "flags"]


def _pick(hostile: bool, good: st.SearchStrategy[int], bad: st.SearchStrategy[int]):
    return st.one_of(good, bad) if hostile else good


def _desc(n: int, hostile: bool) -> st.SearchStrategy[tuple[int, int, int, int]]:
    lo, hi = BASE, BASE + WINDOW
    return st.tuples(
        _pick(
            hostile,
            st.integers(lo + DATA_AREA, hi - 64),
            st.one_of(
                st.sampled_from([0, lo - 1, lo, lo + DATA_AREA, hi - 16, hi - 1, hi, 2**64 - 1]),
                st.integers(0, 2**64 - 1),
            ),
        ),
        _pick(
            hostile,
            st.sampled_from([0, 1, 16, 32, 48, 64]),
            st.one_of(st.sampled_from([17, 0x800, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1)),
        ),
        _pick(
            hostile,
            st.sampled_from([0, NEXT, NEXT, WRITE, WRITE | NEXT, INDIRECT]),
            st.integers(0, 0xFFFF),
        ),
        _pick(hostile, st.integers(0, n - 1), st.integers(0, 0xFFFF)),
    )


@st.composite
def hostile_queue(draw: st.DrawFn) -> tuple[int, bool, bool, bytearray, int]:
    """A queue whose rings hold what a hostile driver chose: a few fields are hostile (any
    value), the rest plausible, so that walks get deep before something is wrong."""
    n = 1 << draw(st.integers(0, 5))
    bad = draw(st.sets(st.sampled_from(HOSTILE), max_size=3))
    lay = VirtqLayout.packed_at(BASE, n)
    buf = bytearray(WINDOW)
    raw = RawRings(buf, BASE, n, lay.desc_addr, lay.avail_addr, lay.used_addr)
    if "desc bytes" in bad:
        buf[: 16 * n] = draw(st.binary(min_size=16 * n, max_size=16 * n))
    else:
        descs = draw(st.lists(_desc(n, "descriptors" in bad), min_size=n, max_size=n))
        for i, desc in enumerate(descs):
            raw.put_desc(i, *desc)
    # the data area holds random bytes or descriptors: indirect tables land here
    if "data bytes" in bad:
        blob = draw(st.binary(max_size=WINDOW - DATA_AREA))
        buf[DATA_AREA : DATA_AREA + len(blob)] = blob
    else:
        for j, desc in enumerate(draw(st.lists(_desc(8, "descriptors" in bad), max_size=32))):
            raw.put_table(BASE + DATA_AREA, j, *desc)
    entry = _pick("avail entries" in bad, st.integers(0, n - 1), st.integers(0, 0xFFFF))
    for slot, head in enumerate(draw(st.lists(entry, min_size=n, max_size=n))):
        raw.put_avail_entry(slot, head)
    if "flags" in bad:
        raw.avail_flags = draw(st.integers(0, 0xFFFF))
        raw.used_event = draw(st.integers(0, 0xFFFF))
    avail_idx = draw(_pick("avail idx" in bad, st.integers(0, n), st.integers(0, 0xFFFF)))
    raw.avail_idx = avail_idx
    return n, draw(st.booleans()), draw(st.booleans()), buf, avail_idx


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(q=hostile_queue(), push_some=st.booleans())
def test_hostile_rings_pop_terminates_inside_the_window(
    q: tuple[int, bool, bool, bytearray, int], push_some: bool
) -> None:
    n, event_idx, indirect, buf, avail_idx = q
    lay = VirtqLayout.packed_at(BASE, n)
    # A bound on any one pop: n table descriptors, one indirect table view, and at most one
    # view per 16 bytes of window for that table's descriptors.
    w = AuditWindow(buf)
    dev = DeviceQueue(w, 0, lay, event_idx=event_idx, indirect=indirect)
    w.max_views = n + 1 + WINDOW // 16
    before = bytes(buf)
    used_lo, used_hi = lay.used_addr, lay.used_addr + VirtqLayout.area_sizes(n)[2]
    chains = 0
    outcome = "empty"
    for _ in range(n + 1):  # avail.idx can move at most n: the n + 1st pop must end it
        w.reset_steps()
        try:
            chain = dev.pop()
        except VirtqueueError as exc:
            assert exc.queue == 0 and dev.broken
            with pytest.raises(VirtqueueError):
                dev.pop()
            outcome = "error"
            event("pop: " + re.sub(r"0x[0-9a-f]+|\d+", "N", exc.reason.split(": the driver")[0]))
            break
        stores = [(a, ln) for op, a, ln in w.log if op == "store16"]
        assert all(used_lo <= a and a + ln <= used_hi for a, ln in stores), stores
        if chain is None:
            break
        chains += 1
        assert 0 <= chain.head < n
        assert all(v.readonly for v in chain.readable)
        assert not any(v.readonly for v in chain.writable)
        # every buffer is a view the window granted; one more grant at most (the table)
        granted = sorted(ln for op, _, ln in w.log if op == "view")
        bufs = chain.readable + chain.writable
        assert len(granted) - len(bufs) in (0, 1)
        remaining = list(granted)
        for v in bufs:
            remaining.remove(len(v))
        if push_some:
            dev.push(chain.head, min(chain.writable_len, 0xFFFFFFFF))
            dev.publish()
    event(f"pop: {'some' if chains else 'no'} chains, then {outcome}")
    assert chains <= n and chains <= ((avail_idx - 0) & 0xFFFF)
    if outcome == "empty":
        assert chains == avail_idx  # every chain offered was popped before "empty"
    # Nothing outside the device's own used ring changed.
    lo, hi = used_lo - BASE, used_hi - BASE
    assert buf[:lo] == before[:lo] and buf[hi:] == before[hi:]


# -- hypothesis: a random used ring against DriverQueue.reap ---------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size_log=st.integers(0, 4),
    event_idx=st.booleans(),
    chains=st.lists(st.integers(0, 3), min_size=1, max_size=16),
    elems=st.lists(
        st.tuples(
            st.one_of(st.integers(0, 17), st.integers(0, 2**32 - 1)),
            st.one_of(st.integers(0, 48), st.integers(0, 2**32 - 1)),
        ),
        max_size=16,
    ),
    used_idx=st.one_of(st.integers(0, 17), st.integers(0, 0xFFFF)),
    garbage_flags=st.integers(0, 0xFFFF),
)
def test_hostile_used_ring_reap_returns_only_chains_in_flight(
    size_log: int,
    event_idx: bool,
    chains: list[int],
    elems: list[tuple[int, int]],
    used_idx: int,
    garbage_flags: int,
) -> None:
    n = 1 << size_log
    lay = VirtqLayout.packed_at(BASE, n)
    w = AuditWindow(bytearray(0x2000))
    raw = RawRings(w.buf, BASE, n, lay.desc_addr, lay.avail_addr, lay.used_addr)
    drv = DriverQueue(w, 1, lay, event_idx=event_idx)
    wlen: dict[int, int] = {}
    data = BASE + 0x1000
    for token, nw in enumerate(chains):
        writable = [(data + 16 * k, 16) for k in range(nw)]
        if drv.free < max(nw, 1):
            break
        drv.add([] if nw else [(data, 8)], writable, token)
        wlen[token] = 16 * nw
    drv.publish()
    for slot, (head, length) in enumerate(elems[:n]):
        raw.put_used_elem(slot, head, length)
    raw.used_flags = garbage_flags
    raw.used_idx = used_idx
    w.reset_steps()
    try:
        got = drv.reap()
    except VirtqueueError as exc:
        assert exc.queue == 1 and drv.broken
        with pytest.raises(VirtqueueError):
            drv.reap()
        got = None
        event("reap: " + re.sub(r"\d+", "N", exc.reason.split(": the device")[0]))
    stores = [a for op, a, _ in w.log if op == "store16"]
    avail_lo, avail_hi = lay.avail_addr, lay.avail_addr + VirtqLayout.area_sizes(n)[1]
    assert all(avail_lo <= a < avail_hi for a in stores)  # the driver writes only its ring
    if got is not None:
        tokens = [tok for tok, _ in got]
        assert len(tokens) == len(set(tokens)) and set(tokens) <= set(wlen)
        assert all(0 <= length <= wlen[tok] for tok, length in got)  # type: ignore[index]
        in_flight = len(wlen) - len(tokens)
        assert drv.in_flight == in_flight
        assert len(got) == used_idx  # a reap that did not raise took exactly used.idx


# -- each hostile used-ring case, by hand ---------------------------------------------------


def driver_with_two_chains() -> tuple[RawRings, DriverQueue]:
    lay = VirtqLayout.packed_at(BASE, 4)
    w = AuditWindow(bytearray(0x2000))
    raw = RawRings(w.buf, BASE, 4, lay.desc_addr, lay.avail_addr, lay.used_addr)
    drv = DriverQueue(w, 1, lay)
    drv.add([(BASE + 0x1000, 4)], [(BASE + 0x1010, 16)], "a")  # head 0 (descriptors 0, 1)
    drv.add([], [(BASE + 0x1020, 8)], "b")  # head 2 (the free list hands out 0, 1, 2)
    drv.publish()
    return raw, drv


def reap_refused(drv: DriverQueue, match: str) -> None:
    with pytest.raises(VirtqueueError, match=match) as info:
        drv.reap()
    assert str(info.value).startswith("virtqueue 1: ")
    assert "the device wrote a corrupt used ring" in str(info.value)
    assert drv.broken
    with pytest.raises(VirtqueueError, match=r"queue is broken \("):
        drv.reap()


def test_reap_refuses_a_used_idx_jump_past_the_chains_published() -> None:
    raw, drv = driver_with_two_chains()
    raw.used_idx = 3
    reap_refused(drv, r"used.idx jumped from 0 to 3: 3 used elements but only 2 chain\(s\)")


def test_reap_refuses_an_id_out_of_range() -> None:
    raw, drv = driver_with_two_chains()
    raw.put_used_elem(0, 4, 0)
    raw.used_idx = 1
    reap_refused(drv, r"used ring entry 0: id=4 is out of range \(queue size 4\)")


def test_reap_refuses_an_id_not_in_flight() -> None:
    raw, drv = driver_with_two_chains()
    raw.put_used_elem(0, 1, 0)  # descriptor 1 is in flight, but not the head of a chain
    raw.used_idx = 1
    reap_refused(drv, r"used ring entry 0: id=1 is not a chain in flight")


def test_reap_refuses_the_same_chain_twice() -> None:
    raw, drv = driver_with_two_chains()
    raw.put_used_elem(0, 0, 0)
    raw.put_used_elem(1, 0, 0)
    raw.used_idx = 2
    reap_refused(drv, r"used ring entry 1: id=0 is not a chain in flight")


def test_reap_refuses_a_len_beyond_the_writable_bytes() -> None:
    raw, drv = driver_with_two_chains()
    raw.put_used_elem(0, 0, 17)  # "a" has 16 writable bytes (its 4 readable do not count)
    raw.used_idx = 1
    reap_refused(drv, r"used ring entry 0: id=0 len=17 exceeds the chain's 16 writable bytes")


def test_reap_accepts_exactly_the_writable_bytes() -> None:
    raw, drv = driver_with_two_chains()
    raw.put_used_elem(0, 2, 8)
    raw.put_used_elem(1, 0, 16)
    raw.used_idx = 2
    assert drv.reap() == [("b", 8), ("a", 16)]

"""DriverQueue: its bytes at the spec's offsets, its decisions, and round trips with the device.

The model test drives a driver and a device over one window through random interleavings and
checks the invariant of a queue: every chain comes back exactly once, with the device's bytes,
and no notification the other side needs is ever suppressed.
"""

from __future__ import annotations

import hashlib
from typing import cast

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ivshmem_bus.core.virtqueue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DeviceQueue,
    DriverQueue,
    VirtqLayout,
)
from ivshmem_bus.core.window import BufferWindow
from ivshmem_bus.errors import QueueFull, VirtqueueError

from .vq_helpers import BASE, AuditWindow, RawRings

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


def setup(
    n: int = 8,
    *,
    event_idx: bool = False,
    indirect: bool = False,
    base_idx: int = 0,
    data_len: int = 0x4000,
) -> tuple[bytearray, BufferWindow, RawRings, DriverQueue, int]:
    """(buffer, window, raw rings, driver, driver address of the data area)."""
    lay = VirtqLayout.packed_at(BASE, n)
    data_off = (lay.total_bytes + 0xFFF) & ~0xFFF
    buf = bytearray(b"\xee" * (data_off + data_len))  # garbage: the driver must zero the rings
    w = BufferWindow(buf, BASE)
    raw = RawRings(buf, BASE, n, lay.desc_addr, lay.avail_addr, lay.used_addr)
    drv = DriverQueue(w, 2, lay, event_idx=event_idx, indirect=indirect, base_idx=base_idx)
    return buf, w, raw, drv, BASE + data_off


def test_init_zeroes_the_rings_and_starts_the_indexes() -> None:
    buf, _, raw, drv, _ = setup(4, event_idx=True, base_idx=0xFFFE)
    lay = drv.layout
    desc, avail, used = (buf[a - BASE : a - BASE + n] for _, a, n in lay.areas())
    assert desc == bytes(64)  # over the 0xee garbage setup() put there
    assert avail[:2] == bytes(2) and avail[4:12] == bytes(8)  # flags, ring[4]
    assert used[:2] == bytes(2) and used[4:36] == bytes(32)  # flags, ring[4]
    assert (raw.avail_flags, raw.avail_idx, raw.used_event) == (0, 0xFFFE, 0xFFFE)
    assert (raw.used_flags, raw.used_idx, raw.avail_event) == (0, 0xFFFE, 0xFFFE)
    assert drv.free == 4


def test_add_writes_descriptors_and_ring_entry_publish_writes_idx() -> None:
    _, _, raw, drv, d = setup()
    head = drv.add([(d, 10), (d + 16, 6)], [(d + 32, 64)], "req")
    assert head == 0
    assert raw.get_desc(0) == (d, 10, NEXT, 1)
    assert raw.get_desc(1) == (d + 16, 6, NEXT, 2)
    assert raw.get_desc(2) == (d + 32, 64, WRITE, 0)
    assert raw.avail_entry(0) == 0
    assert raw.avail_idx == 0  # not visible before publish
    assert drv.free == 5
    assert drv.publish() is True  # used.flags 0: the device wants the kick
    assert raw.avail_idx == 1
    assert drv.publish() is False  # nothing new, nothing stored


def test_publish_honours_no_notify_without_event_idx() -> None:
    _, _, raw, drv, d = setup()
    raw.used_flags = 1
    drv.add([(d, 1)], [], None)
    assert drv.publish() is False
    assert raw.avail_idx == 1


@pytest.mark.parametrize(
    ("avail_event", "batch", "want"),
    [(0, 1, True), (1, 1, False), (1, 2, True), (3, 3, False), (0xFFFF, 1, False)],
)
def test_publish_with_event_idx_uses_avail_event(avail_event: int, batch: int, want: bool) -> None:
    _, _, raw, drv, d = setup(event_idx=True)
    raw.used_flags = 1  # ignored with EVENT_IDX
    raw.avail_event = avail_event
    for k in range(batch):
        drv.add([(d + k, 1)], [], k)
    assert drv.publish() is want


def test_reap_returns_tokens_and_lengths_and_frees_descriptors() -> None:
    _, _, raw, drv, d = setup()
    a = drv.add([(d, 4)], [(d + 8, 8), (d + 16, 8)], "a")
    b = drv.add([], [(d + 32, 4)], "b")
    drv.publish()
    assert drv.free == 4 and drv.reap() == []
    raw.put_used_elem(0, b, 4)
    raw.put_used_elem(1, a, 16)
    raw.used_idx = 2
    assert drv.reap() == [("b", 4), ("a", 16)]
    assert drv.free == 8 and drv.in_flight == 0


def test_add_raises_queue_full_without_changing_anything() -> None:
    _, _, raw, drv, d = setup(4)
    drv.add([(d, 1), (d, 1), (d, 1)], [], "three")
    with pytest.raises(QueueFull, match=r"virtqueue 2: queue full: the chain needs 2 descriptor"):
        drv.add([(d, 1)], [(d, 1)], "two")
    assert drv.free == 1
    assert isinstance(QueueFull(2, 1, 0), VirtqueueError)
    assert not drv.broken
    drv.add([(d, 1)], [], "one")
    with pytest.raises(QueueFull):
        drv.add([(d, 1)], [], "none left")
    assert drv.publish() and raw.avail_idx == 2


@pytest.mark.parametrize(
    ("readable", "writable", "match"),
    [
        ([], [], "at least one buffer"),
        ([(-1, 4)], [], "does not fit a descriptor"),
        ([(0, 1 << 32)], [], "does not fit a descriptor"),
        ([(0, 1), (1 << 64, 1)], [], "does not fit a descriptor"),
    ],
)
def test_add_refuses_the_callers_mistakes(
    readable: list[tuple[int, int]], writable: list[tuple[int, int]], match: str
) -> None:
    _, _, _, drv, _ = setup()
    with pytest.raises(ValueError, match=match):
        drv.add(readable, writable, None)
    assert drv.free == 8  # descriptors given back


def test_indirect_add_takes_one_descriptor_and_writes_the_table() -> None:
    _, _, raw, drv, d = setup(2, indirect=True)
    table = d + 0x800
    head = drv.add([(d, 3)], [(d + 16, 5), (d + 32, 7)], "ind", indirect_table=(table, 48))
    assert drv.free == 1
    assert raw.get_desc(head) == (table, 48, INDIRECT, 0)
    # the table is laid out like a descriptor table: read it as one
    table_descs = [RawRings(raw.buf, BASE, 3, table, 0, 0).get_desc(j) for j in range(3)]
    assert table_descs == [(d, 3, NEXT, 1), (d + 16, 5, WRITE | NEXT, 2), (d + 32, 7, WRITE, 0)]


def test_indirect_table_needs_the_feature_and_enough_room() -> None:
    _, _, _, drv, d = setup(indirect=False)
    with pytest.raises(ValueError, match="VIRTIO_F_INDIRECT_DESC was not negotiated"):
        drv.add([(d, 1)], [(d, 1)], None, indirect_table=(d + 0x100, 32))
    _, _, _, drv, d = setup(indirect=True)
    with pytest.raises(ValueError, match="indirect table of 16 bytes is too small for 2 buffers"):
        drv.add([(d, 1)], [(d, 1)], None, indirect_table=(d + 0x100, 16))


def test_set_interrupts_flags_and_used_event() -> None:
    _, _, raw, drv, d = setup()
    assert drv.set_interrupts(False) is False and raw.avail_flags == 1
    assert drv.set_interrupts(True) is False and raw.avail_flags == 0
    _, _, raw, drv, d = setup(event_idx=True)
    drv.add([], [(d, 4)], "x")
    drv.publish()
    assert drv.set_interrupts(False) is False
    assert raw.avail_flags == 0 and raw.used_event == 0xFFFF  # just behind: as far as can be
    raw.put_used_elem(0, 0, 4)
    raw.used_idx = 1  # the device used it without an interrupt
    assert drv.set_interrupts(True) is True  # re-check after the fence
    assert raw.used_event == 0
    assert drv.reap() == [("x", 4)]
    assert raw.used_event == 1  # reap re-armed for the next one


def test_reap_with_event_idx_rereads_after_arming() -> None:
    """An element published while the driver moves used_event is reaped, not stranded."""
    lay = VirtqLayout.packed_at(BASE, 8)
    buf = bytearray(0x4000)
    w = AuditWindow(buf)
    raw = RawRings(buf, BASE, 8, lay.desc_addr, lay.avail_addr, lay.used_addr)
    drv = DriverQueue(w, 0, lay, event_idx=True)
    d = BASE + 0x1000
    drv.add([], [(d, 4)], "first")
    drv.add([], [(d + 4, 4)], "second")
    drv.publish()
    raw.put_used_elem(0, 0, 4)
    raw.used_idx = 1

    def device_races() -> None:
        if raw.used_event == 1 and raw.used_idx == 1:
            raw.put_used_elem(1, 1, 4)
            raw.used_idx = 2

    w.on_fence = device_races
    assert drv.reap() == [("first", 4), ("second", 4)]


# -- round trips with the device ------------------------------------------------------------


def pattern(tag: int, k: int) -> bytes:
    return (tag * 100_000 + k).to_bytes(8, "little")


def echo_round(
    drv: DriverQueue, dev: DeviceQueue, w: BufferWindow, d: int, n: int, tag: int
) -> None:
    """Fill the queue with n one-descriptor chains (even: readable, odd: writable), serve
    them on the device, reap them, check every byte and length."""
    which: dict[int, int] = {}
    for k in range(n):
        addr = d + 8 * k
        if k % 2 == 0:
            w.view(addr, 8)[:] = pattern(tag, k)
            which[drv.add([(addr, 8)], [], (tag, k))] = k
        else:
            w.view(addr, 8)[:] = bytes(8)
            which[drv.add([], [(addr, 8)], (tag, k))] = k
    assert drv.free == 0
    drv.publish()
    for _ in range(n):
        chain = dev.pop()
        assert chain is not None
        k = which[chain.head]
        if k % 2 == 0:
            assert chain.read_all() == pattern(tag, k) and not chain.writable
            dev.push(chain.head, 0)
        else:
            assert not chain.readable
            dev.push(chain.head, chain.write(pattern(tag, k)[::-1]))
    assert dev.pop() is None
    dev.publish()
    got = [(cast(tuple[int, int], tok), length) for tok, length in drv.reap()]
    assert sorted(tok for tok, _ in got) == [(tag, k) for k in range(n)]
    for (t, k), length in got:
        assert length == 8 * (k % 2)
        if k % 2:
            assert bytes(w.view(d + 8 * k, 8)) == pattern(t, k)[::-1]


@pytest.mark.parametrize("n", [1 << k for k in range(16)])
def test_round_trips_for_every_size_across_the_wrap(n: int) -> None:
    base = (65536 - n - 3) & 0xFFFF  # every lap's indexes cross 65535 -> 0 at some point
    lay = VirtqLayout.packed_at(BASE, n)
    data_off = (lay.total_bytes + 63) & ~63
    buf = bytearray(data_off + 8 * n)
    w = BufferWindow(buf, BASE)
    drv = DriverQueue(w, 0, lay, base_idx=base)
    dev = DeviceQueue(w, 0, lay, base_idx=base)
    laps = 3 if n <= 1024 else 1
    for tag in range(laps):
        echo_round(drv, dev, w, BASE + data_off, n, tag)
    assert drv.free == n


def test_indirect_round_trip() -> None:
    lay = VirtqLayout.packed_at(BASE, 4)
    buf = bytearray(0x2000)
    w = BufferWindow(buf, BASE)
    drv = DriverQueue(w, 0, lay, indirect=True)
    dev = DeviceQueue(w, 0, lay, indirect=True)
    d = BASE + 0x100
    w.view(d, 6)[:] = b"abcdef"
    parts = [(d, 2), (d + 2, 2), (d + 4, 2)]
    outs = [(d + 0x40 + 4 * k, 4) for k in range(5)]
    drv.add(parts, outs, "ind", indirect_table=(BASE + 0x1000, 16 * 8))
    drv.add([(d, 6)], [(d + 0x80, 6)], "direct")
    assert drv.free == 1
    drv.publish()
    served = []
    while (chain := dev.pop()) is not None:
        served.append((len(chain.readable), len(chain.writable)))
        dev.push(chain.head, chain.write(chain.read_all().upper() * 3))
    assert served == [(3, 5), (1, 1)]
    dev.publish()
    assert drv.reap() == [("ind", 18), ("direct", 6)]
    assert bytes(w.view(d + 0x40, 18)) == b"ABCDEF" * 3
    assert drv.free == 4


# -- the model: random interleavings, nothing lost, duplicated or corrupted -----------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 3), st.integers(0, 3), st.booleans()),
        st.tuples(st.just("publish")),
        st.tuples(st.just("serve"), st.integers(1, 8)),
        st.tuples(st.just("device_publish")),
        st.tuples(st.just("reap")),
    ),
    min_size=8,
    max_size=80,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size_log=st.integers(0, 5),
    event_idx=st.booleans(),
    indirect=st.booleans(),
    base_idx=st.one_of(st.integers(65500, 65535), st.integers(0, 65535)),
    ops=OPS,
)
def test_model_driver_and_device_lose_nothing(
    size_log: int, event_idx: bool, indirect: bool, base_idx: int, ops: list[tuple]
) -> None:
    n = 1 << size_log
    lay = VirtqLayout.packed_at(BASE, n)
    slot = 256  # per chain: 3 x 16 readable @0, 3 x 16 writable @48, a table of 6 @128
    data = (lay.total_bytes + 63) & ~63
    buf = bytearray(data + slot * n)
    w = BufferWindow(buf, BASE)
    drv = DriverQueue(w, 0, lay, event_idx=event_idx, indirect=indirect, base_idx=base_idx)
    dev = DeviceQueue(w, 0, lay, event_idx=event_idx, indirect=indirect, base_idx=base_idx)
    expected: dict[int, tuple[bytes, int]] = {}  # token -> (expected reply, writable bytes)
    area_of: dict[int, int] = {}  # token -> its buffer area
    free_areas = list(range(n))
    reaped: set[int] = set()
    device_awake = False  # set by EVENT_AVAIL; the device only runs when woken
    driver_awake = False  # set by EVENT_USED
    popped: list = []
    next_token = 0

    def reply_of(payload: bytes, wlen: int) -> bytes:
        return hashlib.blake2b(payload, digest_size=64).digest()[:wlen]

    def do_reap() -> None:
        for token, length in drv.reap():
            assert token in expected and token not in reaped  # no duplicate, no stranger
            want, _wlen = expected.pop(token)
            assert length == len(want)
            area = BASE + data + slot * area_of[token]
            got = b"".join(bytes(w.view(area + 48 + 16 * k, 16)) for k in range(3))[: len(want)]
            assert got == want  # not corrupted
            reaped.add(token)
            free_areas.append(area_of.pop(token))

    for op in ops:
        if op[0] == "add" and free_areas:
            nr, nw, use_table = op[1], op[2], op[3]
            if nr + nw == 0:
                continue
            area_index = free_areas[-1]
            area = BASE + data + slot * area_index
            payload = bytes([next_token & 0xFF]) * (16 * nr)
            w.view(area, len(payload))[:] = payload
            readable = [(area + 16 * k, 16) for k in range(nr)]
            writable = [(area + 48 + 16 * k, 16) for k in range(nw)]
            table = (area + 128, 96) if indirect and use_table else None
            if table is None and nr + nw > n:
                with pytest.raises(ValueError, match="never fits a queue"):
                    drv.add(readable, writable, None)
                continue
            try:
                drv.add(readable, writable, next_token, indirect_table=table)
            except QueueFull:
                assert drv.free < (1 if table else nr + nw)
                event("queue full")
                continue
            free_areas.pop()
            area_of[next_token] = area_index
            expected[next_token] = (reply_of(payload, 16 * nw), 16 * nw)
            next_token += 1
        elif op[0] == "publish":
            if drv.publish():
                device_awake = True
        elif op[0] == "serve" and device_awake:
            for _ in range(op[1]):
                chain = dev.pop()
                if chain is None:
                    # empty and (EVENT_IDX) armed: the device may sleep on EVENT_AVAIL
                    device_awake = dev.set_notify(True)
                    break
                popped.append(chain)
            event(f"device served {bool(popped)}")
            for chain in popped:
                dev.push(chain.head, chain.write(reply_of(chain.read_all(), chain.writable_len)))
            popped.clear()
        elif op[0] == "device_publish":
            if dev.publish():
                driver_awake = True
        elif op[0] == "reap" and driver_awake:
            event("driver woken and reaped")
            do_reap()
            driver_awake = drv.set_interrupts(True)
        # No lost wake-up: a side asleep has nothing published for it to do.
        if not device_awake:
            assert dev.pending() == 0
        if not driver_awake:
            assert w.load16(lay.used_addr + 2) == (base_idx + len(reaped)) & 0xFFFF
    # Drain: publish everything, serve everything, reap everything.
    drv.publish()
    while (chain := dev.pop()) is not None:
        dev.push(chain.head, chain.write(reply_of(chain.read_all(), chain.writable_len)))
    dev.publish()
    do_reap()
    assert expected == {} and drv.free == n and len(reaped) == next_token


def test_publish_and_reap_order_their_accesses_around_fences() -> None:
    lay = VirtqLayout.packed_at(BASE, 4)
    w = AuditWindow(bytearray(0x2000))
    raw = RawRings(w.buf, BASE, 4, lay.desc_addr, lay.avail_addr, lay.used_addr)
    drv = DriverQueue(w, 0, lay)
    drv.add([], [(BASE + 0x1000, 4)], "t")
    w.reset_steps()
    assert drv.publish() is True
    assert w.log == [
        ("fence", 0, 0),  # release: descriptor and ring entry before avail.idx
        ("store16", lay.avail_addr + 2, 2),  # avail.idx, one 16-bit store
        ("fence", 0, 0),  # StoreLoad before the device's suppression word
        ("load16", lay.used_addr, 2),  # used.flags
    ]
    raw.put_used_elem(0, 0, 4)
    raw.used_idx = 1
    w.reset_steps()

    def elements_read_after_fence() -> None:
        # when the acquire fence runs, the element has not been consumed yet
        assert drv.free == 3

    w.on_fence = elements_read_after_fence
    assert drv.reap() == [("t", 4)]
    assert w.log == [
        ("load16", lay.used_addr + 2, 2),  # used.idx, one 16-bit load
        ("fence", 0, 0),  # acquire: the elements after used.idx
        ("load16", lay.used_addr + 2, 2),  # anything more?
    ]


def test_a_chain_that_can_never_fit_is_the_callers_error_not_queue_full() -> None:
    _, _, _, drv, d = setup(2)
    with pytest.raises(ValueError, match="a chain of 3 buffers never fits a queue of 2"):
        drv.add([(d, 1), (d, 1)], [(d, 1)], None)
    assert drv.free == 2

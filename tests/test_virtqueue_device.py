"""DeviceQueue against a driver written by hand at the spec's byte offsets (tests/vq_helpers).

No DriverQueue here: the available ring and the descriptors are raw bytes, so the device is
checked against the spec's layout, not against the other half of the same code.
"""

from __future__ import annotations

import pytest

from ivshmem_bus.core.virtqueue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Chain,
    DeviceQueue,
    VirtqLayout,
)
from ivshmem_bus.errors import VirtqueueError

from .vq_helpers import BASE, AuditWindow, RawRings

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
DATA = 0x8000  # window offset of the buffer area


def setup(
    n: int = 8, *, event_idx: bool = False, indirect: bool = False, base_idx: int = 0
) -> tuple[bytearray, AuditWindow, RawRings, DeviceQueue]:
    lay = VirtqLayout.packed_at(BASE, n)
    buf = bytearray(DATA + 0x4000)
    assert lay.total_bytes <= DATA
    w = AuditWindow(buf)
    raw = RawRings(buf, BASE, n, lay.desc_addr, lay.avail_addr, lay.used_addr)
    raw.avail_idx = raw.used_idx = base_idx
    dev = DeviceQueue(w, 3, lay, event_idx=event_idx, indirect=indirect, base_idx=base_idx)
    return buf, w, raw, dev


def data(off: int) -> int:
    return BASE + DATA + off


def test_pop_returns_none_on_an_empty_ring() -> None:
    _, _, _, dev = setup()
    assert dev.pop() is None
    assert dev.pending() == 0


def test_pop_resolves_a_chain_into_zero_copy_views() -> None:
    buf, _, raw, dev = setup()
    buf[DATA : DATA + 5] = b"hello"
    buf[DATA + 0x10 : DATA + 0x13] = b"abc"
    raw.put_desc(2, data(0), 5, NEXT, 5)
    raw.put_desc(5, data(0x10), 3, NEXT, 1)
    raw.put_desc(1, data(0x100), 8, WRITE | NEXT, 7)
    raw.put_desc(7, data(0x200), 4, WRITE, 0)
    raw.offer(2)
    assert dev.pending() == 1
    chain = dev.pop()
    assert isinstance(chain, Chain) and chain.head == 2
    assert [bytes(v) for v in chain.readable] == [b"hello", b"abc"]
    assert chain.readable_len == 8 and chain.writable_len == 12
    assert chain.read_all() == b"helloabc"
    assert all(v.readonly for v in chain.readable)
    # zero-copy: the driver's later write shows through the device's view
    buf[DATA] = ord("J")
    assert bytes(chain.readable[0]) == b"Jello"
    # Chain.write fills writable buffers in order and stops at their end
    assert chain.write(b"0123456789ABCDEF") == 12
    assert buf[DATA + 0x100 : DATA + 0x108] == b"01234567"
    assert buf[DATA + 0x200 : DATA + 0x205] == b"89AB\x00"
    assert dev.pop() is None


def test_chain_write_of_less_than_the_buffers_returns_its_length() -> None:
    buf, _, raw, dev = setup()
    raw.put_desc(0, data(0), 4, WRITE | NEXT, 1)
    raw.put_desc(1, data(8), 4, WRITE, 0)
    raw.offer(0)
    chain = dev.pop()
    assert chain is not None and chain.readable == []
    assert chain.write(memoryview(b"xyzzy")) == 5
    assert buf[DATA : DATA + 12] == b"xyzz\x00\x00\x00\x00y\x00\x00\x00"


def test_push_and_publish_write_used_elements_then_idx() -> None:
    _, _, raw, dev = setup()
    for head in (4, 6):
        raw.put_desc(head, data(0), 16, WRITE, 0)
        raw.offer(head)
    a, b = dev.pop(), dev.pop()
    assert a is not None and b is not None
    dev.push(b.head, 9)
    dev.push(a.head, 16)
    assert raw.used_idx == 0  # not visible before publish
    assert raw.used_elem(0) == (6, 9) and raw.used_elem(1) == (4, 16)
    assert dev.publish() is True  # avail.flags 0: the driver wants EVENT_USED
    assert raw.used_idx == 2
    assert dev.publish() is False  # nothing new


def test_publish_orders_elements_fence_idx_fence_then_the_drivers_flags() -> None:
    _, w, raw, dev = setup()
    raw.put_desc(0, data(0), 4, 0, 0)
    raw.offer(0)
    w.reset_steps()
    chain = dev.pop()
    assert chain is not None
    # pop: one 16-bit load of avail.idx, then a fence, then the descriptor's view
    assert [op for op, _, _ in w.log] == ["load16", "fence", "view"]
    assert w.log[0][1] == raw.avail + 2
    dev.push(0, 0)
    w.reset_steps()
    dev.publish()
    assert w.log == [
        ("fence", 0, 0),
        ("store16", raw.used + 2, 2),  # used.idx, one 16-bit store
        ("fence", 0, 0),  # StoreLoad before the suppression word
        ("load16", raw.avail, 2),  # avail.flags
    ]


def test_publish_honours_no_interrupt_without_event_idx() -> None:
    _, _, raw, dev = setup()
    raw.put_desc(0, data(0), 4, 0, 0)
    raw.offer(0)
    raw.avail_flags = 1  # VIRTQ_AVAIL_F_NO_INTERRUPT
    raw.used_event = 0  # ignored without EVENT_IDX
    assert dev.pop() is not None
    dev.push(0, 0)
    assert dev.publish() is False
    assert raw.used_idx == 1


@pytest.mark.parametrize(
    ("used_event", "batch", "want"),
    [
        (0, 1, True),  # used.idx 0 -> 1 passes entry 0
        (1, 1, False),  # entry 1 not written yet
        (1, 2, True),  # 0 -> 2 passes entry 1
        (2, 2, False),
        (65535, 2, False),  # behind: only after a lap
    ],
)
def test_publish_with_event_idx_uses_used_event(used_event: int, batch: int, want: bool) -> None:
    _, _, raw, dev = setup(event_idx=True)
    raw.avail_flags = 1  # the low bit is ignored with EVENT_IDX
    raw.used_event = used_event
    for k in range(batch):
        raw.put_desc(k, data(0), 4, 0, 0)
        raw.offer(k)
    for _ in range(batch):
        chain = dev.pop()
        assert chain is not None
        dev.push(chain.head, 0)
    assert dev.publish() is want


def test_set_notify_without_event_idx_sets_no_notify_and_rechecks() -> None:
    _, w, raw, dev = setup()
    assert dev.set_notify(False) is False
    assert raw.used_flags == 1  # VIRTQ_USED_F_NO_NOTIFY
    raw.put_desc(0, data(0), 4, 0, 0)
    raw.offer(0)  # the driver saw NO_NOTIFY and did not kick
    w.reset_steps()
    assert dev.set_notify(True) is True  # re-check after the fence: a chain is waiting
    assert raw.used_flags == 0
    assert [op for op, _, _ in w.log] == ["store16", "fence", "load16"]
    assert dev.pop() is not None
    assert dev.set_notify(True) is False


def test_with_event_idx_pop_arms_avail_event_before_saying_empty() -> None:
    _, w, raw, dev = setup(event_idx=True)
    raw.avail_event = 0x1234
    w.reset_steps()
    assert dev.pop() is None
    assert raw.avail_event == 0  # the next index the device wants a kick for
    assert [op for op, _, _ in w.log] == ["load16", "store16", "fence", "load16"]
    for k in range(3):
        raw.put_desc(k, data(0), 4, 0, 0)
        raw.offer(k)
    assert [dev.pop() is not None for _ in range(3)] == [True] * 3
    assert dev.pop() is None
    assert raw.avail_event == 3
    w.reset_steps()
    assert dev.pop() is None  # already armed at 3: one load, no store
    assert [op for op, _, _ in w.log] == ["load16"]


def test_event_idx_pop_sees_a_chain_added_while_arming() -> None:
    """The re-read after the fence catches a chain the driver published before it saw
    the new avail_event (so it did not kick)."""
    _, w, raw, dev = setup(event_idx=True)
    raw.put_desc(0, data(0), 4, 0, 0)

    def driver_races() -> None:
        if raw.avail_idx == 0:
            raw.offer(0)

    w.on_fence = driver_races
    chain = dev.pop()
    assert chain is not None and chain.head == 0


def test_set_notify_with_event_idx_writes_avail_event_not_flags() -> None:
    _, _, raw, dev = setup(event_idx=True)
    assert dev.set_notify(False) is False
    assert raw.used_flags == 0  # flags stay 0 with EVENT_IDX
    assert raw.avail_event == 0xFFFF  # just behind the next index: as far as can be
    assert dev.pop() is None  # notifications disabled: no store
    assert raw.avail_event == 0xFFFF
    raw.put_desc(0, data(0), 4, 0, 0)
    raw.offer(0)
    raw.offer(0)
    assert dev.set_notify(True) is True
    assert raw.avail_event == 0


def test_indirect_table_after_direct_descriptors() -> None:
    buf, _, raw, dev = setup(indirect=True)
    table = data(0x1000)
    buf[DATA : DATA + 3] = b"hdr"
    buf[DATA + 0x20 : DATA + 0x24] = b"body"
    raw.put_desc(0, data(0), 3, NEXT, 1)
    # the WRITE flag on the descriptor that refers to a table is ignored (spec)
    raw.put_desc(1, table, 48, INDIRECT | WRITE, 0)
    raw.put_table(table, 0, data(0x20), 4, NEXT, 2)
    raw.put_table(table, 2, data(0x40), 6, WRITE | NEXT, 1)
    raw.put_table(table, 1, data(0x80), 2, WRITE, 0)
    raw.offer(0)
    chain = dev.pop()
    assert chain is not None
    assert chain.read_all() == b"hdrbody"
    assert [len(v) for v in chain.writable] == [6, 2]
    assert chain.write(b"ABCDEFGH") == 8
    assert buf[DATA + 0x40 : DATA + 0x46] == b"ABCDEF" and buf[DATA + 0x80 : DATA + 0x82] == b"GH"


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_indexes_wrap_at_65536_and_slots_are_idx_mod_size(n: int) -> None:
    base = 65536 - n - 1
    _, _, raw, dev = setup(n, base_idx=base)
    seen = []
    for lap in range(3):
        for k in range(n):
            raw.put_desc(k, data(16 * k), 4, WRITE, 0)
            idx = raw.avail_idx
            raw.offer(k)
            assert raw.avail_entry(idx % n) == k
        for _ in range(n):
            chain = dev.pop()
            assert chain is not None
            seen.append(chain.head)
            dev.push(chain.head, lap)
        dev.publish()
        assert raw.used_idx == (base + (lap + 1) * n) & 0xFFFF
        for k in range(n):
            at = (base + lap * n + k) & 0xFFFF
            assert raw.used_elem(at % n) == (k, lap)
    assert seen == list(range(n)) * 3


def test_push_refuses_the_callers_mistakes() -> None:
    _, _, raw, dev = setup()
    with pytest.raises(ValueError, match="push without a popped chain"):
        dev.push(0, 0)
    raw.put_desc(0, data(0), 4, 0, 0)
    raw.offer(0)
    assert dev.pop() is not None
    with pytest.raises(ValueError, match="head 8 is out of range"):
        dev.push(8, 0)
    with pytest.raises(ValueError, match="written length 4294967296 is not a u32"):
        dev.push(0, 1 << 32)
    dev.push(0, 0xFFFFFFFF)
    assert dev.in_flight == 0


def test_a_zero_length_descriptor_is_an_empty_view() -> None:
    _, _, raw, dev = setup()
    raw.put_desc(0, data(0x3FFF) + 1, 0, 0, 0)  # exactly at the window's end, 0 bytes
    raw.offer(0)
    chain = dev.pop()
    assert chain is not None and chain.readable_len == 0 and len(chain.readable) == 1


def test_a_chain_of_exactly_the_queue_size_is_accepted() -> None:
    n = 8
    _, _, raw, dev = setup(n)
    for k in range(n):
        raw.put_desc(k, data(k), 1, NEXT if k < n - 1 else 0, k + 1)
    raw.offer(0)
    chain = dev.pop()
    assert chain is not None and len(chain.readable) == n


def test_the_device_refuses_a_layout_outside_its_window() -> None:
    lay = VirtqLayout.packed_at(BASE + 0x1000, 256)  # desc ends at 0x2000: avail is out
    with pytest.raises(
        VirtqueueError,
        match=r"virtqueue 1: available ring \(518 bytes at 0x40002000\) lies outside audit "
        r"window \(8192 bytes at 0x40000000\)",
    ):
        DeviceQueue(AuditWindow(bytearray(0x2000)), 1, lay)


def test_a_broken_queue_keeps_refusing_and_says_why() -> None:
    _, _, raw, dev = setup()
    raw.avail_idx = 9  # a jump of 9 > size 8
    with pytest.raises(VirtqueueError, match=r"virtqueue 3: avail.idx jumped from 0 to 9"):
        dev.pop()
    assert dev.broken
    raw.avail_idx = 1
    for call in (dev.pop, dev.pending, lambda: dev.set_notify(True)):
        with pytest.raises(VirtqueueError, match=r"queue is broken \(avail.idx jumped"):
            call()

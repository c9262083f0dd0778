"""DeviceQueue's direct path (a plain BufferWindow, a one-descriptor chain) against its
general walk: the same chains, the same bytes, the same refusals, for any ring contents.

Every other device test goes through ``AuditWindow``, which is not a BufferWindow and so
always takes the general walk; this file is where the direct slicing is held to it.
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
    VirtqLayout,
)
from ivshmem_bus.core.window import BufferWindow
from ivshmem_bus.errors import VirtqueueError

from .test_virtqueue_hostile import hostile_queue
from .vq_helpers import BASE, AuditWindow, RawRings

NAME = "audit window"  # both windows carry it: error messages name the window


def _outcome(dev: DeviceQueue) -> tuple[str, object]:
    try:
        chain = dev.pop()
    except VirtqueueError as exc:
        return "error", str(exc)
    if chain is None:
        return "empty", None
    return "chain", _describe(chain)


def _describe(chain: Chain) -> tuple[int, list[tuple[bytes, bool]], list[tuple[int, bool]]]:
    return (
        chain.head,
        [(bytes(v), v.readonly) for v in chain.readable],
        [(len(v), v.readonly) for v in chain.writable],
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(q=hostile_queue(), fill=st.integers(0, 255))
def test_direct_path_pops_what_the_general_walk_pops(
    q: tuple[int, bool, bool, bytearray, int], fill: int
) -> None:
    n, event_idx, indirect, buf, _ = q
    lay = VirtqLayout.packed_at(BASE, n)
    general_buf, direct_buf = bytearray(buf), bytearray(buf)
    general = DeviceQueue(AuditWindow(general_buf, name=NAME), 0, lay,
                          event_idx=event_idx, indirect=indirect)  # fmt: skip
    direct = DeviceQueue(BufferWindow(direct_buf, BASE, name=NAME), 0, lay,
                         event_idx=event_idx, indirect=indirect)  # fmt: skip
    for _ in range(n + 1):
        got = _outcome(direct), _outcome(general)
        assert got[0] == got[1]
        if got[0][0] != "chain":
            break
        head = got[0][1][0]  # type: ignore[index]
        written = sum(length for length, _ in got[0][1][2])  # type: ignore[index]
        for dev in (direct, general):
            dev.push(head, min(written, 0xFFFFFFFF))
            dev.publish()
    assert direct.broken == general.broken
    assert direct_buf == general_buf  # the same used elements, flags and indexes written


def _one_queue(window_cls: type[BufferWindow]) -> tuple[BufferWindow, RawRings, DeviceQueue]:
    buf = bytearray(0x2000)
    lay = VirtqLayout.packed_at(BASE, 4)
    w = window_cls(buf, BASE, name=NAME)
    raw = RawRings(buf, BASE, 4, lay.desc_addr, lay.avail_addr, lay.used_addr)
    return w, raw, DeviceQueue(w, 3, lay)


def test_direct_chain_views_alias_the_window_and_push_writes_the_spec_element():
    w, raw, dev = _one_queue(BufferWindow)
    raw.put_desc(2, BASE + 0x1000, 8, VIRTQ_DESC_F_WRITE, 0)
    raw.put_desc(1, BASE + 0x1100, 4, 0, 0)
    raw.put_avail_entry(0, 2)
    raw.put_avail_entry(1, 1)
    raw.avail_idx = 2
    w.view(BASE + 0x1100, 4)[:] = b"abcd"
    first, second = dev.pop(), dev.pop()
    assert first is not None and second is not None
    assert (first.head, first.readable, len(first.writable[0])) == (2, [], 8)
    first.writable[0][:] = b"12345678"
    assert bytes(w.view(BASE + 0x1000, 8)) == b"12345678"  # zero-copy into the window
    assert second.head == 1 and bytes(second.readable[0]) == b"abcd"
    assert second.readable[0].readonly
    dev.push(2, 8)
    dev.push(1, 0)
    assert dev.publish()
    assert raw.used_idx == 2
    assert raw.used_elem(0) == (2, 8) and raw.used_elem(1) == (1, 0)


def test_direct_chain_ending_at_the_window_end_is_taken_one_byte_more_breaks_the_queue():
    _, raw, dev = _one_queue(BufferWindow)
    raw.put_desc(0, BASE + 0x1FF0, 16, 0, 0)  # the window's last 16 bytes
    raw.put_desc(1, BASE + 0x1FF0, 17, 0, 0)  # one byte past the end
    raw.put_avail_entry(0, 0)
    raw.put_avail_entry(1, 1)
    raw.avail_idx = 2
    chain = dev.pop()
    assert chain is not None and len(chain.readable[0]) == 16
    with pytest.raises(VirtqueueError, match=r"descriptor 1 addr=0x\w+ len=17 lies outside"):
        dev.pop()
    assert dev.broken


def test_direct_chain_below_the_window_base_breaks_the_queue():
    _, raw, dev = _one_queue(BufferWindow)
    raw.put_desc(0, BASE - 1, 1, VIRTQ_DESC_F_WRITE, 0)
    raw.avail_idx = 1
    with pytest.raises(VirtqueueError, match=r"descriptor 0 addr=0x\w+ len=1 lies outside"):
        dev.pop()
    assert dev.broken


def test_a_window_that_overrides_view_sees_every_buffer_through_it():
    class Counting(BufferWindow):
        calls: list[tuple[int, int]]

        def view(self, addr: int, length: int) -> memoryview:
            self.calls.append((addr, length))
            return super().view(addr, length)

    Counting.calls = []
    w, raw, dev = _one_queue(Counting)
    Counting.calls.clear()
    raw.put_desc(0, BASE + 0x1000, 16, 0, 0)
    raw.put_desc(1, BASE + 0x1010, 16, VIRTQ_DESC_F_NEXT, 2)
    raw.put_desc(2, BASE + 0x1020, 16, VIRTQ_DESC_F_WRITE, 0)
    raw.put_avail_entry(0, 0)
    raw.put_avail_entry(1, 1)
    raw.avail_idx = 2
    assert dev.pop() is not None and dev.pop() is not None
    assert w.calls == [(BASE + 0x1000, 16), (BASE + 0x1010, 16), (BASE + 0x1020, 16)]


def test_push_refuses_a_length_that_is_not_a_u32():
    _, raw, dev = _one_queue(BufferWindow)
    raw.put_desc(0, BASE + 0x1000, 16, VIRTQ_DESC_F_WRITE, 0)
    raw.avail_idx = 1
    chain = dev.pop()
    assert chain is not None
    for bad in (-1, 1 << 32):
        with pytest.raises(ValueError, match=f"written length {bad} is not a u32"):
            dev.push(chain.head, bad)
    dev.push(chain.head, (1 << 32) - 1)
    assert dev.publish() and raw.used_elem(0) == (0, (1 << 32) - 1)

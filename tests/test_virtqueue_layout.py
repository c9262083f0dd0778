"""Split-virtqueue layout against the virtio 1.x spec's tables (section 2.7), byte for byte.

Golden values are the spec's: area sizes 16N / 6 + 2N / 6 + 8N, alignments 16 / 2 / 4, field
offsets of virtq_desc, virtq_avail and virtq_used, and vring_need_event's formula
``(u16)(new_idx - event_idx - 1) < (u16)(new_idx - old)`` worked by hand.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ivshmem_bus.core.virtqueue import (
    MAX_QUEUE_SIZE,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    DeviceQueue,
    DriverQueue,
    VirtqLayout,
    vring_need_event,
)
from ivshmem_bus.core.window import BufferWindow
from ivshmem_bus.errors import VirtqueueError

BASE = 0x4000_0000
SIZES = [1 << k for k in range(16)]  # 1 .. 32768


def test_constants_are_the_specs() -> None:
    assert (VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT) == (1, 2, 4)
    assert VIRTQ_AVAIL_F_NO_INTERRUPT == 1 and VIRTQ_USED_F_NO_NOTIFY == 1
    assert (VIRTIO_F_INDIRECT_DESC, VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1) == (28, 29, 32)
    assert MAX_QUEUE_SIZE == 32768


@pytest.mark.parametrize("n", SIZES)
def test_area_sizes_follow_the_spec_table(n: int) -> None:
    assert VirtqLayout.area_sizes(n) == (16 * n, 6 + 2 * n, 6 + 8 * n)


@pytest.mark.parametrize(
    ("n", "sizes"),
    [
        (1, (16, 8, 14)),
        (2, (32, 10, 22)),
        (256, (4096, 518, 2054)),
        (1024, (16384, 2054, 8198)),
        (32768, (524288, 65542, 262150)),
    ],
)
def test_area_sizes_worked_by_hand(n: int, sizes: tuple[int, int, int]) -> None:
    assert VirtqLayout.area_sizes(n) == sizes


@pytest.mark.parametrize(
    ("n", "avail", "used", "total"),
    [
        # desc @0 (16N); avail @16N (2-aligned already); used @ the next multiple of 4.
        (1, 16, 24, 38),  # avail ends at 24: used right there; 24 + 14
        (2, 32, 44, 66),  # avail ends at 42 -> 44; 44 + 22
        (4, 64, 80, 118),  # avail ends at 78 -> 80; 80 + 38
        (256, 4096, 4616, 6670),  # avail ends at 4614 -> 4616; 4616 + 2054
    ],
)
def test_packed_at_places_areas_at_minimum_alignment(
    n: int, avail: int, used: int, total: int
) -> None:
    lay = VirtqLayout.packed_at(BASE, n)
    assert (lay.size, lay.desc_addr, lay.avail_addr, lay.used_addr) == (
        n,
        BASE,
        BASE + avail,
        BASE + used,
    )
    assert lay.total_bytes == total


@pytest.mark.parametrize("n", SIZES)
def test_packed_layout_of_every_size_passes_check_in_an_exact_window(n: int) -> None:
    lay = VirtqLayout.packed_at(BASE, n)
    assert lay.used_addr % 4 == 0 and lay.avail_addr % 2 == 0
    window = BufferWindow(bytearray(lay.total_bytes), BASE)
    lay.check(window, MAX_QUEUE_SIZE)  # no exception: every area fits, exactly


def _window(n: int = 16) -> BufferWindow:
    return BufferWindow(bytearray(VirtqLayout.packed_at(BASE, n).total_bytes + 64), BASE)


@pytest.mark.parametrize("size", [0, 3, 6, 100, 65536, 1 << 20])
def test_check_refuses_sizes_that_are_not_powers_of_two_up_to_32768(size: int) -> None:
    lay = VirtqLayout(size, BASE, BASE + 0x100, BASE + 0x200)
    with pytest.raises(VirtqueueError, match=rf"virtqueue 5: queue size {size} is not a power"):
        lay.check(_window(), MAX_QUEUE_SIZE, queue=5)


def test_check_refuses_a_size_above_the_devices_max() -> None:
    lay = VirtqLayout.packed_at(BASE, 32)
    with pytest.raises(
        VirtqueueError, match=r"queue size 32 is not a power of two between 1 and 16"
    ):
        lay.check(BufferWindow(bytearray(lay.total_bytes), BASE), 16)


@pytest.mark.parametrize(
    ("field", "delta", "what"),
    [
        ("desc_addr", 8, "descriptor table address 0x40000008 is not 16-byte aligned"),
        ("avail_addr", 1, "available ring address 0x40000101 is not 2-byte aligned"),
        ("used_addr", 2, "used ring address 0x40000182 is not 4-byte aligned"),
    ],
)
def test_check_refuses_misaligned_areas(field: str, delta: int, what: str) -> None:
    good = {"desc_addr": BASE, "avail_addr": BASE + 0x100, "used_addr": BASE + 0x180}
    good[field] += delta
    lay = VirtqLayout(16, **good)
    with pytest.raises(VirtqueueError, match=what):
        lay.check(BufferWindow(bytearray(0x1000), BASE), MAX_QUEUE_SIZE)


@pytest.mark.parametrize("area", ["descriptor table", "available ring", "used ring"])
def test_check_refuses_an_area_just_past_the_window(area: str) -> None:
    lay = VirtqLayout.packed_at(BASE, 8)
    total = lay.total_bytes
    # Move exactly one area (keeping its alignment) so that it ends past the window.
    d, a, u = VirtqLayout.area_sizes(8)
    end = BASE + total
    moved = {
        "descriptor table": VirtqLayout(8, (end - d + 1 + 15) & ~15, lay.avail_addr, lay.used_addr),
        "available ring": VirtqLayout(8, lay.desc_addr, end - a + 2, lay.used_addr),
        "used ring": VirtqLayout(8, lay.desc_addr, lay.avail_addr, end - u + 4),
    }[area]
    with pytest.raises(VirtqueueError, match=rf"{area} \(\d+ bytes at 0x[0-9a-f]+\) lies outside"):
        moved.check(BufferWindow(bytearray(total), BASE), MAX_QUEUE_SIZE)


def test_check_refuses_an_area_below_the_window_base() -> None:
    lay = VirtqLayout(4, BASE - 0x100, BASE, BASE + 0x40)
    with pytest.raises(VirtqueueError, match=r"descriptor table .* lies outside"):
        lay.check(BufferWindow(bytearray(0x1000), BASE), MAX_QUEUE_SIZE)


# -- field offsets, as the rings' bytes show them -------------------------------------------


def test_descriptor_and_ring_field_offsets_match_the_spec_structs() -> None:
    n = 4
    lay = VirtqLayout.packed_at(BASE, n)  # desc @0, avail @64, used @80
    buf = bytearray(lay.total_bytes + 0x100)
    w = BufferWindow(buf, BASE)
    drv = DriverQueue(w, 0, lay, event_idx=True)
    dev = DeviceQueue(w, 0, lay, event_idx=True)
    head = drv.add([(0x1122334455667788, 0x99AABBCC)], [(BASE + 0x90, 0x10)], "t")
    assert head == 0  # the free list hands out descriptor 0 first
    drv.publish()
    # virtq_desc 0: addr le64 @0, len le32 @8, flags le16 @12 (NEXT), next le16 @14 (= 1)
    assert buf[0:16] == bytes.fromhex("8877665544332211ccbbaa9901000100")
    # virtq_desc 1: the writable buffer, flags WRITE only
    assert buf[16:32] == (BASE + 0x90).to_bytes(8, "little") + bytes.fromhex("1000000002000000")
    # virtq_avail @64: flags 0 @0, idx 1 @2, ring[0] = head 0 @4
    assert buf[64:70] == bytes.fromhex("000001000000")
    # used_event @ 4 + 2N = 12: 0 (notify after the first used buffer)
    assert buf[64 + 12 : 64 + 14] == b"\x00\x00"
    # The device would fault on the foreign address: give it a real readable buffer instead.
    buf[8:12] = (4).to_bytes(4, "little")
    buf[0:8] = (BASE + 0x80).to_bytes(8, "little")
    chain = dev.pop()
    assert chain is not None and chain.head == 0
    dev.push(0, 7)
    assert dev.publish() is True
    # virtq_used @80: flags @0, idx 1 @2, ring[0] = {id 0 @4, len 7 @8}
    assert buf[80:92] == bytes.fromhex("000001000000000007000000")
    # avail_event @ 4 + 8N = 36: the device's next index after it found the ring empty
    assert dev.pop() is None
    assert buf[80 + 36 : 80 + 38] == (1).to_bytes(2, "little")


# -- vring_need_event ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "new", "old", "want"),
    [
        (0, 1, 0, True),  # (1-0-1)=0 < (1-0)=1: the spec's note, used_event 0 -> the first
        (0, 2, 1, False),  # (2-0-1)=1 < 1 is false: index 0 was passed before old
        (5, 6, 3, True),  # 0 < 3: entry 5 was written in [3, 6)
        (5, 5, 3, False),  # 65535 < 2 is false: entry 5 not yet written
        (5, 8, 6, False),  # 2 < 2 is false: passed before this batch
        (5, 9, 5, True),  # 3 < 4: the first entry of the batch
        (65535, 0, 65534, True),  # (0-65535-1)=0 < (0-65534)=2: across the wrap
        (0, 1, 65535, True),  # 0 < 2: entry 0 of the next lap
        (65535, 5, 0, False),  # 5 < 5 is false: 65535 is behind old
        (7, 7, 7, False),  # nothing moved: 65535 < 0 is false
    ],
)
def test_vring_need_event_worked_by_hand(event: int, new: int, old: int, want: bool) -> None:
    assert vring_need_event(event, new, old) is want


@given(
    old=st.integers(0, 0xFFFF),
    moved=st.integers(0, 32768),
    event=st.integers(0, 0xFFFF),
)
def test_vring_need_event_is_event_in_old_to_new(old: int, moved: int, event: int) -> None:
    """The formula says: the peer's event index lies in [old, new) modulo 65536."""
    new = (old + moved) & 0xFFFF
    passed = {(old + k) & 0xFFFF for k in range(moved)}
    assert vring_need_event(event, new, old) is (event in passed)


def test_the_virtqueue_core_imports_nothing_of_the_io_edge() -> None:
    """Sans-I/O: in a fresh interpreter, importing it loads only the core and the stdlib."""
    code = (
        "import sys, json\nimport ivshmem_bus.core.virtqueue\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    io = {
        *("backends", "bus", "transport", "aio", "device", "fake", "client", "vfio"),
        *("vfio_device", "pci", "regs", "_ffi", "native", "server", "cli", "monitor", "demo"),
        *("memory", "contrib"),
    }  # the I/O layers, before and after the package's move into folders
    ours = {m.split(".")[1] for m in loaded if m.startswith("ivshmem_bus.")}
    assert not ours & io, ours & io
    edge = {"cffi", "mmap", "select", "selectors", "socket", "fcntl", "asyncio", "pyudev"}
    assert not loaded & edge, loaded & edge


def test_release_drops_the_ring_views_so_the_buffer_can_be_resized() -> None:
    lay = VirtqLayout.packed_at(0, 4)
    buf = bytearray(lay.total_bytes)
    w = BufferWindow(buf, 0)
    drv, dev = DriverQueue(w, 0, lay), DeviceQueue(w, 0, lay)
    drv.release()
    dev.release()
    dev.release()  # idempotent
    w.release()
    buf.extend(b"x")  # no view of it is left anywhere (a BufferError otherwise)
    with pytest.raises(VirtqueueError, match=r"queue is broken \(released\)"):
        dev.pop()
    with pytest.raises(VirtqueueError, match=r"queue is broken \(released\)"):
        drv.reap()

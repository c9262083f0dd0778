"""The pool in the doorbell device's BAR2: same addresses on both sides, queues out of reach.

Golden numbers come from the contract, not the module: the two message queues are 4 KiB each
at BAR2 0x0000 and 0x1000 (docs/wire-format.md §3), so the pool starts at 0x2000; split virtqueue
alignments are 16 (descriptors), 2 (available ring), 4 (used ring) (docs/virtqueues.md §1).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from types import SimpleNamespace
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ivshmem_bus import bus
from ivshmem_bus.backends.base import IvshmemDevice
from ivshmem_bus.backends.fake import fake_pair
from ivshmem_bus.core.window import MemoryWindow
from ivshmem_bus.errors import PoolExhausted, WindowError
from ivshmem_bus.memory import open_window
from ivshmem_bus.memory.pool import (
    ALIGN_AVAIL,
    ALIGN_DESC,
    ALIGN_QUEUE,
    ALIGN_USED,
    POOL_OFFSET,
    PoolAllocator,
    PoolWindow,
    QueueAreas,
    split_queue_sizes,
)
from ivshmem_bus.native import ffi


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def stub_device(size: int, name: str = "stub ivshmem") -> IvshmemDevice:
    """Only what PoolWindow uses of a device: ``shmem`` and ``name``."""
    return cast(IvshmemDevice, SimpleNamespace(shmem=memoryview(bytearray(size)), name=name))


def test_constants_match_the_contract() -> None:
    assert POOL_OFFSET == 0x2000 == bus.DEVICE_QUEUE_OFFSET + bus.QUEUE_SIZE
    assert (ALIGN_DESC, ALIGN_AVAIL, ALIGN_USED, ALIGN_QUEUE) == (16, 2, 4, 4096)


def test_driver_writes_and_the_device_reads_the_same_bytes_at_the_same_addresses() -> None:
    before = open_fds()
    a, b = fake_pair(shm_size=1 << 16)
    with (
        a,
        b,
        open_window("pool", device=a, role="driver") as drv,
        open_window("pool", device=b, role="device") as devw,
    ):
        assert isinstance(drv, MemoryWindow) and isinstance(devw, MemoryWindow)
        assert (drv.base, drv.size) == (devw.base, devw.size) == (0x2000, (1 << 16) - 0x2000)
        assert drv.name == "pool in fake ivshmem vmid 1 BAR2"
        assert devw.name == "pool in fake ivshmem vmid 2 BAR2"
        assert drv.allocator is not None and devw.allocator is None
        if ffi.HAVE_COMPILED:  # the helper's StoreLoad fence, not the TSO no-op
            assert drv.fence == devw.fence == ffi.full_fence()
        n = 256
        desc = drv.allocator.alloc(16 * n, ALIGN_DESC)
        avail = drv.allocator.alloc(4 + 2 * n + 2, ALIGN_AVAIL)
        used = drv.allocator.alloc(4 + 8 * n + 2, ALIGN_USED)
        buf = drv.allocator.alloc(100, 1)
        assert desc % 16 == 0 and avail % 2 == 0 and used % 4 == 0
        drv.view(desc, 16)[:] = bytes.fromhex("0010000000000000 64000000 0200 0000")
        drv.store16(avail + 2, 0x0001)  # avail.idx
        drv.view(buf, 5)[:] = b"hello"
        # the device side, through its own mapping of BAR2
        assert bytes(devw.view(desc, 16)) == bytes.fromhex("0010000000000000640000000200 0000")
        assert devw.load16(avail + 2) == 1
        assert bytes(devw.view(buf, 5)) == b"hello"
        # address = BAR2 offset: check against the raw BAR2 bytes, not the window
        assert bytes(b.shmem[buf : buf + 5]) == b"hello"
        assert bytes(b.shmem[avail + 2 : avail + 4]) == b"\x01\x00"
        devw.store16(used + 2, 0x0102)
        assert drv.load16(used + 2) == 0x0102
    assert open_fds() == before


@pytest.mark.parametrize(
    ("addr", "length"),
    [(0x0000, 1), (0x0080, 64), (0x1000, 4), (0x1FFF, 1), (0x1FF0, 0x20), (0x1FFE, 2)],
)
def test_the_device_window_refuses_the_message_queues(addr: int, length: int) -> None:
    a, b = fake_pair(shm_size=1 << 16)
    with a, b, PoolWindow(b, role="device") as w:
        queues = bytes(b.shmem[:0x2000])
        with pytest.raises(WindowError, match=rf"pool in fake ivshmem vmid 2 BAR2: {length} "):
            w.view(addr, length)
        if length == 2:
            with pytest.raises(WindowError):
                w.store16(addr, 0xFFFF)
            with pytest.raises(WindowError):
                w.load16(addr)
        assert bytes(b.shmem[:0x2000]) == queues


def test_the_pool_ends_at_the_last_whole_page_and_needs_room() -> None:
    with PoolWindow(stub_device(0x2000 + 0x1800), role="device") as w:
        assert (w.base, w.size) == (0x2000, 0x1000)
        with pytest.raises(WindowError):
            w.view(0x3000, 1)
    with pytest.raises(
        ValueError, match=r"pool in stub ivshmem BAR2: BAR2 is 12287 bytes, no room"
    ):
        PoolWindow(stub_device(0x2FFF), role="driver")


def test_open_window_pool_needs_the_device_and_no_mem_offset() -> None:
    with pytest.raises(ValueError, match="--mem pool needs the doorbell device"):
        open_window("pool")
    dev = stub_device(0x10000)
    with pytest.raises(ValueError, match=r"takes no --mem-offset .*BAR2 offset"):
        open_window("pool", device=dev, mem_offset=0x40000000)
    with pytest.raises(ValueError, match="role must be"):
        open_window("pool", device=dev, role="peer")  # type: ignore[call-overload]


def test_close_is_idempotent_and_frees_the_device_mapping() -> None:
    a, b = fake_pair(shm_size=1 << 16)
    w = PoolWindow(a, role="driver")
    w.close()
    w.close()
    assert w.closed
    with pytest.raises(ValueError):
        w.view(0x2000, 1)
    a.close()  # would log "still in use by a view" if the window had kept one
    b.close()
    assert a.closed


# The allocator ----------------------------------------------------------------------------


def allocator(size: int = 0x10000) -> tuple[PoolWindow, PoolAllocator]:
    w = PoolWindow(stub_device(size), role="driver")
    assert w.allocator is not None
    return w, w.allocator


def test_alloc_is_first_fit_and_free_merges_neighbours() -> None:
    _, pool = allocator(0x6000)  # pool 0x2000..0x6000
    a = pool.alloc(0x1000, 4096)
    b = pool.alloc(0x10, 16)
    c = pool.alloc(0x1000, 4096)
    assert (a, b, c) == (0x2000, 0x3000, 0x4000)
    assert pool.free_extents == [(0x3010, 0x4000), (0x5000, 0x6000)]
    pool.free(b)
    assert pool.free_extents == [(0x3000, 0x4000), (0x5000, 0x6000)]
    assert pool.alloc(0x800, 4096) == 0x3000  # reused, the first fit
    pool.free(0x3000)
    pool.free(a)
    pool.free(c)
    assert pool.free_extents == [(0x2000, 0x6000)]
    assert pool.allocations == {}


def test_exhaustion_and_misuse_are_clear_errors() -> None:
    _, pool = allocator(0x4000)  # 8 KiB of pool
    pool.alloc(0x1800, 16)
    with pytest.raises(PoolExhausted, match=r"no room for 4096 byte\(s\) aligned to 4096 "
                       r"\(largest free extent 2048 bytes\): free buffers"):  # fmt: skip
        pool.alloc(0x1000, 4096)
    with pytest.raises(ValueError, match="power of two"):
        pool.alloc(16, 3)
    with pytest.raises(ValueError, match="positive"):
        pool.alloc(0, 16)
    with pytest.raises(ValueError, match=r"0x2001 is not an allocated address"):
        pool.free(0x2001)
    pool.free(0x2000)
    with pytest.raises(ValueError, match="freed twice"):
        pool.free(0x2000)


def test_alloc_queue_gives_the_split_layout_sizes_at_their_alignments() -> None:
    # virtio 1.x 2.7 with the event fields: 16n, 2 + 2 + 2n + 2, 2 + 2 + 8n + 2
    assert split_queue_sizes(256) == (4096, 518, 2054)
    assert split_queue_sizes(1) == (16, 8, 14)
    assert split_queue_sizes(32768) == (524288, 65542, 262150)
    for bad in (0, 3, 65536, -2):
        with pytest.raises(ValueError, match=r"power of two in 1\.\.32768"):
            split_queue_sizes(bad)
    _, pool = allocator(0x2000 + 3 * 4096)
    q = pool.alloc_queue(256)
    assert q == QueueAreas(256, 0x2000, 0x3000, 0x3208)  # 0x3000 + 518 = 0x3206, up to 4
    assert q.desc % 16 == 0 and q.avail % 2 == 0 and q.used % 4 == 0
    before = pool.free_extents
    with pytest.raises(PoolExhausted):
        pool.alloc_queue(256)  # its descriptor table would fit, the rings not: all or nothing
    assert pool.free_extents == before
    pool.free_queue(q)
    assert pool.free_extents == [(0x2000, 0x5000)]


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("alloc"), st.integers(1, 0x1800), st.sampled_from([1, 2, 4, 16, 64, 4096])
        ),
        st.tuples(st.just("free"), st.integers(0, 1000), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_allocations_are_aligned_disjoint_inside_and_exhaustion_is_honest(
    sequence: list[tuple[str, int, int]],
) -> None:
    w, pool = allocator(0xA000)
    lo, hi = 0x2000, 0xA000
    live: dict[int, tuple[int, int]] = {}  # addr -> (size, pattern byte)
    for n, (op, x, align) in enumerate(sequence):
        if op == "alloc":
            try:
                addr = pool.alloc(x, align)
            except PoolExhausted:
                # no gap between live allocations (the model's, not the allocator's) fits
                edges = sorted((a, a + s) for a, (s, _) in live.items())
                gaps, start = [], lo
                for a, e in edges:
                    gaps.append((start, a))
                    start = e
                gaps.append((start, hi))
                assert all(((g + align - 1) & -align) + x > e for g, e in gaps)
                continue
            assert addr % align == 0 and lo <= addr and addr + x <= hi
            for a, (s, _) in live.items():
                assert addr + x <= a or a + s <= addr, "overlap"
            pattern = n % 251 + 1
            w.view(addr, x)[:] = bytes([pattern]) * x
            live[addr] = (x, pattern)
        elif live:
            addr = sorted(live)[x % len(live)]
            size, pattern = live.pop(addr)
            assert bytes(w.view(addr, size)) == bytes([pattern]) * size  # nobody wrote over it
            pool.free(addr)
        # conservation: every byte is either live or in exactly one free extent
        assert pool.free_bytes + sum(s for s, _ in live.values()) == hi - lo
        extents = pool.free_extents
        assert all(e1 < s2 for (_, e1), (s2, _) in itertools.pairwise(extents))
    for addr in list(live):
        pool.free(addr)
    assert pool.free_extents == [(lo, hi)]


def test_the_core_does_not_import_the_windows_that_map() -> None:
    """core.window is sans-I/O; memory/ is the edge above it, never below."""
    code = "import sys, json, ivshmem_bus.core.window; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert not {m for m in loaded if m.startswith("ivshmem_bus.memory")}
    assert not loaded & {"mmap", "cffi", "ivshmem_bus.backends", "ivshmem_bus.native"}

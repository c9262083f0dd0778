"""The device framework without a bus: messages in, queues walked in a BufferWindow, outbox out.

The driver side of each queue is the real ``DriverQueue`` over the same window, so what the
device wrote is read back the way a driver reads it; hostile bytes are written by hand.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from ivshmem_bus.core import protocol as p
from ivshmem_bus.core.virtio import (
    ACKNOWLEDGE,
    DRIVER,
    DRIVER_OK,
    FEATURES_OK,
    NEEDS_RESET,
    VIRTIO_F_VERSION_1,
)
from ivshmem_bus.core.virtqueue import VIRTQ_AVAIL_F_NO_INTERRUPT, DriverQueue, VirtqLayout
from ivshmem_bus.core.window import BufferWindow
from ivshmem_bus.devices import ConsoleDevice, RngDevice
from ivshmem_bus.devices.base import MAX_EVENTS, VirtioMsgDevice
from ivshmem_bus.devices.hostio import MemoryIO

BASE = 0x10000
SIZE = 1 << 18
BUFS = BASE + 0x8000  # buffers start here, queues below
READY = ACKNOWLEDGE | DRIVER | FEATURES_OK


def window() -> BufferWindow:
    return BufferWindow(bytearray(SIZE), BASE, name="test window")


def set_queue(dev: VirtioMsgDevice, win: BufferWindow, index: int, size: int) -> DriverQueue:
    layout = VirtqLayout.packed_at(BASE + 0x2000 * index, size)
    dq = DriverQueue(win, index, layout)
    dev.handle(p.SetVqueue(index, size, layout.desc_addr, layout.avail_addr, layout.used_addr))
    return dq


def bring_up(dev: VirtioMsgDevice, win: BufferWindow, sizes=(16,), ok=True) -> list[DriverQueue]:
    dev.handle(p.SetDeviceStatus(ACKNOWLEDGE | DRIVER))
    dev.handle(p.SetFeatures(0, 2, VIRTIO_F_VERSION_1))
    dev.handle(p.SetDeviceStatus(READY))
    queues = [set_queue(dev, win, i, size) for i, size in enumerate(sizes)]
    if ok:
        dev.handle(p.SetDeviceStatus(READY | DRIVER_OK))
    return queues


def kick(dev: VirtioMsgDevice, dq: DriverQueue) -> None:
    dq.publish()
    dev.handle(p.EventAvail(dq.index, 0))


def run(dev: VirtioMsgDevice, rounds: int = 100) -> None:
    for _ in range(rounds):
        if not dev.process():
            return
    raise AssertionError("the device still has work after 100 batches")


# --- rng ------------------------------------------------------------------------------------


def test_rng_fills_buffers_from_the_source_in_order(tmp_path):
    data = bytes(range(256)) * 40
    (tmp_path / "src").write_bytes(data)
    win = window()
    dev = RngDevice(source=tmp_path / "src", window=win)
    (dq,) = bring_up(dev, win)
    lengths = [100, 1, 4000, 3000]
    addr = BUFS
    for i, n in enumerate(lengths):
        dq.add((), ((addr, n),), i)
        addr += n
    kick(dev, dq)
    run(dev)
    assert list(dev.outbox) == [p.EventUsed(0)]
    assert dq.reap() == [(i, n) for i, n in enumerate(lengths)]
    assert bytes(win.view(BUFS, sum(lengths))) == data[: sum(lengths)]
    # the file has 10240 bytes: the next request gets the 3139 left, then nothing
    dq.add((), ((BUFS, 4096),), "a")
    dq.add((), ((BUFS + 4096, 4096),), "b")
    kick(dev, dq)
    run(dev)
    assert dq.reap() == [("a", 3139), ("b", 0)]
    assert bytes(win.view(BUFS, 3139)) == data[7101:]
    dev.close()


def test_no_interrupt_suppresses_event_used():
    win = window()
    dev = RngDevice(window=win)
    (dq,) = bring_up(dev, win)
    dq.set_interrupts(False)
    assert win.load16(dq.layout.avail_addr) == VIRTQ_AVAIL_F_NO_INTERRUPT
    dq.add((), ((BUFS, 64),), 0)
    kick(dev, dq)
    run(dev)
    assert list(dev.outbox) == []
    assert dq.reap() == [(0, 64)]
    dev.close()


def test_nothing_is_consumed_before_driver_ok_and_everything_after():
    win = window()
    dev = RngDevice(window=win)
    (dq,) = bring_up(dev, win, ok=False)
    dq.add((), ((BUFS, 32),), 0)
    kick(dev, dq)
    assert dev.process() is False
    assert dq.reap() == [] and not dev.outbox
    dev.handle(p.SetDeviceStatus(READY | DRIVER_OK))
    run(dev)
    assert dq.reap() == [(0, 32)]
    dev.close()


def test_driver_ok_before_any_queue_is_accepted_and_the_unset_queue_is_ignored():
    win = window()
    dev = RngDevice(window=win)
    bring_up(dev, win, sizes=())
    assert dev.handle(p.GetDeviceStatus()) == p.GetDeviceStatusResponse(READY | DRIVER_OK)
    assert dev.handle(p.EventAvail(0, 0)) is None
    assert dev.events == [p.EventAvail(0, 0)]  # nothing to wake: kept as an unused event
    assert dev.process() is False
    assert dev.handle(p.GetDeviceStatus()).status == READY | DRIVER_OK  # no NEEDS_RESET


# --- SET_VQUEUE checks, RESET_VQUEUE, status 0 ------------------------------------------------


def test_set_vqueue_refuses_bad_sizes_and_layouts():
    win = window()
    dev = RngDevice(window=win)
    bring_up(dev, win, sizes=(), ok=False)
    good = VirtqLayout.packed_at(BASE, 16)
    bad = [
        (24, good.desc_addr, good.avail_addr, good.used_addr),  # not a power of two
        (2048, BASE, BASE + 0x8000, BASE + 0x9000),  # above max_size 1024
        (16, BASE + 8, good.avail_addr, good.used_addr),  # descriptors not 16-aligned
        (16, good.desc_addr, good.avail_addr + 1, good.used_addr),  # avail not 2-aligned
        (16, good.desc_addr, good.avail_addr, good.used_addr + 2),  # used not 4-aligned
        (16, BASE - 0x1000, good.avail_addr, good.used_addr),  # below the window
        (16, good.desc_addr, good.avail_addr, BASE + SIZE - 8),  # runs past the end
        (0, 0, 0, 0),
    ]
    for n, (size, d, a, u) in enumerate(bad, 1):
        dev.handle(p.SetVqueue(0, size, d, a, u))
        assert dev.handle(p.GetVqueue(0)) == p.GetVqueueResponse(0, 1024), (size, d, a, u)
        assert dev.refused == n
    dev.handle(p.SetVqueue(0, 16, good.desc_addr, good.avail_addr, good.used_addr))
    assert dev.handle(p.GetVqueue(0)).size == 16


def test_reset_vqueue_and_status_0_drop_the_queue_state():
    win = window()
    dev = RngDevice(window=win)
    (dq,) = bring_up(dev, win)
    assert dev.handle(p.ResetVqueue(0)) is None  # qemu-v0: no reply
    assert dev.handle(p.GetVqueue(0)) == p.GetVqueueResponse(0, 1024)
    dq.add((), ((BUFS, 16),), 0)
    kick(dev, dq)
    assert dev.process() is False and dq.reap() == []  # the queue is gone: nothing used
    dq = set_queue(dev, win, 0, 16)  # set again after DRIVER_OK: used at once
    dq.add((), ((BUFS, 16),), 1)
    kick(dev, dq)
    run(dev)
    assert dq.reap() == [(1, 16)]
    dev.handle(p.SetDeviceStatus(0))
    assert dev.status == 0 and dev.queues[0].queue is None
    assert dev.handle(p.GetVqueue(0)) == p.GetVqueueResponse(0, 1024)


# --- a broken queue ---------------------------------------------------------------------------


def test_a_hostile_descriptor_sets_needs_reset_and_the_other_queue_keeps_working():
    win = window()
    io = MemoryIO()
    dev = ConsoleDevice(io, window=win)
    rx, tx = bring_up(dev, win, sizes=(16, 16))
    io.feed(b"x")
    rx.add((), ((BUFS, 64),), 0)
    rx.publish()
    # the driver rewrites descriptor 0: an address far outside the window
    struct.pack_into("<QIHH", win.view(rx.layout.desc_addr, 16), 0, 1 << 40, 64, 2, 0)
    dev.handle(p.EventAvail(0, 0))
    run(dev)
    status = READY | DRIVER_OK | NEEDS_RESET
    assert list(dev.outbox) == [p.EventConfig(status, dev.generation, 0, 0)]
    assert dev.handle(p.GetDeviceStatus()) == p.GetDeviceStatusResponse(status)
    assert dev.queues[0].queue.broken
    win.view(BUFS + 0x100, 5)[:] = b"hello"
    tx.add(((BUFS + 0x100, 5),), (), "t")
    kick(dev, tx)
    run(dev)
    assert tx.reap() == [("t", 0)]
    assert io.take() == b"hello"
    # the driver's later status writes keep NEEDS_RESET; only a reset clears it
    assert dev.handle(p.SetDeviceStatus(READY | DRIVER_OK)).status == status
    assert dev.handle(p.SetDeviceStatus(0)).status == 0


@settings(max_examples=200, deadline=None)
@given(
    descs=st.lists(
        st.tuples(
            st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.integers(0, 0xFFFF),
            st.integers(0, 0xFFFF),
        ),
        min_size=8, max_size=8,
    ),
    ring=st.lists(st.integers(0, 0xFFFF), min_size=8, max_size=8),
    avail_idx=st.integers(0, 0xFFFF),
)  # fmt: skip
def test_any_descriptor_table_leaves_the_device_answering(descs, ring, avail_idx):
    win = window()
    dev = RngDevice(window=win)
    (dq,) = bring_up(dev, win, sizes=(8,))
    table = win.view(dq.layout.desc_addr, 16 * 8)
    for i, d in enumerate(descs):
        struct.pack_into("<QIHH", table, 16 * i, *d)
    for i, head in enumerate(ring):
        win.store16(dq.layout.avail_addr + 4 + 2 * i, head)
    win.store16(dq.layout.avail_addr + 2, avail_idx)
    dev.handle(p.EventAvail(0, 0))
    run(dev)
    status = dev.handle(p.GetDeviceStatus()).status
    assert status & ~NEEDS_RESET == READY | DRIVER_OK
    assert bool(status & NEEDS_RESET) == dev.queues[0].queue.broken


# --- config -----------------------------------------------------------------------------------


def test_console_config_generation_and_event_config():
    io = MemoryIO()
    dev = ConsoleDevice(io, cols=80, rows=25)
    assert dev.handle(p.GetConfig(0, 4)) == p.GetConfigResponse(0, 0, 4, struct.pack("<HH", 80, 25))
    assert dev.handle(p.GetConfig(4, 4)).data == (1).to_bytes(4, "little")  # max_nr_ports
    dev.resize(100, 30)  # no driver yet: no event, but a new generation
    assert not dev.outbox and dev.generation == 1
    dev.handle(p.SetDeviceStatus(ACKNOWLEDGE | DRIVER))
    dev.resize(132, 43)
    value = struct.pack("<HH", 132, 43)
    assert list(dev.outbox) == [p.EventConfig(ACKNOWLEDGE | DRIVER, 2, 0, 4, value)]
    assert dev.handle(p.GetConfig(0, 4)) == p.GetConfigResponse(2, 0, 4, value)


def test_events_are_bounded():
    dev = RngDevice()
    for i in range(10 * MAX_EVENTS):
        dev.handle(p.EventAvail(7, i))
    assert len(dev.events) <= MAX_EVENTS
    assert dev.events[-1] == p.EventAvail(7, 10 * MAX_EVENTS - 1)


# --- batches and back-pressure ------------------------------------------------------------------


def test_one_process_call_takes_at_most_one_batch():
    win = window()
    dev = RngDevice(window=win)
    (dq,) = bring_up(dev, win, sizes=(256,))
    for i in range(200):
        dq.add((), ((BUFS + 16 * i, 16),), i)
    kick(dev, dq)
    assert dev.process() is True  # work remains after one batch
    first = len(dq.reap())
    assert 1 <= first <= dev.batch_chains
    run(dev)
    assert first + len(dq.reap()) == 200


def test_console_bytes_wait_for_receive_buffers_none_lost_none_reordered():
    win = window()
    io = MemoryIO()
    dev = ConsoleDevice(io, window=win)
    rx, _ = bring_up(dev, win, sizes=(16, 16))
    data = bytes(range(251)) * 40  # 10040 bytes, fed as the bounded queue takes them
    out = bytearray()
    fed = 0
    for _ in range(10_000):
        fed += io.feed(data[fed : fed + 4096])
        for buf in range(2):  # two 8-byte receive buffers at a time
            rx.add((), ((BUFS + 8 * buf, 8),), buf)
        kick(dev, rx)
        run(dev)
        for buf, n in rx.reap():
            out += win.view(BUFS + 8 * buf, n)
        if len(out) == len(data):
            break
    assert bytes(out) == data


def test_answers_per_profile_for_reset_vqueue_device_info_and_ping():
    qemu, spec, linux = (RngDevice(profile=name) for name in ("qemu-v0", "spec-v1", "linux-v0"))
    assert qemu.handle(p.ResetVqueue(0)) is None  # QEMU's device never replies
    assert spec.handle(p.ResetVqueue(0)) == p.ResetVqueueResponse()
    assert linux.handle(p.ResetVqueue(0)) == p.ResetVqueueResponse(0)
    assert linux.handle(p.ResetVqueue(5)) == p.ResetVqueueResponse(5)  # echoed, even unknown
    assert qemu.handle(p.DeviceInfo()).max_virtqueues == 0  # qemu-v0 cannot carry it
    assert spec.handle(p.DeviceInfo()).max_virtqueues == 1
    assert linux.handle(p.DeviceInfo()).max_virtqueues == 1
    assert spec.handle(p.BusPing(77)) == p.BusPingResponse(77)
    assert linux.handle(p.BusPing(78)) == p.BusPingResponse(78)


def test_unsent_event_used_is_merged_per_queue():
    win = window()
    dev = RngDevice(window=win)
    (dq,) = bring_up(dev, win)
    for i in range(3):  # three rounds, nothing sent in between (the driver's queue is full)
        dq.add((), ((BUFS + 16 * i, 16),), i)
        kick(dev, dq)
        run(dev)
    assert list(dev.outbox) == [p.EventUsed(0)]
    assert dq.reap() == [(0, 16), (1, 16), (2, 16)]

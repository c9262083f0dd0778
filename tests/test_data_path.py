"""The data path end to end: a Python driver here, a Python device in a forked child.

The two processes share only BAR2 (the bus queues and the pool above them) and doorbells, as
two VMs do. Bytes are checked against what the other side was given: the rng device serves a
``--source`` file, the console's host side is a pair of pipes.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from ivshmem_bus.backends.base import IvshmemDevice
from ivshmem_bus.backends.fake import fake_pair
from ivshmem_bus.backends.server_client import ServerClientDevice
from ivshmem_bus.bus import VirtioMsgBus, reset_queues_of
from ivshmem_bus.core import protocol as p
from ivshmem_bus.core.virtio import DRIVER_OK, NEEDS_RESET
from ivshmem_bus.core.virtqueue import VIRTIO_F_EVENT_IDX, Chain
from ivshmem_bus.demo import served_device
from ivshmem_bus.devices import ConsoleDevice, RngDevice, VirtioMsgDevice
from ivshmem_bus.devices.hostio import FdIO
from ivshmem_bus.drivers import ConsoleDriver, RngDriver, VirtioMsgDriver
from ivshmem_bus.drivers.queue import DriverVirtqueue, allocator_for
from ivshmem_bus.errors import DriverError
from ivshmem_bus.memory import open_window
from ivshmem_bus.server import IvshmemServer

EVENT_IDX = 1 << VIRTIO_F_EVENT_IDX


@contextmanager
def linked(
    a: IvshmemDevice, b: IvshmemDevice, make, profile: str = "qemu-v0"
) -> Iterator[tuple[VirtioMsgDriver, object]]:
    """``make()`` served on ``b`` in a child; (driver, pool window) on ``a`` here."""
    b_vmid = b.vmid
    reset_queues_of(a)
    with served_device(b, a.vmid, profile, make=make, others=(a,)):
        b.close()
        with (
            VirtioMsgBus(a, "driver", b_vmid, profile) as bus,
            open_window("pool", device=a, role="driver") as window,
        ):
            yield VirtioMsgDriver(bus, timeout=5), window


@pytest.fixture
def source(tmp_path):
    data = os.urandom(1 << 20)
    path = tmp_path / "source"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("profile", p.PROFILES)
def test_rng_driver_reads_the_sources_first_bytes_over_the_fake_pair(source, profile):
    path, data = source
    a, b = fake_pair(shm_size=4 << 20)
    try:
        with linked(a, b, lambda: RngDevice(source=path), profile) as (driver, window):
            rng = RngDriver(driver, window, buffers=4, buffer_size=16384)
            assert rng.read_entropy(1000) == data[:1000]
            assert rng.read_entropy((1 << 20) - 1000) == data[1000:]  # continues in order
            with pytest.raises(DriverError, match="entropy source is exhausted"):
                rng.read_entropy(1)
            rng.close()
    finally:
        a.close()
        b.close()


def test_rng_with_event_idx_negotiated(source):
    path, data = source
    a, b = fake_pair(shm_size=4 << 20)
    try:
        make = lambda: RngDevice(source=path, ring_features=EVENT_IDX)  # noqa: E731
        with linked(a, b, make) as (driver, window):
            rng = RngDriver(driver, window, buffers=3, buffer_size=4096, event_idx=True)
            assert driver.features & EVENT_IDX
            assert rng.read_entropy(1 << 20) == data
            rng.close()
    finally:
        a.close()
        b.close()


def test_rng_over_the_server_client_backend(tmp_path, source):
    path, data = source
    sock = str(tmp_path / "s.sock")
    with IvshmemServer(sock, shm_size=4 << 20, vectors=2).start():
        a = ServerClientDevice(sock, vectors=2)
        b = ServerClientDevice(sock, vectors=2)
        try:
            with linked(a, b, lambda: RngDevice(source=path)) as (driver, window):
                rng = RngDriver(driver, window)
                assert rng.read_entropy(300_000) == data[:300_000]
                rng.close()
        finally:
            a.close()
            b.close()


def test_urandom_entropy_is_not_the_same_twice():
    a, b = fake_pair()
    try:
        with linked(a, b, RngDevice) as (driver, window):
            rng = RngDriver(driver, window)
            one, two = rng.read_entropy(64), rng.read_entropy(64)
            assert len(one) == len(two) == 64 and one != two
            rng.close()
    finally:
        a.close()
        b.close()


def _pump(fd: int, data: bytes) -> threading.Thread:
    def run() -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.close(fd)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _drain(fd: int, n: int, out: bytearray) -> threading.Thread:
    def run() -> None:
        while len(out) < n:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            out.extend(chunk)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event-idx"])
def test_console_bytes_both_ways_no_loss_no_reordering_with_few_buffers(event_idx):
    to_dev_r, to_dev_w = os.pipe()  # host -> device's stdin
    from_dev_r, from_dev_w = os.pipe()  # device's stdout -> host
    host_in = bytes(range(256)) * 600  # 153600 bytes each way
    driver_out = bytes(reversed(range(256))) * 600
    a, b = fake_pair(shm_size=1 << 20)
    try:

        def make() -> ConsoleDevice:
            return ConsoleDevice(FdIO(to_dev_r, from_dev_w), ring_features=EVENT_IDX)

        with linked(a, b, make) as (driver, window):
            os.close(to_dev_r)
            os.close(from_dev_w)
            console = ConsoleDriver(
                driver, window, rx_buffers=2, tx_buffers=2, buffer_size=64, queue_size=4,
                event_idx=event_idx,
            )  # fmt: skip
            assert bool(console.features & EVENT_IDX) == event_idx
            assert console.size() == (80, 25)
            host_got = bytearray()
            feeder = _pump(to_dev_w, host_in)
            reader = _drain(from_dev_r, len(driver_out), host_got)
            got = bytearray()
            sent = 0
            deadline = time.monotonic() + 60
            while (
                len(got) < len(host_in) or sent < len(driver_out)
            ) and time.monotonic() < deadline:
                if sent < len(driver_out):
                    console.write(driver_out[sent : sent + 1000])
                    sent += 1000
                got += console.read(0.01)
            console.drain()
            reader.join(10)
            feeder.join(10)
            assert bytes(got) == host_in
            assert bytes(host_got) == driver_out
            console.close()
    finally:
        os.close(from_dev_r)
        a.close()
        b.close()


class SlowDevice(VirtioMsgDevice):
    """One queue whose every chain takes 2 ms: a long job for a 200-chain batch."""

    device_id = 4

    def __init__(self) -> None:
        super().__init__()
        self.handlers[0] = self._slow

    def _slow(self, chain: Chain) -> int:
        time.sleep(0.002)
        return chain.write(b"s")


def _queue(driver: VirtioMsgDriver, window, size: int = 256, buffers: int = 200):
    driver.negotiate()
    q = DriverVirtqueue(driver, 0, size, window, allocator_for(window), buffers=buffers,
                        buffer_size=16)  # fmt: skip
    driver.driver_ok()
    return q


def test_a_long_queue_job_still_lets_a_request_be_answered_while_it_runs():
    a, b = fake_pair()
    try:
        with linked(a, b, SlowDevice) as (driver, window):
            q = _queue(driver, window)
            for buf in range(200):
                q.post_writable(buf)
            q.kick()  # 200 chains x 2 ms: a 400 ms job
            time.sleep(0.02)  # the job has started
            assert driver.get_status() & DRIVER_OK  # answered ...
            used = len(q.reap())
            assert 0 < used < 200  # ... while the job was still running
            deadline = time.monotonic() + 10
            while used < 200 and time.monotonic() < deadline:
                driver.wait_event(0.1)
                used += len(q.reap())
            assert used == 200
            q.close()
    finally:
        a.close()
        b.close()


def test_a_hostile_descriptor_sets_needs_reset_and_the_bus_keeps_answering():
    a, b = fake_pair()
    try:
        with linked(a, b, RngDevice) as (driver, window):
            q = _queue(driver, window, size=8, buffers=1)
            q.post_writable(0)
            desc = window.view(q.layout.desc_addr, 16)
            struct.pack_into("<QIHH", desc, 0, 0x10, 16, 2, 0)  # BAR2 0x10: the bus queues
            desc.release()
            q.kick()
            event = driver.wait_event(5)
            assert isinstance(event, p.EventConfig) and event.status & NEEDS_RESET
            assert driver.device_status & NEEDS_RESET
            assert driver.get_status() & NEEDS_RESET
            assert driver.probe().device_id == 4  # every request is still answered
            driver.set_status(0)
            assert driver.get_status() == 0
            q.close()
    finally:
        a.close()
        b.close()


def test_a_queue_the_device_cannot_reach_is_refused_with_a_clear_error():
    a, b = fake_pair()
    try:
        with linked(a, b, RngDevice) as (driver, _window):
            driver.negotiate()
            with pytest.raises(DriverError, match="refused virtqueue 0"):
                driver.set_vqueue(0, 16, 0x100, 0x200, 0x300)  # inside the message queues
    finally:
        a.close()
        b.close()


class ResizingConsole(ConsoleDevice):
    """A console whose terminal is resized as soon as the driver is ready."""

    def __init__(self) -> None:
        super().__init__(FdIO(os.open(os.devnull, os.O_RDONLY), os.open(os.devnull, os.O_WRONLY)))
        self.on_status = self._resize_on_ready

    def _resize_on_ready(self, old: int, new: int) -> None:
        if new & DRIVER_OK and not old & DRIVER_OK:
            self.resize(132, 43)


@pytest.mark.parametrize("profile", p.PROFILES)
def test_a_config_change_reaches_the_driver_as_event_config(profile):
    a, b = fake_pair()
    try:
        with linked(a, b, ResizingConsole, profile) as (driver, window):
            console = ConsoleDriver(driver, window)
            event = driver.wait_event(5)
            while event is not None and not isinstance(event, p.EventConfig):
                event = driver.wait_event(5)
            assert isinstance(event, p.EventConfig)
            assert (event.offset, event.size) == (0, 4)
            assert event.config_value == struct.pack("<HH", 132, 43)
            assert driver.config_generation == event.generation == 1
            assert console.size() == (132, 43)
            assert driver.read_config(0, 4) == (1, struct.pack("<HH", 132, 43))
            console.close()
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("profile", p.PROFILES)
def test_reset_vqueue_drops_the_queue_and_a_new_one_works(profile, source):
    path, data = source
    a, b = fake_pair()
    try:
        with linked(a, b, lambda: RngDevice(source=path), profile) as (driver, window):
            q = _queue(driver, window, size=8, buffers=2)
            q.post_writable(0)
            q.kick()
            while not (done := q.reap()):
                assert driver.wait_event(5) is not None
            assert done == [(0, 16)] and bytes(q.view(0)) == data[:16]
            driver.reset_vqueue(0)
            assert driver.get_vqueue(0).size == 0  # the device dropped it
            q.close()
            q = DriverVirtqueue(driver, 0, 8, window, allocator_for(window), buffers=1,
                                buffer_size=16)  # fmt: skip
            q.post_writable(0)
            q.kick()
            while not (done := q.reap()):
                assert driver.wait_event(5) is not None
            assert bytes(q.view(0)) == data[16:32]  # the source continues
            q.close()
    finally:
        a.close()
        b.close()


def test_a_driver_that_never_reads_events_does_not_stall_the_device():
    """200 kicks, 200 EVENT_USED owed, and a device->driver queue of 63 slots: the device
    keeps its events back (merged per queue) instead of blocking, and answers requests."""
    a, b = fake_pair()
    try:
        with linked(a, b, RngDevice) as (driver, window):
            q = _queue(driver, window, size=256, buffers=200)
            used = 0
            for buf in range(200):
                q.post_writable(buf)
                q.kick()
                time.sleep(0.001)
                used += len(q.reap())  # never bus.receive: the events stay unread
            deadline = time.monotonic() + 10
            while used < 200 and time.monotonic() < deadline:
                used += len(q.reap())
            assert used == 200
            assert driver.get_status() & DRIVER_OK  # the device still answers
            events = 0
            while driver.wait_event(0.2) is not None:
                events += 1
            assert 1 <= events < 200
            q.close()
    finally:
        a.close()
        b.close()

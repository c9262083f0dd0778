"""The two ends of the ``vq`` case: a null device served in a forked child, a streaming driver.

``NullDevice`` does no work per byte beyond one copy, so the figures are the data path's and
not an entropy source's: queue 0 (``SINK``) takes readable buffers and copies each into a
private buffer (as a console's transmitq hands bytes on); queue 1 (``SOURCE``) fills each
writable buffer from a constant pattern (as rng fills its requests). With ``verify`` every
buffer carries a stamp (``stamp``: its sequence number, then bytes derived from it) that the
receiving side checks, so a soak run counts lost, duplicated and corrupted bytes exactly.

The driver (``stream``) keeps every buffer in flight: it refills and publishes what it
reaped, kicks only when the device asked for it (the device sets NO_NOTIFY while it is
busy), and busy-polls used.idx with EVENT_USED suppressed (NO_INTERRUPT), so one
notification covers many buffers in both directions, as the issue's batching target says.
When nothing comes back for ``IDLE_SPINS`` polls it re-enables EVENT_USED and sleeps on the
bus instead. ``probe_every`` sends a GET_DEVICE_STATUS in the middle of the stream and times
its response: what QEMU's ~1 ms deadline is checked against while the device is busy.
"""

from __future__ import annotations

import mmap
import os
import signal
import struct
import time
import zlib
from array import array
from typing import Any

from ivshmem_bus.bus import VirtioMsgBus
from ivshmem_bus.core import protocol as p
from ivshmem_bus.core.virtio import VIRTIO_F_VERSION_1
from ivshmem_bus.core.virtqueue import Chain
from ivshmem_bus.devices import VirtioMsgDevice
from ivshmem_bus.drivers import VirtioMsgDriver
from ivshmem_bus.drivers.queue import DriverVirtqueue, allocator_for

from .harness import CHILD_TIMEOUT, PROFILE, _ready, _rss_kib

__all__ = [
    "SINK", "SOURCE", "NullDevice", "Stream", "device_child", "open_fds", "setup_queues",
    "stamp", "stream",
]  # fmt: skip

SINK = 0  # driver -> device: readable buffers
SOURCE = 1  # device -> driver: writable buffers
NULL_DEVICE_ID = 0xFFFF  # not a virtio device id: the benchmark's own
IDLE_SPINS = 2000  # empty reaps before the driver sleeps on EVENT_USED instead of polling
_SEQ = struct.Struct("<Q")


def stamp(seq: int, size: int) -> bytes:
    """The content of buffer number ``seq`` in a verified run: ``seq`` (u64 LE), then its
    crc32 repeated (so a buffer from another sequence number or a torn copy differs)."""
    head = _SEQ.pack(seq)
    word = zlib.crc32(head).to_bytes(4, "little")
    body = head + word * ((size + 3) // 4)
    return body[:size]


def open_fds() -> int:
    """This process's open file descriptors (/proc/self/fd)."""
    return len(os.listdir("/proc/self/fd")) - 1  # the listing's own


class NullDevice(VirtioMsgDevice):
    """A device that only copies: SINK reads each buffer once, SOURCE writes each once.

    Args:
        size: the largest buffer expected (the sink's private copy).
        verify: check SINK stamps / write SOURCE stamps (``stamp``), counting errors.
    """

    device_id = NULL_DEVICE_ID
    device_features = VIRTIO_F_VERSION_1
    num_queues = 2

    def __init__(
        self, size: int, *, verify: bool = False, sample_at: int = 0, ring_features: int = 0
    ) -> None:
        super().__init__(PROFILE, ring_features=ring_features)
        self.verify = verify
        self.sample_at = sample_at  # buffers (both queues) after which RSS and fds are noted
        self.sample: tuple[int, int] | None = None
        self.sunk = 0  # buffers taken from SINK
        self.sourced = 0  # buffers filled on SOURCE
        self.bytes_sunk = 0
        self.bad = 0  # SINK buffers whose stamp was not the next one expected
        self._copy = memoryview(bytearray(size))
        self._pattern = memoryview(bytes(range(256)) * (size // 256 + 1))[:size]
        self.handlers[SINK] = self._sink_verify if verify else self._sink
        self.handlers[SOURCE] = self._source_verify if verify else self._source

    def _sink(self, chain: Chain) -> int:
        copy = self._copy
        for buf in chain.readable:
            n = len(buf)
            copy[:n] = buf  # the one copy
            self.bytes_sunk += n
        self.sunk += 1
        return 0

    def _note(self) -> None:
        if self.sunk + self.sourced == self.sample_at:
            self.sample = (_rss_kib(), open_fds())

    def _sink_verify(self, chain: Chain) -> int:
        data = chain.read_all()
        if data != stamp(self.sunk, len(data)):
            self.bad += 1
        self.bytes_sunk += len(data)
        self.sunk += 1
        self._note()
        return 0

    def _source(self, chain: Chain) -> int:
        written = 0
        pattern = self._pattern
        for buf in chain.writable:
            n = len(buf)
            buf[:] = pattern[:n]  # the one copy
            written += n
        self.sourced += 1
        return written

    def _source_verify(self, chain: Chain) -> int:
        n = chain.write(stamp(self.sourced, chain.writable_len))
        self.sourced += 1
        self._note()
        return n


def device_child(
    conn: Any,
    dev: Any,
    other: Any,
    peer_vmid: int,
    size: int,
    verify: bool,
    sample_at: int,
    flag: mmap.mmap,
) -> dict[str, Any]:
    """The device process: serve a ``NullDevice`` until the parent sets ``flag[0]``; returns
    its counters, its RSS and open fds after ``sample_at`` buffers and at the end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    other.close()
    with VirtioMsgBus(dev, "device", peer_vmid, PROFILE, spin=1.0) as bus:
        device = NullDevice(size, verify=verify, sample_at=sample_at)
        _ready(conn)
        try:
            device.serve(bus, stop=lambda: flag[0] != 0)
        finally:
            device.close()
    return {
        "sunk": device.sunk,
        "sourced": device.sourced,
        "bytes_sunk": device.bytes_sunk,
        "bad": device.bad,
        "sample": device.sample,
        "rss_kib": _rss_kib(),
        "fds": open_fds(),
    }


class Stream:
    """What one ``stream`` call measured (times in ``perf_counter_ns``)."""

    def __init__(self) -> None:
        self.start_ns = 0
        self.end_ns = 0
        self.buffers = 0
        self.bytes = 0
        self.kicks = 0
        self.sleeps = 0  # times the driver slept on EVENT_USED
        # verify, SOURCE: buffers that came back with another buffer's stamp or none
        self.corrupted = 0  # content is not any buffer's stamp
        self.duplicated = 0  # a stamp already seen
        self.lost = 0  # stamps 0 .. count-1 never received intact
        self.good = 0
        self.probes = array("q")  # response times of the probes, ns
        self.sink: Stream | None = None  # the soak's second direction
        self.samples: list[tuple[int, int, int]] = []  # (buffers, rss KiB, fds)


def setup_queues(
    driver: VirtioMsgDriver, window: Any, queues: tuple[int, ...], qsize: int, nbuf: int, size: int
) -> list[DriverVirtqueue]:
    """Negotiate, set up ``queues`` (one left out stays unset: virtio allows it), DRIVER_OK."""
    driver.probe(max_queues=2)
    driver.negotiate(VIRTIO_F_VERSION_1)
    alloc = allocator_for(window)
    out: list[DriverVirtqueue] = []
    try:
        for queue in queues:
            out.append(
                DriverVirtqueue(driver, queue, qsize, window, alloc, buffers=nbuf, buffer_size=size)
            )
        driver.driver_ok()
    except BaseException:
        for dvq in out:
            dvq.close()
        raise
    return out


def stream(
    driver: VirtioMsgDriver,
    dvq: DriverVirtqueue,
    count: int,
    size: int,
    *,
    verify: bool = False,
    probe_every: int = 0,
    sample_every: int = 0,
) -> Stream:
    """Move ``count`` buffers of ``size`` bytes through ``dvq`` (SINK: the driver offers
    readable buffers; SOURCE: writable ones), every buffer in flight at once."""
    out = Stream()
    q = dvq.queue
    bus = driver.bus
    add_buffers, publish, reap = q.add_buffers, q.publish, q.reap
    sink = dvq.index == SINK
    bufs = [(addr, size) for addr in dvq.addrs]
    free = list(range(len(bufs)))
    views = [dvq.view(b, size) for b in free] if verify else []
    kick = p.EventAvail(index=dvq.index, next_offset_wrap=0)
    status = p.GetDeviceStatus()
    clock = time.perf_counter_ns
    q.set_interrupts(False)
    posted = done = spins = expected = 0
    next_probe = probe_every or count + 1
    next_sample = sample_every or count + 1
    deadline = time.monotonic() + CHILD_TIMEOUT
    out.start_ns = clock()
    while done < count:
        if free and posted < count:
            n = min(len(free), count - posted)
            batch = free[-n:]
            del free[-n:]
            if sink and verify:
                for k, b in enumerate(batch):
                    views[b][:] = stamp(posted + k, size)
            add_buffers([bufs[b] for b in batch], batch, writable=not sink)
            posted += n
            if publish():
                bus.send(kick)
                out.kicks += 1
        got = reap()
        if got:
            spins = 0
            for token, used in got:
                b = int(token)  # type: ignore[call-overload]
                if verify and not sink:
                    expected = _check(out, views[b][:used], expected, size)
                if not sink:
                    out.bytes += used
                free.append(b)
                done += 1
            if done >= next_probe:
                next_probe += probe_every
                t0 = clock()
                driver.bus.request(status, 1.0)
                out.probes.append(clock() - t0)
            if done >= next_sample:
                next_sample += sample_every
                out.samples.append((done, _rss_kib(), open_fds()))
            continue
        spins += 1
        if spins >= IDLE_SPINS:
            spins = 0
            if time.monotonic() > deadline:
                raise TimeoutError(f"vq: {done} of {count} buffers back after {CHILD_TIMEOUT} s")
            if not q.set_interrupts(True):  # True: used elements came meanwhile
                out.sleeps += 1
                msg = driver.wait_event(0.01)
                while msg is not None:  # drain: a full queue would stall the device's sends
                    if not isinstance(msg, p.EventUsed):
                        raise RuntimeError(f"vq: unexpected {msg!r} from the device")
                    msg = bus.receive(0)
            q.set_interrupts(False)
    out.end_ns = clock()
    out.buffers = done
    if sink:
        out.bytes = done * size
    elif verify:
        out.lost = count - out.good
    return out


def _check(out: Stream, data: memoryview, expected: int, size: int) -> int:
    """Classify one verified SOURCE buffer; returns the next sequence number expected."""
    if len(data) != size:
        out.corrupted += 1
        return expected
    seq = int(_SEQ.unpack_from(data)[0])
    if data != stamp(seq, size):
        out.corrupted += 1
        return expected
    if seq < expected:
        out.duplicated += 1
        return expected
    out.good += 1
    return seq + 1

"""The ``hub`` case: linux-v0 through the device hub, the path the Linux driver stack uses.

Issue 18's target: every response within QEMU's ~1 ms at p99.9, with a CPU hog running
beside it, and a start-up (GET_DEVICES to the last DRIVER_OK) under 100 ms. The device side
runs as ``serve --profile linux-v0 --device-type rng,rng`` would: a ``DeviceHub`` with rng at
dev_id 0 and 1 in a forked child (its bus thread and one worker thread per device), its
scheduling taken by ``serving.realtime`` in that child before any thread starts, as serve
does (threads inherit it). The driver is raw queues in this process, busy-polling, one
request in flight (the Linux stack holds one lock over its requests); a sample is one
request put to its response got. Beside it, the same requests to the single-device loop
(``device.serve``, what qemu-v0 runs), so the hub's own cost is the difference.

Rows: idle machine, then a CPU hog on every core with the device at normal scheduling and
with SCHED_FIFO (serve's ``--sched auto`` as root); under load the device goes to CPU 1 and
the driver stays on CPU 0 at nice -20 (as the ``flood`` load rows), so what is measured is
the device's answer. With the C reference built, its eventfd ping-pong under the same hogs
is the machine's own floor. Start-ups: idle, and under the hogs with serve's scheduling
(SCHED_FIFO as root; at normal scheduling only where SCHED_FIFO is not permitted, since a
start-up then takes seconds).
"""

from __future__ import annotations

import array
import contextlib
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator
from multiprocessing.synchronize import Event as ProcessEvent
from typing import Any

from ivshmem_bus.backends.base import IvshmemDevice
from ivshmem_bus.backends.fake import fake_pair
from ivshmem_bus.bus import (
    DEVICE_QUEUE_OFFSET,
    DRIVER_QUEUE_OFFSET,
    QUEUE_SIZE,
    VirtioMsgBus,
    reset_queues_of,
)
from ivshmem_bus.core import protocol as p
from ivshmem_bus.core.queue import SpscQueue
from ivshmem_bus.devices import DeviceHub, RngDevice
from ivshmem_bus.serving import realtime

from .harness import (
    CHILD_TIMEOUT,
    COUNTS,
    LATENCY_UNITS,
    Config,
    _Deadline,
    _get_wait,
    _put_wait,
    combine,
    percentiles_us,
    record,
)
from .placement import CpuHogs, fifo_permitted, pin, placed, placements
from .roundtrip import _nice, c_pingpong_run

__all__ = ["LOADS", "RUNNERS", "case_hub", "hub_rtt_run", "hub_startup_run"]

PROFILE = "linux-v0"
SHM = 1 << 20  # BAR2: the two queues, then the pool the rings of SET_VQUEUE are put in
VERSION_1 = 1 << 32
RUNNERS = {"hub": "device hub (bus thread + worker)", "loop": "single-device loop"}
LOADS = {  # suffix: (CPU hogs, device scheduling, label)
    "idle": (False, "normal", "idle machine"),
    "load-normal": (True, "normal", "CPU hog per core, device normal"),
    "load-fifo": (True, "fifo", "CPU hog per core, device SCHED_FIFO (serve's default as root)"),
}


def _serve(
    dev: IvshmemDevice, peer: int, runner: str, sched: str, cpu: int | None, stop: ProcessEvent
) -> None:
    """The child: the device side, until ``stop`` (or the parent is gone)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    parent = os.getppid()
    # Before any thread starts (the hub's workers inherit all three): not the driver's
    # nice -20, the device's CPU, and serve's scheduling.
    with contextlib.suppress(PermissionError):
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    if cpu is not None:
        pin(0, cpu)
    realtime(sched)

    def stopping() -> bool:
        return stop.is_set() or os.getppid() != parent

    with VirtioMsgBus(dev, "device", peer, PROFILE) as bus:
        if runner == "hub":
            DeviceHub([RngDevice(PROFILE), RngDevice(PROFILE)]).serve(bus, stopping)
        else:
            RngDevice(PROFILE).serve(bus, stop=stopping)


@contextlib.contextmanager
def _served(runner: str, sched: str, cpu: int | None) -> Iterator[tuple[Any, ...]]:
    """A fresh fake pair, the device side forked on it; yields (request, put, get, ring,
    the device's vmid)."""
    a, b = fake_pair(shm_size=SHM)
    peer = b.vmid
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    try:
        reset_queues_of(a)
        args = (b, a.vmid, runner, sched, cpu, stop)
        proc = ctx.Process(target=_serve, args=args, daemon=True)
        proc.start()
        b.close()
        tx = SpscQueue(a.shmem[DRIVER_QUEUE_OFFSET : DRIVER_QUEUE_OFFSET + QUEUE_SIZE])
        rx = SpscQueue(a.shmem[DEVICE_QUEUE_OFFSET : DEVICE_QUEUE_OFFSET + QUEUE_SIZE])
        size = p.MESSAGE_SIZE[PROFILE]
        dl = _Deadline(CHILD_TIMEOUT)

        def request(msg: p.Message) -> p.Message:
            _put_wait(tx.put, p.encode(msg, PROFILE), dl)
            a.ring(peer, 0)
            return p.decode(_get_wait(rx.get, dl, size), PROFILE)

        try:
            yield request, tx.put, rx.get, a.ring, peer
        finally:
            tx.release()
            rx.release()
            stop.set()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    finally:
        a.close()
        b.close()


def hub_rtt_run(runner: str, sched: str, count: int, cpu: int | None = None) -> dict[str, float]:
    """``count`` GET_DEVICE_STATUS round trips to dev_id 0, one in flight."""
    with _served(runner, sched, cpu) as (request, put, get, ring, peer):
        raw = p.encode(p.GetDeviceStatus(dev_num=0), PROFILE)
        size = p.MESSAGE_SIZE[PROFILE]
        for _ in range(min(1000, count)):  # warm up (the child is still importing)
            reply = request(p.GetDeviceStatus(dev_num=0))
        if not isinstance(reply, p.GetDeviceStatusResponse):
            raise RuntimeError(f"hub: unexpected response {reply!r}")
        clock = time.perf_counter_ns
        times = array.array("q", bytes(8 * count))
        dl = _Deadline(CHILD_TIMEOUT)
        for i in range(count):
            t0 = clock()
            _put_wait(put, raw, dl)
            ring(peer, 0)
            _get_wait(get, dl, size)
            times[i] = clock() - t0
    return percentiles_us(times)


def _probe(request: Callable[[p.Message], p.Message], dev: int) -> None:
    """One device's start-up as the Linux driver does it (linux-peer.md), to DRIVER_OK."""
    info = request(p.DeviceInfo(dev_num=dev))
    assert isinstance(info, p.DeviceInfoResponse) and info.num_feature_bits == 64
    request(p.SetDeviceStatus(status=0, dev_num=dev))
    for status in (1, 3):
        request(p.GetDeviceStatus(dev_num=dev))
        request(p.SetDeviceStatus(status=status, dev_num=dev))
    request(p.GetFeatures(index=0, num=2, dev_num=dev))
    request(p.SetFeatures(index=0, num=2, features=VERSION_1, dev_num=dev))
    request(p.GetDeviceStatus(dev_num=dev))
    request(p.SetDeviceStatus(status=0x0B, dev_num=dev))
    request(p.GetDeviceStatus(dev_num=dev))
    for index in range(info.max_virtqueues or 8):
        vq = request(p.GetVqueue(index=index, dev_num=dev))
        assert isinstance(vq, p.GetVqueueResponse)
        if vq.max_size == 0:
            break
        base = 0x10000 * (1 + 4 * dev + index)  # a pool address: desc 16 KiB, then the rings
        request(p.SetVqueue(index, vq.max_size, base, base + 0x4000, base + 0x5000, dev_num=dev))
    request(p.GetDeviceStatus(dev_num=dev))
    done = request(p.SetDeviceStatus(status=0x0F, dev_num=dev))
    assert isinstance(done, p.SetDeviceStatusResponse) and done.status == 0x0F, done


def hub_startup_run(sched: str, count: int, cpu: int | None = None) -> dict[str, float]:
    """``count`` start-ups of both devices: GET_DEVICES sent to the last DRIVER_OK got."""
    with _served("hub", sched, cpu) as (request, *_):
        clock = time.perf_counter_ns
        times = array.array("q", bytes(8 * count))
        for i in range(count + 1):  # the first one warms up
            t0 = clock()
            found = request(p.BusGetDevices(offset=0, num=32))
            assert isinstance(found, p.BusGetDevicesResponse) and found.bitmap[0] == 0b11
            for dev in (0, 1):
                _probe(request, dev)
            if i:
                times[i - 1] = clock() - t0
            for dev in (0, 1):  # power-off: the next start-up begins from reset
                request(p.SetDeviceStatus(status=0, dev_num=dev))
    return percentiles_us(times)


@contextlib.contextmanager
def _load(hogs: bool) -> Iterator[int | None]:
    """The load of a row: yields the device's CPU (None: not pinned, an idle machine)."""
    if not hogs:
        yield None
        return
    with placed("two cores") as second, CpuHogs(), _nice(-20):
        yield second


def _rows() -> list[tuple[str, bool, str, str]]:
    out = []
    for suffix, (hogs, sched, label) in LOADS.items():
        if hogs and "two cores" not in placements():
            continue
        if sched == "fifo" and not fifo_permitted():
            continue  # said by the missing row
        out.append((suffix, hogs, sched, label))
    return out


def case_hub(cfg: Config) -> list[dict[str, Any]]:
    n = cfg.count("hub.rtt")
    ns = max(2, int(COUNTS["hub.startup"] * cfg.scale))  # each start-up is ~30 requests
    fifo_row = any(sched == "fifo" for _, _, sched, _ in _rows())
    out = []
    for suffix, hogs, sched, label in _rows():
        for runner, what in RUNNERS.items():

            def rtt(
                runner: str = runner, sched: str = sched, hogs: bool = hogs
            ) -> dict[str, float]:
                with _load(hogs) as cpu:
                    return hub_rtt_run(runner, sched, n, cpu)

            out.append(record(
                f"hub.rtt.{runner}.{suffix}", "hub", f"linux-v0 round trip, {what}, {label}",
                "python", {"count": n, "runner": runner, "device_sched": sched, "profile": PROFILE,
                           "load": "CPU hog per core" if hogs else "none",
                           "request": "GetDeviceStatus", "device": "RngDevice"},
                combine(cfg.repeat(rtt, loaded=hogs), LATENCY_UNITS),
            ))  # fmt: skip

        if hogs and sched == "normal" and fifo_row:
            continue  # seconds per start-up (the device waits behind the hogs); serve runs fifo

        def startup(sched: str = sched, hogs: bool = hogs) -> dict[str, float]:
            with _load(hogs) as cpu:
                return hub_startup_run(sched, ns, cpu)

        out.append(record(
            f"hub.startup.{suffix}", "hub", f"start-up, GET_DEVICES to the 2nd DRIVER_OK, {label}",
            "python", {"count": ns, "devices": 2, "device_sched": sched, "profile": PROFILE},
            combine(cfg.repeat(startup, loaded=hogs), LATENCY_UNITS),
        ))  # fmt: skip
    binary = cfg.binary
    if binary is not None and "two cores" in placements():
        nc = cfg.count("hub.rtt")

        def c_loaded() -> dict[str, float]:
            with _load(True):
                return c_pingpong_run(binary, "efd", nc)[0]

        out.append(record(
            "hub.c.eventfd.load", "hub", "C eventfd ping-pong, two cores, CPU hog per core", "c",
            {"count": nc, "mode": "eventfd", "placement": "two cores", "load": "CPU hog per core"},
            combine(cfg.repeat(c_loaded, loaded=True), LATENCY_UNITS),
        ))  # fmt: skip
    return out

"""The main job without hardware: a driver probes a Python virtio device over a fake ivshmem pair.

The device runs in a forked child process (a separate address space, as the other VM is);
the two share only BAR2's pages and each other's doorbell eventfds. Used by
``ivshmem-bus demo`` (the README's first command) and by the end-to-end tests.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.synchronize import Event as ProcessEvent

from .backends.base import IvshmemDevice
from .backends.fake import fake_pair
from .bus import VirtioMsgBus, reset_queues_of
from .core import protocol as p
from .devices import RngDevice, VirtioMsgDevice
from .drivers import DeviceDescription, VirtioMsgDriver

__all__ = ["DemoResult", "run_demo", "served_device", "summarize", "summary"]


@dataclass
class DemoResult:
    driver_vmid: int
    device_vmid: int
    profile: str
    description: DeviceDescription
    features: int
    status: int
    round_trips_us: list[float]


def _serve_child(
    device: IvshmemDevice,
    peer_vmid: int,
    profile: str,
    make: Callable[[], VirtioMsgDevice],
    stop: ProcessEvent,
    spin: float,
    coalesce: bool = False,
) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):  # the parent decides when we stop
        signal.signal(sig, signal.SIG_IGN)
    parent = os.getppid()

    def stopping() -> bool:  # or the parent is gone (SIGKILLed): never left serving alone
        return stop.is_set() or os.getppid() != parent

    with VirtioMsgBus(device, "device", peer_vmid, profile, spin=spin, coalesce=coalesce) as bus:
        make().serve(bus, stop=stopping)


@contextlib.contextmanager
def served_device(
    device: IvshmemDevice,
    peer_vmid: int,
    profile: str = "qemu-v0",
    make: Callable[[], VirtioMsgDevice] = RngDevice,
    others: tuple[IvshmemDevice, ...] = (),
    spin: float = 50e-6,
    coalesce: bool = False,
) -> Iterator[multiprocessing.process.BaseProcess]:
    """Run ``make()`` as the device role on ``device`` in a forked child until the block ends.

    ``others`` are devices the child must not keep (closed in the child right after fork);
    ``spin`` is the device bus's busy-poll time before it sleeps on its eventfds;
    ``coalesce`` its doorbell coalescing (``VirtioMsgBus(coalesce=)``).
    """
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()

    def child() -> None:
        for other in others:
            other.close()
        _serve_child(device, peer_vmid, profile, make, stop, spin, coalesce)

    proc = ctx.Process(target=child, name="virtio-msg-device", daemon=True)
    proc.start()
    try:
        yield proc
    finally:
        stop.set()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()


def run_demo(profile: str = "qemu-v0", round_trips: int = 1000) -> DemoResult:
    """Probe and initialize the rng device over a fresh fake pair; time some round trips."""
    drv_dev, dev_dev = fake_pair()
    driver_vmid, device_vmid = drv_dev.vmid, dev_dev.vmid
    try:
        reset_queues_of(drv_dev)  # the driver side starts first: before the device attaches
        with served_device(dev_dev, driver_vmid, profile, others=(drv_dev,)):
            dev_dev.close()  # the child has it; the parent keeps only the driver side
            with VirtioMsgBus(drv_dev, "driver", device_vmid, profile) as bus:
                driver = VirtioMsgDriver(bus, timeout=5.0)
                description = driver.probe()
                features = driver.initialize()
                status = driver.get_status()
                times = []
                for _ in range(round_trips):
                    t0 = time.perf_counter_ns()
                    bus.request(p.GetDeviceStatus(), 5.0)
                    times.append((time.perf_counter_ns() - t0) / 1000)
        return DemoResult(driver_vmid, device_vmid, profile, description, features, status, times)
    finally:
        drv_dev.close()
        dev_dev.close()


def summary(times_us: list[float]) -> dict[str, float | int | None]:
    """The round trips as numbers (``demo --json``): count, p50, p99, max in microseconds."""
    if not times_us:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    q = _percentiles(times_us)
    return {"count": len(times_us), "p50": q[49], "p99": q[98], "max": max(times_us)}


def summarize(times_us: list[float]) -> str:
    """``"p50 12.3 us, p99 45.6 us, max 78.9 us"`` for a list of round-trip times."""
    if not times_us:
        return "no round trips"
    q = _percentiles(times_us)
    return f"p50 {q[49]:.1f} us, p99 {q[98]:.1f} us, max {max(times_us):.1f} us"


def _percentiles(times_us: list[float]) -> list[float]:
    """The 99 cut points (one round trip: it is every percentile)."""
    if len(times_us) < 2:
        return times_us * 99
    return statistics.quantiles(times_us, n=100, method="inclusive")

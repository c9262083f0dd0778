"""Round-trip latency over the linux-user backend against the fake pair, in the same run.

    python tools/linux_user_rtt.py [--count N] [--json]

Both links carry the same request (GET_DEVICE_STATUS, qemu-v0) to the same Python rng device
in a forked child. The fake pair rings with an eventfd; the linux-user bus writes one 0xED
byte to a UNIX socket and the receiver reads it (a syscall each way, issue 16's target: p50
within 2x of the fake pair). Two spin settings: "doorbell" (spin 0: every message is a
wake-up, where the two doorbells differ) and "default" (the bus's 50 us spin before sleeping).
Figures are percentiles in microseconds over ``count`` round trips.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    import ivshmem_bus  # noqa: F401
except ModuleNotFoundError:  # run from a source tree without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ivshmem_bus.backends.base import IvshmemDevice
from ivshmem_bus.backends.fake import fake_pair
from ivshmem_bus.backends.linux_user import LinuxUserDevice
from ivshmem_bus.bus import VirtioMsgBus, reset_queues_of
from ivshmem_bus.core import protocol as p
from ivshmem_bus.demo import served_device

SPINS = {"doorbell": 0.0, "default": 50e-6}


def _time(dev: IvshmemDevice, remote: int, count: int, spin: float) -> list[float]:
    with VirtioMsgBus(dev, "driver", remote, spin=spin) as bus:
        for _ in range(min(1000, count)):  # warm up both processes
            bus.request(p.GetDeviceStatus(), 5)
        times = []
        for _ in range(count):
            t0 = time.perf_counter_ns()
            bus.request(p.GetDeviceStatus(), 5)
            times.append((time.perf_counter_ns() - t0) / 1000)
    return times


def fake(count: int, spin: float) -> list[float]:
    a, b = fake_pair(shm_size=16384)
    reset_queues_of(a)
    remote = b.vmid
    try:
        with served_device(b, a.vmid, others=(a,), spin=spin):
            b.close()
            return _time(a, remote, count, spin)
    finally:
        a.close()
        b.close()


def linux_user(count: int, spin: float) -> list[float]:
    with tempfile.TemporaryDirectory() as where:
        sock = os.path.join(where, "vmsg.sock")
        listener = LinuxUserDevice(sock, listen=True, queue_dir=where)
        try:
            with (
                served_device(listener, 0, spin=spin),
                LinuxUserDevice(sock, queue_dir=where) as client,
            ):
                listener.close()  # the child serves on its copy
                return _time(client, 0, count, spin)
        finally:
            listener.close()


def summary(times: list[float]) -> dict[str, float]:
    q = statistics.quantiles(times, n=100, method="inclusive")
    return {"p50_us": round(q[49], 1), "p99_us": round(q[98], 1), "max_us": round(max(times), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results: dict[str, dict[str, dict[str, float]]] = {}
    for mode, spin in SPINS.items():
        results[mode] = {
            "fake": summary(fake(args.count, spin)),
            "linux-user": summary(linux_user(args.count, spin)),
        }
        ratio = results[mode]["linux-user"]["p50_us"] / results[mode]["fake"]["p50_us"]
        results[mode]["ratio_p50"] = {"linux-user/fake": round(ratio, 2)}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{os.cpu_count()} cpus, Linux {platform.release()}, Python {platform.python_version()}")
    print(f"{args.count} GET_DEVICE_STATUS round trips each, microseconds")
    print(f"{'spin':<10}{'link':<12}{'p50':>8}{'p99':>9}{'max':>10}")
    for mode, rows in results.items():
        for link in ("fake", "linux-user"):
            r = rows[link]
            print(f"{mode:<10}{link:<12}{r['p50_us']:>8}{r['p99_us']:>9}{r['max_us']:>10}")
        print(f"{'':<10}{'ratio p50':<12}{rows['ratio_p50']['linux-user/fake']:>8}")


if __name__ == "__main__":
    main()

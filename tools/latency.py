"""Request/response round-trip latency over the fake pair, busy-poll versus eventfd wake-up.

    python tools/latency.py [--count N] [--profile qemu-v0|spec-v1] [--json]

The device (RngDevice) runs in a forked child, the driver here; both spin for ``spin``
seconds before sleeping on their eventfds. "busy-poll" spins long enough never to sleep;
"eventfd" never spins, so every message is a doorbell and a wake-up. The worst round trip
under back-to-back requests bounds the serve loop's response time (QEMU's driver side gives
up after about 1 ms). Figures are percentiles in microseconds over ``count`` round trips.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

try:
    import ivshmem_bus  # noqa: F401
except ModuleNotFoundError:  # run from a source tree without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import cpu_model
from ivshmem_bus.backends.fake import fake_pair
from ivshmem_bus.bus import VirtioMsgBus, reset_queues_of
from ivshmem_bus.core import protocol as p
from ivshmem_bus.demo import served_device
from ivshmem_bus.devices import RngDevice

MODES = {"busy-poll": 1.0, "eventfd": 0.0}  # spin seconds on both sides


def measure(mode: str, count: int, profile: str) -> dict[str, float]:
    spin = MODES[mode]
    a, b = fake_pair(shm_size=16384)
    reset_queues_of(a)

    def make() -> RngDevice:
        return RngDevice(profile)

    try:
        with served_device(b, a.vmid, profile, make=make, others=(a,), spin=spin):
            b.close()
            with VirtioMsgBus(a, "driver", 2, profile, spin=spin) as bus:
                for _ in range(min(1000, count)):  # warm up both processes
                    bus.request(p.GetDeviceStatus(), 5)
                times = []
                for _ in range(count):
                    t0 = time.perf_counter_ns()
                    bus.request(p.GetDeviceStatus(), 5)
                    times.append((time.perf_counter_ns() - t0) / 1000)
    finally:
        a.close()
        b.close()
    q = statistics.quantiles(times, n=1000, method="inclusive")
    return {
        "p50_us": round(q[499], 1),
        "p99_us": round(q[989], 1),
        "p99.9_us": round(q[998], 1),
        "max_us": round(max(times), 1),
        "over_1ms": sum(t > 1000 for t in times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--profile", choices=p.PROFILES, default="qemu-v0")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {mode: measure(mode, args.count, args.profile) for mode in MODES}
    machine = (
        f"{cpu_model()}, {os.cpu_count()} cpus, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )
    if args.json:
        print(json.dumps({"machine": machine, "count": args.count, **results}, indent=2))
        return
    print(f"{args.count} round trips, {args.profile}, fake pair, two processes ({machine})")
    cols = ["p50_us", "p99_us", "p99.9_us", "max_us", "over_1ms"]
    print(f"{'mode':<10}" + "".join(f"{c:>10}" for c in cols))
    for mode, row in results.items():
        print(f"{mode:<10}" + "".join(f"{row[c]:>10}" for c in cols))


if __name__ == "__main__":
    main()

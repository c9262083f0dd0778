"""cProfile of one request/response round trip's Python work, both ends in one process.

    python tools/profile_rtt.py [--count N] [--top K] [--coalesce]

The benchmark's round trips run the driver and the device in two processes, where a
profiler would see mostly spinning. Here one process plays both ends over a fake pair, in
the order a round trip runs them (driver send, device receive + handle + send, driver
match), so the profile is the CPU cost of the hot loop and nothing else: what is left to
cut once wake-ups are taken away. The first line is the plain time per round trip, measured
without the profiler (which inflates every call).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

try:
    import ivshmem_bus  # noqa: F401
except ModuleNotFoundError:  # run from a source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ivshmem_bus.backends.fake import fake_pair
from ivshmem_bus.bus import VirtioMsgBus
from ivshmem_bus.core import protocol as p
from ivshmem_bus.devices import RngDevice


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--coalesce", action="store_true", help="both buses coalesce")
    args = parser.parse_args(argv)
    a, b = fake_pair(16384)
    driver = VirtioMsgBus(a, "driver", b.vmid, reset_queues=True, coalesce=args.coalesce)
    device = VirtioMsgBus(b, "device", a.vmid, coalesce=args.coalesce)
    rng, msg = RngDevice(), p.GetDeviceStatus()

    def round_trip() -> None:
        request = driver.prepare_request(msg)
        driver.send(request)
        got = device.receive(0)
        assert got is not None
        device._answer(got, rng.handle(got))
        if driver.match_response(request, time.monotonic() + 1.0) is None:
            raise RuntimeError("no response")

    for _ in range(1000):
        round_trip()
    t0 = time.perf_counter()
    for _ in range(args.count):
        round_trip()
    per = (time.perf_counter() - t0) / args.count * 1e6
    print(f"{per:.2f} us of Python per round trip (both ends, no profiler, {args.count} trips)")
    prof = cProfile.Profile()
    prof.runcall(lambda: [round_trip() for _ in range(args.count)])
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    driver.close()
    device.close()
    a.close()
    b.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

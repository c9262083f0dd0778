"""CPU cost of the sans-I/O virtqueue core: driver and device interleaved in one thread.

    python tools/virtqueue_timing.py [--repeat N]

No bus, no notifications, no second process: each row is the best of ``repeat`` runs of
add -> publish -> pop -> (copy) -> push -> publish -> reap over one window, batches of 128
chains in a 256-entry queue, so the figures are the core's own cost per buffer (both sides
together). "memcpy" is a plain memoryview copy of the same bytes into the same span of
buffers in the same run: the reference the issue's 25% target is measured against.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    import ivshmem_bus  # noqa: F401
except ModuleNotFoundError:  # run from a source tree without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ivshmem_bus.core.virtqueue import DeviceQueue, DriverQueue, VirtqLayout
from ivshmem_bus.core.window import BufferWindow

QSIZE = 256
BATCH = 128


def through_queue(bufsize: int, count: int, device_writes: bool) -> float:
    """Buffers per second through one queue; the device copies each buffer once."""
    lay = VirtqLayout.packed_at(0, QSIZE)
    data = (lay.total_bytes + 4095) & ~4095
    window = BufferWindow(bytearray(data + QSIZE * bufsize), 0)
    drv = DriverQueue(window, 0, lay)
    dev = DeviceQueue(window, 0, lay)
    addrs = [data + i * bufsize for i in range(QSIZE)]
    src = bytes(bufsize)
    sink = bytearray(bufsize)
    done = 0
    start = time.perf_counter()
    while done < count:
        for k in range(BATCH):
            if device_writes:
                drv.add((), ((addrs[k], bufsize),), k)
            else:
                drv.add(((addrs[k], bufsize),), (), k)
        drv.publish()
        while (chain := dev.pop()) is not None:
            if device_writes:
                dev.push(chain.head, chain.write(src))
            else:
                sink[:] = chain.readable[0]
                dev.push(chain.head, 0)
        dev.publish()
        done += len(drv.reap())
    return done / (time.perf_counter() - start)


def memcpy(bufsize: int, count: int) -> float:
    """Buffers per second of the same copies into the same span, no queue."""
    span = memoryview(bytearray(QSIZE * bufsize))
    dst = [span[i * bufsize : (i + 1) * bufsize] for i in range(QSIZE)]
    src = bytes(bufsize)
    start = time.perf_counter()
    for k in range(count):
        dst[k % QSIZE][:] = src
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per row; the best is kept")
    args = parser.parse_args()
    rows = [(64, 200_000, False), (4096, 100_000, True), (65536, 20_000, True)]
    print(
        f"{'buffer':>8} {'direction':>16} {'buffers/s':>12} {'MB/s':>9} {'memcpy MB/s':>12} ratio"
    )
    for size, count, writes in rows:
        rate = max(through_queue(size, count, writes) for _ in range(args.repeat))
        ref = max(memcpy(size, count) for _ in range(args.repeat))
        direction = "device writes" if writes else "device reads"
        print(
            f"{size:>8} {direction:>16} {rate:>12,.0f} {rate * size / 1e6:>9,.0f} "
            f"{ref * size / 1e6:>12,.0f} {rate / ref:>5.0%}"
        )


if __name__ == "__main__":
    main()

"""The ``startup`` case: how fast ``serve`` answers a driver that sends the instant it joins.

QEMU's virtio-msg driver joins the ivshmem server, sends DEVICE_INFO at once and aborts after
about 1 ms without a response (wire-format spec section 4). Here the real ``ivshmem-bus
serve`` runs as a user starts it, on a server in this process, and a new driver peer joins,
sends and polls, again and again: each sample is one guest's start (device first; each
driver replaces the last). With the CPU hog rows, every core also runs a busy loop; the
drivers stay on CPU 0 at nice -20 and serve on CPU 1, so the figure is serve's answer.
"""

from __future__ import annotations

import array
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from ivshmem_bus.backends.server_client import ServerClientDevice
from ivshmem_bus.bus import DEVICE_QUEUE_OFFSET, DRIVER_QUEUE_OFFSET, QUEUE_SIZE
from ivshmem_bus.core import protocol as p
from ivshmem_bus.core.queue import SpscQueue
from ivshmem_bus.server import IvshmemServer

from .harness import LATENCY_UNITS, Config, combine, percentiles_us, record
from .placement import CpuHogs, pin, placed, placements
from .roundtrip import _nice

__all__ = ["case_startup", "first_responses"]

ROWS = {  # id suffix: (serve's --sched, CPU hogs, label)
    "auto": ("auto", False, "serve --sched auto (SCHED_FIFO as root), idle machine"),
    "auto-load": ("auto", True, "serve --sched auto, CPU hog per core"),
    "normal-load": ("normal", True, "serve --sched normal, CPU hog per core"),
}


def first_responses(count: int, sched: str, pinned: bool) -> array.array[int]:
    """``count`` drivers' first-response times (ns); serve started once, device first."""
    with tempfile.TemporaryDirectory(prefix="ivshmem-startup-") as tmp:
        sock = os.path.join(tmp, "s.sock")
        with IvshmemServer(sock, shm_size="64K", vectors=1).start():
            serve = subprocess.Popen(
                [sys.executable, "-m", "ivshmem_bus", "serve", "--server", sock, "--sched", sched],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
            try:
                assert serve.stdout is not None
                while "waiting for the driver's peer" not in (line := serve.stdout.readline()):
                    if not line:
                        raise RuntimeError(f"serve exited ({serve.wait()}) before it was ready")
                if pinned:
                    pin(serve.pid, 1)
                raw = p.encode(p.DeviceInfo())
                times = array.array("q", bytes(8 * count))
                for i in range(count):
                    times[i] = _one(sock, raw)
            finally:
                serve.terminate()
                serve.wait(10)
                if serve.stdout is not None:
                    serve.stdout.close()
    return times


def _one(sock: str, raw: bytes) -> int:
    with ServerClientDevice(sock, vectors=1) as dev:
        regions = [
            dev.shmem[DRIVER_QUEUE_OFFSET : DRIVER_QUEUE_OFFSET + QUEUE_SIZE],
            dev.shmem[DEVICE_QUEUE_OFFSET : DEVICE_QUEUE_OFFSET + QUEUE_SIZE],
        ]
        tx, rx = (SpscQueue(r) for r in regions)
        try:
            clock = time.perf_counter_ns
            t0 = clock()
            tx.put(raw)
            dev.ring(0, 0)  # serve joined first: vmid 0
            deadline = t0 + 5_000_000_000
            while rx.get() is None:
                if clock() > deadline:
                    raise RuntimeError("startup: serve did not answer DEVICE_INFO in 5 s")
            return clock() - t0
        finally:
            tx.release()
            rx.release()
            for r in regions:
                r.release()


def case_startup(cfg: Config) -> list[dict[str, Any]]:
    n = cfg.count("startup")
    out = []
    for suffix, (sched, load, label) in ROWS.items():
        if load and "two cores" not in placements():
            continue

        def run(sched: str = sched, load: bool = load) -> dict[str, float]:
            if not load:
                return percentiles_us(first_responses(n, sched, pinned=False))
            with placed("two cores"), CpuHogs(), _nice(-20):
                return percentiles_us(first_responses(n, sched, pinned=True))

        runs = cfg.repeat(run, loaded=load)
        out.append(record(
            f"startup.{suffix}", "startup", label, "python",
            {"count": n, "serve": f"ivshmem-bus serve --sched {sched}", "load": load,
             "driver": "joins, sends DEVICE_INFO at once, polls (as QEMU's)"},
            combine(runs, LATENCY_UNITS),
        ))  # fmt: skip
    return out

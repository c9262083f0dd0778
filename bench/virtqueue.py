"""The ``vq`` case: bytes and buffers per second through a virtqueue, Python to Python.

A Python driver here and ``vqdev.NullDevice`` served in a forked child over the fake pair,
the queue and its buffers in the pool of BAR2 (the CLI's default window), for 64 B, 4 KiB
and 64 KiB buffers, both ways: SINK (the driver offers readable buffers; the device copies
each once, as a console's transmitq) and SOURCE (writable buffers the device fills once, as
rng). Beside them the C reference copies the same bytes with ``memcpy`` from the same number
of buffers of the same size in a shared mapping, in the same run: the issue's 25% target
is the 64 KiB rate over that.

Two more records:

- ``vq.latency``: a long SINK job (a 1024-entry queue of 4 KiB buffers kept full) during
  which the driver sends GET_DEVICE_STATUS every 256 buffers and times the response: the
  device must answer within QEMU's ~1 ms while it works through its queue;
- ``vq.soak``: 10^6 verified 64-byte buffers per run at full scale (half SOURCE, checked by
  the driver; half SINK, checked by the device): lost, duplicated and corrupted buffers, and
  the growth of RSS and open fds after warm-up: the driver's over the second half of each
  direction, the device's from a quarter of the run (half of SOURCE) to its end.
"""

from __future__ import annotations

import functools
import mmap
import subprocess
from pathlib import Path
from typing import Any

from ivshmem_bus.backends.fake import fake_pair
from ivshmem_bus.bus import VirtioMsgBus, reset_queues_of
from ivshmem_bus.drivers import VirtioMsgDriver
from ivshmem_bus.memory import open_window

from .harness import (
    CHILD_TIMEOUT,
    LATENCY_UNITS,
    PROFILE,
    Child,
    Config,
    combine,
    percentiles_us,
    record,
)
from .vqdev import SINK, SOURCE, Stream, device_child, setup_queues, stream

__all__ = ["SIZES", "case_vq", "memcpy_c_run", "vq_python_run"]

QUEUE_SIZE = 256
SIZES = (64, 4096, 65536)
LATENCY_QUEUE = 1024  # QEMU's max queue size: the longest job one kick can give the device
LATENCY_SIZE = 4096
PROBE_EVERY = 256
DIRECTIONS = {"sink": SINK, "source": SOURCE}
DIRECTION_LABELS = {"sink": "device reads (SINK)", "source": "device writes (SOURCE)"}


def buffers_for(size: int, qsize: int = QUEUE_SIZE) -> int:
    """Buffers in flight: the whole queue, at most 4 MiB of them."""
    return min(qsize, (4 << 20) // size)


def _shm_for(nbuf: int, size: int, qsize: int, queues: int) -> int:
    """BAR2 bytes for the bus (8 KiB), ``queues`` queues and their buffers, rounded to MiB."""
    need = 0x2000 + queues * (nbuf * size + 32 * qsize + 0x3000)
    return max(1 << 20, (need + (1 << 20) - 1) & ~((1 << 20) - 1))


def vq_python_run(
    direction: str,
    size: int,
    count: int,
    *,
    qsize: int = QUEUE_SIZE,
    probe_every: int = 0,
    verify: bool = False,
) -> tuple[Stream, dict[str, Any]]:
    """One run in fresh processes; (the driver's Stream, the device's counters).

    ``direction`` is ``"sink"``, ``"source"`` or, for the soak, ``"both"`` (``count`` // 2
    SOURCE buffers, then as many SINK buffers; the Stream returned is SOURCE's with the
    SINK stream as its ``sink`` attribute).
    """
    nbuf = buffers_for(size, qsize)
    queues = (SOURCE, SINK) if direction == "both" else (DIRECTIONS[direction],)
    a, b = fake_pair(shm_size=_shm_for(nbuf, size, qsize, len(queues)))
    b_vmid = b.vmid
    flag = mmap.mmap(-1, 1)
    per = count // 2 if direction == "both" else count
    try:
        reset_queues_of(a)
        with Child(device_child, b, a, a.vmid, size, verify, per // 2, flag) as child:
            b.close()
            with (
                VirtioMsgBus(a, "driver", b_vmid, PROFILE, spin=1.0) as bus,
                open_window("pool", device=a, role="driver") as window,
            ):
                child.recv()  # ready
                driver = VirtioMsgDriver(bus, timeout=5.0)
                dvqs = setup_queues(driver, window, queues, qsize, nbuf, size)
                try:
                    if not verify:  # warm both processes up (not timed)
                        stream(driver, dvqs[0], min(per, max(nbuf, per // 10)), size)
                    sample = max(1, per // 10) if verify else 0
                    first = stream(driver, dvqs[0], per, size, verify=verify,
                                   probe_every=probe_every, sample_every=sample)  # fmt: skip
                    if len(dvqs) > 1:
                        first.sink = stream(
                            driver, dvqs[1], per, size, verify=verify, sample_every=sample
                        )
                    driver.set_status(0)
                finally:
                    for dvq in dvqs:
                        dvq.close()
            flag[0] = 1
            device = child.recv(CHILD_TIMEOUT)
    finally:
        a.close()
        b.close()
        flag.close()
    return first, device


def _rates(st: Stream) -> dict[str, float]:
    seconds = (st.end_ns - st.start_ns) / 1e9
    return {
        "rate": st.buffers / seconds,
        "bytes_rate": st.bytes / seconds,
        "kicks_per_buffer": st.kicks / max(1, st.buffers),
        "sleeps": float(st.sleeps),
    }


def _python_rates(direction: str, size: int, count: int) -> dict[str, float]:
    """One Python run's rates (a named function: ``cfg.repeat`` takes a callable)."""
    return _rates(vq_python_run(direction, size, count)[0])


VQ_UNITS = {
    "rate": "buffers/s",
    "bytes_rate": "B/s",
    "kicks_per_buffer": "kicks",
    "sleeps": "count",
}


def memcpy_c_run(binary: Path, size: int, nbuf: int, count: int) -> dict[str, float]:
    proc = subprocess.run(
        [str(binary), "memcpy", str(size), str(nbuf), str(count)],
        capture_output=True, text=True, timeout=CHILD_TIMEOUT,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"C memcpy failed ({proc.returncode}): {proc.stderr.strip()}")
    n, ns, _ = (int(x) for x in proc.stdout.split())
    return {"rate": n / (ns / 1e9), "bytes_rate": n * size / (ns / 1e9)}


def _latency_run(count: int) -> dict[str, float]:
    every = min(PROBE_EVERY, max(1, count // 8))  # tiny smoke counts probe too
    st, _ = vq_python_run("sink", LATENCY_SIZE, count, qsize=LATENCY_QUEUE, probe_every=every)
    if not st.probes:
        raise RuntimeError("vq latency: no probe was sent (count too small)")
    return {**percentiles_us(st.probes), "probes": float(len(st.probes)), **_rates(st)}


def _soak_run(count: int) -> dict[str, float]:
    src, device = vq_python_run("both", 64, count, verify=True)
    sink = src.sink
    assert sink is not None
    per = count // 2

    def growth(samples: list[tuple[int, int, int]], k: int) -> int:
        half = [s for s in samples if s[0] >= per // 2]
        return (half[-1][k] - half[0][k]) if len(half) > 1 else 0

    dev_rss, dev_fds = device["sample"] or (device["rss_kib"], device["fds"])
    return {
        "buffers": float(src.buffers + sink.buffers),
        "lost": float(src.lost + max(0, per - device["sunk"])),
        "duplicated": float(src.duplicated),
        "corrupted": float(src.corrupted + device["bad"]),
        "driver_rss_growth_kib": float(max(growth(src.samples, 1), growth(sink.samples, 1))),
        "driver_fd_growth": float(max(growth(src.samples, 2), growth(sink.samples, 2))),
        "device_rss_growth_kib": float(device["rss_kib"] - dev_rss),
        "device_fd_growth": float(device["fds"] - dev_fds),
        "rate": (src.buffers + sink.buffers)
        / ((src.end_ns - src.start_ns + sink.end_ns - sink.start_ns) / 1e9),
    }


SOAK_UNITS = {
    "buffers": "count",
    "lost": "count",
    "duplicated": "count",
    "corrupted": "count",
    "driver_rss_growth_kib": "KiB",
    "driver_fd_growth": "count",
    "device_rss_growth_kib": "KiB",
    "device_fd_growth": "count",
    "rate": "buffers/s",
}


def case_vq(cfg: Config) -> list[dict[str, Any]]:
    out = []
    for size in SIZES:
        nbuf = buffers_for(size)
        n = cfg.count(f"vq.{size}")
        params = {"buffer_bytes": size, "buffers": nbuf, "queue_size": QUEUE_SIZE, "count": n}
        if cfg.binary is not None:
            binary = cfg.binary
            nc = cfg.count("vq.memcpy") * 65536 // size  # the same bytes for every size
            runs = cfg.repeat(functools.partial(memcpy_c_run, binary, size, nbuf, nc))
            out.append(
                record(
                    f"vq.c.memcpy.{size}",
                    "vq",
                    f"C memcpy, {_size(size)} buffers",
                    "c",
                    {**params, "count": nc},
                    combine(runs, {"rate": "buffers/s", "bytes_rate": "B/s"}),
                )
            )
        for direction, label in DIRECTION_LABELS.items():
            runs = cfg.repeat(functools.partial(_python_rates, direction, size, n))
            out.append(
                record(
                    f"vq.python.{direction}.{size}",
                    "vq",
                    f"Python, {_size(size)}, {label}",
                    "python",
                    {**params, "direction": direction, "window": "pool"},
                    combine(runs, VQ_UNITS),
                )
            )
    n = cfg.count("vq.latency")
    runs = cfg.repeat(lambda: _latency_run(n))
    out.append(
        record(
            "vq.latency",
            "vq",
            f"GET_DEVICE_STATUS during a SINK job ({LATENCY_QUEUE} x {_size(LATENCY_SIZE)} "
            "in flight)",
            "python",
            {
                "count": n,
                "buffer_bytes": LATENCY_SIZE,
                "queue_size": LATENCY_QUEUE,
                "probe_every": min(PROBE_EVERY, max(1, n // 8)),
            },
            combine(runs, {**LATENCY_UNITS, "probes": "count", **VQ_UNITS}),
        )
    )
    n = cfg.count("vq.soak")
    runs = cfg.repeat(lambda: _soak_run(n))
    out.append(
        record(
            "vq.soak",
            "vq",
            "verified 64 B buffers, half each way",
            "python",
            {"count": n, "buffer_bytes": 64, "queue_size": QUEUE_SIZE, "verify": True},
            combine(runs, SOAK_UNITS),
        )
    )
    return out


def _size(n: int) -> str:
    return f"{n >> 10} KiB" if n >= 1024 else f"{n} B"

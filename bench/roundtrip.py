"""Latency cases: ``rtt`` (request/response round trips) and ``flood`` (the serve loop).

Round trips run against a real device (``RngDevice`` in a forked ``served_device``) with both
sides busy-polling and with both woken by eventfd, beside the two C floors of the same
modes. The flood keeps the device's queue fed back to back: its worst response time is what
QEMU's ~1 ms deadline on the driver side is checked against.
"""

from __future__ import annotations

import array
import contextlib
import functools
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
from ivshmem_bus.demo import served_device
from ivshmem_bus.devices import RngDevice
from ivshmem_bus.native import ffi as _ffi

from .harness import (
    CHILD_TIMEOUT,
    LATENCY_UNITS,
    PROFILE,
    Config,
    _Deadline,
    _get_wait,
    _put_wait,
    combine,
    percentiles_us,
    record,
    shm_file,
)
from .placement import CpuHogs, fifo, fifo_permitted, pin, placed, placements

__all__ = ["FLOOD_WINDOWS", "RTT_MODES", "c_pingpong_run", "case_flood", "case_rtt"]

# Round trips --------------------------------------------------------------------------------------

RTT_MODES = {"busy-poll": 1.0, "eventfd": 0.0}  # spin seconds on both sides


def rtt_python_run(
    spin: float, count: int, coalesce: bool = False, child_cpu: int | None = None
) -> dict[str, float]:
    """Python request round trips; ``child_cpu``: pin the device process there."""
    a, b = fake_pair(shm_size=16384)
    peer = b.vmid
    try:
        reset_queues_of(a)
        with served_device(
            b, a.vmid, PROFILE, make=RngDevice, others=(a,), spin=spin, coalesce=coalesce
        ) as proc:
            b.close()
            if child_cpu is not None and proc.pid is not None:
                pin(proc.pid, child_cpu)  # before the warm-up
            with VirtioMsgBus(a, "driver", peer, PROFILE, spin=spin, coalesce=coalesce) as bus:
                request, msg = bus.request, p.GetDeviceStatus()
                for _ in range(min(1000, count)):  # warm up both processes
                    request(msg, 5.0)
                clock = time.perf_counter_ns
                times = array.array("q", bytes(8 * count))
                for i in range(count):
                    t0 = clock()
                    request(msg, 5.0)
                    times[i] = clock() - t0
    finally:
        a.close()
        b.close()
    return percentiles_us(times)


def _read_u64(path: str, n: int, index: int = 0) -> array.array[int]:
    data = array.array("Q")
    with open(path, "rb") as f:
        f.seek(8 * n * index)
        data.fromfile(f, n)
    return data


def c_pingpong_run(
    binary: Path, mode: str, count: int
) -> tuple[dict[str, float], array.array[int]]:
    """C ping-pong round trips (and, for eventfd, the one-way wake-ups as second value)."""
    with tempfile.TemporaryDirectory(prefix="ivshmem-bench-") as tmp:
        out = os.path.join(tmp, "samples")
        if mode == "spin":
            with shm_file(8192) as path:
                args = [str(binary), "spin-rtt", path, str(count), out]
                proc = subprocess.run(args, capture_output=True, text=True, timeout=CHILD_TIMEOUT)
        else:
            args = [str(binary), "efd", str(count), out]
            proc = subprocess.run(args, capture_output=True, text=True, timeout=CHILD_TIMEOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"C {mode} ping-pong failed: {proc.stderr.strip()}")
        rtt = _read_u64(out, count)
        oneway = _read_u64(out, count, 1) if mode == "efd" else array.array("Q")
    return percentiles_us(rtt), oneway


def _python_rtt(
    cfg: Config, n: int, mode: str, label: str, coalesce: bool = False
) -> dict[str, Any]:
    """One Python round-trip record: ``mode`` from RTT_MODES, optionally coalescing."""
    spin = RTT_MODES[mode]
    runs = cfg.repeat(lambda: rtt_python_run(spin, n, coalesce=coalesce))
    params = {"count": n, "mode": mode, "spin_s": spin}
    if coalesce:
        params["coalesce"] = True
    return record(
        f"rtt.python.{mode}" + ("-coalesced" if coalesce else ""),
        "rtt",
        label,
        "python",
        {**params, "request": "GetDeviceStatus", "device": "RngDevice"},
        combine(runs, LATENCY_UNITS),
    )


def case_rtt(cfg: Config) -> list[dict[str, Any]]:
    out = []
    n = cfg.count("rtt.python")
    nc = cfg.count("rtt.c")
    binary = cfg.binary
    if binary is not None:
        runs = cfg.repeat(lambda: c_pingpong_run(binary, "spin", nc)[0])
        out.append(
            record(
                "rtt.c.spin",
                "rtt",
                "C ping-pong, 2 SPSC queues, busy-poll",
                "c",
                {"count": nc, "mode": "busy-poll"},
                combine(runs, LATENCY_UNITS),
            )
        )
    out.append(_python_rtt(cfg, n, "busy-poll", "Python request, busy-poll (spin 1 s)"))
    if _ffi.HAVE_COMPILED:  # coalescing needs the helper's fence
        label = "Python request, busy-poll, coalesce=True (no doorbell)"
        out.append(_python_rtt(cfg, n, "busy-poll", label, coalesce=True))
    if binary is not None:

        def c_efd() -> dict[str, float]:
            rtt, oneway = c_pingpong_run(binary, "efd", nc)
            cfg.c_oneway.append(percentiles_us(oneway))
            return rtt

        runs = cfg.repeat(c_efd)
        out.append(
            record(
                "rtt.c.eventfd",
                "rtt",
                "C eventfd ping-pong (blocking read)",
                "c",
                {"count": nc, "mode": "eventfd"},
                combine(runs, LATENCY_UNITS),
            )
        )
    out.append(_python_rtt(cfg, n, "eventfd", "Python request, eventfd wake (spin 0)"))
    out += _pinned_eventfd_pairs(cfg, n, nc)
    return out


def _pinned_eventfd_pairs(cfg: Config, n: int, nc: int) -> list[dict[str, Any]]:
    """The eventfd pair, C and Python, with both processes placed alike (placement.py)."""
    out = []
    binary = cfg.binary
    for name in placements():
        slug = name.replace(" ", "-")
        with placed(name) as second:
            if binary is not None:

                def c_run(b: Path = binary) -> dict[str, float]:
                    return c_pingpong_run(b, "efd", nc)[0]

                runs = cfg.repeat(c_run)
                out.append(record(
                    f"rtt.c.eventfd.{slug}", "rtt", f"C eventfd ping-pong, {name}", "c",
                    {"count": nc, "mode": "eventfd", "placement": name},
                    combine(runs, LATENCY_UNITS),
                ))  # fmt: skip

            def python_run(cpu: int = second) -> dict[str, float]:
                return rtt_python_run(0.0, n, child_cpu=cpu)

            runs = cfg.repeat(python_run)
            out.append(record(
                f"rtt.python.eventfd.{slug}", "rtt", f"Python request, eventfd wake, {name}",
                "python", {"count": n, "mode": "eventfd", "spin_s": 0.0, "placement": name,
                           "request": "GetDeviceStatus", "device": "RngDevice"},
                combine(runs, LATENCY_UNITS),
            ))  # fmt: skip
    return out


# Serve loop under a flood -------------------------------------------------------------------------


FLOOD_WINDOWS = (1, 61)  # requests in flight: QEMU's one at a time; the queue kept full


def flood_run(
    spin: float, window: int, count: int, device_sched: str | None = None
) -> dict[str, float]:
    """Requests back to back, ``window`` in flight; per request: put to its response's get.

    ``device_sched`` (``"normal"`` or ``"fifo"``): the loaded machine of issue 14. The
    caller runs a CPU hog on every core (``CpuHogs``); the device process goes to CPU 1 (with
    SCHED_FIFO for ``"fifo"``, as ``serve --sched auto`` gives it) and the driver stays on
    CPU 0 (the caller's placement) at nice -20, so that what is measured is the device's
    answer, not the driver's own preemption.
    """
    raw_req = p.encode(p.GetDeviceStatus(), PROFILE)
    size = p.MESSAGE_SIZE[PROFILE]
    a, b = fake_pair(shm_size=16384)
    peer = b.vmid
    try:
        reset_queues_of(a)
        with served_device(b, a.vmid, PROFILE, make=RngDevice, others=(a,), spin=spin) as proc:
            b.close()
            if device_sched is not None and proc.pid is not None:
                pin(proc.pid, 1)
                os.setpriority(os.PRIO_PROCESS, proc.pid, 0)  # not the driver's nice -20
                if device_sched == "fifo" and not fifo(proc.pid):
                    raise RuntimeError("SCHED_FIFO is not permitted (run the benchmark as root)")
            tx = SpscQueue(a.shmem[DRIVER_QUEUE_OFFSET : DRIVER_QUEUE_OFFSET + QUEUE_SIZE])
            rx = SpscQueue(a.shmem[DEVICE_QUEUE_OFFSET : DEVICE_QUEUE_OFFSET + QUEUE_SIZE])
            put, get, ring, clock = tx.put, rx.get, a.ring, time.perf_counter_ns
            dl = _Deadline()
            for _ in range(min(1000, count)):  # warm up: the child is still starting
                _put_wait(put, raw_req, dl)
                ring(peer, 0)
                _get_wait(get, dl, size)
            sent_at = array.array("q", bytes(8 * count))
            times = array.array("q", bytes(8 * count))
            sent = received = spins = 0
            deadline = time.monotonic() + CHILD_TIMEOUT
            while received < count:
                while sent < count and sent - received < window:
                    t = clock()
                    if not put(raw_req):
                        break
                    sent_at[sent] = t
                    sent += 1
                    ring(peer, 0)
                data = get(size)
                if data is None:
                    spins += 1
                    if not spins & 0xFFFF and (time.monotonic() > deadline or not proc.is_alive()):
                        raise RuntimeError(f"flood: device stopped answering at {received}")
                    continue
                times[received] = clock() - sent_at[received]
                received += 1
            end = clock()
            assert data is not None  # the loop ends on a received response
            last = p.decode(data, PROFILE)
            tx.release()
            rx.release()
    finally:
        a.close()
        b.close()
    if not isinstance(last, p.GetDeviceStatusResponse):
        raise RuntimeError(f"flood: unexpected response {last!r}")
    result = percentiles_us(times)
    result["rate"] = count / ((end - sent_at[0]) / 1e9)
    return result


FLOOD_UNITS = {**LATENCY_UNITS, "rate": "responses/s"}


LOADED = {"normal": "device normal scheduling", "fifo": "device SCHED_FIFO (serve's default)"}


def _loaded_flood(cfg: Config, n: int) -> list[dict[str, Any]]:
    """1 in flight, device eventfd, with a CPU hog on each core: QEMU's deadline when the
    machine is busy (issue 14)."""
    if "two cores" not in placements():
        return []
    out = []
    for sched, label in LOADED.items():
        if sched == "fifo" and not fifo_permitted():
            continue  # said by the missing row; serve --sched auto says it too

        def loaded_run(sched: str = sched) -> dict[str, float]:
            return flood_run(0.0, 1, n, sched)

        with placed("two cores"), CpuHogs() as hogs, _nice(-20):
            runs = cfg.repeat(loaded_run, loaded=True)
        out.append(record(
            f"flood.eventfd.w1.load-{sched}", "flood",
            f"1 in flight, eventfd, CPU hog per core, {label}", "python",
            {"count": n, "in_flight": 1, "device_spin_s": 0.0, "load": f"{len(hogs.cpus)} CPU hogs",
             "device_sched": sched, "driver": "raw queues, busy-poll, CPU 0, nice -20",
             "request": "GetDeviceStatus", "device": "RngDevice"},
            combine(runs, FLOOD_UNITS),
        ))  # fmt: skip
    return out


@contextlib.contextmanager
def _nice(value: int) -> Iterator[None]:
    """This process at ``value`` for the block (if permitted); back to what it was after."""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    with contextlib.suppress(PermissionError):
        os.setpriority(os.PRIO_PROCESS, 0, value)
    try:
        yield
    finally:
        with contextlib.suppress(PermissionError):
            os.setpriority(os.PRIO_PROCESS, 0, before)


def case_flood(cfg: Config) -> list[dict[str, Any]]:
    n = cfg.count("flood")
    out = []
    for window in FLOOD_WINDOWS:
        for mode, spin in RTT_MODES.items():
            runs = cfg.repeat(functools.partial(flood_run, spin, window, n))
            out.append(
                record(
                    f"flood.{mode}.w{window}",
                    "flood",
                    f"{window} in flight, device {mode}",
                    "python",
                    {
                        "count": n,
                        "in_flight": window,
                        "device_spin_s": spin,
                        "driver": "raw queues, busy-poll, a doorbell per request",
                        "request": "GetDeviceStatus",
                        "device": "RngDevice",
                    },
                    combine(runs, FLOOD_UNITS),
                )
            )
    return out + _loaded_flood(cfg, n)

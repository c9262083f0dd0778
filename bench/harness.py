"""What every case shares: forked peers, shared files, statistics, and the run loop.

Each case runs its figure ``runs`` times in fresh processes (``Config.repeat``) and reduces
the runs to median, min and max (``combine``): one run on a shared machine says little.
The helpers here keep the hot loops free of bookkeeping: ``_Deadline`` is only consulted on
the slow path (queue full or empty), and a hung or dead peer fails the case instead of
hanging the benchmark.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ivshmem_bus.core.queue import QUEUE_HEADER_SIZE, SLOT_SIZE, SpscQueue
from ivshmem_bus.native.ffi import queue_blocks

PROFILE = "qemu-v0"
SMALL_REGION = 4096  # the bus's queue: 62 slots
LARGE_REGION = QUEUE_HEADER_SIZE + SLOT_SIZE * 4096  # 4096 slots
CHILD_TIMEOUT = 120.0  # s: a child silent for this long has hung
DEADLINE_US = 1000.0  # QEMU's driver side gives up after about 1 ms

# Full-run counts per run; --quick divides them by 10 and runs 3 times instead of 5.
COUNTS: dict[str, int] = {
    "raw.c": 50_000_000,
    "raw.per-call": 3_000_000,
    "raw.batch": 5_000_000,
    "raw.block": 50_000_000,
    "encoded.codec": 1_000_000,
    "encoded.bus": 1_000_000,
    "rtt.python": 50_000,
    "rtt.c": 50_000,
    "flood": 50_000,
    "doorbell.wake": 20_000,
    "doorbell.bursts": 2_000,
    "vq.64": 500_000,
    "vq.4096": 300_000,
    "vq.65536": 100_000,
    "vq.memcpy": 200_000,  # 64 KiB copies; smaller buffers copy the same bytes
    "vq.latency": 200_000,
    "vq.soak": 1_000_000,
    "startup": 200,
    "hub.rtt": 20_000,
    "hub.startup": 50,  # start-ups of two devices (~30 requests each); at least 2
}
BUSY_WARN = 0.15  # other processes using more of the CPUs than this before the run: warn
MIN_COUNT = 64  # percentiles need samples, even at --scale 0.0001


# Statistics and records ---------------------------------------------------------------------------


def summarize(values: Sequence[float], unit: str) -> dict[str, Any]:
    """One figure over runs: median, min, max and every run's value."""
    return {
        "unit": unit,
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": list(values),
    }


def percentiles_us(samples_ns: Sequence[int]) -> dict[str, float]:
    """p50, p99, p99.9, max (us) and how many samples exceed 1 ms, for one run."""
    data = sorted(samples_ns)
    n = len(data)

    def at(q: float) -> float:
        return data[min(n - 1, int(q * n))] / 1000  # nearest rank

    return {
        "p50_us": at(0.50),
        "p99_us": at(0.99),
        "p99_9_us": at(0.999),
        "max_us": data[-1] / 1000,
        "over_1ms": float(sum(1 for v in data if v > DEADLINE_US * 1000)),
    }


LATENCY_UNITS = {
    "p50_us": "us",
    "p99_us": "us",
    "p99_9_us": "us",
    "max_us": "us",
    "over_1ms": "count",
}


def combine(runs: list[dict[str, float]], units: dict[str, str]) -> dict[str, Any]:
    """Per-run dicts of figures -> {figure: summarize(...)} over the runs."""
    return {key: summarize([r[key] for r in runs], unit) for key, unit in units.items()}


def record(
    rid: str, group: str, label: str, impl: str, params: dict[str, Any], metrics: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": rid,
        "group": group,
        "label": label,
        "impl": impl,
        "params": params,
        "metrics": metrics,
    }


# Processes ----------------------------------------------------------------------------------------


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _half(count: int) -> int:
    """Messages a consumer takes before its first RSS sample (one-time allocations settle)."""
    return max(1, count // 2)


def timed_second_half(conn: Any, run: Callable[[int], Any], count: int) -> tuple[Any, int, int]:
    """Say ready, ``run`` the first half of ``count`` (warm-up), then the second half.

    Returns:
        What the last ``run`` returned, the time it ended (``perf_counter_ns``), and the RSS
        growth in KiB over the second half.
    """
    warm = _half(count)
    _ready(conn)
    run(warm)
    rss_warm = _rss_kib()
    last = run(count - warm)
    end = time.perf_counter_ns()
    return last, end, _rss_kib() - rss_warm


def _rss_metrics(growth_kib: int, count: int) -> dict[str, float]:
    """RSS growth of a consumer over the second half of its messages, and per message."""
    measured = count - _half(count)
    return {
        "rss_growth_kib": float(growth_kib),
        "rss_bytes_per_msg": growth_kib * 1024 / max(1, measured),
    }


RSS_SLACK_KIB = 128  # one-time growth (allocator arenas, 16-page steps); a leak is per message
RSS_UNITS = {"rss_growth_kib": "KiB", "rss_bytes_per_msg": "B/msg"}


def _child_entry(conn: Any, target: Callable[..., Any], args: tuple[Any, ...]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    try:
        conn.send(("ok", target(conn, *args)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class Child:
    """A forked process running ``target(conn, *args)``; its return value is its last message."""

    def __init__(self, target: Callable[..., Any], *args: Any) -> None:
        ctx = multiprocessing.get_context("fork")
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_child_entry, args=(child_conn, target, args), daemon=True)
        self.proc.start()
        child_conn.close()

    def recv(self, timeout: float = CHILD_TIMEOUT) -> Any:
        if not self.conn.poll(timeout):
            raise RuntimeError(f"child {self.proc.pid} sent nothing for {timeout} s")
        try:
            kind, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"child {self.proc.pid} died (exit {self.proc.exitcode})") from None
        if kind == "error":
            raise RuntimeError(f"child {self.proc.pid} failed:\n{value}")
        return value

    def send(self, obj: Any) -> None:
        self.conn.send(obj)

    def close(self) -> None:
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ready(conn: Any) -> None:
    conn.send(("ok", "ready"))


class _Deadline:
    """Spin-wait helper for the slow path only (queue full or empty): never in the fast path."""

    def __init__(self, seconds: float = CHILD_TIMEOUT, peer: Child | None = None) -> None:
        self.end = time.monotonic() + seconds
        self.peer = peer
        self.spins = 0

    def check(self) -> None:
        self.spins += 1
        if self.spins & 0x3FFF:
            return
        if time.monotonic() > self.end:
            raise TimeoutError("benchmark peer made no progress")
        if self.peer is not None and not self.peer.proc.is_alive():
            raise RuntimeError(f"benchmark peer died (exit {self.peer.proc.exitcode})")


def _put_wait(put: Callable[[Any], bool], item: Any, dl: _Deadline) -> None:
    while not put(item):
        dl.check()


def _get_wait(get: Callable[..., Any], dl: _Deadline, *args: Any) -> Any:
    while (data := get(*args)) is None:
        dl.check()
    return data


@contextmanager
def shm_file(size: int) -> Iterator[str]:
    """A zeroed file of ``size`` bytes on tmpfs (shared memory, like a memfd BAR2)."""
    where = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    fd, path = tempfile.mkstemp(prefix="ivshmem-bench-", dir=where)
    try:
        os.ftruncate(fd, size)
        os.close(fd)
        yield path
    finally:
        os.unlink(path)


@contextmanager
def mapped_queue(path: str, size: int, blocks: bool = False) -> Iterator[SpscQueue]:
    """The queue in ``path``; ``blocks``: with the compiled block copies (when built)."""
    fd = os.open(path, os.O_RDWR)
    try:
        mem = mmap.mmap(fd, size, mmap.MAP_SHARED)
    finally:
        os.close(fd)
    q = SpscQueue(memoryview(mem), blocks=queue_blocks() if blocks else None)
    try:
        yield q
    finally:
        q.release()
        mem.close()


# Other processes' load ----------------------------------------------------------------------------


def cpu_busy(seconds: float = 0.5) -> float | None:
    """Fraction of all CPU time spent not idle over ``seconds`` (other processes' load)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


class ForeignCpu:
    """How much of the machine something else used while a run went on.

    All non-idle CPU time in /proc/stat (user, system, interrupts, and steal: the host running
    other guests) minus this benchmark's own (itself and every child it reaped: the forked
    peers, the C programs and their children), as a fraction of the machine's capacity
    (cores x wall time). Interrupt work for our own wake-ups counts here too, so a few
    percent is normal. None where /proc/stat is unreadable.
    """

    def __init__(self) -> None:
        self._t0, self._busy0, self._ours0 = time.monotonic(), self._busy(), self._ours()

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _ours() -> float:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def fraction(self) -> float | None:
        busy = self._busy()
        if busy is None or self._busy0 is None:
            return None
        wall = time.monotonic() - self._t0
        foreign = (busy - self._busy0) - (self._ours() - self._ours0)
        return min(1.0, max(0.0, foreign / max(1e-9, wall * (os.cpu_count() or 1))))


def wait_until_quiet(limit_s: float) -> float | None:
    """Wait (at most ``limit_s``) until other processes use < BUSY_WARN of the CPUs."""
    end = time.monotonic() + limit_s
    while True:
        busy = cpu_busy(0.2)
        if busy is None or busy < BUSY_WARN or time.monotonic() >= end:
            return busy
        time.sleep(1.0)


# The run loop -------------------------------------------------------------------------------------


class Config:
    """One run's settings, handed to every case; also what cases leave for later ones (the C
    eventfd wake-ups the rtt case measured, reused by doorbell) and the load they saw."""

    def __init__(
        self, runs: int, scale: float, binary: Path | None, progress: bool, wait_quiet: float
    ) -> None:
        self.runs = runs
        self.scale = scale
        self.binary = binary
        self.progress = progress
        self.wait_quiet = wait_quiet
        self.c_oneway: list[dict[str, float]] = []  # C eventfd one-way wake-ups, per run
        self.foreign: list[float] = []  # other processes' CPU share, per kept run
        self.retried = 0

    def count(self, key: str) -> int:
        return max(MIN_COUNT, int(COUNTS[key] * self.scale))

    def repeat(self, fn: Callable[[], Any], loaded: bool = False) -> list[Any]:
        """``runs`` results of ``fn()``. With ``wait_quiet``, each run first waits for a quiet
        machine, and a run that other processes disturbed is done again (up to ``runs`` more
        times in all). ``loaded``: the run brings its own load (CPU hogs), never retried."""
        out: list[Any] = []
        retries = 0
        while len(out) < self.runs:
            if self.wait_quiet:
                wait_until_quiet(self.wait_quiet)
            meter = ForeignCpu()
            value = fn()
            foreign = meter.fraction()
            disturbed = not loaded and foreign is not None and foreign > BUSY_WARN
            if disturbed and self.wait_quiet and retries < self.runs:
                retries += 1
                self.retried += 1
                if self.progress:
                    print("x", end="", file=sys.stderr, flush=True)
                continue
            out.append(value)
            if foreign is not None:
                self.foreign.append(foreign)
            if self.progress:
                print(".", end="", file=sys.stderr, flush=True)
        return out

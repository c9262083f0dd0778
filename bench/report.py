"""What a report says besides the figures: the machine, Python/C ratios, the issue's targets.

Figures from different machines or loads are not comparable, so the machine and its load go
into every report; ratios against the C reference of the same run are what is comparable.
The targets are issue 8's, evaluated on this run's medians and never on a single run.
"""

from __future__ import annotations

import itertools
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ivshmem_bus
from ivshmem_bus.core.queue import queue_capacity

from ._cref import _cc_version, _compiler
from .harness import LARGE_REGION, RSS_SLACK_KIB, SMALL_REGION, _half
from .roundtrip import FLOOD_WINDOWS, RTT_MODES

__all__ = ["c_floor_note", "cpu_model", "machine_info", "ratios", "targets"]

NOTE = (
    "2 cores, 2 processes: a busy-polling case keeps both cores busy (producer and consumer, "
    "or driver and device); pinned only where a row says so (same core, two cores; the CPU "
    "hog rows put the device on CPU 1)"
)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(cc_note: str) -> dict[str, Any]:
    from ivshmem_bus.native import ffi as _ffi

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    cc = _compiler()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "machine": platform.machine(),
        "cc": _cc_version(cc) if cc else "",
        "c_reference": cc_note or "built",
        "ivshmem_bus": ivshmem_bus.__version__,
        "compiled_helper": bool(_ffi.HAVE_COMPILED),
        "commit": commit,
        "note": NOTE,
    }


def _median(results: dict[str, dict[str, Any]], rid: str, metric: str) -> float | None:
    rec = results.get(rid)
    if rec is None or metric not in rec["metrics"]:
        return None
    median: float = rec["metrics"][metric]["median"]
    return median


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    out = {}
    for q in (f"q{queue_capacity(SMALL_REGION)}", f"q{queue_capacity(LARGE_REGION)}"):
        c = _median(results, f"raw.{q}.c", "rate")
        for api in ("per-call", "batch", "batch-py", "many", "drain", "c-block"):
            py = _median(results, f"raw.{q}.{api}", "rate")
            if c and py is not None:
                out[f"raw.{q}.{api}/c"] = py / c
        c_block = _median(results, f"raw.{q}.c-block", "rate")
        for api in ("batch", "batch-py"):
            py = _median(results, f"raw.{q}.{api}", "rate")
            if c_block and py is not None:
                out[f"raw.{q}.{api}/c-block"] = py / c_block
    for size in (64, 4096, 65536):
        c = _median(results, f"vq.c.memcpy.{size}", "rate")
        for direction in ("sink", "source"):
            py = _median(results, f"vq.python.{direction}.{size}", "rate")
            if c and py is not None:
                out[f"vq.{direction}.{size}/memcpy"] = py / c
    c = _median(results, "rtt.c.eventfd", "p50_us")
    py = _median(results, "rtt.python.eventfd", "p50_us")
    if c and py is not None:
        out["rtt.eventfd.p50/c"] = py / c
    for slug in ("same-core", "two-cores"):  # both processes of each pair placed alike
        c = _median(results, f"rtt.c.eventfd.{slug}", "p50_us")
        py = _median(results, f"rtt.python.eventfd.{slug}", "p50_us")
        if c and py is not None:
            out[f"rtt.eventfd.{slug}.p50/c"] = py / c
    c = _median(results, "rtt.c.spin", "p50_us")
    py = _median(results, "rtt.python.busy-poll", "p50_us")
    if c and py is not None:
        out["rtt.busy-poll.p50/c"] = py / c
    return out


def c_floor_note(results: dict[str, dict[str, Any]]) -> str:
    """The C ping-pongs' own worst cases: what the machine does to any max, Python or not."""
    parts = []
    for rid, name in (("rtt.c.spin", "spin"), ("rtt.c.eventfd", "eventfd")):
        rec = results.get(rid)
        if rec is not None:
            mt = rec["metrics"]
            parts.append(
                f"C {name} ping-pong max {_us(mt['max_us']['median'])} us, "
                f"{mt['over_1ms']['median']:.0f} of {rec['params']['count']} over 1 ms"
            )
    if not parts:
        return ""
    return "worst cases bound by the machine, medians: " + "; ".join(parts)


Source = str | tuple[str, str]  # a ratio's key, or (record id, metric): that record's median
Row = tuple[str, str, Source, Callable[[float], bool], str]  # name, goal, source, test, unit
QEMU_DEADLINE = "<= 1000 us (QEMU)"
DIRECTIONS = ("sink", "source")


def _at_least(bound: float) -> Callable[[float], bool]:
    return lambda v: v >= bound


def _at_most(bound: float) -> Callable[[float], bool]:
    return lambda v: v <= bound


def _exactly(want: float) -> Callable[[float], bool]:
    return lambda v: v == want


def _rows(small: str, large: str) -> list[Row]:
    """The targets read off one ratio or one median, in the report's order up to the
    virtqueue soak (issue 8's, then issue 15's for the virtqueue data path, the ``vq`` case)."""
    queues = (small, large)
    places = ("same-core", "two-cores")
    return [
        *(
            (f"batch raw slots, {q[1:]}-slot queue, vs C", ">= 50%",
             f"raw.{q}.batch/c", _at_least(0.5), "ratio")
            for q in queues
        ),
        *(
            (f"per-call put/get, {q[1:]}-slot queue", ">= 1,000,000 slots/s",
             (f"raw.{q}.per-call", "rate"), _at_least(1e6), "slots/s")
            for q in queues
        ),
        ("encoded encode+put / get+decode", ">= 300,000 msgs/s",
         ("encoded.codec", "rate"), _at_least(3e5), "msgs/s"),
        ("round trip p50, eventfd, vs C eventfd ping-pong", "<= 2x",
         "rtt.eventfd.p50/c", _at_most(2.0), "ratio"),
        *(
            (f"round trip p50, eventfd, {slug.replace('-', ' ')}, vs C placed alike", "<= 2x",
             f"rtt.eventfd.{slug}.p50/c", _at_most(2.0), "ratio")
            for slug in places
        ),
        ("round trip p50, busy-poll", "<= 10 us",
         ("rtt.python.busy-poll", "p50_us"), _at_most(10.0), "us"),
        *(
            (f"round trip p99.9, {mode}", "<= 1000 us",
             (f"rtt.python.{mode}", "p99_9_us"), _at_most(1000.0), "us")
            for mode in RTT_MODES
        ),
        *(
            (f"serve loop worst response, {window} in flight, {mode}", QEMU_DEADLINE,
             (f"flood.{mode}.w{window}", "max_us"), _at_most(1000.0), "us")
            for mode, window in itertools.product(RTT_MODES, FLOOD_WINDOWS)
        ),
        *(
            (f"virtqueue 64 KiB buffers, {direction}, vs C memcpy", ">= 25%",
             f"vq.{direction}.65536/memcpy", _at_least(0.25), "ratio")
            for direction in DIRECTIONS
        ),
        *(
            (f"virtqueue 64 B buffers, {direction}, one way", ">= 300,000 buffers/s",
             (f"vq.python.{direction}.64", "rate"), _at_least(3e5), "buffers/s")
            for direction in DIRECTIONS
        ),
        ("device's worst response while it works a queue", QEMU_DEADLINE,
         ("vq.latency", "max_us"), _at_most(1000.0), "us"),
    ]  # fmt: skip


LATE_ROWS: list[Row] = [  # after the soak's: the device under CPU hogs, a new driver
    *(
        (f"serve loop p99.9, 1 in flight, CPU hog per core, device {sched}", QEMU_DEADLINE,
         (f"flood.eventfd.w1.load-{sched}", "p99_9_us"), _at_most(1000.0), "us")
        for sched in ("fifo", "normal")
    ),
    *(
        (f"first response to a new driver, max, {suffix.replace('-load', ', CPU hogs')}",
         QEMU_DEADLINE, (f"startup.{suffix}", "max_us"), _at_most(1000.0), "us")
        for suffix in ("auto", "auto-load")
    ),
]  # fmt: skip

HUB_ROWS: list[Row] = [  # issue 18's: linux-v0 through the device hub (the ``hub`` case)
    *(
        (f"hub round trip p99.9, {suffix.replace('load-', 'CPU hogs, device ')}", QEMU_DEADLINE,
         (f"hub.rtt.hub.{suffix}", "p99_9_us"), _at_most(1000.0), "us")
        for suffix in ("idle", "load-normal", "load-fifo")
    ),
    *(
        (f"hub start-up of 2 devices to DRIVER_OK, max, {suffix.replace('load-', 'CPU hogs, ')}",
         "<= 100 ms (issue 18)", (f"hub.startup.{suffix}", "max_us"), _at_most(100_000.0), "us")
        for suffix in ("idle", "load-fifo")
    ),
]  # fmt: skip

# The soak's rows: "<N>-buffer " + name; the value is the worst run's largest of the metrics.
SOAK_ROWS: list[tuple[str, str, tuple[str, ...], Callable[[float], bool], str]] = [
    ("verified run: lost + duplicated + corrupted (worst run)", "0 (issue: 10^6 buffers)",
     ("lost", "duplicated", "corrupted"), _exactly(0), "count"),
    ("run: RSS growth after warm-up, either process (worst run)", f"<= {RSS_SLACK_KIB} KiB",
     ("driver_rss_growth_kib", "device_rss_growth_kib"), _at_most(RSS_SLACK_KIB), "KiB"),
    ("run: open fds growth, either process (worst run)", "0",
     ("driver_fd_growth", "device_fd_growth"), _exactly(0), "count"),
]  # fmt: skip


def targets(results: dict[str, dict[str, Any]], rat: dict[str, float]) -> list[dict[str, Any]]:
    """The issue's targets, evaluated on this run's medians (met: None when not measured)."""
    small, large = f"q{queue_capacity(SMALL_REGION)}", f"q{queue_capacity(LARGE_REGION)}"
    rows: list[dict[str, Any]] = []

    def add(
        name: str, goal: str, value: float | None, ok: Callable[[float], bool], unit: str
    ) -> None:
        rows.append(
            {
                "name": name,
                "goal": goal,
                "value": value,
                "unit": unit,
                "met": None if value is None else bool(ok(value)),
            }
        )

    def add_rows(table: list[Row]) -> None:
        for name, goal, source, ok, unit in table:
            value = rat.get(source) if isinstance(source, str) else _median(results, *source)
            add(name, goal, value, ok, unit)

    add_rows(_rows(small, large))
    soak = results.get("vq.soak")
    if soak is not None:  # no soak record: no soak rows (not even "not measured")
        mt, n = soak["metrics"], soak["params"]["count"]
        for name, goal, keys, ok, unit in SOAK_ROWS:
            add(f"{_si(n)}-buffer {name}", goal, max(mt[k]["max"] for k in keys), ok, unit)
    add_rows(LATE_ROWS)
    add_rows(HUB_ROWS)
    growth = [
        (
            rec["metrics"]["rss_growth_kib"]["max"],
            rec["params"]["count"] - _half(rec["params"]["count"]),
        )
        for rec in results.values()
        if "rss_growth_kib" in rec["metrics"]
    ]
    fewest = min((n for _, n in growth), default=0)
    add(
        f"RSS growth over >= {_si(fewest)} msgs (2nd half of each Python run)",
        f"<= {RSS_SLACK_KIB} KiB (issue: 10^7 msgs)",
        max(g for g, _ in growth) if growth else None,
        _at_most(RSS_SLACK_KIB),
        "KiB",
    )
    return rows


def _si(v: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.2f}{suffix}"
    return f"{v:.0f}"


def _us(v: float) -> str:
    return f"{v:,.0f}" if v >= 1000 else f"{v:.1f}"

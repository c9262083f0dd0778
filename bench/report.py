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

    for q in (small, large):
        add(
            f"batch raw slots, {q[1:]}-slot queue, vs C",
            ">= 50%",
            rat.get(f"raw.{q}.batch/c"),
            lambda v: v >= 0.5,
            "ratio",
        )
    for q in (small, large):
        add(
            f"per-call put/get, {q[1:]}-slot queue",
            ">= 1,000,000 slots/s",
            _median(results, f"raw.{q}.per-call", "rate"),
            lambda v: v >= 1e6,
            "slots/s",
        )
    add(
        "encoded encode+put / get+decode",
        ">= 300,000 msgs/s",
        _median(results, "encoded.codec", "rate"),
        lambda v: v >= 3e5,
        "msgs/s",
    )
    add(
        "round trip p50, eventfd, vs C eventfd ping-pong",
        "<= 2x",
        rat.get("rtt.eventfd.p50/c"),
        lambda v: v <= 2.0,
        "ratio",
    )
    for slug in ("same-core", "two-cores"):
        add(
            f"round trip p50, eventfd, {slug.replace('-', ' ')}, vs C placed alike",
            "<= 2x",
            rat.get(f"rtt.eventfd.{slug}.p50/c"),
            lambda v: v <= 2.0,
            "ratio",
        )
    add(
        "round trip p50, busy-poll",
        "<= 10 us",
        _median(results, "rtt.python.busy-poll", "p50_us"),
        lambda v: v <= 10.0,
        "us",
    )
    for mode in RTT_MODES:
        add(
            f"round trip p99.9, {mode}",
            "<= 1000 us",
            _median(results, f"rtt.python.{mode}", "p99_9_us"),
            lambda v: v <= 1000.0,
            "us",
        )
    for mode, window in itertools.product(RTT_MODES, FLOOD_WINDOWS):
        add(
            f"serve loop worst response, {window} in flight, {mode}",
            "<= 1000 us (QEMU)",
            _median(results, f"flood.{mode}.w{window}", "max_us"),
            lambda v: v <= 1000.0,
            "us",
        )
    _vq_targets(results, rat, add)
    for sched in ("fifo", "normal"):
        add(
            f"serve loop p99.9, 1 in flight, CPU hog per core, device {sched}",
            "<= 1000 us (QEMU)",
            _median(results, f"flood.eventfd.w1.load-{sched}", "p99_9_us"),
            lambda v: v <= 1000.0,
            "us",
        )
    for suffix in ("auto", "auto-load"):
        add(
            f"first response to a new driver, max, {suffix.replace('-load', ', CPU hogs')}",
            "<= 1000 us (QEMU)",
            _median(results, f"startup.{suffix}", "max_us"),
            lambda v: v <= 1000.0,
            "us",
        )
    _hub_targets(results, add)
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
        lambda v: v <= RSS_SLACK_KIB,
        "KiB",
    )
    return rows


def _hub_targets(
    results: dict[str, dict[str, Any]],
    add: Callable[[str, str, float | None, Callable[[float], bool], str], None],
) -> None:
    """Issue 18's: linux-v0 through the device hub (the ``hub`` case)."""
    for suffix in ("idle", "load-normal", "load-fifo"):
        add(
            f"hub round trip p99.9, {suffix.replace('load-', 'CPU hogs, device ')}",
            "<= 1000 us (QEMU)",
            _median(results, f"hub.rtt.hub.{suffix}", "p99_9_us"),
            lambda v: v <= 1000.0,
            "us",
        )
    for suffix in ("idle", "load-fifo"):
        add(
            f"hub start-up of 2 devices to DRIVER_OK, max, {suffix.replace('load-', 'CPU hogs, ')}",
            "<= 100 ms (issue 18)",
            _median(results, f"hub.startup.{suffix}", "max_us"),
            lambda v: v <= 100_000.0,
            "us",
        )


def _vq_targets(
    results: dict[str, dict[str, Any]],
    rat: dict[str, float],
    add: Callable[[str, str, float | None, Callable[[float], bool], str], None],
) -> None:
    """Issue 15's: the virtqueue data path (the ``vq`` case)."""
    for direction in ("sink", "source"):
        add(
            f"virtqueue 64 KiB buffers, {direction}, vs C memcpy",
            ">= 25%",
            rat.get(f"vq.{direction}.65536/memcpy"),
            lambda v: v >= 0.25,
            "ratio",
        )
    for direction in ("sink", "source"):
        add(
            f"virtqueue 64 B buffers, {direction}, one way",
            ">= 300,000 buffers/s",
            _median(results, f"vq.python.{direction}.64", "rate"),
            lambda v: v >= 3e5,
            "buffers/s",
        )
    add(
        "device's worst response while it works a queue",
        "<= 1000 us (QEMU)",
        _median(results, "vq.latency", "max_us"),
        lambda v: v <= 1000.0,
        "us",
    )
    soak = results.get("vq.soak")
    if soak is None:
        return
    mt = soak["metrics"]
    n = soak["params"]["count"]
    add(
        f"{_si(n)}-buffer verified run: lost + duplicated + corrupted (worst run)",
        "0 (issue: 10^6 buffers)",
        max(mt[k]["max"] for k in ("lost", "duplicated", "corrupted")),
        lambda v: v == 0,
        "count",
    )
    add(
        f"{_si(n)}-buffer run: RSS growth after warm-up, either process (worst run)",
        f"<= {RSS_SLACK_KIB} KiB",
        max(mt[k]["max"] for k in ("driver_rss_growth_kib", "device_rss_growth_kib")),
        lambda v: v <= RSS_SLACK_KIB,
        "KiB",
    )
    add(
        f"{_si(n)}-buffer run: open fds growth, either process (worst run)",
        "0",
        max(mt[k]["max"] for k in ("driver_fd_growth", "device_fd_growth")),
        lambda v: v == 0,
        "count",
    )


def _si(v: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.2f}{suffix}"
    return f"{v:.0f}"


def _us(v: float) -> str:
    return f"{v:,.0f}" if v >= 1000 else f"{v:.1f}"

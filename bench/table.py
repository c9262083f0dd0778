"""The report as tables for people, printed with rich.

The same text is read in a terminal and quoted as plain text (the README quotes it), so:
no markup is interpreted (labels hold brackets), styles only where a terminal shows them
(rich emits no escape sequences when its file is not a terminal), and every table gets the
width it needs even past the terminal's or the 80 columns assumed for a pipe: a figure
split over two lines is worse than a long line.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import IO, Any

from rich.console import Console, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from ivshmem_bus.core.queue import queue_capacity

from .harness import BUSY_WARN, LARGE_REGION, PROFILE, SMALL_REGION
from .report import _si, _us, c_floor_note

__all__ = ["print_table"]

Cell = Text | str
LATENCY_COLUMNS = [("p50_us", "p50"), ("p99_us", "p99"), ("p99_9_us", "p99.9"), ("max_us", "max")]
WAKE_NOTE = (
    "(a wake-up is bimodal on a VM: a few us when the woken process runs on the waker's "
    "vCPU, ~20 us when its vCPU was halted; min-max show which way the runs went)"
)


def _cell(stat: dict[str, Any], fmt: Callable[[float], str]) -> Text:
    """``median [min-max]``, the median in bold where a terminal shows it."""
    return Text.assemble((fmt(stat["median"]), "bold"), f" [{fmt(stat['min'])}-{fmt(stat['max'])}]")


def _table(title: str, *columns: str) -> Table:
    """Borderless (plain text stays plain), first column the group's title, figures right."""
    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    table.add_column(title, no_wrap=True)
    for name in columns:
        table.add_column(name, justify="right", no_wrap=True)
    return table


def _raw(recs: list[dict[str, Any]], rat: dict[str, float]) -> Table:
    table = _table("raw 64-byte slots, one way", "slots/s", "vs C", "vs C block")
    current = None
    for rec in recs:
        if rec["params"]["slots"] != current:
            current = rec["params"]["slots"]
            heading = f"  {current}-slot queue ({rec['params']['region_bytes']} bytes)"
            table.add_row(Text(heading, "italic"), "", "", "")
        key = f"raw.q{current}.{rec['id'].rsplit('.', 1)[1]}"
        vs = [f"{rat[k]:.1%}" if k in rat else "" for k in (f"{key}/c", f"{key}/c-block")]
        table.add_row(f"    {rec['label']}", _cell(rec["metrics"]["rate"], _si), *vs)
    return table


def _encoded(recs: list[dict[str, Any]]) -> Table:
    table = _table(f"virtio-msg {PROFILE}, one way", "msgs/s")
    for rec in recs:
        table.add_row(f"  {rec['label']}", _cell(rec["metrics"]["rate"], _si))
    return table


def _latency(title: str, recs: list[dict[str, Any]], extra: list[tuple[str, str]]) -> Table:
    cols = [*LATENCY_COLUMNS, *extra]
    table = _table(title, *(head for _, head in cols))
    for rec in recs:
        cells: list[Cell] = []
        for key, _ in cols:
            stat = rec["metrics"].get(key)
            if stat is None:
                cells.append("")
            elif key in ("over_1ms", "probes"):
                cells.append(_cell(stat, lambda v: f"{v:.0f}"))
            elif key == "rate":
                cells.append(_cell(stat, _si))
            else:
                cells.append(_cell(stat, _us))
        table.add_row(f"  {rec['label']}", *cells)
    return table


def _burst(rec: dict[str, Any]) -> Text:
    mt = rec["metrics"]
    return Text.assemble(
        f"  {rec['label']}: doorbells/burst ",
        _cell(mt["doorbells_per_burst"], lambda v: f"{v:.1f}"),
        ", receiver wake-ups/burst ",
        _cell(mt["wakeups_per_burst"], lambda v: f"{v:.1f}"),
        ", send ",
        _cell(mt["send_us_per_msg"], lambda v: f"{v:.2f}"),
        " us/msg",
    )


def _bytes_rate(v: float) -> str:
    return f"{v / 1e6:,.0f} MB/s"


def _vq(recs: list[dict[str, Any]], rat: dict[str, float]) -> Iterator[RenderableType]:
    """Throughput rows by buffer size, then the latency probe and the verified soak."""
    table = _table("virtqueue, one way (pool window, fake pair)", "buffers/s", "bytes/s",
                   "vs C memcpy", "kicks/buffer")  # fmt: skip
    for rec in recs:
        mt, rid = rec["metrics"], rec["id"]
        if rid.startswith(("vq.c.", "vq.python.")):
            size = rec["params"]["buffer_bytes"]
            key = ".".join(rid.split(".")[2:4])  # "sink.64" (Python) or "64" (C)
            vs = f"{rat[f'vq.{key}/memcpy']:.1%}" if f"vq.{key}/memcpy" in rat else ""
            kicks = mt.get("kicks_per_buffer")
            table.add_row(
                f"  {rec['label']}",
                _cell(mt["rate"], _si),
                _cell(mt["bytes_rate"], _bytes_rate),
                vs if rec["impl"] == "python" else f"({size} B each)",
                _cell(kicks, lambda v: f"{v:.4f}") if kicks else "",
            )
    yield table
    latency = [r for r in recs if r["id"] == "vq.latency"]
    if latency:
        extra = [("over_1ms", ">1 ms"), ("probes", "probes")]
        yield ""
        yield _latency("device response while it works a queue, us", latency, extra)
    for rec in recs:
        if rec["id"] == "vq.soak":
            mt = rec["metrics"]

            def n(key: str, mt: dict[str, Any] = mt) -> Text:
                return _cell(mt[key], lambda v: f"{v:.0f}")

            yield Text.assemble(
                f"  {rec['label']}, {_si(rec['params']['count'])} per run: lost ", n("lost"),
                ", duplicated ", n("duplicated"), ", corrupted ", n("corrupted"),
                "; RSS growth KiB driver ", n("driver_rss_growth_kib"), " device ",
                n("device_rss_growth_kib"), "; fd growth driver ", n("driver_fd_growth"),
                " device ", n("device_fd_growth"), "; ", _cell(mt["rate"], _si), " buffers/s",
            )  # fmt: skip


def _target_value(t: dict[str, Any]) -> str:
    if t["unit"] == "ratio":
        return f"{t['value']:.2f}x" if "2x" in t["goal"] else f"{t['value']:.1%}"
    if t["unit"] == "B/msg":
        return f"{t['value']:.3f} {t['unit']}"
    if t["unit"] == "count":
        return f"{t['value']:.0f}"
    if t["unit"] in ("us", "KiB"):
        return f"{_us(t['value'])} {t['unit']}"
    return f"{_si(t['value'])} {t['unit']}"


def _targets(rows: list[dict[str, Any]]) -> Table:
    table = _table("targets (issue 8), on medians of this run", "goal", "this run")
    table.add_column("", no_wrap=True)
    for t in rows:
        if t["value"] is None:
            table.add_row(f"  {t['name']}", t["goal"], "not measured", "-")
        else:
            met = Text("met", "green") if t["met"] else Text("MISSED", "bold red")
            table.add_row(f"  {t['name']}", t["goal"], _target_value(t), met)
    return table


def _header(report: dict[str, Any]) -> Iterator[RenderableType]:
    m = report["machine"]
    scale = "" if report["scale"] in (1.0, 0.1) else f", counts x{report['scale']:g}"
    yield Text(
        f"ivshmem_bus {m['ivshmem_bus']} bench ({'quick' if report['quick'] else 'full'}"
        f"{scale}, {report['runs']} runs per figure: median [min-max])",
        "bold",
    )
    yield (
        f"machine: {m['cpu']}, {m['cores']} cores, {m['kernel']}, {m['python']}, "
        f"compiled helper {'yes' if m['compiled_helper'] else 'no'}, commit {m['commit'] or '?'}"
    )
    yield f"note: {m['note']}"
    if (m["cpu_busy_before"] or 0.0) > BUSY_WARN:
        yield Text(
            f"WARNING: CPUs {m['cpu_busy_before']:.0%} busy before the run (load average "
            f"{m['loadavg_after']:.2f} after it): other processes skewed these figures",
            "bold yellow",
        )
    rat = report["ratios"]
    head = [
        f"{api} {rat[f'raw.q{q}.{api}/c']:.1%} ({q} slots)"
        for api in ("per-call", "batch")
        for q in (queue_capacity(SMALL_REGION), queue_capacity(LARGE_REGION))
        if f"raw.q{q}.{api}/c" in rat
    ]
    if head:
        yield "headline, Python/C raw slot throughput: " + ", ".join(head)


def renderables(report: dict[str, Any]) -> Iterator[RenderableType]:
    """The report top to bottom; ``""`` is a blank line between blocks."""
    yield from _header(report)
    by_group: dict[str, list[dict[str, Any]]] = {}
    for rec in report["results"]:
        by_group.setdefault(rec["group"], []).append(rec)
    if "raw" in by_group:
        yield from ("", _raw(by_group["raw"], report["ratios"]))
    if "encoded" in by_group:
        yield from ("", _encoded(by_group["encoded"]))
    if "rtt" in by_group:
        yield from ("", _latency("round trip, us", by_group["rtt"], [("over_1ms", ">1 ms")]))
    if "flood" in by_group:
        extra = [("over_1ms", ">1 ms"), ("rate", "responses/s")]
        yield from ("", _latency("serve loop under a flood, put->get us", by_group["flood"], extra))
    if "startup" in by_group:
        title = "first response to a driver that sends as it joins (QEMU: ~1 ms), us"
        yield from ("", _latency(title, by_group["startup"], [("over_1ms", ">1 ms")]))
    if "hub" in by_group:
        title = "linux-v0 through the device hub (issue 18), us"
        yield from ("", _latency(title, by_group["hub"], [("over_1ms", ">1 ms")]))
    if "doorbell" in by_group:
        wakes = [r for r in by_group["doorbell"] if r["id"].startswith("doorbell.wake")]
        extra = [("ring_call_us", "ring call us")]
        yield from ("", WAKE_NOTE, "", _latency("doorbell ring -> wake, us", wakes, extra))
        yield from (_burst(r) for r in by_group["doorbell"] if r["id"].startswith("doorbell.burst"))
    if "vq" in by_group:
        yield from ("", *_vq(by_group["vq"], report["ratios"]))
    if report["targets"]:
        yield from ("", _targets(report["targets"]))
        floor = c_floor_note({r["id"]: r for r in report["results"]})
        if floor:
            yield f"  ({floor})"
    noisy = {c: f for c, f in report["foreign_cpu"].items() if f is not None and f > BUSY_WARN}
    if noisy:
        during = ", ".join(f"{f:.0%} of the CPUs during {c}" for c, f in noisy.items())
        warning = f"WARNING: other processes used {during}: those figures are skewed"
        yield from ("", Text(warning, "bold yellow"))
    for err in report["errors"]:
        last = err["error"].strip().splitlines()[-1]
        yield from ("", Text(f"ERROR in {err['case']}: {last}", "bold red"))
    yield from ("", f"({report['duration_s']:.0f} s)")


def print_table(report: dict[str, Any], file: IO[str] | None = None) -> None:
    """Print the report to ``file`` (default stdout), plain text unless it is a terminal."""
    out = sys.stdout if file is None else file
    console = Console(file=out, markup=False, emoji=False, highlight=False, soft_wrap=True)
    items = list(renderables(report))
    unbounded = console.options.update_width(1 << 16)
    needed = max(
        (Measurement.get(console, unbounded, t).maximum for t in items if isinstance(t, Table)),
        default=0,
    )
    if needed > console.width:
        console.width = needed  # a long line wraps in the terminal; a cell never wraps
    with console.capture() as captured:
        for item in items:
            console.print(item)
    # Cells are padded to their column's width: no trailing blanks in quoted plain text.
    out.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
    out.flush()

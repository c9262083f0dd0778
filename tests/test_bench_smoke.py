"""The benchmark runs end to end with tiny counts and writes well-formed JSON, both as
``python -m bench`` (from the source tree) and as ``ivshmem-bus bench``.

A benchmark is not a test (issue 8): nothing here looks at a figure's value, only that every
case ran in its two processes, that the report has the shape runs are compared by, and that
the table stays plain text when it is not printed to a terminal (the README quotes it).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CASES = {"raw", "encoded", "rtt", "flood", "doorbell", "vq", "startup", "hub"}
LATENCY = {"p50_us", "p99_us", "p99_9_us", "max_us", "over_1ms"}
RAW_APIS = ("per-call", "batch", "batch-py", "many", "drain")
RAW_IDS = {f"raw.{q}.{api}" for q in ("q62", "q4096") for api in RAW_APIS}
C_IDS = {f"raw.{q}.{c}" for q in ("q62", "q4096") for c in ("c", "c-block")}
VQ_SIZES = (64, 4096, 65536)
VQ_PYTHON = {f"vq.python.{d}.{s}" for d in ("sink", "source") for s in VQ_SIZES}
VQ_RATES = {"rate", "bytes_rate", "kicks_per_buffer", "sleeps"}
SOAK = {"buffers", "lost", "duplicated", "corrupted", "driver_rss_growth_kib",
        "driver_fd_growth", "device_rss_growth_kib", "device_fd_growth", "rate"}  # fmt: skip
# Not a terminal, and nothing forcing rich to colour anyway.
ENV = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
ANSI = re.compile(r"\x1b\[")


def run_bench(entry: list[str], out: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The benchmark at tiny counts (``entry``: the shim or the console entry point), its
    JSON to ``out`` and its C reference built under ``out``'s directory; must exit 0."""
    proc = subprocess.run(
        [sys.executable, *entry, "--scale", "0.0001", "--quiet", *args, "--json", str(out),
         "--cache-dir", str(out.parent / "cache")],
        capture_output=True, text=True, timeout=120, cwd=cwd, env=ENV,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results.json"
    proc = run_bench(["-m", "bench"], out, ROOT, "--runs", "2")
    return json.loads(out.read_text()), proc.stdout


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def test_report_header(report):
    data, _ = report
    assert data["schema"] == "ivshmem-bus-bench/1"
    assert set(data["cases"]) == CASES
    assert data["runs"] == 2
    assert data["errors"] == []
    assert set(data["foreign_cpu"]) == CASES
    machine = data["machine"]
    for key in ("cpu", "cores", "kernel", "python", "c_reference", "note"):
        assert machine[key], key
    assert isinstance(machine["compiled_helper"], bool)


def test_every_figure_is_a_median_of_the_runs(report):
    data, _ = report
    results = data["results"]
    assert {r["group"] for r in results} == CASES
    ids = [r["id"] for r in results]
    assert len(ids) == len(set(ids))
    for rec in results:
        assert rec["impl"] in ("python", "c"), rec["id"]
        assert rec["foreign_cpu"] is None or 0.0 <= rec["foreign_cpu"] <= 1.0
        assert rec["label"] and isinstance(rec["params"], dict)
        assert rec["metrics"], rec["id"]
        for name, stat in rec["metrics"].items():
            assert isinstance(stat["unit"], str), (rec["id"], name)
            assert len(stat["runs"]) == 2, (rec["id"], name)
            assert all(_is_number(v) for v in stat["runs"]), (rec["id"], name)
            assert stat["min"] <= stat["median"] <= stat["max"], (rec["id"], name)
            assert stat["min"] == min(stat["runs"]) and stat["max"] == max(stat["runs"])


def test_expected_cases_and_metrics(report):
    data, _ = report
    by_id = {r["id"]: r for r in data["results"]}
    c_built = not data["machine"]["c_reference"].startswith(("no C", "skipped"))
    for q in ("q62", "q4096"):
        for api in RAW_APIS:
            assert by_id[f"raw.{q}.{api}"]["metrics"]["rate"]["median"] > 0
        assert (f"raw.{q}.c" in by_id) == (f"raw.{q}.c-block" in by_id) == c_built
    assert by_id["encoded.codec"]["metrics"]["rate"]["median"] > 0
    assert "doorbells_per_msg" in by_id["encoded.bus"]["metrics"]
    for rid in ("rtt.python.busy-poll", "rtt.python.eventfd"):
        assert set(by_id[rid]["metrics"]) == LATENCY
    assert ("rtt.c.eventfd" in by_id) == c_built
    two_cores = len(os.sched_getaffinity(0)) >= 2
    for slug in ("same-core", "two-cores") if two_cores else ("same-core",):
        assert by_id[f"rtt.python.eventfd.{slug}"]["params"]["placement"] == slug.replace("-", " ")
        assert (f"rtt.c.eventfd.{slug}" in by_id) == c_built
    if two_cores:  # the busy machine: a CPU hog per core
        assert by_id["flood.eventfd.w1.load-normal"]["params"]["load"].endswith("CPU hogs")
        assert ("flood.eventfd.w1.load-fifo" in by_id) == (os.geteuid() == 0)
        assert by_id["startup.auto-load"]["metrics"]["max_us"]["median"] > 0
    assert by_id["startup.auto"]["metrics"]["p50_us"]["median"] > 0
    assert [r for r in data["results"] if r["group"] == "flood"]
    for runner in ("hub", "loop"):  # linux-v0 through the device hub, and without it
        assert set(by_id[f"hub.rtt.{runner}.idle"]["metrics"]) == LATENCY
    assert by_id["hub.startup.idle"]["params"]["devices"] == 2
    if two_cores:
        assert by_id["hub.rtt.hub.load-normal"]["params"]["load"] == "CPU hog per core"
        assert ("hub.rtt.hub.load-fifo" in by_id) == (os.geteuid() == 0)
        assert ("hub.c.eventfd.load" in by_id) == c_built
    assert by_id["doorbell.burst"]["metrics"]["doorbells_per_burst"]["median"] > 0
    if data["machine"]["compiled_helper"]:
        assert set(by_id["rtt.python.busy-poll-coalesced"]["metrics"]) == LATENCY
        assert by_id["doorbell.burst-coalesced"]["params"]["coalesce"] is True
    if c_built:
        assert set(data["ratios"]) >= {
            "raw.q62.batch/c",
            "raw.q62.batch/c-block",
            "rtt.eventfd.p50/c",
        }
    for target in data["targets"]:
        assert set(target) == {"name", "goal", "value", "unit", "met"}
        assert target["met"] in (True, False, None)


def test_vq_case_records_and_targets(report):
    data, stdout = report
    by_id = {r["id"]: r for r in data["results"] if r["group"] == "vq"}
    c_built = not data["machine"]["c_reference"].startswith(("no C", "skipped"))
    memcpy = {f"vq.c.memcpy.{s}" for s in VQ_SIZES}
    assert set(by_id) == VQ_PYTHON | {"vq.latency", "vq.soak"} | (memcpy if c_built else set())
    for rid in VQ_PYTHON:
        rec = by_id[rid]
        assert set(rec["metrics"]) == VQ_RATES, rid
        assert rec["params"]["buffer_bytes"] == int(rid.rsplit(".", 1)[1])
        assert rec["params"]["direction"] == rid.split(".")[2]
        assert rec["metrics"]["rate"]["min"] > 0
    if c_built:
        for size in VQ_SIZES:
            assert set(by_id[f"vq.c.memcpy.{size}"]["metrics"]) == {"rate", "bytes_rate"}
            assert {f"vq.sink.{size}/memcpy", f"vq.source.{size}/memcpy"} <= set(data["ratios"])
    latency = by_id["vq.latency"]["metrics"]
    assert set(latency) == LATENCY | {"probes"} | VQ_RATES
    assert latency["probes"]["min"] >= 1
    soak = by_id["vq.soak"]["metrics"]
    assert set(soak) == SOAK
    assert soak["buffers"]["min"] == by_id["vq.soak"]["params"]["count"]
    for key in ("lost", "duplicated", "corrupted"):  # a verification, not a figure
        assert soak[key]["max"] == 0, key
    names = [t["name"] for t in data["targets"]]
    assert sum(n.startswith("virtqueue ") for n in names) == 4
    assert any(n.startswith("device's worst response while it works a queue") for n in names)
    assert sum("-buffer" in n for n in names) == 3
    assert "virtqueue, one way (pool window, fake pair)" in stdout
    assert "device response while it works a queue, us" in stdout


def test_table_printed(report):
    _, stdout = report
    assert "raw 64-byte slots, one way" in stdout
    assert "round trip, us" in stdout
    assert "targets (issue 8)" in stdout


def test_table_is_plain_text_when_piped(report):
    data, stdout = report
    assert not ANSI.search(stdout)
    assert not [line for line in stdout.splitlines() if line != line.rstrip()]
    lines = stdout.splitlines()
    for rec in data["results"]:  # no cell wrapped: a row is one line with all its figures
        if rec["group"] in ("rtt", "flood"):
            row = next(line for line in lines if line.strip().startswith(rec["label"]))
            assert row.count(" [") == len(rec["metrics"]), row


def test_console_script_runs_the_same_benchmark(tmp_path):
    out = tmp_path / "results.json"
    proc = run_bench(["-m", "ivshmem_bus", "bench"], out, ROOT, "--runs", "1", "--only", "raw")
    assert "raw 64-byte slots, one way" in proc.stdout
    assert not ANSI.search(proc.stdout)
    data = json.loads(out.read_text())
    assert data["schema"] == "ivshmem-bus-bench/1"
    assert data["cases"] == ["raw"] and data["runs"] == 1 and data["errors"] == []
    ids = {r["id"] for r in data["results"]}
    assert ids - C_IDS == RAW_IDS
    for rec in data["results"]:
        assert rec["group"] == "raw"
        for stat in rec["metrics"].values():
            assert set(stat) == {"unit", "median", "min", "max", "runs"}
            assert len(stat["runs"]) == 1 and _is_number(stat["median"])


def test_console_script_takes_exactly_the_benchmark_options():
    def options(cmd: list[str]) -> list[str]:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split("options:", 1)[1].splitlines()

    script = options([sys.executable, "-m", "bench", "--help"])
    assert "--wait-quiet S" in "\n".join(script)
    assert options([sys.executable, "-m", "ivshmem_bus", "bench", "--help"]) == script


def test_placement_pins_this_process_and_gives_it_back():
    from bench.placement import CpuHogs, placed

    before, env = os.sched_getaffinity(0), os.environ.get("BENCH_CHILD_CPU")
    with placed("same core") as second:
        assert os.sched_getaffinity(0) == {0} and second == 0
        assert os.environ["BENCH_CHILD_CPU"] == "0"  # what the C reference's child reads
    assert os.sched_getaffinity(0) == before and os.environ.get("BENCH_CHILD_CPU") == env
    with CpuHogs() as hogs:
        pids = [p.pid for p in hogs._procs]
        assert len(pids) == len(before)
    for pid in pids:  # every hog is gone with the block
        assert not Path(f"/proc/{pid}").exists()

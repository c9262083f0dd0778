"""One whole benchmark run: the cases in order, the report, the table and the JSON file.

A case that fails is recorded in ``errors`` and the others still run: a long run should
not lose every figure to one broken case. The exit code says whether any case failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import CASES, SCHEMA
from ._cref import build_reference, default_cache_dir
from .doorbell import case_doorbell
from .harness import BUSY_WARN, Config, cpu_busy
from .hub import case_hub
from .report import machine_info, ratios, targets
from .roundtrip import case_flood, case_rtt
from .startup import case_startup
from .table import print_table
from .throughput import case_encoded, case_raw
from .virtqueue import case_vq

__all__ = ["CASE_FUNCS", "run"]

CASE_FUNCS: dict[str, Callable[[Config], list[dict[str, Any]]]] = {
    "raw": case_raw,
    "encoded": case_encoded,
    "rtt": case_rtt,
    "flood": case_flood,
    "doorbell": case_doorbell,
    "vq": case_vq,
    "startup": case_startup,
    "hub": case_hub,
}


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Run what ``args`` (bench's options) ask for; ``argv`` is recorded in the report."""
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C: shared-memory files are removed, children reaped.
        signal.signal(signal.SIGTERM, _terminate)
    cases = args.only or list(CASES)
    cfg, cc_note = _config(args)
    busy_before = cpu_busy()
    if busy_before is not None and busy_before > BUSY_WARN:
        print(
            f"warning: the CPUs are {busy_before:.0%} busy before the benchmark starts: "
            "other processes will skew the figures",
            file=sys.stderr,
        )
    started = time.time()
    t0 = time.monotonic()
    results, errors, foreign = _run_cases(cfg, cases)
    by_id = {r["id"]: r for r in results}
    rat = ratios(by_id)
    report = {
        "schema": SCHEMA,
        "started": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(),
        "duration_s": time.monotonic() - t0,
        "argv": list(argv),
        "quick": args.quick,
        "runs": cfg.runs,
        "scale": cfg.scale,
        "cases": cases,
        "machine": {
            **machine_info(cc_note),
            "cpu_busy_before": busy_before,
            "loadavg_after": os.getloadavg()[0],
        },
        "results": results,
        "foreign_cpu": foreign,
        "retried_runs": cfg.retried,
        "ratios": rat,
        "targets": targets(by_id, rat),
        "errors": errors,
    }
    _write(report, args.json)
    return 1 if errors else 0


def _config(args: argparse.Namespace) -> tuple[Config, str]:
    """The run's settings and the C reference (built, or why not)."""
    runs = args.runs or (3 if args.quick else 5)
    scale = args.scale * (0.1 if args.quick else 1.0)
    binary, cc_note = (
        (None, "skipped (--no-c)")
        if args.no_c
        else build_reference(args.cache_dir or default_cache_dir())
    )
    if cc_note and not args.no_c:
        print(f"warning: {cc_note}", file=sys.stderr)
    return Config(runs, scale, binary, progress=not args.quiet, wait_quiet=args.wait_quiet), cc_note


def _run_cases(
    cfg: Config, cases: list[str]
) -> tuple[list[dict[str, Any]], list[dict[str, str]], dict[str, float | None]]:
    """Every case's records, the cases that failed (with their tracebacks), and the most CPU
    other processes took during each case."""
    results: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    foreign: dict[str, float | None] = {}
    for case in cases:
        if cfg.progress:
            print(f"{case} ", end="", file=sys.stderr, flush=True)
        cfg.foreign = []
        try:
            recs = CASE_FUNCS[case](cfg)
        except Exception:
            recs = []
            errors.append({"case": case, "error": traceback.format_exc()})
        foreign[case] = max(cfg.foreign) if cfg.foreign else None
        for rec in recs:
            rec["foreign_cpu"] = foreign[case]
        results.extend(recs)
        if cfg.progress:
            print(file=sys.stderr, flush=True)
    return results, errors, foreign


def _write(report: dict[str, Any], json_path: str) -> None:
    """The table, and the JSON to ``json_path`` (``-``: JSON alone on stdout, table on stderr)."""
    text = json.dumps(report, indent=2) + "\n"
    if json_path == "-":
        print_table(report, sys.stderr)
        sys.stdout.write(text)
    else:
        print_table(report)
        Path(json_path).write_text(text)
        print(f"results written to {json_path}")

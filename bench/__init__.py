"""Throughput and latency of ivshmem_bus against a C reference measured in the same run.

    ivshmem-bus bench [--quick] [--json OUT] [--runs N] [--only CASE,...]
    python -m bench ...          (the same, from a source checkout)

Every case runs in two processes (the second forked with multiprocessing's "fork" context),
over the fake ivshmem device (``fake_pair``) or, for the raw-queue cases, a shared file on
tmpfs mapped MAP_SHARED by each process, as two VMs map BAR2. Each figure is the median of
``--runs`` independent runs (fresh processes and queues), with the min and max beside it.
Time is ``time.perf_counter_ns`` (CLOCK_MONOTONIC, the clock the C side reads too, so a
timestamp taken in one process can be compared with one taken in the other). Nothing is
pinned: on a 2-core machine two busy-polling processes own both cores, and the table says so.

Cases (``--only`` takes these names):

raw       64-byte slots one way through a 62-slot (4 KiB) and a 4096-slot queue: the C
          reference (``bench_ref.c``, same layout, acquire/release atomics, built with ``cc``
          into ``.cache/bench/`` of a source tree, else ``$XDG_CACHE_HOME/ivshmem-bus/bench``)
          one slot per call (as QEMU's spsc_queue) and in blocks of up to capacity - 1 slots;
          ``SpscQueue.put``/``get`` per call; the batch API ``put_block``/``get_block`` (up to
          capacity - 1 slots a call) through the compiled helper ("batch") and in pure Python
          ("batch-py"); and ``put_many``/``get_many`` and ``put_many``/``drain`` (no-op
          callback) moving half a queue (at most 256 slots) a call. The producer's clock
          starts before its first put and the consumer's stops after its last get: rate =
          slots / (end - start). The consumers also report their RSS growth over their second
          half.
encoded   virtio-msg one way: ``protocol.encode`` + ``put`` / ``get`` + ``protocol.decode``
          on the bus's 4 KiB driver queue, and the whole bus (``send``, a doorbell per
          message, / ``receive``, busy-polling).
rtt       request/response round trip (GET_DEVICE_STATUS to RngDevice served in a forked
          child by ``demo.served_device``): busy-poll (spin 1 s on both sides; also with
          ``coalesce=True``, which rings no doorbell while the peer polls) and eventfd
          wake-up (spin 0), beside a C ping-pong over two SPSC queues (the spin floor) and a
          C eventfd ping-pong (the wake-up floor).
flood     the device-role serve loop under a flood of GET_DEVICE_STATUS: the driver sends
          back to back with 1 request in flight (as QEMU does) and with the queue kept full
          (61 in flight), a doorbell each; response time = request enqueued to response
          dequeued, against QEMU's ~1 ms deadline.
doorbell  one doorbell from ring to wake-up in the other process (C eventfd, Python
          ``os.write``/``poll``, ``FakeDevice.ring``/``wait``), the cost of the ``ring`` call,
          and what a burst of 32 ``bus.send`` costs in doorbells and receiver wake-ups, with
          QEMU's semantics (a doorbell per send) and with ``coalesce=True``.
vq        the virtqueue data path (issue 15): a Python driver and a null device
          (``vqdev.NullDevice``, one copy per byte and no other work) over the fake pair,
          queue and buffers in the pool of BAR2, 64 B / 4 KiB / 64 KiB buffers, both ways
          (device reads, device writes), against C ``memcpy`` of the same bytes from the
          same number of buffers; the device's response time to GET_DEVICE_STATUS while it
          works through a 1024-entry queue; and a verified soak (10^6 buffers per run,
          stamped and checked on both sides: lost, duplicated, corrupted, RSS and fds).

hub       linux-v0 through the device hub (issue 18): GET_DEVICE_STATUS round trips to dev_id
          0 of a ``DeviceHub`` (bus thread + a worker per device) in a forked child, beside
          the single-device loop, idle and with a CPU hog per core (device normal and
          SCHED_FIFO); the start-up of two devices (GET_DEVICES to the last DRIVER_OK); the C
          eventfd ping-pong under the same hogs (``hub.py``).

Results go to ``bench-results.json`` (``--json``) so that runs can be compared; the smoke
test (tests/test_bench_smoke.py) checks its shape, never its figures. Other processes skew
everything here: each case records the largest share of the CPUs that processes other than
the benchmark used during one of its runs (``foreign_cpu``), and the table warns above 15%.
``--wait-quiet S`` waits up to S seconds before each run for the machine to go quiet and
does a disturbed run again (at most ``--runs`` extra runs per figure).

Modules: ``harness`` (processes, shared files, statistics, the run loop), ``throughput`` (raw,
encoded), ``roundtrip`` (rtt, flood), ``doorbell``, ``virtqueue`` and ``vqdev`` (vq), ``_cref``
(the C reference), ``report`` (machine, ratios, targets), ``table`` (the printed tables),
``driver`` (one whole run). This module only parses arguments, so that ``ivshmem-bus`` can
offer ``bench`` without importing the benchmark.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["CASES", "DEFAULT_JSON", "DESCRIPTION", "SCHEMA", "add_arguments", "cmd_bench", "main"]

SCHEMA = "ivshmem-bus-bench/1"
CASES = ("raw", "encoded", "rtt", "flood", "doorbell", "vq", "startup", "hub")
DEFAULT_JSON = "bench-results.json"
DESCRIPTION = __doc__.splitlines()[0]


def _cases(text: str) -> list[str]:
    """argparse type of ``--only``: known case names, in the order given (empty: all)."""
    cases = [c.strip() for c in text.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown case(s) {', '.join(unknown)}; choose from {CASES}"
        )
    return cases


def _runs(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _scale(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive factor (e.g. 0.01 or 2)")
    return value


def _json_out(text: str) -> str:
    """argparse type of ``--json``: a file whose directory exists and is writable, checked
    before the run (a long run must not end in a write that fails and loses the results)."""
    if text == "-":
        return text
    folder = Path(text).resolve().parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text}: the directory {folder} does not exist: create it or give another path"
        )
    if not os.access(folder, os.W_OK) or Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} cannot be written: give a writable file path")
    return text


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The benchmark's options, on its own parser and on ``ivshmem-bus bench`` alike."""
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a tenth of the counts, 3 runs per figure (under a minute)",
    )
    ap.add_argument(
        "--json",
        metavar="OUT",
        type=_json_out,
        default=DEFAULT_JSON,
        help=f"write the results here (default {DEFAULT_JSON}; '-' for stdout)",
    )
    ap.add_argument("--runs", type=_runs, help="runs per figure (default 5, --quick 3)")
    ap.add_argument(
        "--scale",
        type=_scale,
        default=1.0,
        help="multiply every count by this (tests use a tiny one)",
    )
    ap.add_argument(
        "--only", metavar="CASES", type=_cases, help=f"comma-separated subset of {CASES}"
    )
    ap.add_argument("--no-c", action="store_true", help="skip the C reference")
    ap.add_argument("--cache-dir", type=Path, help="where the C reference is built")
    ap.add_argument("--quiet", action="store_true", help="no progress dots on stderr")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each run wait up to S seconds for other processes to go quiet, and "
        "do a run they disturbed again",
    )


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="bench",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table, write the JSON. 0 when every case ran, else 1."""
    args = _parser().parse_args(argv)
    from .driver import run  # the benchmark itself: imported only when it runs

    return run(args, list(sys.argv[1:] if argv is None else argv))


def cmd_bench(args: argparse.Namespace) -> int:
    """``ivshmem-bus bench``: the same run; the report's argv is the command line's."""
    from .driver import run

    return run(args, sys.argv[1:])

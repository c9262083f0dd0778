"""Soak: N sequence-numbered messages each way over the fake pair, two processes, with pauses.

    python tools/soak.py [--count N] [--profile qemu-v0|spec-v1] [--seed S] [--json]

The driver runs here, the device in a forked child (a separate address space, as the other VM
is); they share BAR2's pages and each other's doorbell eventfds, nothing else. Both directions
run at once: in each process a sender thread sends ``count`` messages carrying a sequence number
(driver -> device ``EventAvail(index=seq)``, device -> driver ``EventUsed(index=seq)``), while the
main thread receives the peer's. Each side pauses at random (seeded) so queues fill and drain
and both the busy-poll and the eventfd sleep paths run.

Every received sequence number is checked against a table of what arrived: a number seen twice
is *duplicated*, one below the highest seen so far that had not arrived is *reordered*, and
numbers that never arrive are *lost*. All three must be 0. Before and after, each process
records its open fd count (``/proc/self/fd``) and resident set size (``VmRSS``); the figures
are printed, with the rate and the buses' counters. Exit status 0 when nothing was lost,
duplicated, reordered or dropped, 1 otherwise.

The receive side gives up when nothing arrives for ``--stall`` seconds (default 30), so a lost
message ends the run with a report instead of a hang.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

try:
    import ivshmem_bus  # noqa: F401
except ModuleNotFoundError:  # run from a source tree without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ivshmem_bus.backends.fake import FakeDevice, fake_pair
from ivshmem_bus.bus import VirtioMsgBus, reset_queues_of
from ivshmem_bus.core import protocol as p

__all__ = ["SideReport", "fd_count", "rss_kib", "run"]

MAX_COUNT = 1 << 32  # the sequence number travels in a u32 index
PAUSE_ONE_IN = 2000  # on average one pause per this many messages, on each side
PAUSE_MAX_S = 0.002
SEND_TIMEOUT_S = 30.0


def fd_count() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    """Resident set size of this process, KiB (``VmRSS``)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


@dataclasses.dataclass
class SideReport:
    """What one process saw: its receive checks, its bus counters, its fds and RSS."""

    role: str
    sent: int = 0
    received: int = 0  # messages of the expected type
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    unexpected: int = 0  # messages of another type
    send_error: str = ""
    stalled: bool = False
    seconds: float = 0.0
    stats: dict[str, int] = dataclasses.field(default_factory=dict)
    fds_before: int = 0
    fds_after: int = 0
    rss_kib_before: int = 0
    rss_kib_after: int = 0

    @property
    def clean(self) -> bool:
        dropped = self.stats.get("dropped", 0)
        return (
            self.lost == self.duplicated == self.reordered == self.unexpected == dropped == 0
            and not self.send_error
            and not self.stalled
        )


def _pause(rng: random.Random) -> None:
    time.sleep(rng.uniform(0.0, PAUSE_MAX_S))


def _side(
    bus: VirtioMsgBus, role: str, count: int, seed: int, stall: float, report: SideReport
) -> None:
    """Send ``count`` numbered messages from a thread while receiving ``count`` here."""
    if role == "driver":
        in_cls, make = p.EventUsed, lambda seq: p.EventAvail(index=seq, next_offset_wrap=0)
    else:
        in_cls, make = p.EventAvail, lambda seq: p.EventUsed(index=seq)
    send_rng = random.Random(seed * 2 + (role == "device"))
    recv_rng = random.Random(seed * 2 + 1 + (role == "device") * 2)

    def sender() -> None:
        send = bus.send
        roll = send_rng.randrange
        try:
            for seq in range(count):
                send(make(seq), SEND_TIMEOUT_S)
                report.sent += 1
                if roll(PAUSE_ONE_IN) == 0:
                    _pause(send_rng)
        except Exception as exc:  # reported, never silent
            report.send_error = f"{type(exc).__name__}: {exc}"

    seen = bytearray(count)
    highest = -1
    unique = dup = reordered = unexpected = 0
    thread = threading.Thread(target=sender, name=f"soak-{role}-sender", daemon=True)
    start = time.monotonic()
    thread.start()
    receive = bus.receive
    roll = recv_rng.randrange
    while unique < count:
        msg = receive(stall)
        if msg is None:
            report.stalled = True
            break
        if type(msg) is not in_cls:
            unexpected += 1
            continue
        seq = msg.index
        if seq >= count:
            unexpected += 1
            continue
        if seen[seq]:
            dup += 1
            continue
        seen[seq] = 1
        unique += 1
        if seq < highest:
            reordered += 1
        else:
            highest = seq
        if roll(PAUSE_ONE_IN) == 0:
            _pause(recv_rng)
    thread.join(SEND_TIMEOUT_S + stall)  # every send returned or failed by then
    report.seconds = time.monotonic() - start
    report.received = unique
    report.lost = count - unique
    report.duplicated = dup
    report.reordered = reordered
    report.unexpected = unexpected
    report.stats = {**dataclasses.asdict(bus.stats), "dropped": bus.stats.dropped}


def _device_child(
    dev: FakeDevice,
    drv: FakeDevice,
    drv_vmid: int,
    count: int,
    seed: int,
    stall: float,
    profile: str,
    conn,
) -> None:
    drv.close()  # the parent's side: this process keeps only its own device
    report = SideReport("device", fds_before=fd_count(), rss_kib_before=rss_kib())
    try:
        with VirtioMsgBus(dev, "device", drv_vmid, profile) as bus:
            conn.send("ready")
            _side(bus, "device", count, seed, stall, report)
        report.fds_after, report.rss_kib_after = fd_count(), rss_kib()
    finally:
        dev.close()
        conn.send(dataclasses.asdict(report))
        conn.close()


def run(
    count: int = 10_000_000, *, profile: str = "qemu-v0", seed: int = 1, stall: float = 30.0
) -> dict[str, Any]:
    """Run the soak; returns both sides' reports (as dicts) and the overall figures.

    The driver's fd and RSS figures are taken before the fake pair is made and after
    everything is closed and the child has exited (the fd delta must be 0); the device's
    around its bus's life (its device is opened by the parent, before it exists).
    """
    if not 1 <= count <= MAX_COUNT:
        raise ValueError(f"count must be 1..{MAX_COUNT}, not {count}")
    ctx = multiprocessing.get_context("fork")
    report = SideReport("driver", fds_before=fd_count(), rss_kib_before=rss_kib())
    drv, dev = fake_pair()
    drv_vmid, dev_vmid = drv.vmid, dev.vmid
    parent_conn, child_conn = ctx.Pipe()
    child = ctx.Process(
        target=_device_child,
        args=(dev, drv, drv_vmid, count, seed, stall, profile, child_conn),
        name="soak-device",
        daemon=True,
    )
    child_report: dict[str, Any] | None = None
    start = time.monotonic()
    try:
        reset_queues_of(drv)  # the driver owns reset: before the device attaches
        child.start()
        child_conn.close()
        dev.close()  # the child has it
        if not parent_conn.poll(30) or parent_conn.recv() != "ready":
            raise RuntimeError("the device process did not start")
        with VirtioMsgBus(drv, "driver", dev_vmid, profile) as bus:
            _side(bus, "driver", count, seed, stall, report)
        if parent_conn.poll(SEND_TIMEOUT_S + stall + 30):
            child_report = parent_conn.recv()
    finally:
        drv.close()
        dev.close()
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join()
        exitcode = child.exitcode
        child.close()  # its sentinel pipe
        parent_conn.close()
    elapsed = time.monotonic() - start
    report.fds_after, report.rss_kib_after = fd_count(), rss_kib()
    child_clean = child_report is not None and SideReport(**child_report).clean
    theirs = child_report or {"lost": count, "duplicated": 0, "reordered": 0}
    return {
        "count_each_way": count,
        "profile": profile,
        "seed": seed,
        "seconds": round(elapsed, 2),
        "messages_per_second": round(2 * count / elapsed),
        "lost": report.lost + theirs["lost"],
        "duplicated": report.duplicated + theirs["duplicated"],
        "reordered": report.reordered + theirs["reordered"],
        "child_exitcode": exitcode,
        "ok": report.clean and child_clean and exitcode == 0,
        "sides": [dataclasses.asdict(report), child_report],
    }


def _print(result: dict[str, Any]) -> None:
    print(
        f"soak: {result['count_each_way']:,} messages each way ({result['profile']}, seed "
        f"{result['seed']}) in {result['seconds']} s = {result['messages_per_second']:,} msg/s"
    )
    print(
        f"lost {result['lost']}, duplicated {result['duplicated']}, reordered {result['reordered']}"
    )
    for side in result["sides"]:
        if side is None:
            print("device: no report (the child died)")
            continue
        stats = side["stats"]
        dropped = stats.get("dropped", 0)
        print(
            f"{side['role']:>6}: sent {side['sent']:,} received {side['received']:,} "
            f"unexpected {side['unexpected']} dropped "
            f"{dropped} "
            f"full-waits {stats.get('queue_full_waits', 0)} wakeups "
            f"{stats.get('doorbell_wakeups', 0)}; fds {side['fds_before']} -> "
            f"{side['fds_after']}; RSS {side['rss_kib_before']} -> {side['rss_kib_after']} KiB"
            + (f"; send error: {side['send_error']}" if side["send_error"] else "")
            + ("; STALLED" if side["stalled"] else "")
        )
    print("OK" if result["ok"] else "FAILED")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000_000, help="messages each way")
    parser.add_argument("--profile", choices=p.PROFILES, default="qemu-v0")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--stall", type=float, default=30.0, help="give up after this idle time")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    result = run(args.count, profile=args.profile, seed=args.seed, stall=args.stall)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

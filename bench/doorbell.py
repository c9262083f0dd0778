"""The ``doorbell`` case: from a ring in one process to the wake-up in the other.

A wake-up is what a message costs when the receiver sleeps instead of spinning, so it is
measured bare (C eventfd, Python ``os.write``/``poll``) and through ``FakeDevice`` to show
what each layer adds; the burst shows how many doorbells and wake-ups the bus spends on a
run of messages sent back to back.
"""

from __future__ import annotations

import array
import functools
import mmap
import os
import select
import statistics
import struct
import time
from typing import Any

from ivshmem_bus.backends.fake import fake_pair
from ivshmem_bus.bus import VirtioMsgBus, reset_queues_of
from ivshmem_bus.native import ffi as _ffi

from .harness import (
    CHILD_TIMEOUT,
    LATENCY_UNITS,
    PROFILE,
    Child,
    Config,
    _ready,
    combine,
    percentiles_us,
    record,
)
from .roundtrip import c_pingpong_run
from .throughput import sample_messages

__all__ = ["BURST", "case_doorbell"]

BURST = 32  # bus.send calls back to back per burst

_ONE = (1).to_bytes(8, "little")
_STAMP = struct.Struct("<q")
STAMP_OFFSET = 0x3000  # in BAR2, past both queues


def _wake_child(conn: Any, dev: Any, other: Any, peer_vmid: int, total: int) -> None:
    other.close()
    shm, wait, ring, clock = dev.shmem, dev.wait, dev.ring, time.perf_counter_ns
    _ready(conn)
    for _ in range(total):
        while not wait(CHILD_TIMEOUT):
            pass
        _STAMP.pack_into(shm, STAMP_OFFSET, clock())
        ring(peer_vmid, 0)


def wake_device_run(count: int) -> dict[str, float]:
    """FakeDevice.ring in one process to FakeDevice.wait returning in the other."""
    warm = min(500, count)
    a, b = fake_pair(shm_size=16384)
    peer = b.vmid
    try:
        with Child(_wake_child, b, a, a.vmid, warm + count) as child:
            b.close()
            shm, wait, ring, clock = a.shmem, a.wait, a.ring, time.perf_counter_ns
            oneway = array.array("q", bytes(8 * count))
            ring_ns = array.array("q", bytes(8 * count))
            child.recv()
            for i in range(warm + count):
                t0 = clock()
                ring(peer, 0)
                t1 = clock()
                while not wait(CHILD_TIMEOUT):
                    pass
                if i >= warm:
                    oneway[i - warm] = _STAMP.unpack_from(shm, STAMP_OFFSET)[0] - t0
                    ring_ns[i - warm] = t1 - t0
            child.recv()
    finally:
        a.close()
        b.close()
    result = percentiles_us(oneway)
    result["ring_call_us"] = statistics.median(ring_ns) / 1000
    return result


def _poll_child(conn: Any, ping: int, pong: int, stamp: mmap.mmap, total: int) -> None:
    poller = select.poll()
    poller.register(ping, select.POLLIN)
    clock, read, write = time.perf_counter_ns, os.read, os.write
    _ready(conn)
    for _ in range(total):
        poller.poll()
        read(ping, 8)
        _STAMP.pack_into(stamp, 0, clock())
        write(pong, _ONE)


def wake_minimal_run(count: int) -> dict[str, float]:
    """The least Python can do: os.write to an eventfd, poll + os.read in the other process."""
    warm = min(500, count)
    ping = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    pong = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    stamp = mmap.mmap(-1, 4096)  # MAP_SHARED | MAP_ANONYMOUS: shared across fork
    try:
        with Child(_poll_child, ping, pong, stamp, warm + count) as child:
            poller = select.poll()
            poller.register(pong, select.POLLIN)
            clock, read, write = time.perf_counter_ns, os.read, os.write
            oneway = array.array("q", bytes(8 * count))
            ring_ns = array.array("q", bytes(8 * count))
            child.recv()
            for i in range(warm + count):
                t0 = clock()
                write(ping, _ONE)
                t1 = clock()
                poller.poll()
                read(pong, 8)
                if i >= warm:
                    oneway[i - warm] = _STAMP.unpack_from(stamp, 0)[0] - t0
                    ring_ns[i - warm] = t1 - t0
            child.recv()
    finally:
        os.close(ping)
        os.close(pong)
        stamp.close()
    result = percentiles_us(oneway)
    result["ring_call_us"] = statistics.median(ring_ns) / 1000
    return result


def _burst_child(
    conn: Any, dev: Any, other: Any, peer_vmid: int, total: int, coalesce: bool
) -> dict[str, Any]:
    other.close()
    with VirtioMsgBus(dev, "device", peer_vmid, PROFILE, spin=0.0, coalesce=coalesce) as bus:
        _ready(conn)
        for i in range(total):
            if bus.receive(CHILD_TIMEOUT) is None:
                raise TimeoutError(f"burst receiver: message {i} never came")
            if (i + 1) % BURST == 0:
                conn.send(("ok", i + 1))
        stats = bus.stats
        return {"received": stats.received, "wakeups": stats.doorbell_wakeups}


def burst_run(bursts: int, coalesce: bool = False) -> dict[str, float]:
    """``bursts`` times: BURST bus.send back to back, then wait until the receiver has them
    (``coalesce``: both buses ring only when the receiver may be asleep)."""
    msgs = sample_messages()
    a, b = fake_pair(shm_size=16384)
    peer = b.vmid
    try:
        reset_queues_of(a)
        with Child(_burst_child, b, a, a.vmid, bursts * BURST, coalesce) as child:
            b.close()
            with VirtioMsgBus(a, "driver", peer, PROFILE, coalesce=coalesce) as bus:
                send, clock = bus.send, time.perf_counter_ns
                per_msg = []
                child.recv()
                for _ in range(bursts):
                    time.sleep(0.0002)  # let the receiver fall asleep on its eventfd
                    t0 = clock()
                    for msg in msgs[:BURST]:
                        send(msg)
                    per_msg.append((clock() - t0) / BURST / 1000)
                    child.recv()
                result = child.recv()
                rung = bus.stats.doorbells_rung
    finally:
        a.close()
        b.close()
    if result["received"] != bursts * BURST:
        raise RuntimeError(f"burst: received {result['received']} of {bursts * BURST}")
    return {
        "doorbells_per_burst": rung / bursts,
        "wakeups_per_burst": result["wakeups"] / bursts,
        "send_us_per_msg": statistics.median(per_msg),
    }


def case_doorbell(cfg: Config) -> list[dict[str, Any]]:
    out = []
    n = cfg.count("doorbell.wake")
    units = {**LATENCY_UNITS, "ring_call_us": "us"}
    binary = cfg.binary
    if binary is not None:
        nc = cfg.count("rtt.c")

        def c_oneway() -> dict[str, float]:
            _, oneway = c_pingpong_run(binary, "efd", nc)
            return percentiles_us(oneway)

        # The eventfd ping-pong of the rtt case measured these already, in the same processes.
        runs = cfg.c_oneway[: cfg.runs] if len(cfg.c_oneway) >= cfg.runs else cfg.repeat(c_oneway)
        out.append(
            record(
                "doorbell.wake.c",
                "doorbell",
                "C write(eventfd) -> read returns",
                "c",
                {"count": nc},
                combine(runs, LATENCY_UNITS),
            )
        )
    runs = cfg.repeat(lambda: wake_minimal_run(n))
    out.append(
        record(
            "doorbell.wake.os",
            "doorbell",
            "Python os.write -> poll+os.read",
            "python",
            {"count": n},
            combine(runs, units),
        )
    )
    runs = cfg.repeat(lambda: wake_device_run(n))
    out.append(
        record(
            "doorbell.wake.device",
            "doorbell",
            "FakeDevice.ring -> .wait returns",
            "python",
            {"count": n},
            combine(runs, units),
        )
    )
    return out + _burst_records(cfg)


def _burst_records(cfg: Config) -> list[dict[str, Any]]:
    """Bursts of sends to a sleeping receiver: doorbells and wake-ups per burst."""
    out = []
    nb = cfg.count("doorbell.bursts")
    for rid, label, coalesce in (
        ("doorbell.burst", f"burst of {BURST} bus.send, receiver asleep", False),
        (
            "doorbell.burst-coalesced",
            "same, coalesce=True (ring only when the receiver may sleep)",
            True,
        ),
    ):
        if coalesce and not _ffi.HAVE_COMPILED:
            continue  # coalescing needs the helper's fence
        runs = cfg.repeat(functools.partial(burst_run, nb, coalesce))
        out.append(
            record(
                rid,
                "doorbell",
                label,
                "python",
                {"bursts": nb, "burst": BURST, "receiver_spin_s": 0.0, "coalesce": coalesce},
                combine(
                    runs,
                    {
                        "doorbells_per_burst": "doorbells",
                        "wakeups_per_burst": "wake-ups",
                        "send_us_per_msg": "us",
                    },
                ),
            )
        )
    return out

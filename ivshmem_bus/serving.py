"""Serving a virtio device on a fabric: ``serve_link``, what ``ivshmem-bus serve`` runs.

No settle delay, however the two ends start. QEMU's driver sends DEVICE_INFO the instant it
joins and aborts if the response takes more than about 1 ms (wire-format spec section 4), so
the device end is ready *before* any driver is there: it claims the device queue, resets the
queues (by default), and sleeps on its doorbell. A request in the driver queue is proof that
a driver exists; who it is is chosen when its request arrives (``ownership.PeerChoice``: the
peer that claims the driver queue, else the one other peer), so a monitor that joins and
leaves at once is never mistaken for the driver, and a replaced driver (a new peer id) is
answered at its first request.

A QEMU driver polls its queue for the response and does not wait for our doorbell; an
ivshmem_bus driver claims the driver queue, so the doorbell goes to the right peer at once.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from . import ownership
from .backends.base import IvshmemDevice
from .bus import BusStats, VirtioMsgBus
from .core import protocol
from .core.protocol import Message
from .devices.hub import DeviceHub
from .errors import RemoteVmidError

if TYPE_CHECKING:
    from .devices.base import VirtioMsgDevice as Served

__all__ = ["ServeResult", "realtime", "serve_link"]

CLAIM_CHECK_SECONDS = 0.5


@dataclasses.dataclass
class ServeResult:
    handled: int
    stats: BusStats
    hub_stats: object | None = None  # the hub's counters, when a hub served


def serve_link(
    dev: IvshmemDevice,
    devices: Sequence[Served],
    *,
    hub: bool = False,
    remote: str = "auto",
    profile: str = "qemu-v0",
    coalesce: bool = False,
    reset_queues: bool = True,
    wait: float = float("inf"),
    stop: Callable[[], bool] = lambda: False,
    say: Callable[[str], None] = print,
    bar_fix: str = "",
    ready: str = "",
    sched: str = "normal",
) -> ServeResult:
    """Serve ``devices`` (``devices`` package devices, dev_id = place in the list) to the
    driver until ``stop()`` (looked at every 10 ms).

    Args:
        hub: serve through a ``DeviceHub`` (bus messages, several devices, each on its own
            worker so PINGs are answered whatever a device does); else the one device's own
            loop (``device.serve``, the lowest latency: QEMU's 1 ms deadline).
        remote: ``auto`` (see the module doc) or the driver's vmid.
        reset_queues: zero both queues first (after the claim check: a refused second device
            must not wipe the first one's queues); a live driver's claim is kept.
        wait: with ``auto``, seconds to wait for any other peer before giving up.
        say: gets the lines a user reads (the driver chosen, malformed input).
        bar_fix: what to tell the user when BAR2 is too small.
        ready: said once the device end can answer (before any driver needs to be there).
        sched: ``realtime``'s policy, taken only now, once everything is imported and set up:
            a real-time process that is still starting (imports take seconds in an emulated
            one-CPU guest) would starve every other process of that CPU.

    Raises:
        QueueClaimed: another live peer serves on this fabric.
        BarTooSmall: BAR2 cannot hold the two queues.
        RemoteVmidError: no other peer within ``wait`` seconds.
    """
    ownership.check_bar2(dev, bar_fix)
    if remote == "auto" and dev.peers() is None:
        raise RemoteVmidError(
            f"{dev.name} cannot list peers: give --remote-vmid N; run 'ivshmem-bus vmid' on "
            f"the other machine to get N"
        )
    runner = DeviceHub(list(devices)) if hub else None
    later: list[str] = []  # said while a driver waits for its answer: printed after it
    choice = ownership.PeerChoice(dev, None if remote == "auto" else int(remote, 0), later.append)
    ownership.claim(dev, "device")  # refuses before the reset below can wipe anything
    start = time.monotonic()
    try:
        if reset_queues:
            ownership.reset_queues_keeping_claims(dev)  # before any peer can have sent anything
        with VirtioMsgBus(dev, "device", choice.choose() or 0, profile, coalesce=coalesce) as bus:

            def follow(msg: Message) -> None:
                now = choice.choose()  # the driver that sent it exists now
                if now is not None:
                    bus.remote_vmid = now
                if runner is None and isinstance(msg, protocol.BusPing):  # the hub answers its own
                    reply = protocol.BusPingResponse(data=msg.data)
                    bus.send(dataclasses.replace(reply, token=msg.token, dev_num=msg.dev_num))

            malformed, next_check = 0, 0.0

            def stopping() -> bool:
                nonlocal malformed, next_check
                while later:
                    say(later.pop(0))
                if bus.stats.malformed > malformed:
                    say(_malformed_line(bus, bus.stats.malformed - malformed))
                    malformed = bus.stats.malformed
                now = time.monotonic()
                if now >= next_check:
                    next_check = now + CLAIM_CHECK_SECONDS
                    choice.check_claim("device")
                    if choice.fixed is None and now - start >= wait and dev.peers() == set():
                        raise RemoteVmidError(
                            f"{dev.name}: no driver's peer joined within {wait:g} s "
                            f"(--wait): start the driver on the same fabric, or wait longer"
                        )
                return stop()

            say(realtime(sched))
            if ready:
                say(ready)
            if runner is None:
                handled = devices[0].serve(bus, stop=stopping, on_message=follow)
                return ServeResult(handled, bus.stats)
            handled = runner.serve(bus, stop=stopping, on_message=follow)
            return ServeResult(handled, bus.stats, runner.stats)
    finally:
        ownership.release(dev, "device")


def realtime(policy: str = "auto", priority: int = 10) -> str:
    """Give this process real-time scheduling (SCHED_FIFO) for QEMU's 1 ms deadline.

    A sleeping serve loop is woken by the driver's doorbell; on a busy machine the kernel's
    normal scheduler may run other work first for several milliseconds (measured: p50 1.7 ms,
    max 18 ms with two CPU-bound processes on 2 cores), SCHED_FIFO runs it at once (max 0.6
    ms). The loop sleeps between requests, so it takes a core only while it answers; the
    kernel's RT throttling still leaves 5% to everything else under a flood.

    Args:
        policy: ``"fifo"`` (fail if not permitted), ``"auto"`` (fifo when permitted: root, or
            an RLIMIT_RTPRIO of at least ``priority``), ``"normal"`` (leave it).
    Returns:
        One line for the log saying what the process got and, if not fifo, how to get it.
    Raises:
        PermissionError: ``fifo`` and the process may not have it.
    """
    if policy == "normal":
        return "scheduling: normal (--sched normal)"
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except PermissionError as exc:
        if policy == "fifo":
            raise PermissionError(
                f"SCHED_FIFO priority {priority} is not permitted: run as root or raise "
                f"RLIMIT_RTPRIO (ulimit -r {priority}), or use --sched auto"
            ) from exc
        return (
            "scheduling: normal (SCHED_FIFO not permitted: run as root or with ulimit -r "
            f"{priority}; on a busy machine a response may miss QEMU's 1 ms deadline)"
        )
    return f"scheduling: SCHED_FIFO priority {priority} (QEMU's 1 ms deadline on a busy machine)"


def _malformed_line(bus: VirtioMsgBus, count: int) -> str:
    return (
        f"dropped {count} message(s) from the driver that do not decode as {bus.profile}: "
        f"does the driver use another --profile?"
    )

"""The device's serve loop: bus requests and queue batches, interleaved.

QEMU's driver side gives up on a request after about 1 ms, so no queue job may hold the bus
longer than that. The loop therefore alternates:

1. one ``device.process()`` pass: at most ``batch_chains`` chains per kicked queue, and it
   stops at the next chain boundary once ``batch_seconds`` (0.2 ms) have passed;
2. the messages that arrived meanwhile (the bus is looked at with timeout 0 while queue work
   remains), each answered at once, at most ``MAX_MESSAGES`` in a row before the next batch;
3. the device's ``outbox`` (EVENT_USED, EVENT_CONFIG) sent after each step, without
   waiting for a full driver queue (``flush``): what does not fit waits, merged per queue.

With no queue work the loop sleeps in ``bus.receive(poll_interval)``: a doorbell wakes it
for a request or an EVENT_AVAIL, and the poll interval bounds the wait for host-side input
(a console's stdin) that has no doorbell. A single handler call is the unit that cannot be
interrupted: handlers must be short (one buffer's worth of work).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable
from typing import Protocol

from ..bus import VirtioMsgBus
from ..core import protocol as p
from ..core.window import MemoryWindow
from ..errors import BusTimeout
from ..memory.pool import PAGE, POOL_OFFSET, PoolWindow

__all__ = ["MAX_MESSAGES", "Served", "serve_device"]

log = logging.getLogger(__name__)

MAX_MESSAGES = 64  # messages answered in a row before queue work gets its turn again
EVENT_SEND_TIMEOUT = 2e-4  # how long an event may wait for a free slot before it is kept


class Served(Protocol):
    """What the loop needs of a device (``base.VirtioMsgDevice``)."""

    profile: str
    window: MemoryWindow | None
    num_queues: int
    outbox: collections.deque[p.Message]

    def handle(self, msg: p.Message) -> p.Message | None: ...

    def process(self) -> bool: ...

    def reset(self) -> None: ...


def _answer(bus: VirtioMsgBus, request: p.Message, reply: p.Message | None) -> None:
    """Send ``reply`` with the request's token and dev_num (the responder copies them)."""
    if reply is None:
        return
    if reply.token != request.token or reply.dev_num != request.dev_num:
        reply = dataclasses.replace(reply, token=request.token, dev_num=request.dev_num)
    bus.send(reply)


def flush(device: Served, bus: VirtioMsgBus) -> bool:
    """Send what the device queued (EVENT_USED, EVENT_CONFIG), oldest first; False when the
    driver's queue is full and some wait for the next call.

    Events never block the loop: a driver that does not read its queue (63 slots) would
    otherwise stall the device, and with it every request. Kept events are not lost, and the
    device merges a queue's EVENT_USED while one is still unsent (one covers every used
    buffer up to now).
    """
    out = device.outbox
    while out:
        try:
            bus.send(out[0], timeout=EVENT_SEND_TIMEOUT)
        except BusTimeout:
            log.debug("%s: the driver's queue is full; %d event(s) wait", bus.device.name, len(out))
            return False
        out.popleft()
    return True


def serve_device(
    device: Served,
    bus: VirtioMsgBus,
    stop: Callable[[], bool] | None = None,
    *,
    on_message: Callable[[p.Message], None] | None = None,
) -> int:
    """Answer the driver on a device-role bus and run the queues until ``stop()``.

    Without a window the device gets the pool in the bus device's BAR2 (closed on return),
    when it has queues and BAR2 has room above the message queues.

    Args:
        on_message: called with each incoming message before it is handled (the CLI follows
            the driver's peer with it).

    Returns:
        How many messages were handled.
    """
    device.profile = bus.profile
    own = None
    room = len(bus.device.shmem) & ~(PAGE - 1)  # PoolWindow ends at a page boundary
    if device.window is None and device.num_queues and room > POOL_OFFSET:
        own = device.window = PoolWindow(bus.device, role="device")
    handled = 0
    try:
        busy = False
        while stop is None or not stop():
            msg = bus.receive(0 if busy else bus.poll_interval)
            n = 0
            while msg is not None:
                if on_message is not None:
                    on_message(msg)
                _answer(bus, msg, device.handle(msg))
                handled += 1
                flush(device, bus)
                n += 1
                msg = bus.receive(0) if n < MAX_MESSAGES else None
            busy = device.process()
            flush(device, bus)  # kept events go at the next turn (a request wakes us)
    finally:
        if own is not None:
            device.window = None
            device.reset()  # the queues' views of the pool go with it
            own.close()
    return handled

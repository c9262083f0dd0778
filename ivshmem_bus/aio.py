"""asyncio for the bus: ``async with``, ``await bus.request(...)``, ``async for msg in bus``.

A thin layer over a ``VirtioMsgBus``: the queues, matching, counters and handler are the
bus's own; only the waiting differs. Where the bus sleeps in ``select``, this awaits the same
eventfds with ``loop.add_reader`` (``IvshmemDevice.async_wait``), and wakes at least every
poll interval to look at the queue (a doorbell can be lost). ``send`` does not wait unless
the queue is full, and then it waits as the bus does (bounded by ``timeout``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from .bus import VirtioMsgBus
from .core.protocol import Message

__all__ = ["AsyncVirtioMsgBus"]


class AsyncVirtioMsgBus:
    """The asyncio face of ``bus``; closing it closes the bus."""

    def __init__(self, bus: VirtioMsgBus) -> None:
        self.bus = bus

    async def _doorbell(self, timeout: float) -> None:
        bus = self.bus
        if bus.prepare_sleep():  # else a message came meanwhile: look again at once
            bus.note_wake(bool(await bus.device.async_wait(timeout)))

    async def send(self, msg: Message, timeout: float = 1.0) -> None:
        """Enqueue and ring (see ``VirtioMsgBus.send``)."""
        self.bus.send(msg, timeout)

    async def receive(self, timeout: float | None = None) -> Message | None:
        """The next incoming message, or None after ``timeout`` seconds."""
        deadline = float("inf") if timeout is None else time.monotonic() + timeout
        while True:
            msg = self.bus.receive(0)
            remaining = deadline - time.monotonic()
            if msg is not None or remaining <= 0:
                return msg
            await self._doorbell(min(remaining, self.bus.poll_interval))

    async def request(self, msg: Message, timeout: float = 1.0) -> Message:
        """Send a request and await its response (see ``VirtioMsgBus.request``).

        Raises:
            BusTimeout: no response within ``timeout`` (the peer was ringed again halfway,
                as by the sync bus).
        """
        bus = self.bus
        msg, clock = bus.start_request(msg, timeout)
        while True:
            found = bus.step_request(msg, clock)
            if found is not None:
                return found
            await self._doorbell(max(0.0, min(clock.wake_at - time.monotonic(), bus.poll_interval)))

    async def __aenter__(self) -> AsyncVirtioMsgBus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.bus.close()

    async def __aiter__(self) -> AsyncIterator[Message]:
        while not self.bus.closed:
            msg = await self.receive(self.bus.poll_interval)
            if msg is not None:
                yield msg

"""One thread per device, and a send that several threads share: why a slow device cannot
silence the bus.

The Linux driver tears the whole bus down, for good, after one second with nothing from the
device side, and it PINGs every second to find out (docs/linux.md). A device handler may take
any time (a blocking console writer, a slow ``--source``, a long queue job), so no handler
runs on the thread that answers PINGs. ``hub.DeviceHub.serve`` keeps the bus thread for
receiving and for bus messages; each device gets a ``DeviceWorker`` with an inbox, and the
worker alone calls the device: ``handle`` for each transport message routed to it and
``process`` for its queues, then sends what the device produced. The device object is
touched by one thread only, so it needs no lock of its own.

Sends from the bus thread and every worker go through one ``LockedSender``: the driver queue
has one producer index, so enqueues must not interleave. A worker whose send meets a full
driver queue retries in slices of ``SEND_SLICE`` and lets go of the lock between slices, so
a PING response never waits behind it for longer than one slice.

``busy_since`` says when the worker entered device code; the bus thread reads it to log a
device that has been inside one call for too long (its own requests wait; the driver holds
one lock over every request, so the whole guest's virtio-msg traffic waits with them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable

from ..bus import VirtioMsgBus
from ..core import protocol as p
from ..core.virtio import DRIVER_OK
from ..errors import BusClosed, BusTimeout
from .base import VirtioMsgDevice

__all__ = ["SEND_SLICE", "DeviceWorker", "LockedSender"]

log = logging.getLogger(__name__)

SEND_SLICE = 0.005  # the longest one sender holds the lock while the driver queue is full
EVENT_SEND_TIMEOUT = 2e-4  # how long an event may wait for a free slot before it is kept
MAX_MESSAGES = 64  # messages a worker answers in a row before its queues get a turn


class LockedSender:
    """``bus.send`` for several threads: one enqueue at a time, never a long hold."""

    def __init__(self, bus: VirtioMsgBus) -> None:
        self.bus = bus
        self.lock = threading.Lock()

    def send(self, msg: p.Message, timeout: float = 1.0) -> None:
        """Send ``msg``, waiting up to ``timeout`` for a free slot, in ``SEND_SLICE`` slices.

        Raises:
            BusTimeout: the driver queue stayed full for ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                try:
                    self.bus.send(msg, timeout=min(SEND_SLICE, timeout))
                    return
                except BusTimeout:
                    if time.monotonic() >= deadline:
                        raise
            time.sleep(0)  # another sender (the bus thread's PING response) may go first

    def try_send(self, msg: p.Message) -> bool:
        """Send ``msg`` only if a slot frees within ``EVENT_SEND_TIMEOUT``; False if not."""
        with self.lock:
            try:
                self.bus.send(msg, timeout=EVENT_SEND_TIMEOUT)
            except BusTimeout:
                return False
        return True


class DeviceWorker(threading.Thread):
    """The thread that runs one device: its transport messages and its queues.

    Args:
        dev_id: the device's number on the bus.
        device: the device; only this thread calls it once ``start`` ran.
        sender: the shared send.
        poll_interval: the longest an idle worker waits before looking at its queues again
            (a console's host input has no doorbell).
        on_driver_ok: called (on this thread) with ``dev_id`` after the response to a
            SET_DEVICE_STATUS that set DRIVER_OK was sent.
    """

    def __init__(
        self,
        dev_id: int,
        device: VirtioMsgDevice,
        sender: LockedSender,
        *,
        poll_interval: float = 0.01,
        on_driver_ok: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(name=f"device-{dev_id}-{type(device).__name__}", daemon=True)
        self.dev_id = dev_id
        self.device = device
        self.sender = sender
        self.poll_interval = poll_interval
        self.on_driver_ok = on_driver_ok
        self.inbox: queue.SimpleQueue[p.Message | None] = queue.SimpleQueue()
        self.busy_since: float | None = None  # monotonic time device code was entered
        self.warned = False  # the bus thread logged the current call as slow
        self.handled = 0
        self.failed = 0  # device calls that raised (logged; the worker goes on)
        self._quit = threading.Event()

    def put(self, msg: p.Message) -> None:
        """A transport message for this device (from the bus thread)."""
        self.inbox.put(msg)

    def stop(self, timeout: float = 2.0) -> bool:
        """Ask the thread to end and wait up to ``timeout``; False if it is still inside a
        device call (it is a daemon thread, and ends when that call returns)."""
        self._quit.set()
        self.inbox.put(None)
        if self.is_alive():
            self.join(timeout)
        return not self.is_alive()

    def run(self) -> None:
        with contextlib.suppress(BusClosed):  # serve ended while the device was in a call
            self._loop()

    def _loop(self) -> None:
        busy = False
        while not self._quit.is_set():
            try:
                msg = self.inbox.get(block=not busy, timeout=None if busy else self.poll_interval)
            except queue.Empty:
                msg = None
            n = 0
            while msg is not None and not self._quit.is_set():
                self._handle(msg)
                n += 1
                if n >= MAX_MESSAGES:
                    break
                try:
                    msg = self.inbox.get_nowait()
                except queue.Empty:
                    msg = None
            if self._quit.is_set():
                break
            busy = self._call(self.device.process) is True
            self._flush()

    def _call(self, fn: Callable[..., object], *args: object) -> object:
        self.warned = False
        self.busy_since = time.monotonic()
        try:
            return fn(*args)
        except (BusClosed, KeyboardInterrupt):
            raise
        except Exception:
            self.failed += 1
            log.exception("dev_id %d (%s) failed", self.dev_id, type(self.device).__name__)
            return None
        finally:
            self.busy_since = None

    def _handle(self, msg: p.Message) -> None:
        reply = self._call(self.device.handle, msg)
        self.handled += 1
        if isinstance(reply, p.Message):
            if reply.dev_num != msg.dev_num or reply.token != msg.token:
                reply = dataclasses.replace(reply, token=msg.token, dev_num=msg.dev_num)
            try:
                self.sender.send(reply)
            except BusTimeout as exc:
                log.warning("dev_id %d: response not sent: %s", self.dev_id, exc)
                return
            if (
                isinstance(msg, p.SetDeviceStatus)
                and self.device.status & DRIVER_OK
                and self.on_driver_ok is not None
            ):
                self.on_driver_ok(self.dev_id)
        self._flush()

    def _flush(self) -> None:
        """The device's events (EVENT_USED, EVENT_CONFIG), oldest first; what finds the
        driver queue full waits for the next turn (the device merges EVENT_USED per queue)."""
        out = self.device.outbox
        while out:
            if not self.sender.try_send(out[0]):
                return
            out.popleft()

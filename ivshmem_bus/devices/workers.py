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

**Answered inline.** A hop to the worker costs a thread wake-up and a GIL hand-over per
request, and on a loaded machine each hand-over waits for the kernel to run the other
thread (measured: docs/linux.md "Limits"). So ``try_inline`` lets the bus thread answer a
request itself when that cannot delay it, by construction, never by timing:

- the message is one of ``INLINE``: reads of the device's state (DEVICE_INFO,
  GET_DEV_FEATURES, GET_DEVICE_STATUS, GET_CONFIG, GET_VQUEUE) and SET_DRV_FEATURES, each
  answered by ``VirtioMsgDevice``'s own handler, whose work is bounded by the message (a
  few fields, a config slice, feature words clipped to ``num_feature_bits``), with no
  callback, no I/O and no queue work; a device that overrides ``handle`` or that handler
  (or has it patched) always gets the hop;
- the worker is idle: nothing routed to it is still unanswered (so the answer cannot
  overtake an earlier message of the same device), and the device lock, which the worker
  holds around every device call, is free: the bus thread takes it without blocking, so it
  never waits for a device; a busy device gets the hop as before.

Everything else (SET_DEVICE_STATUS with its ``on_status`` and DRIVER_OK, SET_VQUEUE,
SET_CONFIG, RESET_VQUEUE, EVENT_AVAIL and the queue work) stays on the worker.

**Idle workers sleep.** A worker looks at its queues every ``poll_interval`` only when its
device has work without a doorbell: it overrides ``queue_ready`` (a console whose host side
was not ready) or ``process``. Any other device's queue work starts with a message routed
to it (EVENT_AVAIL, DRIVER_OK), which wakes the worker at once, so it waits up to
``IDLE_WAIT`` (for events put in its outbox from elsewhere). Every wake-up of an idle
thread is a GIL hand-over that the bus thread may have to wait for behind a CPU hog.
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

__all__ = ["INLINE", "SEND_SLICE", "DeviceWorker", "LockedSender"]

log = logging.getLogger(__name__)

SEND_SLICE = 0.005  # the longest one sender holds the lock while the driver queue is full
EVENT_SEND_TIMEOUT = 2e-4  # how long an event may wait for a free slot before it is kept
MAX_MESSAGES = 64  # messages a worker answers in a row before its queues get a turn
IDLE_WAIT = 1.0  # the longest an idle worker of a device without host-side work sleeps

# Requests the bus thread may answer itself (see the module doc): the message type and the
# VirtioMsgDevice handler that must be the one the device uses for it.
INLINE: dict[type[p.Message], Callable[..., object]] = {
    p.DeviceInfo: VirtioMsgDevice._device_info,
    p.GetFeatures: VirtioMsgDevice._get_features,
    p.SetFeatures: VirtioMsgDevice._set_features,
    p.GetDeviceStatus: VirtioMsgDevice._get_status,
    p.GetConfig: VirtioMsgDevice._get_config,
    p.GetVqueue: VirtioMsgDevice._get_vqueue,
}


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
        cls = type(device)
        polls = (
            cls.queue_ready is not VirtioMsgDevice.queue_ready
            or cls.process is not VirtioMsgDevice.process
        )
        self.idle_wait = poll_interval if polls else max(poll_interval, IDLE_WAIT)
        self.on_driver_ok = on_driver_ok
        self.inbox: queue.SimpleQueue[p.Message | None] = queue.SimpleQueue()
        self.busy_since: float | None = None  # monotonic time device code was entered
        self.warned = False  # the bus thread logged the current call as slow
        # Each counter is written by one thread only (no lost updates): the worker's own,
        # and those of the bus thread's inline answers.
        self._handled = self._failed = 0
        self.inline = 0  # messages answered on the bus thread (``try_inline``)
        self._inline_failed = 0
        self.device_lock = threading.Lock()  # held around every call into the device
        self._routed = 0  # messages put (written by the bus thread only)
        self._done = 0  # of those, handled (written by this thread only)
        self._quit = threading.Event()

    @property
    def handled(self) -> int:
        """Messages handled, on this thread or inline."""
        return self._handled + self.inline

    @property
    def failed(self) -> int:
        """Device calls that raised (logged; the worker goes on)."""
        return self._failed + self._inline_failed

    def put(self, msg: p.Message) -> None:
        """A transport message for this device (from the bus thread)."""
        self._routed += 1
        self.inbox.put(msg)

    def try_inline(self, msg: p.Message) -> bool:
        """Answer ``msg`` on the calling (bus) thread if that cannot delay it (module doc);
        False: nothing was done, ``put`` it."""
        device = self.device
        safe = INLINE.get(type(msg))
        if safe is None or type(device).handle is not VirtioMsgDevice.handle:
            return False
        handler = device._handlers.get(type(msg))
        if handler is None or getattr(handler, "__func__", None) is not safe:
            return False  # the device answers this type with code of its own
        if "handle" in vars(device):  # patched on the instance
            return False
        if not self.device_lock.acquire(blocking=False):
            return False  # the worker is inside the device
        try:
            if self._done != self._routed:
                return False  # an earlier message of this device is still unanswered
            try:
                reply = handler(msg)
            except Exception:
                self._inline_failed += 1
                log.exception("dev_id %d (%s) failed", self.dev_id, type(device).__name__)
                return True
        finally:
            self.device_lock.release()
        self.inline += 1
        self._reply(msg, reply)
        return True

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
                msg = self.inbox.get(block=not busy, timeout=None if busy else self.idle_wait)
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
            with self.device_lock:
                return fn(*args)
        except (BusClosed, KeyboardInterrupt):
            raise
        except Exception:
            self._failed += 1
            log.exception("dev_id %d (%s) failed", self.dev_id, type(self.device).__name__)
            return None
        finally:
            self.busy_since = None

    def _handle(self, msg: p.Message) -> None:
        try:
            reply = self._call(self.device.handle, msg)
            self._handled += 1
            if self._reply(msg, reply) and (
                isinstance(msg, p.SetDeviceStatus)
                and self.device.status & DRIVER_OK
                and self.on_driver_ok is not None
            ):
                self.on_driver_ok(self.dev_id)
        finally:
            self._done += 1  # once its response is out: no inline answer can overtake it
        self._flush()

    def _reply(self, msg: p.Message, reply: object) -> bool:
        """Send the device's response to ``msg`` (with its dev_id and token); True if sent."""
        if not isinstance(reply, p.Message):
            return False
        if reply.dev_num != msg.dev_num or reply.token != msg.token:
            reply = dataclasses.replace(reply, token=msg.token, dev_num=msg.dev_num)
        try:
            self.sender.send(reply)
        except BusTimeout as exc:
            log.warning("dev_id %d: response not sent: %s", self.dev_id, exc)
            return False
        return True

    def _flush(self) -> None:
        """The device's events (EVENT_USED, EVENT_CONFIG), oldest first; what finds the
        driver queue full waits for the next turn (the device merges EVENT_USED per queue)."""
        out = self.device.outbox
        while out:
            if not self.sender.try_send(out[0]):
                return
            out.popleft()

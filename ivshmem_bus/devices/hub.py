"""The bus layer of a device side: bus messages, several devices on one bus, keep-alive.

A ``DeviceHub`` serves several ``VirtioMsgDevice`` objects at distinct dev_ids over one
device-role bus (``ivshmem-bus serve --device-type rng,console``: rng at 0, console at 1).
What belongs to the bus and not to any device is answered here, once (docs/linux.md):

- **GET_DEVICES**: the bitmap of the dev_ids served, offset and num echoed (the Linux driver
  drops a response that does not echo them, without a word), next_offset past the window
  when a dev_id lies beyond it, else 0 (the driver ignores it).
- **PING**: answered at once by the bus thread with its data. A PING *response* is never
  answered: the bus's ``receive`` drops every response as a stray (``bus.stats``); the Linux
  driver answers PING responses too, so answering one would start an endless echo.
- **EVENT_DEVICE**: ``add`` / ``remove`` while serving send it (1 ready, 2 removed); when
  ``serve`` ends, every device is announced removed, so a driver that keeps running drops
  them instead of tearing the bus down a second later (it has no hot-add: a restarted
  device side is seen only by a reloaded driver).
- **Routing**: a transport message goes to the worker of its dev_id; one for a dev_id not
  served is dropped and counted (``stats.unknown_dev``), and logged once per dev_id. That
  includes dev_id 32, which the Linux driver's GET_DEVICES path accepts (an off-by-one of its
  own): nothing here depends on it.

**What the hub serves.** At most 32 devices, at dev_id 0..31 (``MAX_DEVICES``): the Linux
driver asks GET_DEVICES for offset 0, num 32 and never looks further, so a device beyond
would never be probed, and no bitmap bit past 31 is ever set. A device whose DEVICE_INFO
device_id is 0 is refused too: the driver reads 0 as "no device" and skips it, so listing
it would only cost a probe. Both are ``HubDeviceError`` at ``DeviceHub()`` or ``add``.

**The bitmap race, and the way around it chosen here.** The Linux driver keeps bus messages
in one receive buffer and re-reads the GET_DEVICES bitmap from it while it probes the
devices one after the other; a bus message arriving meanwhile (a PING response: its first
PING comes ~50 ms after GET_DEVICES) overwrites the bitmap and the devices after the one
being probed are lost. The rule: no bus message between the GET_DEVICES response and
DRIVER_OK of every listed device. Of the three measured ways, the hub holds its bus messages
(PING responses, EVENT_DEVICE) from the GET_DEVICES response until every listed device
reached DRIVER_OK, then sends them in order; the hold ends after ``hold_limit`` (0.7 s) in
any case (a device whose probe failed never gets there), inside the driver's 1 s window. It
does not slow the start-up down (answering GET_DEVICES late would) and needs no knowledge
of the driver's buffer layout (carrying the bitmap in the PING response would).
``hold_pings=False`` turns it off, for the tests that reproduce the race.

**Keep-alive by construction.** The bus thread (the caller of ``serve``) only receives,
answers bus messages and routes; it never calls code a device supplies and never waits
for a device. It answers a request itself only where that is bounded by construction
(``DeviceWorker.try_inline``: a read of the device's state by ``VirtioMsgDevice``'s own
handler, taken only when the device's worker is idle, its lock got without blocking);
everything else runs on the device's own ``workers.DeviceWorker`` thread. Every send goes
through one ``LockedSender`` whose
holders let go within ``SEND_SLICE`` even when the driver queue is full. So a PING is
answered within one ``bus.receive`` wake-up (``poll_interval``, 10 ms) plus a send, whatever
a handler is doing, outside the start-up hold; 250 ms is the bound ``PING_DEADLINE`` the
tests hold it to. What can still delay it is outside the loop: a stopped process, or native
code holding the GIL (Python threads hand it over every switch interval, below). Both are
logged: a PING answered later than ``PING_DEADLINE`` and a bus-thread turn longer than
that say so at WARNING, before the driver's 1 s runs out, and so does a device that has
been inside one call longer than ``SLOW_CALL`` (its own requests wait, and the driver holds
one lock over all of its requests).

**The GIL switch interval while serving.** ``serve`` lowers ``sys.setswitchinterval`` to
``SWITCH_INTERVAL`` (0.5 ms; CPython's default is 5 ms) and restores it when it ends. A
thread that wants the GIL while another runs Python code gets it only when the holder is
asked to let go, after one interval: a PING, or a request to another device, arriving while
a worker computes in pure Python waits that long for the bus thread, then again for the
worker that answers it. The interval costs nothing while the other threads sleep (a switch
is forced only when a thread is waiting), and 0.5 ms keeps two such waits inside QEMU's
1 ms. It is process-wide: serve is its own process.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from ..bus import VirtioMsgBus
from ..core import protocol as p
from ..core.layouts import HEADER_SIZE, MESSAGE_SIZE
from ..errors import HubDeviceError
from ..memory.pool import POOL_OFFSET, PoolWindow
from .base import VirtioMsgDevice
from .workers import DeviceWorker, LockedSender

__all__ = [
    "HOLD_LIMIT",
    "MAX_DEVICES",
    "PING_DEADLINE",
    "SLOW_CALL",
    "SWITCH_INTERVAL",
    "DeviceHub",
    "HubStats",
]

log = logging.getLogger(__name__)

HOLD_LIMIT = 0.7  # longest start-up hold of bus messages (the driver's window is 1 s)
PING_DEADLINE = 0.25  # a PING answered later than this is logged
SLOW_CALL = 0.25  # a device inside one call for longer than this is logged
MAX_BURST = 256  # messages routed in a row before the hub's own checks run
DEV_READY, DEV_REMOVED = 1, 2  # EVENT_DEVICE dev_state
SWITCH_INTERVAL = 5e-4  # the GIL switch interval while serving (module doc)
MAX_DEVICES = 32  # dev_id 0..31: the window of the Linux driver's one GET_DEVICES (0, 32)


@dataclasses.dataclass
class HubStats:
    """Counters of a hub's bus messages (the bus's own are in ``bus.stats``)."""

    get_devices: int = 0
    pings: int = 0
    pings_held: int = 0  # PING responses held by the start-up hold
    late_pings: int = 0  # answered later than PING_DEADLINE after they were read
    unknown_dev: int = 0  # transport messages for a dev_id not served: dropped
    other_bus: int = 0  # bus messages from the driver that get no answer (events, unknown)
    events: int = 0  # EVENT_DEVICE sent
    stalls: int = 0  # bus-thread turns longer than PING_DEADLINE


class DeviceHub:
    """Several devices at distinct dev_ids on one device-role bus.

    Args:
        devices: dev_id -> device, or a sequence (dev_ids 0, 1, ...).
        hold_pings: hold bus messages from the GET_DEVICES response until every listed
            device reached DRIVER_OK (the bitmap-race workaround; see the module doc).
        hold_limit: the longest such a hold lasts, in seconds.
        announce_removal: when ``serve`` ends, send EVENT_DEVICE removed for every device.
    """

    def __init__(
        self,
        devices: Mapping[int, VirtioMsgDevice] | Sequence[VirtioMsgDevice] = (),
        *,
        hold_pings: bool = True,
        hold_limit: float = HOLD_LIMIT,
        announce_removal: bool = True,
    ) -> None:
        if not isinstance(devices, Mapping) and len(devices) > MAX_DEVICES:
            raise HubDeviceError(
                MAX_DEVICES,
                f"{len(devices)} devices: a hub serves at most {MAX_DEVICES} (dev_id 0..31, "
                f"what the Linux driver's GET_DEVICES asks about): serve the rest on another "
                f"ivshmem device",
            )
        items = dict(devices) if isinstance(devices, Mapping) else dict(enumerate(devices))
        for dev_id, device in items.items():
            _check_device(dev_id, device)
        self.hold_pings = hold_pings
        self.hold_limit = hold_limit
        self.announce_removal = announce_removal
        self.stats = HubStats()
        self._devices: dict[int, VirtioMsgDevice] = items
        self._workers: dict[int, DeviceWorker] = {}
        self._owned: dict[int, PoolWindow] = {}  # pool windows serve opened for a device
        self._lock = threading.Lock()  # hold state and the worker table; taken before sends
        self._bus: VirtioMsgBus | None = None
        self._sender: LockedSender | None = None
        self._held: list[p.Message] = []
        self._waiting_ok: set[int] = set()
        self._hold_until = 0.0
        self._unknown_seen: set[int] = set()

    @property
    def devices(self) -> dict[int, VirtioMsgDevice]:
        """dev_id -> device, a copy."""
        with self._lock:
            return dict(self._devices)

    @property
    def holding(self) -> bool:
        """The start-up hold is on (bus messages wait)."""
        with self._lock:
            return self._holding(time.monotonic())

    # Devices coming and going --------------------------------------------------------------

    def add(self, dev_id: int, device: VirtioMsgDevice) -> None:
        """Serve ``device`` at ``dev_id``; while serving, start it and send EVENT_DEVICE 1."""
        _check_device(dev_id, device)
        with self._lock:
            if dev_id in self._devices:
                raise HubDeviceError(dev_id, f"dev_id {dev_id} is served already: remove it first")
            self._devices[dev_id] = device
            if self._bus is not None:
                self._start(dev_id, device)
                self._send_bus(p.BusEventDevice(target_dev_num=dev_id, dev_state=DEV_READY))

    def remove(self, dev_id: int) -> VirtioMsgDevice:
        """Stop serving ``dev_id`` (EVENT_DEVICE 2 while serving); returns its device, which
        the caller closes."""
        with self._lock:
            device = self._devices.pop(dev_id)
            worker = self._workers.pop(dev_id, None)
            if self._bus is not None:
                self._send_bus(p.BusEventDevice(target_dev_num=dev_id, dev_state=DEV_REMOVED))
        if worker is not None:
            worker.stop()
        self._disown(dev_id, device)
        return device

    def _start(self, dev_id: int, device: VirtioMsgDevice) -> None:
        assert self._bus is not None and self._sender is not None
        bus = self._bus
        device.profile = bus.profile
        if device.window is None and device.num_queues and len(bus.device.shmem) > POOL_OFFSET:
            self._owned[dev_id] = device.window = PoolWindow(bus.device, role="device")
        worker = DeviceWorker(
            dev_id, device, self._sender, poll_interval=bus.poll_interval,
            on_driver_ok=self._driver_ok,
        )  # fmt: skip
        self._workers[dev_id] = worker
        worker.start()

    def _disown(self, dev_id: int, device: VirtioMsgDevice) -> None:
        own = self._owned.pop(dev_id, None)
        if own is not None:
            device.window = None
            device.reset()  # the queues' views of the pool go with it
            own.close()

    # Bus messages ------------------------------------------------------------------------------

    def get_devices(
        self, msg: p.BusGetDevices, profile: str = "linux-v0"
    ) -> p.BusGetDevicesResponse:
        """The GET_DEVICES response: offset echoed, num echoed (clipped to what one message
        of ``profile`` carries), bit i = dev_id offset+i is served."""
        most = (MESSAGE_SIZE[profile] - HEADER_SIZE[profile] - 6) * 8
        num = min(msg.num, most)
        bits = bytearray((num + 7) // 8)
        beyond = False
        with self._lock:  # add / remove may run on another thread
            served = list(self._devices)
        for dev_id in served:
            i = dev_id - msg.offset
            if 0 <= i < num:
                bits[i // 8] |= 1 << (i % 8)
            beyond = beyond or i >= num
        next_offset = min(msg.offset + num, 0xFFFF) if beyond else 0
        return p.BusGetDevicesResponse(msg.offset, num, next_offset, bytes(bits))

    def _on_bus(self, msg: p.Message, read_at: float) -> None:
        if isinstance(msg, p.BusPing):
            self.stats.pings += 1
            with self._lock:
                reply = p.BusPingResponse(data=msg.data, token=msg.token)
                if self._holding(time.monotonic()):
                    self._held.append(reply)
                    self.stats.pings_held += 1
                    return
                self._send(reply)
            late = time.monotonic() - read_at
            if late > PING_DEADLINE:
                self.stats.late_pings += 1
                log.warning(
                    "PING %d answered %.0f ms after it was read: the driver tears the bus "
                    "down after 1 s without a message", msg.data, late * 1e3,
                )  # fmt: skip
        elif isinstance(msg, p.BusGetDevices):
            self.stats.get_devices += 1
            found = self.get_devices(msg, self._bus.profile if self._bus else "linux-v0")
            found = dataclasses.replace(found, token=msg.token)  # spec-v1 matches by token
            listed = {
                found.offset + i for i in range(found.num) if found.bitmap[i // 8] >> (i % 8) & 1
            }
            with self._lock:
                self._send(found)
                if self.hold_pings and listed:
                    self._waiting_ok = listed
                    self._hold_until = time.monotonic() + self.hold_limit
        else:
            self.stats.other_bus += 1
            log.debug("bus message %s from the driver: no answer", type(msg).__name__)

    def _holding(self, now: float) -> bool:
        return bool(self._waiting_ok) and now < self._hold_until

    def _driver_ok(self, dev_id: int) -> None:
        """A worker sent the response that put ``dev_id`` at DRIVER_OK."""
        with self._lock:
            if dev_id in self._waiting_ok:
                self._waiting_ok.discard(dev_id)
                if not self._waiting_ok:
                    self._release()

    def _release(self) -> None:
        """End the hold: the held bus messages, in order (the hub lock is held)."""
        self._waiting_ok = set()
        self._hold_until = 0.0
        held, self._held = self._held, []
        for msg in held:
            self._send(msg)

    def _send_bus(self, msg: p.Message) -> None:
        """A bus message from the device side: held during the start-up hold (lock held)."""
        if isinstance(msg, p.BusEventDevice):
            self.stats.events += 1
        if self._holding(time.monotonic()):
            self._held.append(msg)
        else:
            self._send(msg)

    def _send(self, msg: p.Message) -> None:
        assert self._sender is not None
        self._sender.send(msg)

    # The loop -------------------------------------------------------------------------------------

    def _route(self, msg: p.Message) -> None:
        worker = self._workers.get(msg.dev_num)
        if worker is not None:
            if not worker.try_inline(msg):
                worker.put(msg)
            return
        self.stats.unknown_dev += 1
        if msg.dev_num not in self._unknown_seen:
            self._unknown_seen.add(msg.dev_num)
            log.warning(
                "%s for dev_id %d dropped: this bus serves dev_id(s) %s",
                type(msg).__name__, msg.dev_num, sorted(self.devices) or "none",
            )  # fmt: skip

    def _tick(self, now: float, turn: float) -> None:
        """The hub's own checks, once per bus-thread turn: the hold's time limit, slow
        devices, and a bus thread that was itself held up."""
        if turn > PING_DEADLINE:
            self.stats.stalls += 1
            log.warning(
                "the bus thread was held up %.0f ms (a stopped process, native code holding "
                "the GIL?): PINGs waited; the driver tears the bus down after 1 s", turn * 1e3,
            )  # fmt: skip
        with self._lock:
            if self._waiting_ok and now >= self._hold_until:
                log.warning(
                    "start-up hold: dev_id(s) %s not at DRIVER_OK after %.1f s (did the driver "
                    "fail its probe?); sending %d held bus message(s)",
                    sorted(self._waiting_ok), self.hold_limit,
                    len(self._held),
                )  # fmt: skip
                self._release()
            workers = list(self._workers.values())
        for w in workers:
            since = w.busy_since
            if since is not None and not w.warned and now - since > SLOW_CALL:
                w.warned = True
                log.warning(
                    "dev_id %d (%s) has been inside one call for %.2f s: its requests wait "
                    "(and the driver's other requests behind them); PINGs and the other "
                    "devices are still answered", w.dev_id, type(w.device).__name__, now - since,
                )  # fmt: skip

    def serve(
        self,
        bus: VirtioMsgBus,
        stop: Callable[[], bool] | None = None,
        *,
        on_message: Callable[[p.Message], None] | None = None,
    ) -> int:
        """Serve every device on ``bus`` until ``stop()`` (looked at every poll interval).

        Args:
            on_message: called on the bus thread with each incoming message first.

        Returns:
            How many messages were read.
        """
        with self._lock:
            if self._bus is not None:
                raise RuntimeError("this hub is serving already")
            self._bus, self._sender = bus, LockedSender(bus)
            for dev_id, device in self._devices.items():
                self._start(dev_id, device)
        handled = 0
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, SWITCH_INTERVAL))
        try:
            last = time.monotonic()
            while stop is None or not stop():
                msg = bus.receive(bus.poll_interval)
                now = time.monotonic()
                n = 0
                while msg is not None:
                    if on_message is not None:
                        on_message(msg)
                    if msg.BUS:
                        self._on_bus(msg, now)
                    else:
                        self._route(msg)
                    handled += 1
                    n += 1
                    msg = bus.receive(0) if n < MAX_BURST else None
                    now = time.monotonic()
                self._tick(now, now - last)
                last = now
        finally:
            sys.setswitchinterval(switch)
            self._shutdown()
        return handled

    def _shutdown(self) -> None:
        with self._lock:
            workers, self._workers = self._workers, {}
            sender = self._sender
            if self.announce_removal and sender is not None and not sender.bus.closed:
                for dev_id in sorted(self._devices):
                    sender.try_send(p.BusEventDevice(target_dev_num=dev_id, dev_state=DEV_REMOVED))
            self._held, self._waiting_ok, self._hold_until = [], set(), 0.0
        for w in workers.values():
            if not w.stop():
                log.warning("dev_id %d is still inside a call; left behind", w.dev_id)
        for dev_id, device in list(self._devices.items()):
            self._disown(dev_id, device)
        with self._lock:
            self._bus = self._sender = None


def _check_device(dev_id: int, device: VirtioMsgDevice) -> None:
    """Refuse what the Linux driver would never probe (see the module doc)."""
    if not isinstance(dev_id, int) or not 0 <= dev_id < MAX_DEVICES:
        raise HubDeviceError(
            dev_id,
            f"dev_id {dev_id!r}: a hub serves dev_id 0..{MAX_DEVICES - 1} (the Linux driver's "
            f"GET_DEVICES asks for 0..31 and never looks further): give it a free dev_id below "
            f"{MAX_DEVICES}",
        )
    if device.device_id == 0:
        raise HubDeviceError(
            dev_id,
            f"dev_id {dev_id}: {type(device).__name__} has DEVICE_INFO device_id 0, which the "
            f"Linux driver reads as 'no device' and skips: set its class's device_id to the "
            f"virtio device id it implements (rng 4, console 3)",
        )

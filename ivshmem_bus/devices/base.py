"""A virtio device in Python, presented over virtio-msg: the control plane and the queues.

Control plane: every request is answered the way QEMU's virtio-msg.c device side does
(docs/wire-format.md §4): vendor "QEMU", 64 feature bits, GET_VQUEUE max_size 1024 for an
existing queue and 0 past the last, config sizes 0/1/2/4 (and 8, which the qemu-v0 data field
also carries), FEATURES_OK refused when the driver asked for features the device does not
offer, no reply to RESET_VQUEUE in qemu-v0 (spec-v1: an empty one, linux-v0: the index
echoed, docs/wire-format.md §12), PING (spec-v1, linux-v0) echoed.

Data path (docs/virtqueues.md): SET_VQUEUE binds queue ``index`` to the
device's memory window as a ``DeviceQueue`` once its size (a power of two, at most
``queue_max_size``) and its three areas (inside the window, aligned 16/2/4) pass
``VirtqLayout.check``; a refused SET_VQUEUE leaves the queue unset (GET_VQUEUE then answers
size 0, which is how a driver sees the refusal: the response has no error field). EVENT_AVAIL
marks the queue kicked; ``process()`` then pops its chains in bounded batches, hands each to
the queue's handler and pushes the bytes the handler wrote, and queues EVENT_USED when
``DeviceQueue.publish()`` says the driver wants it. RESET_VQUEUE and status 0 drop the queue
state. A device without a window (``window=None``, the probe-only setups) records SET_VQUEUE
as before and moves no data.

DRIVER_OK before a queue is set: virtio lets a driver leave queues it does not use unset
(console without MULTIPORT uses 2 of its queues); such a queue is simply never processed, and
its EVENT_AVAIL is kept in ``events`` like any other unused event. No buffer is consumed before
DRIVER_OK (virtio: "the device MUST NOT consume buffers ... before DRIVER_OK"); chains made
available earlier are picked up when DRIVER_OK arrives.

A queue whose driver wrote something hostile (a bad head, ``next``, address, length, a loop,
an avail.idx jump) raises ``VirtqueueError`` from ``pop``: the queue is then broken, the device
sets DEVICE_NEEDS_RESET (0x40) in its status, tells the driver with EVENT_CONFIG (virtio:
"SHOULD send a device configuration change notification") and keeps answering the bus and
serving its other queues. Only a reset (status 0) clears it.

``serve.py`` runs the loop that interleaves bus requests with queue batches.
"""

from __future__ import annotations

import collections
import functools
import logging
from collections.abc import Callable

from ..bus import VirtioMsgBus
from ..core import protocol as p
from ..core.messages import MAX_FEATURE_BLOCKS
from ..core.virtio import (
    DRIVER,
    DRIVER_OK,
    FEATURES_OK,
    NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    VIRTIO_MSG_VENDOR_ID,
)
from ..core.virtqueue import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, DeviceQueue
from ..core.window import MemoryWindow
from ..errors import VirtqueueError
from .queues import ChainHandler, Vqueue, bind, release, run_batch
from .serve import serve_device

__all__ = ["QEMU_MAX_QUEUE_SIZE", "RING_FEATURES", "ChainHandler", "VirtioMsgDevice"]

log = logging.getLogger(__name__)

QEMU_MAX_QUEUE_SIZE = 1024
MAX_EVENTS = 256  # unconsumed events kept for inspection; the oldest go first

RING_FEATURES = 1 << VIRTIO_F_EVENT_IDX | 1 << VIRTIO_F_INDIRECT_DESC


class VirtioMsgDevice:
    """A virtio device presented over virtio-msg: subclass, set the class attributes, and put
    one handler per queue in ``handlers``.

    Args:
        profile: the wire profile (``serve`` takes the bus's).
        config: the device's config space.
        window: the memory the driver's addresses resolve through; None: no data path
            (``serve`` then opens the pool in the bus device's BAR2 when the device has
            queues and BAR2 has room).
        ring_features: VIRTIO_F_EVENT_IDX / VIRTIO_F_INDIRECT_DESC bits to offer as well (the
            queues use each only when the driver accepted it).

    Attributes:
        handlers: queue index -> ``ChainHandler``.
        events: events no queue consumed, newest last, at most ``MAX_EVENTS``.
        outbox: messages the device wants sent (EVENT_USED, EVENT_CONFIG); ``serve`` sends.
        on_status: called with (old, new) whenever the status changes.
        refused: SET_VQUEUE requests refused (bad size or layout).
    """

    device_id = 0
    vendor_id = VIRTIO_MSG_VENDOR_ID
    device_features = VIRTIO_F_VERSION_1
    num_feature_bits = 64
    num_queues = 1
    queue_max_size = QEMU_MAX_QUEUE_SIZE
    config_sizes = frozenset({0, 1, 2, 4, 8})
    batch_chains = 256  # the most chains one process() takes from one queue; with small
    # chains the time budget below ends the batch first (a round of the serve loop, a look
    # at the bus and a publish, costs several small chains: not one round every 64)
    batch_seconds = 2e-4  # ... and the time after which it stops at the next chain

    def __init__(
        self,
        profile: str = "qemu-v0",
        config: bytes = b"",
        window: MemoryWindow | None = None,
        *,
        ring_features: int = 0,
    ) -> None:
        if ring_features & ~RING_FEATURES:
            raise ValueError(
                f"ring_features 0x{ring_features:x}: only RING_INDIRECT_DESC (bit 28) and "
                "RING_EVENT_IDX (bit 29) are ring features"
            )
        self.device_features = type(self).device_features | ring_features
        self.profile = profile
        self.config = bytearray(config)
        self.window = window
        self.handlers: dict[int, ChainHandler] = {}
        self.on_status: Callable[[int, int], None] | None = None
        self.events: list[p.Message] = []
        self.outbox: collections.deque[p.Message] = collections.deque()
        self.refused = 0
        self._handlers: dict[type, Callable] = {
            p.DeviceInfo: self._device_info, p.GetFeatures: self._get_features,
            p.SetFeatures: self._set_features, p.GetDeviceStatus: self._get_status,
            p.SetDeviceStatus: self._set_status, p.GetConfig: self._get_config,
            p.SetConfig: self._set_config, p.GetVqueue: self._get_vqueue,
            p.SetVqueue: self._set_vqueue, p.ResetVqueue: self._reset_vqueue,
            p.EventAvail: self._event_avail, p.BusPing: self._ping,
        }  # fmt: skip
        self._rr = 0
        self.reset()

    def reset(self) -> None:
        """Back to power-on state: status 0, no driver features, queues unconfigured. The
        config space and generation stay (they are the device's, not the driver's)."""
        for vq in getattr(self, "queues", {}).values():
            release(vq)
        self.status = 0
        self.driver_features = 0
        self.generation = getattr(self, "generation", 0)
        self.queues = {i: Vqueue() for i in range(self.num_queues)}

    def close(self) -> None:
        """Drop the queues (their views of the window) before the window closes."""
        self.reset()

    def handle(self, msg: p.Message) -> p.Message | None:
        """The response to ``msg``, or None (events, RESET_VQUEUE in qemu-v0, unknowns)."""
        handler = self._handlers.get(type(msg))
        if handler is None:
            if msg.EVENT:
                self.on_event(msg)
            return None
        return handler(msg)

    def on_event(self, msg: p.Message) -> None:
        """An event no queue consumed: kept in ``events`` (bounded, oldest dropped)."""
        self.events.append(msg)
        if len(self.events) > MAX_EVENTS:
            del self.events[: MAX_EVENTS // 2]

    def serve(
        self,
        bus: VirtioMsgBus,
        stop: Callable[[], bool] | None = None,
        *,
        on_message: Callable[[p.Message], None] | None = None,
    ) -> int:
        """Answer the driver and run the queues on a device-role bus until ``stop()``
        (``serve.serve_device``); returns how many messages were handled."""
        return serve_device(self, bus, stop, on_message=on_message)

    # The data path -------------------------------------------------------------------------

    def queue_ready(self, index: int) -> bool:
        """May the handler of ``index`` take a chain now? (False: back-pressure; the chains
        stay in the ring until it is True.) Always True here."""
        return True

    @property
    def has_work(self) -> bool:
        """Some kicked queue can make progress now (``process`` would pop a chain)."""
        if not self.status & DRIVER_OK:
            return False
        return any(
            vq.kicked and vq.queue is not None and not vq.queue.broken and self.queue_ready(i)
            for i, vq in self.queues.items()
        )

    def process(self) -> bool:
        """One bounded batch on each kicked queue (``batch_chains`` chains or
        ``batch_seconds``, whichever ends first); EVENT_USED goes to ``outbox``.

        Returns:
            True when work remains (call again after answering the bus).
        """
        if not self.status & DRIVER_OK:
            return False
        order = sorted(self.queues)
        self._rr = (self._rr + 1) % max(1, len(order))
        for index in order[self._rr :] + order[: self._rr]:
            vq = self.queues[index]
            q = vq.queue
            if q is None or not vq.kicked or q.broken or not self.queue_ready(index):
                continue
            try:
                self._batch(index, vq, q)
            except VirtqueueError as exc:
                self._broken(index, exc)
            if q.publish():
                self._used(index)
        return self.has_work

    def _batch(self, index: int, vq: Vqueue, q: DeviceQueue) -> None:
        handler = self.handlers.get(index)
        if handler is None:
            vq.kicked = False  # nothing consumes this queue: leave its chains alone
            return
        ready = None  # the base class is always ready: no call per chain
        if type(self).queue_ready is not VirtioMsgDevice.queue_ready:
            ready = functools.partial(self.queue_ready, index)
        run_batch(vq, q, handler, ready, self.batch_chains, self.batch_seconds)

    def _used(self, index: int) -> None:
        """EVENT_USED for ``index``, unless one is still waiting to be sent (it covers these
        buffers too: the driver reaps up to used.idx)."""
        event = p.EventUsed(index=index)
        if event not in self.outbox:
            self.outbox.append(event)

    def _broken(self, index: int, exc: VirtqueueError) -> None:
        log.warning("%s; DEVICE_NEEDS_RESET set, other queues keep running", exc)
        vq = self.queues[index]
        vq.kicked = False
        old = self.status
        self.status |= NEEDS_RESET
        if self.on_status is not None and old != self.status:
            self.on_status(old, self.status)
        self.outbox.append(p.EventConfig(self.status, self.generation, 0, 0))

    def kick(self, index: int) -> None:
        """Look at queue ``index`` again (a handler that was not ready now is)."""
        vq = self.queues.get(index)
        if vq is not None and vq.queue is not None:
            vq.kicked = True

    def set_config(self, offset: int, data: bytes) -> None:
        """A device-side config change: new generation, and EVENT_CONFIG to the driver (with
        the changed bytes when the profile's field holds them, else size 0: re-read)."""
        if offset < 0 or offset + len(data) > len(self.config):
            raise ValueError(
                f"config change at {offset}+{len(data)} is outside the {len(self.config)}-byte "
                "config space"
            )
        self.config[offset : offset + len(data)] = data
        self.generation = (self.generation + 1) & 0xFFFFFFFF
        if not self.status & DRIVER:
            return  # no driver yet: it reads the config when it comes
        event = p.EventConfig(self.status, self.generation, offset, len(data), bytes(data))
        try:
            p.encode(event, self.profile)
        except ValueError:  # more bytes than the profile's field holds: the driver re-reads
            event = p.EventConfig(self.status, self.generation, offset, 0)
        self.outbox.append(event)

    # Per-message answers ----------------------------------------------------------------------

    def _device_info(self, msg: p.DeviceInfo) -> p.Message:
        extra = {"max_virtqueues": self.num_queues} if self.profile != "qemu-v0" else {}
        return p.DeviceInfoResponse(
            self.device_id, self.vendor_id, self.num_feature_bits, len(self.config), **extra
        )

    def _window(self, index: int, num: int) -> tuple[int, int]:
        """(shift, mask) of feature blocks ``index .. index+num-1``, clipped to the device's
        ``num_feature_bits``: index and num come from the peer, and an unclipped
        ``mask << 32 * index`` with index 0xFFFFFFFF is a 17 GB integer."""
        if self.profile == "qemu-v0":
            num = min(num, 2)  # one u64 word carries the answer
        shift = 32 * index
        if shift >= self.num_feature_bits:
            return 0, 0  # past the last feature block: nothing there
        bits = min(32 * min(num, MAX_FEATURE_BLOCKS), self.num_feature_bits - shift)
        return shift, (1 << bits) - 1

    def _get_features(self, msg: p.GetFeatures) -> p.Message:
        shift, mask = self._window(msg.index, msg.num)
        num = min(msg.num, 2 if self.profile == "qemu-v0" else MAX_FEATURE_BLOCKS)
        return p.GetFeaturesResponse(msg.index, num, (self.device_features >> shift) & mask)

    def _set_features(self, msg: p.SetFeatures) -> p.Message:
        shift, mask = self._window(msg.index, msg.num)
        self.driver_features = (self.driver_features & ~(mask << shift)) | (
            (msg.features & mask) << shift
        )
        if self.profile == "spec-v1":
            return p.SetFeaturesResponse()
        return p.SetFeaturesResponse(msg.index, msg.num, msg.features)

    def _get_status(self, msg: p.GetDeviceStatus) -> p.Message:
        return p.GetDeviceStatusResponse(self.status)

    def _set_status(self, msg: p.SetDeviceStatus) -> p.Message:
        old, new = self.status, msg.status
        if new == 0:
            self.reset()
        else:
            if new & FEATURES_OK and self.driver_features & ~self.device_features:
                new &= ~FEATURES_OK  # asked for something we do not offer: refuse
            new |= self.status & NEEDS_RESET  # only a reset clears it
            self.status = new
            if new & DRIVER_OK and not old & DRIVER_OK:
                for vq in self.queues.values():  # chains made available before DRIVER_OK
                    vq.kicked = vq.queue is not None
        if self.on_status is not None and old != self.status:
            self.on_status(old, self.status)
        return p.SetDeviceStatusResponse(self.status)

    def _get_config(self, msg: p.GetConfig) -> p.Message:
        if msg.size not in self.config_sizes or msg.offset + msg.size > len(self.config):
            return p.GetConfigResponse(self.generation, msg.offset, 0)
        data = bytes(self.config[msg.offset : msg.offset + msg.size])
        return p.GetConfigResponse(self.generation, msg.offset, msg.size, data)

    def _set_config(self, msg: p.SetConfig) -> p.Message:
        if msg.size in self.config_sizes and msg.offset + msg.size <= len(self.config):
            self.config[msg.offset : msg.offset + msg.size] = msg.data
            self.generation = (self.generation + 1) & 0xFFFFFFFF
        return p.SetConfigResponse(self.generation, msg.offset, msg.size, msg.data)

    def _get_vqueue(self, msg: p.GetVqueue) -> p.Message:
        vq = self.queues.get(msg.index)
        if vq is None:
            return p.GetVqueueResponse(msg.index, 0)
        return p.GetVqueueResponse(
            msg.index, self.queue_max_size, vq.size, vq.descriptor_addr, vq.driver_addr,
            vq.device_addr,
        )  # fmt: skip

    def _set_vqueue(self, msg: p.SetVqueue) -> p.Message:
        if msg.index in self.queues:
            release(self.queues[msg.index])
            self.queues[msg.index] = self._bind(msg)
        if self.profile == "spec-v1":
            return p.SetVqueueResponse()
        return p.SetVqueueResponse(
            msg.index, msg.size, msg.descriptor_addr, msg.driver_addr, msg.device_addr
        )

    def _bind(self, msg: p.SetVqueue) -> Vqueue:
        """The queue SET_VQUEUE describes, checked; an unset queue when it is refused."""
        try:
            vq = bind(msg, self.window, self.queue_max_size, self.driver_features)
        except VirtqueueError as exc:
            self.refused += 1
            log.warning("SET_VQUEUE refused: %s", exc)
            return Vqueue()
        vq.kicked = vq.queue is not None and bool(self.status & DRIVER_OK)
        return vq

    def _reset_vqueue(self, msg: p.ResetVqueue) -> p.Message | None:
        if msg.index in self.queues:
            release(self.queues[msg.index])
            self.queues[msg.index] = Vqueue()
        if self.profile == "qemu-v0":
            return None  # QEMU's device never replies
        return p.ResetVqueueResponse(msg.index if self.profile == "linux-v0" else 0)

    def _ping(self, msg: p.BusPing) -> p.Message:
        return p.BusPingResponse(msg.data)

    def _event_avail(self, msg: p.EventAvail) -> None:
        vq = self.queues.get(msg.index)
        if vq is None or vq.queue is None:
            self.on_event(msg)  # no such queue bound: nothing to wake
            return None
        vq.kicked = True
        return None

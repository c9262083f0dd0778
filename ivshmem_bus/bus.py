"""VirtioMsgBus: virtio-msg messages over an ivshmem device, as QEMU's virtio-msg-bus-ivshmem.

Theory of operation
-------------------
BAR2 holds two SPSC queues (docs/wire-format.md §3): the driver queue at 0x0000 carries
driver -> device messages, the device queue at 0x1000 device -> driver (the device's
``message_queues``: the linux-user backend's are two files). The driver role
produces on the first and consumes the second; the device role the reverse. The side that
starts first may pass ``reset_queues=True`` to zero both (8 KiB) before the other attaches.

Sending encodes the message into one slot and rings ``remote_vmid`` (vector 0) after each
enqueue, as QEMU does. With ``coalesce=True`` (both ends ivshmem_bus) it rings only when the
peer may be asleep: ``queue.py`` explains the polling flag and the re-check that make this
lose no wake-up. Either way, before sleeping a receiver fences and looks at its queue once
more (with the compiled helper), so a coalescing peer cannot strand a message.

A full queue is waited out (the peer is ringed again, in case it
slept through a doorbell) until ``timeout``, then ``BusTimeout``.

Receiving drains the whole queue on every look (eventfd counts coalesce: one wake-up can
stand for many doorbells). Waiting spins on the queue for ``spin`` seconds, then sleeps on
the device's eventfds; since a doorbell can be lost (rung before the peer enabled its
vectors), a sleeping wait wakes every ``poll_interval`` to look at the queue anyway.

Requests: one outstanding at a time per caller. qemu-v0 matches a response by msg_id,
spec-v1 by token (allocated here). While a request waits, responses that match nothing are
dropped and counted; requests the peer sends (QEMU's device sends IOMMU_TRANSLATE that way)
go to ``handler`` when one is set, and are answered at once; everything else (events,
unanswered requests) is kept and delivered after, in arrival order, by ``receive``.

asyncio: ``aio.AsyncVirtioMsgBus`` wraps a bus and awaits the same eventfds.

Bytes the peer wrote that do not decode are dropped and counted, never raised: the peer is
untrusted and one bad slot must not stop the link. A corrupt queue index is different: it
raises ``QueueCorrupt`` (nothing sane can be read until the queues are reset).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Literal

from .backends.base import IvshmemDevice
from .core import protocol
from .core.protocol import Message, UnknownMessage
from .core.queue import SpscQueue, reset_queue
from .core.regs import PEER_IDS, is_peer_id
from .errors import BusClosed, BusTimeout, ProtocolError

__all__ = [
    "DEVICE_QUEUE_OFFSET",
    "DRIVER_QUEUE_OFFSET",
    "QUEUE_SIZE",
    "BusStats",
    "Handler",
    "VirtioMsgBus",
    "reset_queues_of",
]

log = logging.getLogger(__name__)

DRIVER_QUEUE_OFFSET = 0x0000
DEVICE_QUEUE_OFFSET = 0x1000
QUEUE_SIZE = 0x1000
Role = Literal["driver", "device"]
Handler = Callable[[Message], Message | None]


@dataclasses.dataclass
class BusStats:
    """Counters of one bus. ``dropped`` = malformed + unknown + stray responses + overflow
    (messages beyond ``max_pending`` kept for ``receive``). ``lost_doorbells``: sleeps that
    the poll interval ended with messages waiting and still no doorbell pending: it was lost
    or never rung. ``doorbells_suppressed``: sends that coalescing did not ring for."""

    sent: int = 0
    received: int = 0
    malformed: int = 0
    unknown: int = 0
    stray_responses: int = 0
    queue_full_waits: int = 0
    doorbells_rung: int = 0
    doorbells_suppressed: int = 0
    doorbell_wakeups: int = 0
    lost_doorbells: int = 0
    timeouts: int = 0
    overflow: int = 0

    @property
    def dropped(self) -> int:
        return self.malformed + self.unknown + self.stray_responses + self.overflow


def reset_queues_of(device: IvshmemDevice) -> None:
    """Empty both queues (8 KiB of BAR2 on ivshmem; the backend's ``message_queues``): only
    before the peer attaches ("reset-queues")."""
    for region in device.message_queues():
        with region:
            reset_queue(region)


@dataclasses.dataclass
class RequestClock:
    """The times of one outstanding request (monotonic seconds)."""

    timeout: float
    deadline: float
    rering_at: float

    @property
    def wake_at(self) -> float:
        """When a sleeping requester must look again at the latest."""
        return min(self.deadline, self.rering_at)


class VirtioMsgBus:
    """One end of a virtio-msg link over an ivshmem device.

    Args:
        device: any ``IvshmemDevice`` backend; the bus does not close it.
        role: ``"driver"`` or ``"device"``.
        remote_vmid: the peer's VMID (its IVPosition), 0..65535.
        profile: ``"qemu-v0"`` (QEMU's ivshmem bus) or ``"spec-v1"``.
        reset_queues: zero both queues first (only the side that starts first).
        handler: answers requests that arrive while a ``request`` waits (return the response,
            or None for no response).
        spin: seconds to busy-poll the queue before sleeping on the eventfds.
        poll_interval: the longest a sleeping wait goes without looking at the queue.
        max_pending: how many incoming events/requests are held for ``receive`` at most.
        coalesce: ring only when the peer may be asleep (both ends must be ivshmem_bus:
            QEMU's side does not re-check its queue before sleeping). Needs the compiled
            helper's full fence.

    Raises:
        ValueError: bad role, profile or vmid, BAR2 smaller than the two queues, or
            ``coalesce`` without the compiled helper.
        QueueCorrupt: an index in shared memory is out of range (and reset_queues is off).
    """

    def __init__(
        self,
        device: IvshmemDevice,
        role: Role,
        remote_vmid: int,
        profile: str = "qemu-v0",
        *,
        reset_queues: bool = False,
        handler: Handler | None = None,
        spin: float = 50e-6,
        poll_interval: float = 0.01,
        max_pending: int = 4096,
        coalesce: bool = False,
    ) -> None:
        if role not in ("driver", "device"):
            raise ValueError(f"role must be 'driver' or 'device', not {role!r}")
        if profile not in protocol.PROFILES:
            raise ValueError(f"unknown profile {profile!r}; use one of {protocol.PROFILES}")
        if not is_peer_id(remote_vmid):
            raise ValueError(f"remote_vmid {remote_vmid} is not a peer id ({PEER_IDS})")
        full_fence = device.full_fence
        if coalesce and full_fence is None:
            raise ValueError(
                f"{device.name}: coalesce=True needs a StoreLoad fence, which only the compiled "
                "helper has (install a C compiler and reinstall ivshmem-bus), or coalesce=False"
            )
        if reset_queues:
            reset_queues_of(device)
        fence, blocks = device.fence, device.queue_blocks
        regions = list(device.message_queues())  # BAR2 0x0000/0x1000 on ivshmem
        queues: list[SpscQueue] = []
        try:
            for region in regions:
                queues.append(SpscQueue(region, fence=fence, blocks=blocks))
        except BaseException:  # hold no view of BAR2 once construction failed
            for q in queues:
                q.release()
            for region in regions:
                region.release()
            raise
        driver_q, device_q = queues
        self._tx, self._rx = (driver_q, device_q) if role == "driver" else (device_q, driver_q)
        self.device = device
        self.role = role
        self.remote_vmid = remote_vmid
        self.profile = profile
        self.handler = handler
        self.spin = spin
        self.poll_interval = poll_interval
        self.max_pending = max_pending
        self.stats = BusStats()
        self._pending: collections.deque[Message] = collections.deque()
        self._token = 0
        self._closed = False
        self.coalesce = coalesce
        self._full_fence = full_fence
        # Our receive queue's polling flag: up while we do not sleep; cleared when not
        # coalescing (a flag left by an earlier process would silence a coalescing peer).
        self._rx.set_polling(coalesce)

    # Sending ------------------------------------------------------------------------------------

    def send(self, msg: Message, timeout: float = 1.0) -> None:
        """Encode ``msg``, enqueue it and ring the peer.

        Raises:
            BusTimeout: the queue stayed full for ``timeout`` seconds.
            ValueError: the profile cannot carry ``msg``.
        """
        self.check_open()
        raw = protocol.encode(msg, self.profile)
        if not self._tx.put(raw):
            self._wait_for_space(raw, timeout)
        self.stats.sent += 1
        if self.coalesce and not self._tx.needs_doorbell(self._full_fence):  # type: ignore[arg-type]
            self.stats.doorbells_suppressed += 1
            return
        self._ring()

    def _wait_for_space(self, raw: bytes, timeout: float) -> None:
        self.stats.queue_full_waits += 1
        deadline = time.monotonic() + timeout
        pause = 1e-5
        while not self._tx.put(raw):
            if time.monotonic() >= deadline:
                self.stats.timeouts += 1
                raise BusTimeout(
                    f"queue to vmid {self.remote_vmid} on {self.device.name} stayed full for "
                    f"{timeout} s: the peer is not consuming (is it running and attached?)"
                )
            self._ring()  # it may have slept through the doorbell that filled the queue
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)

    def _ring(self) -> None:
        self.device.ring(self.remote_vmid, 0)
        self.stats.doorbells_rung += 1

    # Receiving ----------------------------------------------------------------------------------

    def _fetch(self) -> list[Message]:
        """Drain the receive queue and decode; bad slots are dropped and counted."""
        out: list[Message] = []
        self._rx.drain(lambda slot: self._decode_into(slot, out))
        return out

    def _decode_into(self, slot: memoryview, out: list[Message]) -> None:
        try:
            msg = protocol.decode(slot, self.profile)
        except ProtocolError as exc:
            self.stats.malformed += 1
            log.debug("%s: dropped: %s", self.device.name, exc)
            return
        if isinstance(msg, UnknownMessage):
            self.stats.unknown += 1
            log.debug("%s: dropped unknown message 0x%02x", self.device.name, msg.msg_id)
            return
        self.stats.received += 1
        out.append(msg)

    def _wait(self, deadline: float, spin_until: float) -> None:
        """Block until a doorbell, the poll interval, or the deadline, whichever is first."""
        now = time.monotonic()
        if now < spin_until:
            return  # still spinning: look at the queue again straight away
        remaining = deadline - now
        if remaining <= 0 or not self.prepare_sleep():
            return
        self.note_wake(bool(self.device.wait(min(remaining, self.poll_interval))))

    def prepare_sleep(self) -> bool:
        """Before sleeping on the eventfds: False when a message came since the last look.

        Clears our polling flag, fences, and looks at the queue again (the consumer's half of
        the coalescing protocol); without the compiled helper there is no fence, no peer
        can coalesce, and this is always True.
        """
        fence = self._full_fence
        return fence is None or self._rx.may_sleep(fence)

    def note_wake(self, doorbell: bool) -> None:
        """After sleeping: raise the polling flag again, and count how the sleep ended."""
        if self.coalesce:
            self._rx.set_polling(True)
        if doorbell:
            self.stats.doorbell_wakeups += 1
        elif not self._rx.empty() and self.device.vector_fds() and not self.device.drain():
            # messages found by the poll interval, and no doorbell just arriving for them (a
            # device without vectors, ivshmem-plain, has no doorbells to lose)
            self.stats.lost_doorbells += 1
            log.debug("%s: messages waited for a doorbell that never came", self.device.name)

    def receive(self, timeout: float | None = None) -> Message | None:
        """The next incoming message, or None after ``timeout`` seconds (None: forever).

        Responses that arrive when no request is waiting are dropped as strays.
        """
        self.check_open()
        deadline = float("inf") if timeout is None else time.monotonic() + timeout
        spin_until = time.monotonic() + self.spin
        while True:
            if self._pending:
                return self._pending.popleft()
            for msg in self._fetch():
                if protocol.is_response(msg):
                    self.stats.stray_responses += 1
                else:
                    self._keep(msg)
            if self._pending:
                continue
            if time.monotonic() >= deadline:
                return None
            self._wait(deadline, spin_until)

    # Requests -----------------------------------------------------------------------------------

    def prepare_request(self, msg: Message) -> Message:
        if not protocol.expects_response(msg, self.profile):
            raise ValueError(f"{type(msg).__name__} gets no response in {self.profile}: use send()")
        if self.profile == "spec-v1":
            self._token = self._token % 0xFFFF + 1  # 1..65535; 0 is for events
            msg = dataclasses.replace(msg, token=self._token)
        return msg

    def match_response(self, request: Message, deadline: float) -> Message | None:
        """Drain the queue while ``request`` waits and sort what came: the response if it is
        there; strays dropped, requests answered by the handler (within what is left of the
        request's own ``deadline``, a monotonic time), the rest kept for later."""
        found = None
        for msg in self._fetch():
            if found is None and protocol.response_matches(request, msg, self.profile):
                found = msg
            elif protocol.is_response(msg):
                self.stats.stray_responses += 1
            elif self.handler is not None and protocol.expects_response(msg, self.profile):
                left = max(0.0, deadline - time.monotonic())
                self._answer(msg, self.handler(msg), left)
            else:
                self._keep(msg)
        return found

    def _keep(self, msg: Message) -> None:
        """Hold an event or unanswered request for ``receive``; bounded, since a peer can
        flood a side that never calls ``receive``: past ``max_pending`` new ones are dropped."""
        if len(self._pending) >= self.max_pending:
            self.stats.overflow += 1
            return
        self._pending.append(msg)

    def timed_out(self, request: Message, timeout: float) -> BusTimeout:
        self.stats.timeouts += 1
        return BusTimeout(
            f"no response to {type(request).__name__} from vmid {self.remote_vmid} on "
            f"{self.device.name} within {timeout} s: is the peer serving, with {self.profile}?"
        )

    def request(self, msg: Message, timeout: float = 1.0) -> Message:
        """Send a request and wait for its response.

        Returns:
            The response (its class is ``protocol.response_class(msg)``).

        Raises:
            BusTimeout: no response within ``timeout`` (the peer was ringed again halfway).
            ValueError: ``msg`` gets no response in this profile.
        """
        msg, clock = self.start_request(msg, timeout)
        spin_until = time.monotonic() + self.spin
        while True:
            found = self.step_request(msg, clock)
            if found is not None:
                return found
            self._wait(clock.wake_at, spin_until)

    def start_request(self, msg: Message, timeout: float) -> tuple[Message, RequestClock]:
        """Send ``msg`` (with its token, in spec-v1) and start its clock. The sync and asyncio
        faces both drive a request with ``step_request`` between their own kinds of sleep."""
        self.check_open()
        msg = self.prepare_request(msg)
        start = time.monotonic()
        clock = RequestClock(timeout, start + timeout, start + timeout / 2)
        self.send(msg, timeout)
        return msg, clock

    def step_request(self, msg: Message, clock: RequestClock) -> Message | None:
        """One look for ``msg``'s response: the response, or None to sleep until
        ``clock.wake_at``. Rings the peer again halfway (the first doorbell may have been lost:
        a receiver that enabled its vectors after we rang never saw it).

        Raises:
            BusTimeout: the deadline passed.
        """
        found = self.match_response(msg, clock.deadline)
        if found is not None:
            return found
        now = time.monotonic()
        if now >= clock.deadline:
            raise self.timed_out(msg, clock.timeout)
        if now >= clock.rering_at:
            clock.rering_at = clock.deadline
            self._ring()
        return None

    def serve(
        self, handler: Handler, *, stop: Callable[[], bool] | None = None, timeout: float = 1.0
    ) -> int:
        """Answer requests until ``stop()`` is true (checked at least every poll interval).

        ``handler`` gets every incoming request and event; what it returns (if not None) is
        sent back at once. QEMU's driver side gives up after about 1 ms, so the handler must
        be quick.

        Returns:
            How many messages were handled.
        """
        handled = 0
        while stop is None or not stop():
            msg = self.receive(self.poll_interval)
            if msg is None:
                continue
            self._answer(msg, handler(msg), timeout)
            handled += 1
        return handled

    def _answer(self, request: Message, reply: Message | None, timeout: float = 1.0) -> None:
        """Send ``reply`` with the request's token and dev_num (the responder copies them)."""
        if reply is None:
            return
        if reply.token != request.token or reply.dev_num != request.dev_num:
            reply = dataclasses.replace(reply, token=request.token, dev_num=request.dev_num)
        self.send(reply, timeout)

    # Life cycle -----------------------------------------------------------------------------------

    def check_open(self) -> None:
        if self._closed:
            raise BusClosed(f"bus on {self.device.name} is closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release the queues' views of BAR2 (the device can then be closed). Idempotent."""
        if not self._closed:
            self._closed = True
            self._rx.set_polling(False)  # nobody polls now: a coalescing peer must ring
            self._tx.release()
            self._rx.release()

    def __enter__(self) -> VirtioMsgBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<VirtioMsgBus {self.role} on {self.device.name} -> vmid {self.remote_vmid} "
            f"({self.profile})>"
        )

"""One queue pair per fabric: who produces on each queue, and which peer an ``auto`` end talks to.

A fabric (one BAR2) carries one driver queue and one device queue. Two devices on it would
both consume the driver queue, two drivers both produce on it: each would see half the other
side's messages. So each ivshmem_bus end *claims* the queue it produces on, in a word QEMU
never writes (``core.queue.CLAIM_OFFSET``: the producer line's word after head):

    BAR2 0x0004  driver queue, claim of the driver: CLAIM | vmid
    BAR2 0x1004  device queue, claim of the device: CLAIM | vmid

(``CLAIM`` = bit 16; any value without exactly that bit pattern above the low 16 bits is "no
claim", so zeroed or stale memory never looks claimed by accident.)

A claim is *live* while its vmid is one of the server's peers: the server announces a peer's
departure, so a dead owner's claim expires by itself (peer ids are handed out by a running
counter, not reused soon). A backend that cannot list peers (VFIO: the guest sees only its own
IVPosition) cannot tell a live claim from a stale one: there a foreign claim is reported in
the log and taken over. QEMU's peers never claim, and a missing claim never refuses anything:
an ivshmem_bus end beside QEMU behaves exactly as without claims.

Stores are one aligned 32-bit store (``memoryview.cast("I")``, as the queue indexes), and a
claim is only written by the end it names. Two ends that start in the same instant may both
find the word free; ``PeerChoice.check_claim`` (called by ``serve`` every half second) notices
that the other one won and says so, so the loser stops instead of sharing the queue.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Literal

from .backends.base import IvshmemDevice
from .bus import DEVICE_QUEUE_OFFSET, DRIVER_QUEUE_OFFSET, QUEUE_SIZE, reset_queues_of
from .core.queue import CLAIM, CLAIM_OFFSET
from .core.regs import PEER_IDS, is_peer_id
from .errors import BarTooSmall, QueueClaimed, RemoteVmidError

__all__ = [
    "PeerChoice",
    "check_bar2",
    "claim",
    "claim_of",
    "claimed",
    "release",
    "reset_queues_keeping_claims",
    "resolve_driver_remote",
]

log = logging.getLogger(__name__)

Role = Literal["driver", "device"]
_TX = {"driver": DRIVER_QUEUE_OFFSET, "device": DEVICE_QUEUE_OFFSET}  # the queue a role produces on
NEED = DEVICE_QUEUE_OFFSET + QUEUE_SIZE  # 8 KiB: the two queues
POLL_SECONDS = 0.05  # how often an ``auto`` wait reads the peer list and the claim word again


def check_bar2(dev: IvshmemDevice, fix: str = "") -> None:
    """Raise ``BarTooSmall`` (one line, naming the fix) when the device cannot give the bus its
    two queues (on ivshmem: BAR2 under 8 KiB; the linux-user bus has its queue files)."""
    try:
        queues = dev.message_queues()
    except ValueError:
        raise BarTooSmall(
            f"{dev.name}: shared memory is {len(dev.shmem)} bytes; the bus needs {NEED} (two "
            f"4 KiB queues): {fix or 'give the ivshmem server or device at least 8K'}"
        ) from None
    for region in queues:
        region.release()


def _word(dev: IvshmemDevice, role: Role) -> memoryview:
    """The claim word of the queue ``role`` produces on, wherever the backend keeps its queues
    (``message_queues``: BAR2 on ivshmem, the queue files on the linux-user bus)."""
    tx, rx = dev.message_queues()
    mine, other = (tx, rx) if role == "driver" else (rx, tx)
    try:
        return mine[CLAIM_OFFSET : CLAIM_OFFSET + 4].cast("I")
    finally:
        mine.release()
        other.release()


def claim_of(dev: IvshmemDevice, role: Role) -> int | None:
    """The vmid claiming the queue ``role`` produces on, or None (one 32-bit load)."""
    with _word(dev, role) as word:
        value = word[0]
    return value & 0xFFFF if value >> 16 == CLAIM >> 16 else None


def _live(dev: IvshmemDevice, vmid: int | None, peers: set[int] | None) -> bool:
    return vmid is not None and vmid != dev.vmid and (peers is None or vmid in peers)


def claim(dev: IvshmemDevice, role: Role) -> None:
    """Claim the queue ``role`` produces on for this peer.

    Raises:
        QueueClaimed: another live peer claims it (the message names that peer).
    """
    owner, peers = claim_of(dev, role), dev.peers()
    if _live(dev, owner, peers):
        if peers is not None:
            raise QueueClaimed(_claimed_message(dev, role, owner))  # type: ignore[arg-type]
        log.warning(
            "%s: the %s queue names vmid %s as its %s, and this backend cannot tell whether it "
            "is still there: taking it over", dev.name, role, owner, role,
        )  # fmt: skip
    with _word(dev, role) as word:
        word[0] = CLAIM | dev.vmid


def reset_queues_keeping_claims(dev: IvshmemDevice) -> None:
    """Zero both queues (``bus.reset_queues_of``) but keep the claims of live peers (ours too):
    a device that starts after its driver must not make that driver look unclaimed."""
    peers = dev.peers()
    kept = {role: claim_of(dev, role) for role in ("driver", "device")}
    reset_queues_of(dev)
    for role, vmid in kept.items():
        if vmid is not None and (vmid == dev.vmid or peers is None or vmid in peers):
            with _word(dev, role) as word:  # type: ignore[arg-type]
                word[0] = CLAIM | vmid


def release(dev: IvshmemDevice, role: Role) -> None:
    """Clear our claim (only if the word still names us). Safe on a closed link's device."""
    if claim_of(dev, role) == dev.vmid:
        with _word(dev, role) as word:
            word[0] = 0


@contextlib.contextmanager
def claimed(dev: IvshmemDevice, role: Role) -> Iterator[None]:
    """``claim`` for the block's duration, then ``release``."""
    claim(dev, role)
    try:
        yield
    finally:
        release(dev, role)


def _claimed_message(dev: IvshmemDevice, role: Role, owner: int) -> str:
    where = _TX[role] + CLAIM_OFFSET
    what = "serves a device" if role == "device" else "drives the device"
    return (
        f"{dev.name}: vmid {owner} already {what} on this fabric (its claim at BAR2 "
        f"0x{where:04x}); one fabric carries one {role}: stop vmid {owner}'s "
        f"ivshmem-bus {'serve' if role == 'device' else 'probe/ping'}, or use another fabric"
    )


def resolve_driver_remote(
    dev: IvshmemDevice, spec: str, *, hint: str = "", wait: float = 0.0
) -> int:
    """For a driver-role end: the device's vmid from ``spec`` (a number, or ``auto``).

    ``auto``: the peer that claims the device queue when one does (an ivshmem_bus device),
    else the one other peer (a QEMU device); the choice is logged with the peers seen. With no
    peer yet, or several and none claiming, it looks again every ``POLL_SECONDS`` until
    ``wait`` seconds have passed (a device started with the driver joins meanwhile; a monitor
    leaves at once): it returns the moment the choice is clear, never after a fixed delay.
    ``wait=0`` looks once.

    Raises:
        RemoteVmidError: ``auto`` with no peer, or several and none claims the device queue,
            when ``wait`` ran out; or on a backend that cannot list peers.
        ValueError: ``spec`` is neither a number in 0..65535 nor ``auto``.
    """
    if spec != "auto":
        value = int(spec, 0)
        if not is_peer_id(value):
            raise ValueError(f"remote vmid {spec} is not a peer id ({PEER_IDS})")
        return value
    deadline = time.monotonic() + wait
    while True:
        peers = dev.peers()
        if peers is None:
            raise RemoteVmidError(
                f"{dev.name} cannot list peers: give --remote-vmid N; run 'ivshmem-bus vmid' on "
                f"the other machine to get N"
            )
        owner = claim_of(dev, "device")
        seen = ", ".join(map(str, sorted(peers))) or "none"
        if _live(dev, owner, peers):
            log.info(
                "%s: peers seen: %s; chose vmid %s (it claims the device queue)",
                dev.name, seen, owner,
            )  # fmt: skip
            return owner  # type: ignore[return-value]
        if len(peers) == 1:
            (peer,) = peers
            log.info(
                "%s: peers seen: %s; chose vmid %d (the only other peer)", dev.name, seen, peer
            )
            return peer
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(POLL_SECONDS, left))  # peers() reads the server's announcements
    waited = f" after {wait:g} s" if wait > 0 else ""
    if not peers:
        raise RemoteVmidError(
            f"{dev.name}: no other peer is connected{waited}: start the device first "
            f"({hint or 'ivshmem-bus serve on the same fabric'})"
        )
    raise RemoteVmidError(
        f"{dev.name}: several peers ({seen}){waited}: choose one with --remote-vmid N"
    )


class PeerChoice:
    """For a device-role end: the driver to answer, re-chosen as peers come and go.

    With ``fixed`` (``--remote-vmid N``) it is that peer, always. With ``auto``: the live peer
    that claims the driver queue (an ivshmem_bus driver); else the one other peer (a QEMU
    driver: the only thing a request proves is that a driver exists); else, with several and
    no claim, the newest (the highest id: the server counts up), since a replaced driver's
    departure may be announced after its successor's arrival, and a monitor stays only for
    an instant. A wrong pick costs only a misdirected doorbell (QEMU polls for responses) and
    is corrected at the next message. ``say`` gets one line each time the choice changes.
    """

    def __init__(
        self, dev: IvshmemDevice, fixed: int | None, say: Callable[[str], None] = log.info
    ) -> None:
        self.dev = dev
        self.fixed = fixed
        self.say = say
        self.current: int | None = fixed
        self.peers_seen = False

    def choose(self) -> int | None:
        """The driver's vmid now (None: no other peer yet). Cheap: one non-blocking read of
        the server's announcements and one 32-bit load, so it runs before every answer."""
        if self.fixed is not None:
            return self.fixed
        peers = self.dev.peers()
        if peers is None:
            return self.current
        self.peers_seen = self.peers_seen or bool(peers)
        owner = claim_of(self.dev, "driver")
        if _live(self.dev, owner, peers):
            pick, why = owner, "it claims the driver queue"
        elif len(peers) == 1:
            pick, why = next(iter(peers)), "the only other peer"
        elif peers:
            pick, why = max(peers), "several peers and no claim: the newest"
        else:
            return self.current
        if pick != self.current:
            seen = ", ".join(map(str, sorted(peers)))
            gone = (
                ""
                if self.current is None or self.current in peers
                else f"vmid {self.current} left; "
            )
            self.say(f"{gone}peers seen: {seen}; serving vmid {pick} ({why})")
            self.current = pick
        return self.current

    def check_claim(self, role: Role = "device") -> None:
        """Re-assert our claim (a QEMU peer's reset-queues zeroes it). Raises ``QueueClaimed``
        when another live peer claimed the queue meanwhile (two ends started at once)."""
        owner = claim_of(self.dev, role)
        if owner == self.dev.vmid:
            return
        peers = self.dev.peers()
        if _live(self.dev, owner, peers) and peers is not None:
            raise QueueClaimed(_claimed_message(self.dev, role, owner))  # type: ignore[arg-type]
        with _word(self.dev, role) as word:
            word[0] = CLAIM | self.dev.vmid

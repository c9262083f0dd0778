"""Which peer to talk to: ``--remote-vmid N`` or ``auto`` (the one other peer announced).

A server client can list peers; a VFIO device cannot (the guest sees only its own IVPosition),
so there the id must be given.
"""

from __future__ import annotations

import time

from ..core.regs import PEER_IDS, is_peer_id
from ..errors import RemoteVmidError
from .base import IvshmemDevice

__all__ = ["follow_single_peer", "resolve_remote_vmid"]


def resolve_remote_vmid(
    dev: IvshmemDevice, spec: str, *, wait: float = 0.0, settle: float = 0.0, poll: float = 0.05
) -> int:
    """A peer id from ``spec``: a number (``46``, ``0x2e``) or ``auto``.

    Args:
        wait: for ``auto``, how long to wait for exactly one other peer to be announced
            (``serve`` waits; ``probe`` and ``ping`` look once).
        settle: for ``auto``, how long that one peer must stay: a monitor joins only to take
            the shared memory and leaves at once, and must not be taken for the driver.

    Raises:
        RemoteVmidError: ``auto`` with no peer or several (they are listed), or on a backend
            that cannot list peers (the message says how to find the value).
        ValueError: ``spec`` is neither a number in 0..65535 nor ``auto``.
    """
    if spec != "auto":
        value = int(spec, 0)
        if not is_peer_id(value):
            raise ValueError(f"remote vmid {spec} is not a peer id ({PEER_IDS})")
        return value
    deadline = time.monotonic() + wait
    candidate, since = -1, 0.0
    while True:
        peers = dev.peers()
        if peers is None:
            raise RemoteVmidError(
                f"{dev.name} cannot list peers: give --remote-vmid N; run 'ivshmem-bus vmid' "
                f"on the other machine to get N"
            )
        now = time.monotonic()
        if len(peers) == 1:
            (peer,) = peers
            if peer != candidate:
                candidate, since = peer, now
            if now - since >= settle:
                return peer
        else:
            candidate = -1
        if now >= deadline and candidate == -1:
            if not peers:
                raise RemoteVmidError(f"{dev.name}: no other peer is connected")
            listed = ", ".join(str(p) for p in sorted(peers))
            raise RemoteVmidError(
                f"{dev.name}: several peers ({listed}): choose one with --remote-vmid N"
            )
        time.sleep(poll)  # peers() reads the server's announcements


def follow_single_peer(dev: IvshmemDevice, current: int) -> int:
    """For a device-role ``auto`` link: the peer to answer now.

    When the driver's peer left and exactly one other peer is there, that is the new driver
    (a restarted guest gets a new id from the server); otherwise keep ``current``.
    """
    peers = dev.peers()
    if peers is None or current in peers or len(peers) != 1:
        return current
    return next(iter(peers))

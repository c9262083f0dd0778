"""One device queue's state, its binding by SET_VQUEUE, and one bounded batch of its chains.

The pieces of ``base.VirtioMsgDevice`` that touch a ``DeviceQueue``: ``bind`` checks what
SET_VQUEUE carries (size a power of two up to max_size; areas inside the window and aligned,
``VirtqLayout.check``), ``run_batch`` pops and hands chains to the queue's handler under a
chain and a time budget, with kicks suppressed while it is busy.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from ..core import protocol as p
from ..core.virtqueue import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    Chain,
    DeviceQueue,
    VirtqLayout,
)
from ..core.window import MemoryWindow
from ..errors import VirtqueueError

__all__ = ["ChainHandler", "Vqueue", "bind", "release", "run_batch"]

CHUNK = 32  # chains popped at once (``DeviceQueue.pop_many``); the time budget still ends a
# batch at the next chain: the chains popped and not handled are given back (``unpop``)

ChainHandler = Callable[[Chain], int]
"""Consumes one chain; returns the bytes it wrote into the chain's writable buffers."""


@dataclasses.dataclass
class Vqueue:
    """One queue's state: what SET_VQUEUE said and, with a window, the bound queue."""

    size: int = 0
    descriptor_addr: int = 0
    driver_addr: int = 0
    device_addr: int = 0
    queue: DeviceQueue | None = None
    kicked: bool = False  # chains may be available (EVENT_AVAIL, DRIVER_OK, set_notify)
    notify: bool = True  # we last asked for EVENT_AVAIL


def release(vq: Vqueue) -> None:
    """Drop a queue's views of the window (it is being replaced or reset)."""
    if vq.queue is not None:
        vq.queue.release()
        vq.queue = None


def bind(
    msg: p.SetVqueue, window: MemoryWindow | None, max_size: int, driver_features: int
) -> Vqueue:
    """The queue SET_VQUEUE describes; without a window, its addresses only.

    Raises:
        VirtqueueError: a size that is not a power of two up to ``max_size``, or areas
            outside the window or misaligned.
    """
    size = msg.size
    if not 0 < size <= max_size or size & (size - 1):
        raise VirtqueueError(
            msg.index,
            f"queue size {size} is not a power of two between 1 and {max_size}: use a size "
            "GET_VQUEUE allows",
        )
    queue = None
    if window is not None:
        layout = VirtqLayout(size, msg.descriptor_addr, msg.driver_addr, msg.device_addr)
        layout.check(window, max_size, queue=msg.index)
        queue = DeviceQueue(
            window, msg.index, layout,
            event_idx=bool(driver_features >> VIRTIO_F_EVENT_IDX & 1),
            indirect=bool(driver_features >> VIRTIO_F_INDIRECT_DESC & 1),
        )  # fmt: skip
    return Vqueue(size, msg.descriptor_addr, msg.driver_addr, msg.device_addr, queue)


def run_batch(
    vq: Vqueue,
    q: DeviceQueue,
    handler: ChainHandler,
    ready: Callable[[], bool] | None,
    chains: int,
    seconds: float,
) -> None:
    """Up to ``chains`` chains, stopping at the next chain once ``seconds`` passed or when
    ``ready()`` turns False (``None``: always ready). An empty ring re-enables kicks (and
    looks once more, since a chain may have slipped in before the flag); then the queue
    waits for EVENT_AVAIL.

    The used elements are only written here; the caller publishes used.idx once for the
    whole batch (one store, one EVENT_USED decision).

    Raises:
        VirtqueueError: the driver wrote something hostile (the queue is broken).
    """
    if vq.notify:  # busy: the driver need not kick until we ask again
        q.set_notify(False)
        vq.notify = False
    clock = time.monotonic
    deadline = clock() + seconds
    left = chains
    while left > 0:
        if ready is not None and not ready():
            return
        # A handler with back-pressure (``ready``) is asked before each chain: one at a time.
        batch = q.pop_many(1 if ready is not None else min(left, CHUNK))
        if not batch:
            vq.notify = True
            if not q.set_notify(True):  # True: chains slipped in before the flag
                vq.kicked = False
                return
            left -= 1
            continue
        written: list[int] = []
        late = False
        try:
            for chain in batch:
                written.append(handler(chain))
                if clock() >= deadline:
                    late = True
                    break
        finally:
            q.push_many(batch, written)
            # The chains not handled go back to the ring (a handler that raised keeps its
            # own chain popped, as with one pop per chain).
            rest = len(batch) - len(written) - (0 if late or len(written) == len(batch) else 1)
            if rest:
                q.unpop(rest)
        if late:
            return
        left -= len(batch)

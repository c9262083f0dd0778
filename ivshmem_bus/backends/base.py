"""The one device interface every upper layer uses (ixy's ``struct ixy_device``).

An ivshmem device, whatever the backend (VFIO inside a guest, the fake pair, a client of an
ivshmem server), is: registers (``regs``: IVPosition is the VMID), shared memory (``shmem``,
BAR2), doorbells out (``ring``) and doorbells in (one eventfd per vector, ``wait``). The bus
knows only this class; backends fill in ``_ring`` and the fds.

Facts the interface is built on (docs/vfio.md §6, §8; docs/wire-format.md §3.7):
- eventfd counters coalesce: one readable eventfd can stand for several doorbells, so
  ``wait`` drains every counter it reports;
- a doorbell rung before the receiver enabled its vectors is lost: callers must not rely on a
  single doorbell for liveness (the bus re-checks its queue periodically).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import mmap
import os
import select
import time
from collections.abc import Callable, Sequence
from typing import Self, final

from ..core.queue import BlockCopier
from ..core.regs import Bar0, doorbell_value

__all__ = ["IvshmemDevice", "unmap"]

log = logging.getLogger(__name__)


class IvshmemDevice(abc.ABC):
    """An ivshmem function: registers, BAR2, doorbells. A context manager; ``close`` is
    idempotent and releases everything the backend owns."""

    regs: Bar0
    _epoll: select.epoll | None = None  # made by _poller, closed by close_poller

    # Methods ----------------------------------------------------------------------------------

    def ring(self, peer: int, vector: int = 0) -> None:
        """Ring ``vector`` of ``peer``: on hardware, one store of ``(peer << 16) | vector``.

        Raises:
            ValueError: peer not in 0..65535 or vector not in 0..255.
        """
        self._ring(peer, vector, doorbell_value(peer, vector))  # range-checked once, here

    @abc.abstractmethod
    def _ring(self, peer: int, vector: int, value: int) -> None:
        """Deliver a doorbell; ``value`` is the checked Doorbell word for it."""

    @abc.abstractmethod
    def vector_fds(self) -> Sequence[int]:
        """One non-blocking eventfd per vector, index = vector, for selectors/epoll/asyncio."""

    @final
    def wait(self, timeout: float | None) -> set[int]:
        """Wait until a doorbell arrives on any vector, or ``timeout`` seconds pass.

        The one wait of every backend: backends never override it, they supply the two hooks
        (``_before_wait``, ``_after_doorbells``), so ``wait``, ``async_wait`` and ``drain``
        behave alike on each of them.

        Returns:
            The vectors that fired (empty on timeout). Their counters are drained.
        """
        self._before_wait()
        fired = self.drain()
        if fired or timeout == 0:
            return fired
        fds = self.vector_fds()
        if not fds:  # ivshmem-plain: nothing can ring us; the caller polls its queue
            if timeout is None:
                raise ValueError(f"{self.name} has no doorbell vectors: wait() needs a timeout")
            time.sleep(timeout)
            return fired
        ready = self._poller().poll(-1 if timeout is None else timeout)
        fired = {fds.index(fd) for fd, _events in ready if self._read_vector(fd)}
        if fired:
            self._after_doorbells(fired)
        return fired

    def _before_wait(self) -> None:
        """Hook: run before every wait (the server client reads the server's announcements
        here, so a peer that joined meanwhile can be rung)."""
        return None

    def _after_doorbells(self, fired: set[int]) -> None:
        """Hook: run whenever doorbells were taken, by ``wait``, ``async_wait`` or ``drain``
        (VFIO INTx clears IntrStatus and unmasks here: INTx is automasked after each
        interrupt, and a path that forgot it would never be woken again)."""
        del fired

    def _read_vector(self, fd: int) -> int:
        """Hook: take what has fired on one vector fd without blocking; nonzero if it had.
        An eventfd's counter here; the linux-user bus's one "vector" is its socket (the
        doorbell bytes), so it reads that instead."""
        return _read_eventfd(fd)

    def _poller(self) -> select.epoll:
        """One epoll over the vector fds, kept for the device's life (a new selector per
        wait cost ~7 us per wake-up). Backends make it when they finish opening and close it
        with ``close_poller`` from their ``close``."""
        poller = self._epoll
        if poller is None:
            poller = select.epoll()
            for fd in self.vector_fds():
                poller.register(fd, select.EPOLLIN)
            self._epoll = poller
        return poller

    def close_poller(self) -> None:
        """Close the epoll ``wait`` keeps; every backend's ``close`` calls this."""
        poller = self._epoll
        if poller is not None:
            self._epoll = None
            poller.close()

    @final
    async def async_wait(self, timeout: float | None) -> set[int]:
        """``wait`` for asyncio: ``loop.add_reader`` on the same eventfds, never blocking."""
        self._before_wait()
        fired = self.drain()
        if fired or timeout == 0:
            return fired
        fds = list(self.vector_fds())
        if not fds:
            if timeout is None:
                raise ValueError(f"{self.name} has no doorbell vectors: wait() needs a timeout")
            await asyncio.sleep(timeout)
            return fired
        loop = asyncio.get_running_loop()
        woken = loop.create_future()

        def wake() -> None:
            if not woken.done():
                woken.set_result(None)

        for fd in fds:
            loop.add_reader(fd, wake)
        try:
            await asyncio.wait_for(woken, timeout)
        except TimeoutError:
            pass
        finally:
            for fd in fds:
                loop.remove_reader(fd)
        return self.drain()

    @property
    def fence(self) -> Callable[[], None] | None:
        """The memory barrier queues on this device's shared memory need (None on x86).

        Shared memory is coherent between the two sides; only the CPU's ordering matters,
        so every backend gives the same answer, from the compiled helper when present.
        """
        from ..native.ffi import queue_fence

        return queue_fence()

    @property
    def full_fence(self) -> Callable[[], None] | None:
        """A StoreLoad barrier for doorbell coalescing (None without the compiled helper)."""
        from ..native.ffi import full_fence

        return full_fence()

    @property
    def queue_blocks(self) -> Callable[[memoryview, int], BlockCopier] | None:
        """The ``SpscQueue(blocks=)`` factory for this device's queues: the compiled block
        copies when the helper is built, else None (the queue's pure-Python copies)."""
        from ..native.ffi import queue_blocks

        return queue_blocks()

    @final
    def drain(self) -> set[int]:
        """Read every vector's eventfd without blocking; the vectors that had fired."""
        fired = {v for v, fd in enumerate(self.vector_fds()) if self._read_vector(fd)}
        if fired:
            self._after_doorbells(fired)
        return fired

    def message_queues(self) -> tuple[memoryview, memoryview]:
        """The bus's two queue regions: (driver -> device, device -> driver).

        On ivshmem they are 4 KiB each at BAR2 offsets 0x0000 and 0x1000 (wire-format.md
        section 3; ``bus.DRIVER_QUEUE_OFFSET`` and the rest name the same numbers); a backend
        whose queues live elsewhere (the linux-user bus: two files) overrides this. The
        caller releases both views.

        Raises:
            ValueError: BAR2 is smaller than the two queues.
        """
        shm, size = self.shmem, 0x1000
        if len(shm) < 2 * size:
            raise ValueError(f"{self.name}: BAR2 is {len(shm)} bytes; the bus needs {2 * size}")
        return shm[0:size], shm[size : 2 * size]

    def peers(self) -> set[int] | None:
        """The other peers' ids when the backend knows them (server client), else None."""
        return None

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Immutable properties ---------------------------------------------------------------------

    @property
    def vmid(self) -> int:
        """This peer's id, read from IVPosition."""
        return self.regs.ivposition

    @property
    @abc.abstractmethod
    def shmem(self) -> memoryview:
        """BAR2: the shared memory, writable."""

    @property
    def vectors(self) -> int:
        """Number of doorbell vectors."""
        return len(self.vector_fds())

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """What the device is, for error messages (a BDF, a socket path, "fake pair")."""

    # String representation ----------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def unmap(mapping: mmap.mmap, owner: str) -> None:
    """Close a backend's mmap at close time. A caller may still hold a view of it (an mmap
    with exports cannot close): then the mapping goes when that view does, and we say so."""
    try:
        mapping.close()
    except BufferError:
        log.warning("%s: shared memory still in use by a view at close", owner)


def _read_eventfd(fd: int) -> int:
    """Drain one non-blocking eventfd; its counter (0 if it had not fired)."""
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0

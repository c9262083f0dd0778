"""The fake ivshmem device: the device model without hardware, for tests, demos and laptops.

It behaves as QEMU's ivshmem-doorbell does from inside a guest: BAR0 is a 256-byte register
file (IVPosition readable by anyone who maps it), BAR2 is a shared-memory file mapped
MAP_SHARED by each peer separately (as two VMs map the same host memory), and a doorbell
write becomes a write of 1 to the peer's eventfd for that vector. ``fake_pair()`` gives two
connected devices in one call, no server process: each owns its own fds (its eventfds, dups
of the peer's, its own shm and BAR0 fds), so after a fork each process closes the device it
does not use without breaking the other.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..core.regs import BAR0_SIZE, IVPOSITION, PEER_IDS, Bar0, MmapWords, is_peer_id
from ..core.server_protocol import MAX_VECTORS
from .base import IvshmemDevice, unmap

__all__ = ["FakeDevice", "fake_pair"]

DEFAULT_SHM_SIZE = 1 << 20
_ONE = (1).to_bytes(8, "little")


class FakeDevice(IvshmemDevice):
    """One fake ivshmem function. Takes ownership of every fd it is given, even on error.

    Args:
        name: for messages.
        shm_fd: the shared-memory file (BAR2); its size is the BAR2 size.
        bar0_fd: the 256-byte register file.
        own_fds: this device's eventfds, index = vector (non-blocking).
        peer_fds: peer id -> that peer's eventfds (dups this device owns), for ringing.
    """

    def __init__(
        self,
        name: str,
        shm_fd: int,
        bar0_fd: int,
        own_fds: Sequence[int],
        peer_fds: Mapping[int, Sequence[int]],
    ) -> None:
        self._name = name
        self._fds = [shm_fd, bar0_fd, *own_fds, *(fd for fds in peer_fds.values() for fd in fds)]
        self._own_fds = list(own_fds)
        self._peer_fds = {peer: list(fds) for peer, fds in peer_fds.items()}
        self._shm_map: mmap.mmap | None = None
        self._bar0_map: mmap.mmap | None = None
        try:
            self._open(shm_fd, bar0_fd)
            self._poller()  # made now, so the fds of an open device stay constant
        except BaseException:
            self.close()
            raise

    def _open(self, shm_fd: int, bar0_fd: int) -> None:
        size = os.fstat(shm_fd).st_size
        self._shm_map = mmap.mmap(shm_fd, size, mmap.MAP_SHARED)
        self._bar0_map = mmap.mmap(bar0_fd, BAR0_SIZE, mmap.MAP_SHARED)
        self._shm_view: memoryview | None = memoryview(self._shm_map)
        from ..native.ffi import mmio_words  # loaded when a device opens, as the fences are

        # BAR0 through the compiled exact-width accessor, as on a real mapped BAR
        self._words: MmapWords | None = MmapWords(memoryview(self._bar0_map), mmio_words())
        self.regs = Bar0(self._words)

    # Methods ------------------------------------------------------------------------------------

    def _ring(self, peer: int, vector: int, value: int) -> None:
        self.regs.write_doorbell(value)  # the guest's one store, kept in the register file
        fds = self._peer_fds.get(peer)
        if fds is not None and vector < len(fds):
            os.write(fds[vector], _ONE)
        # Like QEMU's device, a doorbell to an unknown peer or vector is dropped silently.

    def vector_fds(self) -> Sequence[int]:
        return self._own_fds

    def peers(self) -> set[int]:
        return set(self._peer_fds)

    def close(self) -> None:
        """Unmap BAR0 and BAR2 and close every fd this device owns. Idempotent."""
        self.close_poller()
        words, self._words = getattr(self, "_words", None), None
        if words is not None:
            words.release()
        view, self._shm_view = getattr(self, "_shm_view", None), None
        if view is not None:
            view.release()
        for attr in ("_bar0_map", "_shm_map"):
            mapping = getattr(self, attr)
            setattr(self, attr, None)
            if mapping is not None:
                unmap(mapping, self._name)
        fds, self._fds = self._fds, []
        self._own_fds, self._peer_fds = [], {}
        for fd in fds:
            os.close(fd)

    @property
    def closed(self) -> bool:
        return not self._fds

    # Immutable properties -----------------------------------------------------------------------

    @property
    def shmem(self) -> memoryview:
        if self._shm_view is None:
            raise ValueError(f"{self._name} is closed")
        return self._shm_view

    @property
    def name(self) -> str:
        return self._name


def _shared_file(directory: Path | None, filename: str, size: int) -> int:
    """A file of ``size`` zero bytes: in ``directory`` (visible to other processes) or a memfd."""
    if directory is None:
        fd = os.memfd_create(f"ivshmem-bus-{filename}", os.MFD_CLOEXEC)
    else:
        fd = os.open(
            directory / filename, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
        )
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fake_pair(
    shm_size: int = DEFAULT_SHM_SIZE,
    vectors: int = 2,
    vmids: tuple[int, int] = (1, 2),
    directory: str | os.PathLike[str] | None = None,
) -> tuple[FakeDevice, FakeDevice]:
    """Two fake ivshmem devices wired to each other, like two guests on one server.

    Args:
        shm_size: BAR2 size in bytes (the bus needs at least 8 KiB).
        vectors: doorbell vectors per device (1..64, as the server allows).
        vmids: the two devices' IVPosition values.
        directory: where to put the BAR0/BAR2 files (``bar0-<vmid>``, ``shm``) so other
            processes can map them; default: anonymous memfds.

    Returns:
        ``(a, b)``: ``a`` has ``vmids[0]``, ``b`` has ``vmids[1]``. Close both.
    """
    if not 1 <= vectors <= MAX_VECTORS:
        raise ValueError(f"vectors must be 1..{MAX_VECTORS}, not {vectors}")
    if vmids[0] == vmids[1] or not all(is_peer_id(v) for v in vmids):
        raise ValueError(f"vmids must be two different ids in {PEER_IDS}, not {vmids}")
    if shm_size < 4096 or shm_size % 4096:
        raise ValueError(f"shm_size must be a positive multiple of 4096, not {shm_size}")
    where = None if directory is None else Path(directory)
    originals: list[int] = []  # closed in every case; each device owns dups of them

    def keep(fd: int) -> int:
        originals.append(fd)
        return fd

    made: list[FakeDevice] = []
    try:
        shm = keep(_shared_file(where, "shm", shm_size))
        bar0 = {v: keep(_shared_file(where, f"bar0-{v}", BAR0_SIZE)) for v in vmids}
        events = {
            v: [keep(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)) for _ in range(vectors)]
            for v in vmids
        }
        for vmid, fd in bar0.items():
            with mmap.mmap(fd, BAR0_SIZE) as regs:  # the device model sets IVPosition
                words = MmapWords(memoryview(regs))
                words.write32(IVPOSITION, vmid)
                words.release()
        for me, peer in (vmids, vmids[::-1]):
            shm_d, bar0_d, *ev = _dup_all([shm, bar0[me], *events[me], *events[peer]])
            made.append(
                FakeDevice(
                    f"fake ivshmem vmid {me}",
                    shm_d,
                    bar0_d,
                    ev[:vectors],
                    {peer: ev[vectors:]},
                )
            )
    except BaseException:
        for dev in made:
            dev.close()
        raise
    finally:
        for fd in originals:
            os.close(fd)
    return made[0], made[1]


def _dup_all(fds: Sequence[int]) -> list[int]:
    """Duplicate every fd, or none: on failure the dups made so far are closed."""
    dups: list[int] = []
    try:
        for fd in fds:
            dups.append(os.dup(fd))
    except BaseException:
        for fd in dups:
            os.close(fd)
        raise
    return dups

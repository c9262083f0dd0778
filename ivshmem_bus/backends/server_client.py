"""A device backend that is a client of an ivshmem server, as QEMU's ivshmem-doorbell is.

So a host program can join a fabric of QEMU guests (or of other host programs) through the
same server: it gets the shared memory, one eventfd per vector for itself, and the eventfds
of every other peer to ring them.

The server protocol (docs/wire-format.md §2): every message is one little-endian int64,
optionally with one fd (SCM_RIGHTS). On connect: the version (0), our own id, -1 with the
shared-memory fd, then ``id`` + eventfd once per vector for every peer already there, then
our own id + eventfd once per vector. Later: a new peer's id + eventfd per vector; a peer's
id with no fd when it leaves.

The initial burst is read synchronously (until our own ``vectors`` eventfds arrived); later
announcements are read without blocking in ``wait`` and ``peers``, and by ``ring`` only for
a peer it does not know yet (not on every doorbell: a departed peer's eventfd copy stays
valid, and ringing it is harmless), so the peer table is current without a thread.

The server is another process on the host, trusted no more than needed: ids are range
checked, a peer gets at most 64 vectors, and every fd received that is not kept is closed.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
from collections.abc import Sequence

from ..core.regs import BAR0_SIZE, IVPOSITION, Bar0, MmapWords, is_peer_id
from ..core.server_protocol import MAX_VECTORS, PROTOCOL_VERSION
from ..errors import ServerClientError, ServerClosedError
from .base import IvshmemDevice, unmap

__all__ = ["ServerClientDevice"]

log = logging.getLogger(__name__)

_ONE = (1).to_bytes(8, "little")


class ServerClientDevice(IvshmemDevice):
    """An ivshmem device backed by an ivshmem server's UNIX socket.

    Args:
        path: the server socket (QEMU's ``-chardev socket,path=...``).
        vectors: how many vectors this peer expects (the server's ``-n``).
        timeout: seconds for connecting and for the initial burst.

    Raises:
        ServerClientError: cannot connect, the server speaks another protocol, or the
            initial burst is incomplete within ``timeout``.
    """

    def __init__(self, path: str | os.PathLike[str], vectors: int = 1, timeout: float = 5.0):
        if not 1 <= vectors <= MAX_VECTORS:
            raise ValueError(f"vectors must be 1..{MAX_VECTORS}, not {vectors}")
        self._path = os.fspath(path)
        self._want_vectors = vectors
        self._sock: socket.socket | None = None
        self._buf = bytearray()  # a message split across reads waits here
        self._id = -1
        self._shm_fd = -1
        self._shm_map: mmap.mmap | None = None
        self._shm_view: memoryview | None = None
        self._own: list[int] = []
        self._peers: dict[int, list[int]] = {}
        self.server_gone = False
        self._regs_buf = bytearray(BAR0_SIZE)  # a host program has no BAR0: IVPosition only
        from ..native.ffi import mmio_words  # loaded when a device opens, as the fences are

        self._words = MmapWords(self._regs_buf, mmio_words())
        self.regs = Bar0(self._words)
        try:
            self._open(timeout)
            self._poller()  # made now, so the fds of an open device stay constant
        except BaseException:
            self.close()
            raise

    def _open(self, timeout: float) -> None:
        sock = self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(self._path)
        except OSError as exc:
            raise ServerClientError(
                f"cannot connect to ivshmem server at {self._path}: {exc.strerror or exc}; "
                f"start one with 'ivshmem-bus server -S {self._path}'"
            ) from exc
        try:
            version, fd = self._recv()
        except TimeoutError as exc:
            raise ServerClientError(_silent(self._path, timeout)) from exc
        self._no_fd(fd)
        if version != PROTOCOL_VERSION:
            raise ServerClientError(_not_ivshmem(self._path, version))
        own_id, fd = self._recv()
        self._no_fd(fd)
        if not is_peer_id(own_id):
            raise ServerClientError(f"{self._path}: server assigned invalid id {own_id}")
        self._id = own_id
        self._words.write32(IVPOSITION, own_id)
        while self._shm_map is None or len(self._own) < self._want_vectors:
            try:
                self._handle(*self._recv())
            except TimeoutError as exc:
                raise ServerClientError(
                    f"{self._path}: got {len(self._own)} of {self._want_vectors} vectors before "
                    f"the server went quiet: does it run with -n {self._want_vectors}?"
                ) from exc
        sock.setblocking(False)

    # The server's messages --------------------------------------------------------------------

    def _recv(self) -> tuple[int, int]:
        """One int64 and its fd (or -1). Raises ServerClientError on EOF."""
        if self._sock is None:
            raise ServerClientError(f"{self._path}: the client is closed")
        try:
            return _recv_message(self._sock, self._buf, self._path)
        except ServerClosedError:
            self.server_gone = True
            raise

    def _no_fd(self, fd: int) -> None:
        if fd != -1:
            os.close(fd)
            raise ServerClientError(f"{self._path}: unexpected fd in the server's greeting")

    def _handle(self, value: int, fd: int) -> None:
        if value == -1:
            if fd == -1 or self._shm_map is not None:
                self._close_quietly(fd)
                raise ServerClientError(f"{self._path}: bad shared-memory message")
            self._shm_fd = fd
            try:
                size = os.fstat(fd).st_size
                self._shm_map = mmap.mmap(fd, size, mmap.MAP_SHARED)
            except (OSError, ValueError) as exc:  # an empty or unmappable fd from the server
                raise ServerClientError(
                    f"{self._path}: the server's shared memory cannot be mapped: {exc}"
                ) from exc
            self._shm_view = memoryview(self._shm_map)
        elif not is_peer_id(value):
            self._close_quietly(fd)
            log.warning("%s: ignored invalid peer id %d from the server", self._path, value)
        elif fd == -1:  # peer gone
            for gone in self._peers.pop(value, []):
                os.close(gone)
            log.info("%s: peer %d left", self._path, value)
        elif value == self._id:
            self._add_vector(self._own, fd, value)
            os.set_blocking(fd, False)
        else:
            self._add_vector(self._peers.setdefault(value, []), fd, value)

    def _add_vector(self, fds: list[int], fd: int, peer: int) -> None:
        if len(fds) >= MAX_VECTORS:
            os.close(fd)
            log.warning("%s: peer %d sent more than %d vectors", self._path, peer, MAX_VECTORS)
        else:
            fds.append(fd)

    @staticmethod
    def _close_quietly(fd: int) -> None:
        if fd != -1:
            os.close(fd)

    def update(self) -> None:
        """Read every announcement the server has sent since the last look (non-blocking)."""
        if self._sock is None or self.server_gone:
            return
        while True:
            try:
                self._handle(*self._recv())
            except (BlockingIOError, InterruptedError):
                return
            except ServerClientError as exc:
                if self.server_gone:  # peers' eventfds keep working without the server
                    log.warning("%s", exc)
                    return
                raise

    # Device interface -----------------------------------------------------------------------------

    def _ring(self, peer: int, vector: int, value: int) -> None:
        fds = self._peers.get(peer)
        if fds is None or vector >= len(fds):  # perhaps announced since we last looked
            self.update()
            fds = self._peers.get(peer)
        if fds is not None and vector < len(fds):
            os.write(fds[vector], _ONE)
        # as on hardware, a doorbell to an absent peer or vector is dropped

    def vector_fds(self) -> Sequence[int]:
        return self._own

    def _before_wait(self) -> None:
        self.update()

    def peers(self) -> set[int]:
        self.update()
        return set(self._peers)

    def peer_vectors(self) -> dict[int, tuple[int, ...]]:
        """Every other peer's eventfds (index = vector), in the order the server announced
        the peers, after reading pending announcements: what ``ivshmem-client``'s dump lists."""
        self.update()
        return {peer: tuple(fds) for peer, fds in self._peers.items()}

    def fileno(self) -> int:
        """The server socket, for callers that want to watch announcements."""
        return -1 if self._sock is None else self._sock.fileno()

    def close(self) -> None:
        """Close the socket, unmap BAR2, close every eventfd. Idempotent.

        The register view goes too, as on the other backends: using a closed device fails.
        """
        self.close_poller()
        self._words.release()
        if self._shm_view is not None:
            self._shm_view.release()
            self._shm_view = None
        if self._shm_map is not None:
            unmap(self._shm_map, self._path)
            self._shm_map = None
        fds = [self._shm_fd, *self._own, *(fd for v in self._peers.values() for fd in v)]
        self._shm_fd, self._own, self._peers = -1, [], {}
        for fd in fds:
            if fd != -1:
                os.close(fd)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @property
    def shmem(self) -> memoryview:
        if self._shm_view is None:
            raise ValueError(f"ivshmem server client of {self._path} is closed")
        return self._shm_view

    @property
    def name(self) -> str:
        return f"ivshmem server {self._path} (peer {self._id})"


def fetch_shared_memory(path: str | os.PathLike[str], timeout: float = 5.0) -> int:
    """Connect to a server, take the shared-memory fd from its greeting, and hang up.

    For observers (``ivshmem-bus monitor``): they need BAR2, not doorbells, and must not stay
    a peer that ``--remote-vmid auto`` would count. The peers see it come and go.

    Returns:
        The shared-memory fd (the caller closes it).
    """
    path = os.fspath(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            raise ServerClientError(
                f"cannot connect to ivshmem server at {path}: {exc.strerror or exc}; start one "
                f"with 'ivshmem-bus server -S {path}'"
            ) from exc
        pending = bytearray()
        try:
            version, fd = _recv_message(sock, pending, path)
            if fd != -1:
                os.close(fd)
            if version != PROTOCOL_VERSION:
                raise ServerClientError(_not_ivshmem(path, version))
            _value, fd = _recv_message(sock, pending, path)  # our id: no fd expected
            if fd != -1:
                os.close(fd)
            value, fd = _recv_message(sock, pending, path)
        except TimeoutError as exc:
            raise ServerClientError(_silent(path, timeout)) from exc
    if value != -1 or fd == -1:
        if fd != -1:
            os.close(fd)
        raise ServerClientError(
            f"{path}: the greeting did not carry the shared memory: is it an ivshmem server "
            f"(ivshmem-bus server, or QEMU's ivshmem-server)?"
        )
    return fd


def _silent(path: str, timeout: float) -> str:
    return (
        f"{path}: no greeting from the server within {timeout:g} s: is it an ivshmem server "
        f"(ivshmem-bus server, or QEMU's ivshmem-server), and not stuck?"
    )


def _not_ivshmem(path: str, first: int) -> str:
    return (
        f"{path} does not speak the ivshmem server protocol (its first message is "
        f"{first:#x}, not version 0): give the socket of an ivshmem server"
    )


def _recv_message(sock: socket.socket, pending: bytearray, where: str) -> tuple[int, int]:
    """One server message: a little-endian int64 and at most one fd (-1 if none).

    The stream may split a message across reads: bytes wait in ``pending``. Every fd beyond
    the first of a message is closed at once, so a server cannot make us hold fds we do not
    use. Raises ``ServerClosedError`` on EOF (closing a received fd first); a non-blocking socket
    with nothing to read raises BlockingIOError with ``pending`` kept for the next call.
    """
    fd = -1
    while len(pending) < 8:
        data, fds, _flags, _addr = socket.recv_fds(sock, 8 - len(pending), 4)
        for extra in fds[1:] if fd == -1 else fds:  # at most one fd per message
            os.close(extra)
        if fds and fd == -1:
            fd = fds[0]
        if not data:
            if fd != -1:
                os.close(fd)
            raise ServerClosedError(f"{where}: the ivshmem server closed the connection")
        pending += data
    value = int.from_bytes(pending[:8], "little", signed=True)
    del pending[:8]
    return value, fd

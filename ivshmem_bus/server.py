"""An ivshmem server: QEMU's ivshmem-doorbell protocol over a UNIX stream socket.

Theory of operation (docs/wire-format.md §2; QEMU ``contrib/ivshmem-server``). Each message
from server to client is one little-endian int64, optionally with one fd (SCM_RIGHTS). A new
client gets: version 0; its own id; -1 with the shared-memory fd; each connected peer's id
once per vector with that peer's eventfd; its own id once per vector with its own eventfds.
The others get the new id once per vector with an eventfd, and, when a peer leaves, its id
with no fd. Clients never speak: a byte (or EOF) from a client ends it.

Two layers, after h11. ``PeerTable`` is pure: it allocates ids and says who is told what,
as ``(value, fd or None)`` lists per destination; it never opens, sends or closes an fd, so
it is tested without sockets. ``IvshmemServer`` owns the socket, the shared memory and the
eventfds, and moves the table's messages onto the wire.

Sends never block the loop: each client has a queue, and every queued fd is the queue's own
``dup``, so closing a departed peer's eventfds cannot leave a queued message naming a closed
(or reused) fd number. A client whose queue outgrows twice the largest greeting is dropped.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import logging
import os
import re
import selectors
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from .core.regs import MAX_PEER
from .core.server_protocol import MAX_VECTORS, PROTOCOL_VERSION
from .errors import ServerError

__all__ = ["IvshmemServer", "Message", "PeerTable", "ServerError", "parse_size"]

log = logging.getLogger("ivshmem_bus.server")

ID_LIMIT = MAX_PEER + 1  # ids travel in Doorbell bits 31..16 (docs/wire-format.md §1.1)
_BACKLOG = 10  # QEMU's IVSHMEM_SERVER_LISTEN_BACKLOG
_POLL_SECONDS = 0.1  # how often serve_forever looks at a caller's stop_event
_INT64 = struct.Struct("<q")
_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"\s*(\d+)\s*([KMGT]?)\s*", re.IGNORECASE)
_LIVE = "another server is listening on {}: stop it or choose another socket path"

Message = tuple[int, int | None]
"""One server-to-client message: the int64 value and the fd to attach, or None."""
Outbox = dict[int, list[Message]]  # destination peer id -> its messages, in send order


def parse_size(text: str) -> int:
    """Parse a size as QEMU's server takes it (``"4M"``, ``"1g"``, ``"4096"``; K = 1024).

    Args:
        text: digits with an optional K, M, G or T suffix (any case).
    Returns:
        The size in bytes.
    Raises:
        ValueError: ``text`` is not such a size.
    """
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"shared-memory size {text!r} is not a size: write e.g. '4M' or '4096'")
    return int(match.group(1)) * _SUFFIXES[match.group(2).upper()]


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} = {value} is out of range: it must be {low}..{high}")


class PeerTable:
    """Who is connected, with which eventfds, and who must be told what. No I/O.

    Args:
        vectors: eventfds (interrupt vectors) per peer, 1..64.
        shm_fd: the shared-memory fd every new peer receives with value -1 (just a number).
        max_peers: how many peers may be connected at once, 1..65536.
        next_id: where the id counter starts (QEMU starts at 0).
    Raises:
        ValueError: an argument is out of range.
    """

    def __init__(self, vectors: int, shm_fd: int, *, max_peers: int = 64, next_id: int = 0) -> None:
        _check_range("vectors", vectors, 1, MAX_VECTORS)
        _check_range("max_peers", max_peers, 1, ID_LIMIT)
        _check_range("next_id", next_id, 0, ID_LIMIT - 1)
        self.vectors = vectors
        self.shm_fd = shm_fd
        self.max_peers = max_peers
        self._next_id = next_id
        self._peers: dict[int, tuple[int, ...]] = {}  # id -> eventfds, in connect order

    @property
    def peer_ids(self) -> tuple[int, ...]:
        """Connected ids in connect order (from a copy, so another thread may read it)."""
        return tuple(self._peers.copy())

    @property
    def full(self) -> bool:
        """True when ``add_peer`` would refuse: ``max_peers`` peers are connected."""
        return len(self._peers) >= self.max_peers

    def eventfds(self, peer_id: int) -> tuple[int, ...]:
        """The eventfds of ``peer_id``, vector 0 first. Raises KeyError for an unknown id."""
        return self._peers[peer_id]

    def add_peer(self, eventfds: Sequence[int]) -> tuple[int, Outbox]:
        """Admit a peer that owns ``eventfds`` (one per vector).

        Ids come from QEMU's allocator: a running counter that skips ids in use and wraps at
        65536, so a departed peer's id is not handed out again soon (a late doorbell to it
        then misses instead of reaching a stranger).

        Returns:
            ``(new_id, outbox)``: ``outbox[new_id]`` is the new peer's whole greeting; every
            other peer gets the new id once per vector with an eventfd.
        Raises:
            ValueError: ``len(eventfds) != vectors``.
            ServerError: the table is full (check ``full`` first).
        """
        if len(eventfds) != self.vectors:
            raise ValueError(f"add_peer got {len(eventfds)} eventfds for {self.vectors} vectors")
        if self.full:
            raise ServerError(f"peer table is full ({self.max_peers} peers): raise max_peers")
        while self._next_id in self._peers:  # ends: max_peers <= ID_LIMIT, so one id is free
            self._next_id = (self._next_id + 1) % ID_LIMIT
        new_id = self._next_id
        self._next_id = (new_id + 1) % ID_LIMIT
        fds = tuple(eventfds)
        greeting: list[Message] = [(PROTOCOL_VERSION, None), (new_id, None), (-1, self.shm_fd)]
        for peer_id, theirs in self._peers.items():
            greeting += [(peer_id, fd) for fd in theirs]
        greeting += [(new_id, fd) for fd in fds]
        outbox: Outbox = {peer_id: [(new_id, fd) for fd in fds] for peer_id in self._peers}
        outbox[new_id] = greeting
        self._peers[new_id] = fds
        return new_id, outbox

    def remove_peer(self, peer_id: int) -> tuple[tuple[int, ...], Outbox]:
        """Forget ``peer_id``.

        Returns:
            ``(eventfds, outbox)``: the eventfds the caller must now close, and "peer gone"
            (its id, no fd) for every remaining peer.
        Raises:
            KeyError: ``peer_id`` is not connected.
        """
        fds = self._peers.pop(peer_id)
        return fds, {other: [(peer_id, None)] for other in self._peers}


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    peer_id: int
    pending: deque[tuple[bytes, int]] = field(default_factory=deque)  # (bytes, own fd or -1)
    events: int = selectors.EVENT_READ


_LISTENER, _WAKEUP = "listener", "wakeup"  # selector tags; clients are tagged with _Client


class IvshmemServer:
    """A QEMU-compatible ivshmem server, listening from construction until ``close()``.

    Run it with ``serve_forever()`` in this thread, or ``start()`` in a background thread
    ended by ``stop()``. ``close()`` (also on leaving a ``with`` block) stops it and releases
    everything: clients, eventfds, the socket file and the shared memory. The loop is not
    thread-safe: call ``close()`` after ``serve_forever`` has returned.

    Args:
        socket_path: where to create the UNIX socket. A stale socket there (nobody listens)
            is replaced; a live one or a non-socket is an error. The probe is a ``connect()``,
            so a live QEMU server there sees a client come and go.
        shm_size: bytes, or a string for ``parse_size``; a power of two (QEMU maps a PCI BAR).
        shm_path: a file to share (created 0600 if missing, sized if empty); by default an
            anonymous memfd, sealed against resizing so no client can SIGBUS the others.
        vectors: eventfds per peer, 1..64.
        max_peers: connections beyond this are accepted and closed at once.
        mode: permission bits of the socket file.
    Raises:
        ValueError: an argument is out of range.
        ServerError: the socket or the shared memory could not be set up.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        shm_size: int | str = "4M",
        shm_path: str | os.PathLike[str] | None = None,
        vectors: int = 1,
        max_peers: int = 64,
        mode: int = 0o600,
    ) -> None:
        size = parse_size(shm_size) if isinstance(shm_size, str) else shm_size
        if size <= 0 or size & (size - 1):
            raise ValueError(f"shared-memory size {size} is not a power of two: use e.g. 4M")
        self._path = os.fspath(socket_path)
        if len(os.fsencode(self._path)) >= 108:
            raise ValueError(f"socket path {self._path!r} is too long for AF_UNIX (max 107 bytes)")
        self._shm_path = None if shm_path is None else os.fspath(shm_path)
        self._size = size
        self._mode = mode
        self._table = PeerTable(vectors, -1, max_peers=max_peers)  # shm_fd set in _open
        self._max_pending = 2 * (3 + max_peers * vectors)  # twice the largest greeting
        self._shm_fd = self._wake_fd = -1
        self._listener: socket.socket | None = None
        self._socket_id: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file
        self._selector: selectors.BaseSelector | None = None
        self._clients: dict[int, _Client] = {}
        self._thread: threading.Thread | None = None
        self._thread_stop = threading.Event()
        self._thread_error: BaseException | None = None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # Methods

    def serve_forever(
        self,
        stop_event: threading.Event | None = None,
        timeout: float | None = None,
        *,
        idle_exit: float | None = None,
    ) -> bool:
        """Accept clients and relay messages until ``stop_event`` is set, ``timeout`` passes,
        or (with ``idle_exit``) no peer has been connected for ``idle_exit`` seconds.

        For SIGINT/SIGTERM, pass an event the signal handler sets (looked at every 0.1 s).
        Without one, Ctrl-C raises KeyboardInterrupt; ``close()`` still releases everything.
        ``idle_exit`` is for a fake fabric's server: gone once nobody has used it for a while.

        Returns:
            True when it returned for ``idle_exit``, else False.
        Raises:
            RuntimeError: ``start()``'s thread is serving already.
            ServerError: the server is closed.
        """
        self._check_open("serve")
        if self._thread not in (None, threading.current_thread()):
            raise RuntimeError(f"ivshmem server on {self._path} is served by start()'s thread")
        deadline = None if timeout is None else time.monotonic() + timeout
        idle_since = time.monotonic()
        while stop_event is None or not stop_event.is_set():
            wait = None if stop_event is None and idle_exit is None else _POLL_SECONDS
            now = time.monotonic()
            if idle_exit is not None:
                if self._clients:
                    idle_since = now
                elif now - idle_since >= idle_exit:
                    return True
            if deadline is not None:
                left = deadline - now
                if left <= 0:
                    return False
                wait = left if wait is None else min(wait, left)
            self._poll(wait)
        return False

    def start(self) -> IvshmemServer:
        """Run ``serve_forever`` in a daemon thread until ``stop()``; returns ``self``.

        Raises:
            RuntimeError: already started.
            ServerError: the server is closed.
        """
        self._check_open("start")
        if self._thread is not None:
            raise RuntimeError(f"ivshmem server on {self._path} is already running")
        self._thread_stop.clear()
        name = f"ivshmem-server {self._path}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the background thread from ``start()``; a no-op when none runs.

        Raises:
            ServerError: the thread failed (the cause is chained) or did not end in 10 s.
        """
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._thread_stop.set()
        os.eventfd_write(self._wake_fd, 1)  # wakes select() now, not at the next poll
        thread.join(timeout=10)
        if thread.is_alive():
            raise self._error(f"ivshmem server on {self._path}: its thread did not stop in 10 s")
        error, self._thread_error = self._thread_error, None
        if error is not None:
            msg = f"ivshmem server on {self._path}: the serving thread failed: {error!r}"
            raise self._error(msg) from error

    def close(self) -> None:
        """Stop, drop every client (telling the others, as QEMU does), release every fd.

        Removes the socket file only if it is still the one this server created. Idempotent.
        """
        try:
            self.stop()
        finally:
            if self._selector is not None:
                self._drop([(peer_id, "the server is closing") for peer_id in list(self._clients)])
                selector, self._selector = self._selector, None
                selector.close()
            listener, self._listener = self._listener, None
            if listener is not None:
                listener.close()
            self._unlink_socket()
            shm_fd, wake_fd, self._shm_fd, self._wake_fd = self._shm_fd, self._wake_fd, -1, -1
            _close_fds([fd for fd in (shm_fd, wake_fd) if fd >= 0])  # trio: -1 before close

    def __enter__(self) -> IvshmemServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Immutable properties

    @property
    def socket_path(self) -> str:
        return self._path

    @property
    def shm_size(self) -> int:
        return self._size

    @property
    def vectors(self) -> int:
        return self._table.vectors

    @property
    def max_peers(self) -> int:
        return self._table.max_peers

    @property
    def peer_ids(self) -> tuple[int, ...]:
        """Connected peer ids in connect order (safe to read from another thread)."""
        return self._table.peer_ids

    @property
    def closed(self) -> bool:
        return self._selector is None

    # Setup and teardown

    def _open(self) -> None:
        self._open_shm()
        self._table.shm_fd = self._shm_fd
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._check_socket_directory()
        self._remove_stale_socket()
        listener = self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self._path)
            st = os.lstat(self._path)
            self._socket_id = (st.st_dev, st.st_ino)
            # Before listen(): until then every connect() is refused, so nobody gets in
            # while the file still has the umask's mode.
            os.chmod(self._path, self._mode)
            listener.listen(_BACKLOG)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise self._error(_LIVE.format(self._path), exc) from exc
            msg = f"socket {self._path}: cannot listen: {exc.strerror}"
            raise self._error(msg, exc) from exc
        listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, _LISTENER)
        self._selector.register(self._wake_fd, selectors.EVENT_READ, _WAKEUP)

    def _open_shm(self) -> None:
        path = self._shm_path
        try:
            if path is None:
                self._shm_fd = os.memfd_create("ivshmem", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
                os.ftruncate(self._shm_fd, self._size)
                seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
                fcntl.fcntl(self._shm_fd, fcntl.F_ADD_SEALS, seals)
                return
            self._shm_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            st = os.fstat(self._shm_fd)
            if stat.S_ISREG(st.st_mode) and st.st_size == 0:
                os.ftruncate(self._shm_fd, self._size)
        except OSError as exc:
            where = path or "memfd"
            # an existing file (or directory) failed to open read-write; a new one to be made
            exists = path is not None and os.path.exists(path)
            what = "open it read-write" if exists else "create it"
            msg = f"shared memory {where}: cannot {what}: {exc.strerror}"
            raise ServerError(msg, path=where, errno=exc.errno) from exc
        if not stat.S_ISREG(st.st_mode):
            raise ServerError(f"shared memory {path} is not a regular file", path=path)
        if st.st_size not in (0, self._size):
            size = st.st_size
            fix = (
                f"give its size, {size} (-l {size}; shm_size= from Python)"
                if size > 0 and not size & (size - 1)
                else "its size is not a power of two"
            )
            msg = f"shared memory {path} is {size} bytes, not {self._size}: {fix}, or choose "
            raise ServerError(msg + "another file", path=path)

    def _check_socket_directory(self) -> None:
        """Refuse a directory where another user could replace our socket: it must be ours
        (or root's), and not writable by others unless sticky, as /tmp is (there, only the
        owner of a file may remove or rename it)."""
        directory = os.path.dirname(os.path.abspath(self._path))
        try:
            st = os.stat(directory)
        except OSError as exc:
            raise self._error(f"socket directory {directory}: {exc.strerror}", exc) from exc
        owners = {os.geteuid(), 0}
        writable_by_others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if st.st_uid not in owners or (writable_by_others and not st.st_mode & stat.S_ISVTX):
            raise ServerError(
                f"socket directory {directory} can be changed by other users (owner uid "
                f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}): another user could replace "
                f"the socket; put it in a directory you own, e.g. $XDG_RUNTIME_DIR",
                path=self._path,
            )

    def _remove_stale_socket(self) -> None:
        """QEMU's server unlinks whatever is there; we replace only a socket nobody serves."""
        try:
            st = os.lstat(self._path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            msg = (
                f"{self._path} is a directory: name a socket in it, e.g. {self._path}/ivshmem.sock"
            )
            raise self._error(msg)
        if not stat.S_ISSOCK(st.st_mode):
            msg = f"{self._path} exists and is not a socket: refusing to replace it; remove it"
            raise self._error(msg + " or choose another socket path")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)  # a full backlog blocks connect(): somebody is there
            try:
                probe.connect(self._path)
            except ConnectionRefusedError:
                log.info("removing stale socket %s (nobody listens on it)", self._path)
                os.unlink(self._path)
                return
            except TimeoutError:
                pass
            except OSError as exc:
                msg = f"socket {self._path}: cannot tell if a server listens ({exc.strerror})"
                raise self._error(msg + "; remove it if it is stale", exc) from exc
        raise self._error(_LIVE.format(self._path))

    def _unlink_socket(self) -> None:
        socket_id, self._socket_id = self._socket_id, None
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self._path)
            if socket_id == (st.st_dev, st.st_ino):  # replaced by someone else: not ours
                os.unlink(self._path)

    def _error(self, message: str, exc: OSError | None = None) -> ServerError:
        return ServerError(message, path=self._path, errno=None if exc is None else exc.errno)

    def _check_open(self, what: str) -> None:
        if self._selector is None:
            msg = f"cannot {what}: the ivshmem server on {self._path} is closed; make a new one"
            raise self._error(msg)

    # The loop

    def _run(self) -> None:
        try:
            self.serve_forever(self._thread_stop)
        except BaseException as exc:  # handed to stop(), which raises it in the caller
            self._thread_error = exc

    def _poll(self, timeout: float | None) -> None:
        assert self._selector is not None  # internal: serve_forever checked
        for key, mask in self._selector.select(timeout):
            if key.data is _LISTENER:
                self._accept()
            elif key.data is _WAKEUP:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake_fd)
            else:
                self._on_client(key.data, mask)

    def _on_client(self, client: _Client, mask: int) -> None:
        if self._clients.get(client.peer_id) is not client:
            return  # dropped earlier in this round
        if mask & selectors.EVENT_READ:
            self._on_readable(client)
        else:
            reason = self._flush(client)
            if reason is not None:
                self._drop([(client.peer_id, reason)])

    def _accept(self) -> None:
        assert self._listener is not None and self._selector is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EMFILE and the like: the listener stays readable, so
            log.warning("accept on %s failed: %s", self._path, exc.strerror)
            time.sleep(_POLL_SECONDS)  # back off instead of spinning
            return
        if self._table.full:
            log.warning("refusing a client on %s: max_peers reached", self._path)
            sock.close()
            return
        sock.setblocking(False)
        eventfds: list[int] = []
        try:
            for _ in range(self._table.vectors):
                eventfds.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        except OSError as exc:
            log.warning("refusing a client on %s: no eventfd: %s", self._path, exc.strerror)
            _close_fds(eventfds)
            sock.close()
            return
        peer_id, outbox = self._table.add_peer(eventfds)
        client = self._clients[peer_id] = _Client(sock, peer_id)
        self._selector.register(sock, selectors.EVENT_READ, client)
        log.info("peer %d connected to %s", peer_id, self._path)
        self._drop(self._deliver(outbox))

    def _on_readable(self, client: _Client) -> None:
        try:
            data = client.sock.recv(64)  # fds sent along are discarded by the kernel
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            reason = f"its socket failed: {exc.strerror}"
        else:
            reason = "it sent data, which clients must not" if data else "it hung up"
        self._drop([(client.peer_id, reason)])

    def _deliver(self, outbox: Outbox) -> list[tuple[int, str]]:
        """Queue each message with its own dup of the fd; return the clients that failed."""
        failed: list[tuple[int, str]] = []
        for peer_id, messages in outbox.items():
            client = self._clients[peer_id]
            try:
                for value, fd in messages:
                    client.pending.append((_INT64.pack(value), -1 if fd is None else os.dup(fd)))
            except OSError as exc:
                failed.append((peer_id, f"cannot duplicate an fd for it: {exc.strerror}"))
                continue
            reason = self._flush(client)
            if reason is not None:
                failed.append((peer_id, reason))
        return failed

    def _flush(self, client: _Client) -> str | None:
        """Send what the socket takes now; return why the client must go, or None."""
        assert self._selector is not None
        while client.pending:
            data, fd = client.pending[0]
            try:
                if fd >= 0:  # MSG_NOSIGNAL: a vanished client is EPIPE, never SIGPIPE
                    fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
                    sent = client.sock.sendmsg([data], fds, socket.MSG_NOSIGNAL)
                else:
                    sent = client.sock.send(data, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                return f"sending to it failed: {exc.strerror}"
            client.pending.popleft()
            if fd >= 0:
                os.close(fd)
            if sent < len(data):  # the fd went with the first byte; the rest follows alone
                client.pending.appendleft((data[sent:], -1))
        if len(client.pending) > self._max_pending:
            return f"it is not reading its socket ({len(client.pending)} messages pending)"
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.pending else 0)
        if events != client.events:
            self._selector.modify(client.sock, events, client)
            client.events = events
        return None

    def _drop(self, work: list[tuple[int, str]]) -> None:
        """Drop peers and tell the others; telling may fail too, hence a worklist."""
        assert self._selector is not None
        while work:
            peer_id, reason = work.pop()
            client = self._clients.pop(peer_id, None)
            if client is None:
                continue  # already dropped
            self._selector.unregister(client.sock)
            client.sock.close()
            _close_fds([fd for _, fd in client.pending if fd >= 0])
            client.pending.clear()
            eventfds, outbox = self._table.remove_peer(peer_id)
            log.info("peer %d disconnected from %s: %s", peer_id, self._path, reason)
            work += self._deliver(outbox)
            _close_fds(eventfds)


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)

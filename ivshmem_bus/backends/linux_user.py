"""QEMU's linux-user virtio-msg bus as a device backend: queue files and a socket doorbell.

The ``virtio-msg-bus-linux-user`` bus (linux-user-bus.md) joins two processes on one host
with the ivshmem queue layout in two files and a UNIX stream socket (QEMU's chardev) for
doorbells. A host program with this backend is either end of it: the driver of QEMU's
``x-virtio-msg`` machine (its C virtio devices), or the device for a QEMU driver machine.

- Queues: ``queue-<name>-driver`` (driver -> device) and ``queue-<name>-device`` (device ->
  driver) in ``queue_dir``, each 262,272 bytes = 128 + 4096 x 64: head u32 @0, tail u32 @0x40,
  4096 slots from 0x80. ``message_queues`` hands them to the bus in place of BAR2's 4 KiB
  regions. The side that listens starts first (the contract's start order): it creates the
  files, or zeroes ones an earlier run left (QEMU never zeroes: stale indexes would be read
  as messages). The side that connects opens them as the listener left them and refuses
  files that cannot be fresh (wrong size, an index out of range, messages nobody consumed).
- Doorbell: one byte 0xED written to the socket after each enqueue; any bytes received mean
  "look at the queue", read 128 at a time. No eventfds and no vectors: ``vector_fds`` is the
  socket (the listening one until the peer connects), so epoll and asyncio wait on it.
- VMIDs: the bus has none. It joins exactly two ends, so ``peers()`` is always ``{0}`` (the
  single peer, present or not yet connected), ``vmid`` is 0, and ``ring(peer)`` ignores
  ``peer`` and ``vector``: every doorbell goes to the one peer.
- Memory: the driver's RAM file (``mem``) is the virtqueue window at ``mem_offset``; there
  is no BAR2, so ``shmem`` is empty. The device names the window and does not open it
  (``backends/`` sits below ``memory/``): ``memory.open_window(dev.mem,
  mem_offset=dev.mem_offset)`` is the ``FileWindow`` over it.

A peer that disconnects is not an error: a listener accepts the next one (a restarted QEMU),
a connected end keeps its files and drops doorbells (requests then time out, as on a bus
whose peer died).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import socket
import stat

from ..core.queue import HEAD_OFFSET, QUEUE_HEADER_SIZE, SLOT_SIZE, TAIL_OFFSET
from ..core.regs import BAR0_SIZE, Bar0, MmapWords
from ..errors import LinuxUserError
from .base import IvshmemDevice, unmap

__all__ = [
    "DEFAULT_BUS_NAME",
    "DEFAULT_MEM_OFFSET",
    "DOORBELL",
    "QUEUE_FILE_SIZE",
    "QUEUE_SLOTS",
    "LinuxUserDevice",
    "QueueFiles",
    "queue_file_paths",
]

log = logging.getLogger(__name__)

QUEUE_SLOTS = 4096
QUEUE_FILE_SIZE = QUEUE_HEADER_SIZE + QUEUE_SLOTS * SLOT_SIZE  # 262,272
DOORBELL = b"\xed"
READ_CHUNK = 128  # the receiver reads up to 128 doorbell bytes at a time, as QEMU does
MAX_READS = 64  # per drain: a peer flooding the socket cannot keep us reading forever
DEFAULT_BUS_NAME = "linux-user"
DEFAULT_MEM_OFFSET = 0x40000000  # the seed's: Arm virt RAM base
PEER_ID = 0  # the one peer of a two-ended bus


def queue_file_paths(queue_dir: str | os.PathLike[str], bus_name: str) -> tuple[str, str]:
    """(driver -> device, device -> driver) queue file paths of bus ``bus_name``."""
    if not bus_name or "/" in bus_name or bus_name in (".", ".."):
        raise ValueError(f"bus name {bus_name!r} is not a file-name part (QEMU's name=)")
    base = os.fspath(queue_dir)
    return (
        os.path.join(base, f"queue-{bus_name}-driver"),
        os.path.join(base, f"queue-{bus_name}-device"),
    )


class QueueFiles:
    """The two queue files, mapped MAP_SHARED.

    Args:
        queue_dir, bus_name: where the files are (QEMU's working directory and ``name=``).
        create: this side starts first: create missing files, zero existing ones.
            Otherwise the files must exist, be 262,272 bytes, and hold no message in flight.
        readonly: map PROT_READ (the monitor); never writes, never checks for staleness.

    Raises:
        LinuxUserError: a file is missing, of the wrong size, not a regular file, or stale.
    """

    def __init__(
        self,
        queue_dir: str | os.PathLike[str],
        bus_name: str = DEFAULT_BUS_NAME,
        *,
        create: bool = False,
        readonly: bool = False,
    ) -> None:
        if create and readonly:
            raise ValueError("queue files cannot be created read-only")
        self.paths = queue_file_paths(queue_dir, bus_name)
        self._maps: list[mmap.mmap] = []
        self._views: list[memoryview] = []
        try:
            for path in self.paths:
                mapping = _map_queue_file(path, create=create, readonly=readonly)
                self._maps.append(mapping)
                self._views.append(memoryview(mapping))
            if create:
                for view in self._views:
                    view[:] = bytes(QUEUE_FILE_SIZE)  # the peer has not attached yet
            elif not readonly:
                for path, view in zip(self.paths, self._views, strict=True):
                    _check_fresh(path, view)
        except BaseException:
            self.close()
            raise

    def message_queues(self) -> tuple[memoryview, memoryview]:
        """Views of the two files (driver -> device, device -> driver); release them."""
        if len(self._views) != 2:
            raise ValueError(f"queue files {self.paths[0]} and the device's are closed")
        return self._views[0][:], self._views[1][:]

    def close(self) -> None:
        """Unmap both files. Idempotent."""
        views, self._views = self._views, []
        for view in views:
            view.release()
        maps, self._maps = self._maps, []
        for mapping in maps:
            unmap(mapping, mapping_owner(self.paths))

    def __enter__(self) -> QueueFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mapping_owner(paths: tuple[str, str]) -> str:
    return f"queue files {paths[0]} and {os.path.basename(paths[1])}"


def _map_queue_file(path: str, *, create: bool, readonly: bool) -> mmap.mmap:
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | (os.O_CREAT if create else 0), 0o600)
    except FileNotFoundError:
        raise LinuxUserError(
            path,
            f"queue file {path} does not exist: start QEMU first (it creates its queue files "
            f"in its working directory), or name that directory with --queue-dir",
        ) from None
    except OSError as exc:
        raise LinuxUserError(path, f"cannot open queue file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LinuxUserError(path, f"queue file {path} is not a regular file: remove it")
        if create and st.st_size == 0:
            os.ftruncate(fd, QUEUE_FILE_SIZE)  # a new file: zeros, as QEMU's O_CREAT+ftruncate
        elif st.st_size != QUEUE_FILE_SIZE:
            raise LinuxUserError(
                path,
                f"queue file {path} is {st.st_size} bytes, not {QUEUE_FILE_SIZE} (128 + 4096 "
                f"x 64): not a linux-user queue; remove it (rm {path}) and restart both ends",
            )
        prot = mmap.PROT_READ | (0 if readonly else mmap.PROT_WRITE)
        return mmap.mmap(fd, QUEUE_FILE_SIZE, mmap.MAP_SHARED, prot)
    finally:
        os.close(fd)  # the mapping keeps its own reference


def _check_fresh(path: str, view: memoryview) -> None:
    """Refuse a file the listener cannot have just made: an index out of range, or messages
    in flight (QEMU does not zero its files; a device that just started has sent nothing and
    consumed nothing of ours)."""
    words = view[:QUEUE_HEADER_SIZE].cast("I")
    try:
        head, tail = words[HEAD_OFFSET // 4], words[TAIL_OFFSET // 4]
    finally:
        words.release()
    if head >= QUEUE_SLOTS or tail >= QUEUE_SLOTS or head != tail:
        raise LinuxUserError(
            path,
            f"stale queue file {path} (head {head}, tail {tail}) from an earlier run: stop "
            f"QEMU, remove queue-*-driver and queue-*-device there (rm), and start QEMU again",
        )


class LinuxUserDevice(IvshmemDevice):
    """One end of a linux-user bus.

    Args:
        socket_path: the chardev socket (QEMU's ``-chardev socket,path=...``).
        listen: be the socket server and create the queue files (this side starts first:
            ``serve`` for a QEMU driver machine); else connect to a listening end (QEMU's
            ``x-virtio-msg`` machine) and open its files.
        bus_name: QEMU's ``name=`` property: the queue files are ``queue-<name>-*``.
        queue_dir: where the queue files are (QEMU's working directory).
        mem: the driver's RAM file (QEMU's ``mem-path``), the virtqueue window; optional,
            kept as ``self.mem`` for ``memory.open_window``.
        mem_offset: the driver address of ``mem``'s first byte (``self.mem_offset``).
        timeout: seconds to connect.

    Raises:
        LinuxUserError: missing, stale or wrong-size queue files; no socket, nobody
            listening on it, or a socket path in use (each message names the fix).
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        listen: bool = False,
        bus_name: str = DEFAULT_BUS_NAME,
        queue_dir: str | os.PathLike[str] = ".",
        mem: str | os.PathLike[str] | None = None,
        mem_offset: int = DEFAULT_MEM_OFFSET,
        timeout: float = 5.0,
    ) -> None:
        if mem_offset < 0:
            raise ValueError(f"mem offset must be >= 0, not {mem_offset}")
        self._path = os.fspath(socket_path)
        self._bus_name = bus_name
        self.listen = listen
        self.mem = None if mem is None else os.fspath(mem)
        self.mem_offset = mem_offset
        self._files: QueueFiles | None = None
        self._server: socket.socket | None = None
        self._server_ino = -1
        self._conn: socket.socket | None = None
        self.peer_gone = False
        self._words = MmapWords(bytearray(BAR0_SIZE))  # no BAR0: IVPosition reads 0
        self.regs = Bar0(self._words)
        try:
            if listen:  # a live listener's files are not ours to zero; then the files,
                self._check_socket_path()  # zeroed before anyone can connect
                self._files = QueueFiles(queue_dir, bus_name, create=True)
                self._listen()
            else:  # socket first: no QEMU is the likelier fault than its files
                self._connect(timeout)
                self._files = QueueFiles(queue_dir, bus_name)
            self._poller()
        except BaseException:
            self.close()
            raise

    # Socket -------------------------------------------------------------------------------------

    def _check_socket_path(self) -> None:
        """Refuse a path that is not a socket or that a live end listens on; remove a stale
        socket of an earlier run."""
        path = self._path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise LinuxUserError(
                path, f"{path} exists and is not a socket: remove it or choose another path"
            )
        if _listening(path):
            raise LinuxUserError(
                path,
                f"socket {path} is in use: another end listens on it; stop it or choose "
                f"another path",
            )
        os.unlink(path)  # a stale socket of an earlier run

    def _listen(self) -> None:
        path = self._path
        server = self._server = socket.socket(
            socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
        )
        try:
            server.bind(path)
        except OSError as exc:
            raise LinuxUserError(path, f"cannot listen on {path}: {exc.strerror}") from None
        self._server_ino = os.stat(path).st_ino
        server.listen(1)
        server.setblocking(False)

    def _connect(self, timeout: float) -> None:
        path = self._path
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        conn.settimeout(timeout)
        try:
            conn.connect(path)
        except OSError as exc:
            conn.close()
            raise LinuxUserError(path, _connect_error(path, exc)) from None
        self._attach(conn)

    def _attach(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        self._conn = conn
        self.peer_gone = False
        self.close_poller()  # the vector fd changed: wait's epoll is made again

    def _accept(self) -> None:
        """Take a waiting connection (listener only, while no peer is attached; a second
        one waits in the backlog until the first leaves: a restarted QEMU)."""
        if self._server is None or self._conn is not None:
            return
        try:
            conn, _addr = self._server.accept()
        except (BlockingIOError, InterruptedError):
            return
        self._attach(conn)
        log.info("%s: peer connected", self.name)

    def _peer_left(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        self.close_poller()
        self.peer_gone = True
        log.info("%s: the peer disconnected", self.name)

    # Device interface ---------------------------------------------------------------------------

    def _ring(self, peer: int, vector: int, value: int) -> None:
        """One 0xED byte to the one peer; ``peer`` and ``vector`` mean nothing here.

        The peer's doorbells that arrived meanwhile are read first. A bus that finds its
        messages while spinning never sleeps, so never reads them in ``wait``: unlike an
        eventfd counter, unread bytes fill the socket until the peer's writes block (QEMU's
        would, or lose the doorbell). Taking them here loses no wake-up: the peer publishes
        a message before its byte, and the bus looks at its queue after every send before it
        sleeps.
        """
        self._read_vector(-1)
        conn = self._conn
        if conn is None:
            return  # nobody attached: as on ivshmem, a doorbell to an absent peer is dropped
        try:
            conn.send(DOORBELL, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            pass  # the peer has unread doorbells: it will look at the queue anyway
        except OSError:  # EPIPE, ECONNRESET: the peer went away
            self._peer_left()

    def vector_fds(self) -> list[int]:
        """The one "vector": the connected socket, or the listening one until a peer
        connects (its readiness is the peer arriving, with its first doorbell behind it)."""
        if self._conn is not None:
            return [self._conn.fileno()]
        if self._server is not None:
            return [self._server.fileno()]
        return []

    def _read_vector(self, fd: int) -> int:
        """Take a connecting peer and every doorbell byte waiting, 128 at a time: how many
        bytes (0: none; EOF drops the peer). ``fd`` is our one vector fd (or -1)."""
        self._accept()
        got = 0
        for _ in range(MAX_READS):
            conn = self._conn
            if conn is None:
                break
            try:
                data = conn.recv(READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                self._peer_left()
                break
            got += len(data)
        return got

    def message_queues(self) -> tuple[memoryview, memoryview]:
        if self._files is None:
            raise ValueError(f"{self.name} is closed")
        return self._files.message_queues()

    def peers(self) -> set[int]:
        return {PEER_ID}

    def fileno(self) -> int:
        """The socket a doorbell arrives on (-1 when none)."""
        fds = self.vector_fds()
        return fds[0] if fds else -1

    def close(self) -> None:
        """Close the sockets (removing the socket file we made) and unmap the queue files.
        Idempotent."""
        self.close_poller()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._server is not None:
            self._server.close()
            self._server = None
            try:
                if os.stat(self._path).st_ino == self._server_ino:
                    os.unlink(self._path)
            except OSError:
                pass
        if self._files is not None:
            self._files.close()
            self._files = None
        self._words.release()

    @property
    def closed(self) -> bool:
        return self._files is None

    # Immutable properties -------------------------------------------------------------------------

    @property
    def vmid(self) -> int:
        """Always 0: the linux-user bus has no VMIDs."""
        return 0

    @property
    def vectors(self) -> int:
        return 1

    @property
    def shmem(self) -> memoryview:
        """Empty: no BAR2 (the queues are files, the memory is ``mem``), so code that sizes
        BAR2 for a pool finds no room rather than failing."""
        return memoryview(bytearray())

    @property
    def name(self) -> str:
        return f"linux-user bus {self._bus_name} ({self._path})"


def _connect_error(path: str, exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return (
            f"no socket at {path}: start QEMU first (-chardev socket,path={path},server=on,"
            f"wait=off) or the listening end (ivshmem-bus serve --linux-user {path})"
        )
    if exc.errno == errno.ECONNREFUSED:
        return (
            f"nobody listens on {path} (a stale socket of an earlier run): start QEMU "
            f"(-chardev socket,path={path},server=on,wait=off) or ivshmem-bus serve there"
        )
    if isinstance(exc, TimeoutError):
        return f"connecting to {path} timed out: is the listening end (QEMU) stopped?"
    return f"cannot connect to {path}: {exc.strerror or exc}"


def _listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True

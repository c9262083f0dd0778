"""Host-side byte streams for a console device: stdin/stdout, a pty, a UNIX socket.

A ``HostIO`` moves bytes between the serving process and something outside it without ever
blocking the serve loop and without dropping a byte:

- input: a reader thread reads the host side into a bounded queue (``DEPTH`` chunks of at
  most ``CHUNK`` bytes); when the queue is full the thread stops reading, so the host's
  writer blocks (back-pressure to ``socat``, a pipe, a terminal), and the device takes bytes
  with ``read_nowait`` only when the driver has receive buffers;
- output: ``write_nowait`` hands a chunk to a writer thread's bounded queue; ``write_room``
  says whether it has room, and the console device leaves transmit chains in the ring while
  it has not (back-pressure to the driver).

Threads, not non-blocking fds: stdin may be a terminal shared with the parent shell, whose
file status flags must not change. Readers use ``select`` with a short timeout so ``close``
can stop them before their fds are closed.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import socket
import threading
import time

__all__ = ["CHUNK", "DEPTH", "FdIO", "HostIO", "MemoryIO", "PtyIO", "SocketIO"]

CHUNK = 4096
DEPTH = 16
_TICK = 0.05  # how often a blocked reader looks at the stop flag


class HostIO:
    """Bounded queues between the host side and the console device (see the module doc)."""

    name = "host"

    def __init__(self) -> None:
        self._in: queue.Queue[bytes] = queue.Queue(DEPTH)
        self._out: queue.Queue[bytes | None] = queue.Queue(DEPTH)
        self._stop = threading.Event()
        self.eof = False  # the host side ended its input
        self._threads: list[threading.Thread] = []

    def _start(self, *targets: object) -> None:
        for target in targets:
            t = threading.Thread(target=target, name=f"console-{self.name}", daemon=True)  # type: ignore[arg-type]
            t.start()
            self._threads.append(t)

    def read_nowait(self, limit: int = 65536) -> bytes:
        """Host bytes waiting, up to about ``limit`` (whole chunks); b"" when none."""
        parts: list[bytes] = []
        size = 0
        while size < limit:
            try:
                chunk = self._in.get_nowait()
            except queue.Empty:
                break
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)

    def write_room(self) -> bool:
        return not self._out.full()

    def write_nowait(self, data: bytes) -> None:
        """Queue ``data`` for the host (call only after ``write_room``)."""
        if data:
            self._out.put_nowait(data)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until the writer took every queued chunk (for tests and shutdown)."""
        self._out.join() if timeout is None else _join(self._out, timeout)

    def _readable(self, fd: int) -> bool:
        """Wait for ``fd`` to be readable; False once ``close`` was called."""
        while not self._stop.is_set():
            if select.select([fd], [], [], _TICK)[0]:
                return True
        return False

    def _put_input(self, data: bytes) -> bool:
        """Blocks while the queue is full (back-pressure); False once closing."""
        while not self._stop.is_set():
            try:
                self._in.put(data, timeout=_TICK)
                return True
            except queue.Full:
                continue
        return False

    def _next_output(self) -> bytes | None:
        while not self._stop.is_set():
            try:
                return self._out.get(timeout=_TICK)
            except queue.Empty:
                continue
        return None

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(1.0)


class MemoryIO(HostIO):
    """No host at all: ``feed`` queues input, ``take`` returns the output so far (tests, and
    a device whose other end is Python code). ``feed`` refuses what the bounded queue cannot
    hold rather than block the caller: it returns how many bytes it took."""

    name = "memory"

    def feed(self, data: bytes) -> int:
        taken = 0
        for i in range(0, len(data), CHUNK):
            try:
                self._in.put_nowait(data[i : i + CHUNK])
            except queue.Full:
                break
            taken += len(data[i : i + CHUNK])
        return taken

    def take(self) -> bytes:
        parts: list[bytes | None] = []
        while True:
            try:
                chunk = self._out.get_nowait()
            except queue.Empty:
                return b"".join(p for p in parts if p)
            parts.append(chunk)
            self._out.task_done()


def _join(q: queue.Queue, timeout: float) -> None:
    import time

    end = time.monotonic() + timeout
    while q.unfinished_tasks and time.monotonic() < end:
        time.sleep(0.005)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class FdIO(HostIO):
    """Two file descriptors (stdin and stdout by default); they are not closed here."""

    def __init__(self, in_fd: int = 0, out_fd: int = 1, name: str = "stdio") -> None:
        super().__init__()
        self.name = name
        self.in_fd, self.out_fd = in_fd, out_fd
        self._start(self._reader, self._writer)

    def _reader(self) -> None:
        while self._readable(self.in_fd):
            try:
                data = os.read(self.in_fd, CHUNK)
            except OSError:  # a pty whose other side went away: wait for it to come back
                self._stop.wait(_TICK)
                continue
            if not data:
                self.eof = True
                return
            if not self._put_input(data):
                return

    def _writer(self) -> None:
        while (data := self._next_output()) is not None:
            try:
                _write_all(self.out_fd, data)
            finally:
                self._out.task_done()


class PtyIO(FdIO):
    """A new pseudo-terminal: ``screen`` or ``socat`` attach to ``slave_name``. The slave
    stays open here too, so the master never reads EIO when a client detaches."""

    def __init__(self) -> None:
        master, slave = os.openpty()
        self._fds = (master, slave)
        self.slave_name = os.ttyname(slave)
        import tty

        tty.setraw(slave)  # bytes pass as they are: no echo, no line editing
        super().__init__(master, master, name=f"pty {self.slave_name}")

    def close(self) -> None:
        super().close()
        for fd in self._fds:
            os.close(fd)


def _peer_gone(conn: socket.socket) -> bool:
    """True when the client has hung up (its end closed), without reading its input."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLRDHUP | select.POLLHUP)
    return any(ev & (select.POLLRDHUP | select.POLLHUP) for _fd, ev in poller.poll(0))


class SocketIO(HostIO):
    """A listening UNIX socket; one client at a time (``socat - UNIX-CONNECT:PATH``).

    Output waits while no client is connected (never dropped): the first client gets it.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.name = f"socket {path}"
        self.path = path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(path)
            self._listener.listen(1)
        except OSError:
            self._listener.close()
            raise
        self._client: socket.socket | None = None
        self._have_client = threading.Event()
        self._start(self._reader, self._writer)

    def _reader(self) -> None:
        while self._readable(self._listener.fileno()):
            conn, _ = self._listener.accept()
            self._client = conn
            self._have_client.set()
            while self._readable(conn.fileno()):
                try:
                    data = conn.recv(CHUNK)
                except OSError:
                    data = b""
                if not data or not self._put_input(data):
                    break
            self._have_client.clear()
            self._client = None
            conn.close()

    def _writer(self) -> None:
        pending: bytes | None = None
        while not self._stop.is_set():
            if pending is None:
                pending = self._next_output()
                if pending is None:
                    return
            if not self._have_client.wait(_TICK):
                continue
            conn = self._client
            if conn is not None and _peer_gone(conn):  # it left and the reader has not seen it
                time.sleep(0.001)  # yet: a send now would vanish with the connection
                continue
            try:
                if conn is not None:
                    conn.sendall(pending)
                    pending = None
                    self._out.task_done()
            except OSError:  # the client left mid-write: the next one gets the chunk
                self._have_client.clear()

    def close(self) -> None:
        super().close()
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

"""The ivshmem server: the pure peer table, then the protocol over a real socket.

Invariant (the table's fuzz statement): for any sequence of connects and disconnects, every
message that carries an eventfd carries the id of the peer that owns it, a new peer hears of
exactly the peers connected before it, and a departed peer is announced once to every peer
still connected. The socket tests read the wire message by message with a raw client (recvmsg
with SCM_RIGHTS), as QEMU's ivshmem device does. Every recv has a timeout; nothing can hang.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import resource
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ivshmem_bus.errors import IvshmemBusError
from ivshmem_bus.server import (
    ID_LIMIT,
    IvshmemServer,
    PeerTable,
    ServerError,
    parse_size,
)

TIMEOUT = 2.0
SHM = 4096  # a page: the smallest size every test can mmap


# Pure part: sizes and the peer table


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("4K", 4096), ("4k", 4096), ("4M", 4 << 20), ("1G", 1 << 30), ("2t", 2 << 40)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "4X", "-4M", "4.5M", "4 M B", "0x10"])
def test_parse_size_rejects_garbage_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


def test_table_greets_the_first_peer_with_version_id_shm_and_own_fds() -> None:
    table = PeerTable(2, shm_fd=100)
    peer_id, outbox = table.add_peer([10, 11])
    assert peer_id == 0
    assert outbox == {0: [(0, None), (0, None), (-1, 100), (0, 10), (0, 11)]}


def test_table_introduces_peers_both_ways_and_announces_departures() -> None:
    table = PeerTable(2, shm_fd=100)
    table.add_peer([10, 11])
    table.add_peer([20, 21])
    peer_id, outbox = table.add_peer([30, 31])
    assert peer_id == 2
    assert outbox == {
        0: [(2, 30), (2, 31)],
        1: [(2, 30), (2, 31)],
        2: [(0, None), (2, None), (-1, 100), (0, 10), (0, 11), (1, 20), (1, 21), (2, 30), (2, 31)],
    }
    fds, outbox = table.remove_peer(1)
    assert fds == (20, 21)
    assert outbox == {0: [(1, None)], 2: [(1, None)]}
    assert table.peer_ids == (0, 2)
    assert table.eventfds(2) == (30, 31)


def test_table_ids_wrap_at_65536() -> None:
    table = PeerTable(1, shm_fd=3, next_id=ID_LIMIT - 2)
    assert [table.add_peer([i])[0] for i in range(3)] == [ID_LIMIT - 2, ID_LIMIT - 1, 0]


def test_table_ids_are_not_reused_until_the_counter_wraps_and_then_skip_ids_in_use() -> None:
    table = PeerTable(1, shm_fd=3, max_peers=2)
    assert table.add_peer([10])[0] == 0  # stays connected all along
    for expected in range(1, ID_LIMIT):  # one full turn of the counter
        peer_id, _ = table.add_peer([11])
        assert peer_id == expected
        table.remove_peer(peer_id)
    assert table.add_peer([12])[0] == 1  # 0 is in use: skipped


def test_table_refuses_when_full_and_checks_its_arguments() -> None:
    table = PeerTable(1, shm_fd=3, max_peers=1)
    table.add_peer([10])
    assert table.full
    with pytest.raises(ServerError, match="max_peers"):
        table.add_peer([11])
    with pytest.raises(ValueError, match="2 eventfds for 1 vectors"):
        PeerTable(1, shm_fd=3).add_peer([1, 2])
    for kwargs in ({"vectors": 0}, {"vectors": 65}, {"max_peers": 0}, {"next_id": ID_LIMIT}):
        args = {"vectors": 1, "shm_fd": 3} | kwargs
        with pytest.raises(ValueError, match="out of range"):
            PeerTable(**args)
    with pytest.raises(KeyError):
        table.remove_peer(5)


@given(
    ops=st.lists(st.one_of(st.just("add"), st.integers(0, 7)), max_size=40),
    vectors=st.integers(1, 3),
    start=st.one_of(st.sampled_from([0, ID_LIMIT - 2, ID_LIMIT - 1]), st.integers(0, ID_LIMIT - 1)),
)
def test_table_against_a_model(ops: list[str | int], vectors: int, start: int) -> None:
    table = PeerTable(vectors, shm_fd=999, max_peers=5, next_id=start)
    model: dict[int, tuple[int, ...]] = {}  # id -> eventfds, in connect order
    owner: dict[int, int] = {}  # eventfd -> id
    counter, fresh = start, itertools.count(1000)
    for op in ops:
        if op == "add" and len(model) == 5:
            assert table.full
            with pytest.raises(ServerError):
                table.add_peer([0] * vectors)
        elif op == "add":
            fds = tuple(next(fresh) for _ in range(vectors))
            while counter in model:
                counter = (counter + 1) % ID_LIMIT
            new_id, outbox = table.add_peer(fds)
            assert new_id == counter and new_id not in model
            counter = (counter + 1) % ID_LIMIT
            owner.update(dict.fromkeys(fds, new_id))
            greeting = [(0, None), (new_id, None), (-1, 999)]
            greeting += [(p, fd) for p, theirs in model.items() for fd in theirs]
            greeting += [(new_id, fd) for fd in fds]
            assert outbox == {p: [(new_id, fd) for fd in fds] for p in model} | {new_id: greeting}
            model[new_id] = fds
            for messages in outbox.values():  # the invariant, stated independently
                assert all(owner[fd] == v for v, fd in messages if fd not in (None, 999))
        elif model:
            victim = list(model)[int(op) % len(model)]
            fds, outbox = table.remove_peer(victim)
            assert fds == model.pop(victim)
            assert outbox == {p: [(victim, None)] for p in model}
        assert table.peer_ids == tuple(model)


# The socket: a raw client, as QEMU's ivshmem device reads the wire


class RawClient:
    """Reads the server's messages one by one; owns (and closes) every fd it receives."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(str(path))
        self.fds: list[int] = []
        self.id = -1
        self.shm_fd = -1
        self.peers: dict[int, list[int]] = {}  # other peer -> its eventfds, vector order
        self.own: list[int] = []

    def recv(self) -> tuple[int, int | None]:
        data, fds = b"", []
        while len(data) < 8:
            chunk, got, flags, _ = socket.recv_fds(self.sock, 8 - len(data), 4)
            self.fds += got
            fds += got
            assert not flags & socket.MSG_CTRUNC
            if not chunk:
                raise EOFError("server closed the connection")
            data += chunk
        assert len(fds) <= 1, "one fd per message at most"
        return struct.unpack("<q", data)[0], fds[0] if fds else None

    def greet(self, vectors: int, others: int | None) -> RawClient:
        """Read the whole greeting: version, id, shm, the other peers' fds, then our own.

        ``others`` is how many peers must be introduced; ``None`` accepts any number.
        """
        assert self.recv() == (0, None)
        self.id, fd = self.recv()
        assert fd is None and 0 <= self.id < ID_LIMIT
        value, self.shm_fd = self.recv()
        assert value == -1 and self.shm_fd is not None
        while True:
            peer, fd = self.recv()
            assert fd is not None
            if peer == self.id:
                break
            self.peers.setdefault(peer, []).append(fd)
        assert others is None or len(self.peers) == others
        assert all(len(f) == vectors for f in self.peers.values())
        self.own.append(fd)
        for _ in range(vectors - 1):
            value, fd = self.recv()
            assert value == self.id and fd is not None
            self.own.append(fd)
        return self

    def learn_peer(self, vectors: int) -> int:
        """Read a new peer's announcement (its id once per vector, each with an fd)."""
        ids, fds = zip(*(self.recv() for _ in range(vectors)), strict=True)
        assert len(set(ids)) == 1 and None not in fds
        self.peers[ids[0]] = list(fds)  # type: ignore[arg-type]
        return ids[0]

    def quiet(self, wait: float = 0.05) -> bool:
        return not readable(self.sock.fileno(), wait)

    def expect_eof(self) -> None:
        with pytest.raises(EOFError):
            while True:
                self.recv()

    def close(self) -> None:
        self.sock.close()
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)


def readable(fd: int, wait: float = TIMEOUT) -> bool:
    poller = select.poll()  # not select(): the big tests hold fds above 1024
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(wait * 1000))


def wait_until(condition: Callable[[], bool]) -> None:
    """For facts only the server's side shows; bounded like every wait here."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "ivshmem.sock"


@pytest.fixture
def make_server(path: Path) -> Iterator:
    servers: list[IvshmemServer] = []

    def make(**kwargs: object) -> IvshmemServer:
        kwargs.setdefault("shm_size", SHM)
        servers.append(IvshmemServer(path, **kwargs).start())  # type: ignore[arg-type]
        return servers[-1]

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def connect(path: Path) -> Iterator:
    clients: list[RawClient] = []

    def connect() -> RawClient:
        clients.append(RawClient(path))
        return clients[-1]

    yield connect
    for client in clients:
        client.close()


def test_first_client_greeting_and_shared_memory_size(make_server, connect) -> None:
    make_server(vectors=3, shm_size="8K")
    a = connect().greet(vectors=3, others=0)
    assert a.id == 0 and len(set(a.own)) == 3
    assert os.fstat(a.shm_fd).st_size == 8192
    assert a.quiet()


def test_shared_memory_is_shared_and_cannot_be_resized(make_server, connect) -> None:
    make_server()
    a, b = connect().greet(1, 0), connect().greet(1, 1)
    with mmap.mmap(a.shm_fd, SHM) as ma, mmap.mmap(b.shm_fd, SHM) as mb:
        ma[100:105] = b"hello"
        assert mb[100:105] == b"hello"
    with pytest.raises(PermissionError):  # sealed: one client cannot SIGBUS the others
        os.ftruncate(a.shm_fd, 0)


def test_peers_are_introduced_both_ways_per_vector(make_server, connect) -> None:
    make_server(vectors=2)
    a = connect().greet(2, 0)
    b = connect().greet(2, 1)
    assert list(b.peers) == [a.id]
    assert a.learn_peer(2) == b.id
    c = connect().greet(2, 2)
    assert list(c.peers) == [a.id, b.id]  # connect order, as QEMU's peer list
    assert a.learn_peer(2) == b.learn_peer(2) == c.id
    assert a.quiet() and b.quiet() and c.quiet()


def test_ringing_an_eventfd_wakes_exactly_that_peers_vector(make_server, connect) -> None:
    make_server(vectors=2)
    a = connect().greet(2, 0)
    b = connect().greet(2, 1)
    a.learn_peer(2)
    os.eventfd_write(a.peers[b.id][1], 1)  # a rings (b, vector 1)
    assert readable(b.own[1]) and os.eventfd_read(b.own[1]) == 1
    assert not readable(b.own[0], 0.01) and not readable(a.own[1], 0.01)
    os.eventfd_write(b.peers[a.id][0], 1)  # and back: b rings (a, vector 0)
    assert readable(a.own[0]) and os.eventfd_read(a.own[0]) == 1


def test_disconnect_announces_peer_gone_without_fd(make_server, connect) -> None:
    server = make_server(vectors=2)
    a, b = connect().greet(2, 0), connect().greet(2, 1)
    a.learn_peer(2)
    b.close()
    assert a.recv() == (b.id, None)
    assert a.quiet() and server.peer_ids == (a.id,)


def test_a_client_that_sends_anything_is_dropped(make_server, connect, caplog) -> None:
    caplog.set_level(logging.INFO, logger="ivshmem_bus.server")
    make_server()
    a, b = connect().greet(1, 0), connect().greet(1, 1)
    a.learn_peer(1)
    b.sock.sendall(b"x")
    b.expect_eof()
    assert a.recv() == (b.id, None)
    assert "peer 0 connected" in caplog.text
    assert "peer 1 disconnected" in caplog.text and "sent data" in caplog.text


def test_ids_count_on_after_a_disconnect(make_server, connect) -> None:
    make_server()
    a, b = connect().greet(1, 0), connect().greet(1, 1)
    a.learn_peer(1)
    b.close()
    assert a.recv() == (1, None)
    assert connect().greet(1, 1).id == 2  # QEMU's counter: 1 is free but not reused yet


def test_peer_limit_refuses_extra_connections(make_server, connect, caplog) -> None:
    make_server(max_peers=2)
    a, b = connect().greet(1, 0), connect().greet(1, 1)
    a.learn_peer(1)
    extra = connect()
    extra.expect_eof()  # accepted and closed: not even the version
    assert a.quiet() and b.quiet()
    assert "refusing a client" in caplog.text
    b.close()
    assert a.recv() == (b.id, None)
    assert connect().greet(1, 1).id == 2  # room again


@pytest.fixture
def many_fds() -> Iterator[None]:
    """Room for ~4,700 fds in this process (the server's 8 x 64 eventfds and every client's
    copies of them): the soft limit raised towards the hard one for the test, as a user's
    1024 is too few; root's is often higher already."""
    need = 8192
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"needs {need} open files; the hard limit is {hard} (ulimit -Hn)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_large_greeting_arrives_whole_through_backpressure(
    many_fds: None, make_server, connect
) -> None:
    # 8 peers x 64 vectors: the last greeting is 515 fd messages, more than a UNIX socket
    # buffer holds, so the server must queue and finish on EVENT_WRITE.
    make_server(vectors=64, max_peers=8)
    clients = [connect().greet(64, n) for n in range(8)]
    for n, client in enumerate(clients):
        for _ in range(n + 1, 8):
            client.learn_peer(64)
        assert sorted(client.peers) == [c.id for c in clients if c is not client]
    os.eventfd_write(clients[0].peers[clients[7].id][63], 1)
    assert readable(clients[7].own[63])


def test_a_client_that_never_reads_is_dropped(make_server, connect, path) -> None:
    server = make_server(vectors=64, max_peers=2)
    lazy = connect().greet(64, 0)  # then never reads again
    for _ in range(40):  # each round queues 65 messages for `lazy`
        churn = connect().greet(64, None)  # 1 other, or 0 once lazy is gone
        churn.close()
        wait_until(lambda gone=churn.id: gone not in server.peer_ids)  # or the next is refused
        if lazy.id not in server.peer_ids:
            break
    assert lazy.id not in server.peer_ids
    lazy.expect_eof()  # what was sent before the drop, then EOF


def test_socket_mode_is_0600_by_default_and_configurable(path, make_server) -> None:
    server = make_server()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    server.close()
    make_server(mode=0o660)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660


def test_a_stale_socket_is_replaced(path, make_server, connect) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    make_server()
    assert connect().greet(1, 0).id == 0


def test_a_live_socket_is_refused(path, make_server) -> None:
    make_server()
    with pytest.raises(ServerError, match=f"another server is listening on {path}") as info:
        IvshmemServer(path, shm_size=SHM)
    assert isinstance(info.value, IvshmemBusError) and info.value.path == str(path)
    assert path.exists()


@pytest.mark.parametrize("kind", ["file", "dir", "symlink"])
def test_a_non_socket_path_is_refused_and_left_alone(path, kind) -> None:
    if kind == "file":
        path.write_text("precious")
    elif kind == "dir":
        path.mkdir()
    else:
        path.symlink_to(path.parent / "elsewhere")
    expected = "is a directory: name a socket in it" if kind == "dir" else "is not a socket: refus"
    with pytest.raises(ServerError, match=expected):
        IvshmemServer(path, shm_size=SHM)
    assert path.is_symlink() if kind == "symlink" else path.exists()
    if kind == "file":
        assert path.read_text() == "precious"


def test_close_removes_the_socket_and_leaves_no_fds_open(path) -> None:
    before = set(os.listdir("/proc/self/fd"))
    with IvshmemServer(path, shm_size=SHM, vectors=4).start() as server:
        a = RawClient(path).greet(4, 0)
        b = RawClient(path).greet(4, 1)
        a.learn_peer(4)
        b.close()
        assert a.recv() == (b.id, None)
        RawClient(path).close()  # one that leaves at once: still a peer for a moment
        assert a.learn_peer(4) == 2
        assert a.recv() == (2, None)
        b = RawClient(path).greet(4, 1)
        assert a.learn_peer(4) == b.id == 3
    assert server.closed and not path.exists()
    b.expect_eof()
    assert a.recv() == (b.id, None)  # closing tells the others, as QEMU's server does
    a.expect_eof()
    a.close()
    b.close()
    assert set(os.listdir("/proc/self/fd")) == before


def test_a_failed_start_leaves_no_fds_open(path, tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ServerError):
        IvshmemServer(tmp_path / "file", shm_size=SHM)
    assert set(os.listdir("/proc/self/fd")) == before


def test_close_leaves_a_replaced_socket_file_alone(path) -> None:
    server = IvshmemServer(path, shm_size=SHM)
    path.unlink()
    path.write_text("someone else's")
    server.close()
    assert path.read_text() == "someone else's"


def test_close_is_idempotent_and_a_closed_server_refuses_to_serve(path) -> None:
    server = IvshmemServer(path, shm_size=SHM)
    server.close()
    server.close()
    with pytest.raises(ServerError, match="is closed; make a new one"):
        server.serve_forever(timeout=0)
    with pytest.raises(ServerError, match="is closed"):
        server.start()


def test_serve_forever_stops_on_timeout_and_on_its_event(path) -> None:
    with IvshmemServer(path, shm_size=SHM) as server:
        start = time.monotonic()
        server.serve_forever(timeout=0.05)
        assert 0.05 <= time.monotonic() - start < 1.5
        stop = threading.Event()
        threading.Timer(0.05, stop.set).start()
        server.serve_forever(stop)  # returns within a poll interval of stop.set()
        assert time.monotonic() - start < 2.5


def test_start_twice_is_an_error_and_stop_then_start_resumes(path, connect) -> None:
    with IvshmemServer(path, shm_size=SHM).start() as server:
        with pytest.raises(RuntimeError, match="already running"):
            server.start()
        with pytest.raises(RuntimeError, match="served by start"):
            server.serve_forever(timeout=0)
        server.stop()
        server.stop()  # no-op
        a = connect()  # queued in the backlog while nobody serves
        server.start()
        assert a.greet(1, 0).id == 0


def test_file_backed_shared_memory(path, tmp_path, connect) -> None:
    shm = tmp_path / "shm"
    with IvshmemServer(path, shm_size="8K", shm_path=shm).start():
        a = connect().greet(1, 0)
        with mmap.mmap(a.shm_fd, 8192) as m:
            m[:4] = b"data"
    assert shm.read_bytes()[:4] == b"data" and stat.S_IMODE(shm.stat().st_mode) == 0o600
    with IvshmemServer(path, shm_size="8K", shm_path=shm):  # same size: reused as is
        pass
    assert shm.read_bytes()[:4] == b"data"
    with pytest.raises(ServerError, match=r"is 8192 bytes, not 4096: give its size, 8192 \(-l"):
        IvshmemServer(path, shm_size=SHM, shm_path=shm)
    with pytest.raises(ServerError, match="/dev/null is not a regular file"):
        IvshmemServer(path, shm_size=SHM, shm_path="/dev/null")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shm_size": 3000}, "not a power of two"),
        ({"shm_size": "3M"}, "not a power of two"),
        ({"shm_size": 0}, "not a power of two"),
        ({"vectors": 0}, "vectors = 0 is out of range"),
        ({"vectors": 65}, "vectors = 65 is out of range"),
        ({"max_peers": 0}, "max_peers = 0 is out of range"),
    ],
)
def test_bad_arguments_are_value_errors(path, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        IvshmemServer(path, **kwargs)
    assert not path.exists()


def test_a_socket_path_too_long_for_af_unix(tmp_path) -> None:
    with pytest.raises(ValueError, match="too long for AF_UNIX"):
        IvshmemServer(tmp_path / ("x" * 120), shm_size=SHM)


def test_a_thread_failure_is_raised_by_stop(path, monkeypatch) -> None:
    server = IvshmemServer(path, shm_size=SHM)
    with contextlib.closing(server):
        monkeypatch.setattr(server, "_poll", lambda timeout: 1 / 0)
        server.start()
        server._thread.join(TIMEOUT)  # type: ignore[union-attr]
        with pytest.raises(ServerError, match="serving thread failed") as info:
            server.stop()
        assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_socket_directory_writable_by_others_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # world-writable, not sticky: anyone could swap the socket
    with pytest.raises(ServerError, match=r"can be changed by other users.*mode 777"):
        IvshmemServer(shared / "s.sock", shm_size="1M")
    assert not (shared / "s.sock").exists()
    shared.chmod(0o1777)  # sticky, like /tmp: allowed
    with IvshmemServer(shared / "s.sock", shm_size="1M"):
        assert (shared / "s.sock").exists()

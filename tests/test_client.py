"""The ivshmem-server client backend against a scripted server speaking docs/wire-format.md §2."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from ivshmem_bus.backends.server_client import ServerClientDevice
from ivshmem_bus.errors import ServerClientError


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def msg(value: int) -> bytes:
    return value.to_bytes(8, "little", signed=True)


class ScriptedServer:
    """Accepts one client and sends it (value, fd-or-None) messages, then waits."""

    def __init__(self, path, script):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.script = script
        self.conn = None
        self.later = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.conn, _ = self.listener.accept()
        for value, fd in self.script:
            if value is None:  # script says: hang up
                self.conn.close()
                return
            if fd is None:
                self.conn.sendall(msg(value))
            else:
                socket.send_fds(self.conn, [msg(value)], [fd])

    def send(self, value, fd=None):
        if fd is None:
            self.conn.sendall(msg(value))
        else:
            socket.send_fds(self.conn, [msg(value)], [fd])

    def close(self):
        self.thread.join(5)
        if self.conn:
            self.conn.close()
        self.listener.close()


@pytest.fixture
def fds():
    """Server-side resources: an shm memfd and eventfds, closed after the test."""
    made = []

    def make(kind="event"):
        if kind == "shm":
            fd = os.memfd_create("shm")
            os.ftruncate(fd, 16384)
        else:
            fd = os.eventfd(0, os.EFD_NONBLOCK)
        made.append(fd)
        return fd

    yield make
    for fd in made:
        os.close(fd)


def test_greeting_peers_own_vectors_and_ringing(tmp_path, fds):
    shm = fds("shm")
    peer3 = [fds(), fds()]
    own = [fds(), fds()]
    before = open_fds()
    server = ScriptedServer(
        tmp_path / "s",
        [(0, None), (7, None), (-1, shm), (3, peer3[0]), (3, peer3[1]), (7, own[0]), (7, own[1])],
    )
    try:
        with ServerClientDevice(tmp_path / "s", vectors=2) as dev:
            assert dev.vmid == 7
            assert dev.vectors == 2
            assert len(dev.shmem) == 16384
            assert dev.peers() == {3}
            dev.ring(3, 1)
            assert os.eventfd_read(peer3[1]) == 1  # vector 1 of peer 3
            os.eventfd_write(own[0], 1)  # peer rings us on vector 0
            assert dev.wait(1.0) == {0}
            # a new peer arrives, then peer 3 leaves
            new = [fds(), fds()]
            server.send(9, new[0])
            server.send(9, new[1])
            server.send(3)
            threading.Event().wait(0.05)
            assert dev.peers() == {9}
            dev.ring(3, 0)  # gone: dropped like hardware, no error
        with pytest.raises(ValueError):
            _ = dev.vmid  # closed: the register view is gone, as on the other backends
        # what remains is the test's side: listener, accepted connection, the two new eventfds
        assert open_fds() == before + 4
    finally:
        server.close()


def test_wrong_version_is_refused_and_nothing_leaks(tmp_path):
    before = open_fds()
    server = ScriptedServer(tmp_path / "s", [(1, None)])
    try:
        with pytest.raises(ServerClientError, match="its first message is 0x1, not version 0"):
            ServerClientDevice(tmp_path / "s")
    finally:
        server.close()
    assert open_fds() == before


def test_server_closing_during_the_burst_is_an_error(tmp_path, fds):
    shm = fds("shm")
    server = ScriptedServer(tmp_path / "s", [(0, None), (1, None), (-1, shm), (None, None)])
    before = open_fds()
    try:
        with pytest.raises(ServerClientError, match="closed the connection"):
            ServerClientDevice(tmp_path / "s", vectors=1)
    finally:
        server.thread.join(5)
        server.listener.close()
    assert open_fds() == before - 1  # the listener is closed and the client left nothing


def test_incomplete_burst_times_out_with_a_hint(tmp_path, fds):
    shm = fds("shm")
    own = fds()
    server = ScriptedServer(tmp_path / "s", [(0, None), (1, None), (-1, shm), (1, own)])
    try:
        with pytest.raises(ServerClientError, match=r"got 1 of 2 vectors.*-n 2"):
            ServerClientDevice(tmp_path / "s", vectors=2, timeout=0.2)
    finally:
        server.close()


def test_no_server_names_the_fix(tmp_path):
    with pytest.raises(ServerClientError, match="ivshmem-bus server -S"):
        ServerClientDevice(tmp_path / "missing")


def test_invalid_peer_ids_are_ignored_and_their_fds_closed(tmp_path, fds):
    shm = fds("shm")
    own = fds()
    bogus = fds()
    server = ScriptedServer(
        tmp_path / "s", [(0, None), (1, None), (-1, shm), (70000, bogus), (1, own)]
    )
    try:
        before = open_fds()
        with ServerClientDevice(tmp_path / "s", vectors=1) as dev:
            assert dev.peers() == set()
        # the client closed its copy of the bogus fd along with everything else;
        # the one extra is the server's accepted connection
        assert open_fds() == before + 1
    finally:
        server.close()


def test_fetch_shared_memory_survives_a_greeting_split_across_reads(tmp_path, fds):
    from ivshmem_bus.backends.server_client import fetch_shared_memory

    shm = fds("shm")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "s"))
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        stream = msg(0) + msg(7)
        for start, end in ((0, 3), (3, 8), (8, 13), (13, 16)):  # every message split
            conn.sendall(stream[start:end])
            threading.Event().wait(0.01)
        socket.send_fds(conn, [msg(-1)[:2]], [shm])  # the fd rides on the first fragment
        conn.sendall(msg(-1)[2:])
        threading.Event().wait(0.2)
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        got = fetch_shared_memory(tmp_path / "s")
        assert os.fstat(got).st_size == 16384
        os.close(got)
    finally:
        t.join(5)
        listener.close()


def test_ringing_a_known_peer_reads_nothing_from_the_server(tmp_path, fds):
    shm, peer3, own = fds("shm"), fds(), fds()
    server = ScriptedServer(tmp_path / "s", [(0, None), (7, None), (-1, shm), (3, peer3), (7, own)])
    try:
        with ServerClientDevice(tmp_path / "s", vectors=1) as dev:
            looks = []
            real = dev.update
            dev.update = lambda: looks.append(1) or real()
            dev.ring(3, 0)
            assert looks == []  # no syscall on the server socket per doorbell
            dev.ring(9, 0)  # unknown: look for an announcement once
            assert looks == [1]
            assert os.eventfd_read(peer3) == 1
    finally:
        server.close()

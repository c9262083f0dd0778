"""The console's host side: bytes in and out of a UNIX socket and a pty, none dropped."""

from __future__ import annotations

import os
import socket
import time

from ivshmem_bus.devices.hostio import CHUNK, DEPTH, FdIO, MemoryIO, PtyIO, SocketIO


def _read_until(io, n: int, timeout: float = 5.0) -> bytes:
    out = bytearray()
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += io.read_nowait()
        time.sleep(0.005)
    return bytes(out)


def test_socket_output_waits_for_a_client_then_both_ways(tmp_path):
    path = str(tmp_path / "console.sock")
    io = SocketIO(path)
    try:
        io.write_nowait(b"before anyone came")  # kept, not dropped
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        client.settimeout(5)
        got = b""
        while len(got) < 18:
            got += client.recv(100)
        assert got == b"before anyone came"
        client.sendall(b"typed")
        assert _read_until(io, 5) == b"typed"
        client.close()
        io.write_nowait(b"for the next one")
        second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        second.connect(path)
        second.settimeout(5)
        got = b""
        while len(got) < 16:
            got += second.recv(100)
        assert got == b"for the next one"
        second.close()
    finally:
        io.close()
    assert not os.path.exists(path)


def test_pty_both_ways():
    io = PtyIO()
    try:
        fd = os.open(io.slave_name, os.O_RDWR | os.O_NOCTTY)
        try:
            os.write(fd, b"keys")
            assert _read_until(io, 4) == b"keys"
            io.write_nowait(b"screen")
            io.flush()
            assert os.read(fd, 100) == b"screen"
        finally:
            os.close(fd)
    finally:
        io.close()


def test_a_full_input_queue_stops_reading_the_host_side():
    r, w = os.pipe()
    io = FdIO(r, os.open(os.devnull, os.O_WRONLY))
    try:
        os.set_blocking(w, False)
        written = 0
        refused = 0
        while refused < 5:  # until the pipe stays full: the reader stopped taking
            try:
                written += os.write(w, b"x" * 4096)
                refused = 0
            except BlockingIOError:
                refused += 1
                time.sleep(0.05)
        held = len(io.read_nowait(1 << 30))
        assert held <= CHUNK * DEPTH < written  # the rest waits in the pipe, not lost
        rest = _read_until(io, written - held)
        assert held + len(rest) == written
    finally:
        io.close()
        os.close(io.out_fd)
        os.close(r)
        os.close(w)


def test_memory_io_takes_only_what_fits():
    io = MemoryIO()
    assert io.feed(b"a" * (CHUNK * DEPTH + 10)) == CHUNK * DEPTH
    assert io.read_nowait(1 << 30) == b"a" * (CHUNK * DEPTH)
    io.write_nowait(b"out")
    assert io.take() == b"out"

"""``rng``, ``console`` and ``serve --device-type`` through the real entry point, on a fake fabric.

Each command is its own ``python -m ivshmem_bus`` process, as in two shells; the checks are
the bytes on stdout and the exit codes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ivshmem_bus.core import protocol as p

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ivshmem_bus", *args]


class Serve:
    """``serve`` in the background on the fabric in ``fabric``; stdout and stderr to files."""

    def __init__(self, tmp_path: Path, fabric: Path, *args: str, stdin=subprocess.DEVNULL):
        self.out = tmp_path / "serve.out"
        self.err = tmp_path / "serve.err"
        self._files = [self.out.open("wb"), self.err.open("wb")]
        self.proc = subprocess.Popen(
            cli("serve", "--fake", str(fabric), *args),
            stdin=stdin, stdout=self._files[0], stderr=self._files[1], cwd=ROOT,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while b"waiting for the driver" not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"serve did not start:\n{self.log().decode()}")
            time.sleep(0.02)

    def log(self) -> bytes:
        return self.out.read_bytes() + self.err.read_bytes()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        for f in self._files:
            f.close()
        return rc


@pytest.fixture
def fabric(tmp_path):
    """A fake fabric's directory; its server (started by the first command) is stopped after."""
    path = tmp_path / "fabric"
    yield path
    pid_file = path / "server.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)


def run(*args: str, stdin: bytes = b"", timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), input=stdin, capture_output=True, timeout=timeout, cwd=ROOT)


def test_rng_writes_exactly_n_bytes_of_the_sources_stream(tmp_path, fabric):
    data = os.urandom(300_000)
    (tmp_path / "src").write_bytes(data)
    serve = Serve(tmp_path, fabric, "--device-type", "rng", "--source", str(tmp_path / "src"))
    try:
        got = run("rng", "--fake", str(fabric), "-n", "200K")
        assert got.returncode == 0, got.stderr
        assert got.stdout == data[:204800]
        # the device keeps its place in the file: the next driver gets the rest, then an error
        rest = run("rng", "--fake", str(fabric), "-n", "95200")
        assert rest.returncode == 0, rest.stderr
        assert rest.stdout == data[204800:]
        empty = run("rng", "--fake", str(fabric), "-n", "1")
        assert empty.returncode == 1
        assert b"entropy source is exhausted" in empty.stderr
    finally:
        assert serve.stop() == 0


def test_rng_from_urandom_over_a_file_window(tmp_path, fabric):
    # The fabric's BAR2 is the server's file: a FileWindow over it at mem-offset 0 reads the
    # driver's pool addresses (BAR2 offsets) as the pool window does.
    shm = tmp_path / "bar2"
    shm.write_bytes(bytes(4 << 20))
    sock = fabric / "ivshmem.sock"
    fabric.mkdir()
    server = subprocess.Popen(
        cli("server", "-S", str(sock), "-l", "4M", "-n", "2", "-m", str(shm)), cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        serve = Serve(tmp_path, fabric, "--mem", str(shm), "--mem-offset", "0")
        try:
            got = run("rng", "--fake", str(fabric), "-n", "1M")
            assert got.returncode == 0, got.stderr
            assert len(got.stdout) == 1 << 20 and len(set(got.stdout)) == 256
            # a reader that stops early (| head -c 10): exit 141 as cat does, no traceback
            reader = subprocess.Popen(
                cli("rng", "--fake", str(fabric), "-n", "64M"), cwd=ROOT,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            assert len(reader.stdout.read(10)) == 10
            reader.stdout.close()
            assert reader.wait(30) == 141
            assert reader.stderr.read() == b""
            reader.stderr.close()
        finally:
            assert serve.stop() == 0
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(10)


def test_bad_byte_counts_are_usage_errors(fabric):
    got = run("rng", "--fake", str(fabric), "-n", "12Q")
    assert got.returncode == 2
    assert b"is not a byte count" in got.stderr


def test_serve_options_of_the_other_device_type_are_usage_errors(tmp_path, fabric):
    got = run("serve", "--fake", str(fabric), "--device-type", "console", "--source", "x")
    assert got.returncode == 2
    assert b"--source is for --device-type rng" in got.stderr
    got = run("serve", "--fake", str(fabric), "--console-pty")
    assert got.returncode == 2
    assert b"are for --device-type console" in got.stderr
    got = run("serve", "--fake", str(fabric), "--mem", "pool", "--mem-offset", "0x1000")
    assert got.returncode == 2
    assert b"--mem pool takes no --mem-offset" in got.stderr


def test_rng_with_nobody_serving_fails_with_a_message(tmp_path, fabric):
    got = run("rng", "--fake", str(fabric), "--remote-vmid", "7", "--timeout", "0.3")
    assert got.returncode == 1
    assert b"no response" in got.stderr


@pytest.mark.parametrize(("command", "serve"), [("rng", ""), ("console", " --device-type console")])
def test_auto_with_nobody_serving_fails_naming_serve_after_the_timeout(fabric, command, serve):
    t0 = time.monotonic()
    got = run(command, "--fake", str(fabric), "--timeout", "0.5", stdin=b"")
    took = time.monotonic() - t0
    assert got.returncode == 1 and got.stdout == b""
    assert got.stderr.decode().splitlines() == [
        f"ivshmem-bus: error: ivshmem server {fabric}/ivshmem.sock (peer 0): no other peer is "
        f"connected after 0.5 s: start the device first (ivshmem-bus serve --fake {fabric}"
        f"{serve})"
    ]
    assert took >= 0.5


def test_rng_started_before_serve_waits_for_it_within_the_timeout(tmp_path, fabric):
    data = os.urandom(10_000)
    (tmp_path / "src").write_bytes(data)
    fake = run("rng", "--fake", str(fabric), "--remote-vmid", "7", "--timeout", "0.1")
    assert fake.returncode == 1  # it started the fabric's server: serve below cannot race rng to it
    rng = subprocess.Popen(
        cli("rng", "--fake", str(fabric), "-n", "10000", "--timeout", "20"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:
        time.sleep(0.5)  # the test's own pause: rng is waiting with no peer yet
        assert rng.poll() is None
        serve = Serve(  # the driver started first: serve must not zero its request (--help)
            tmp_path, fabric, "--device-type", "rng", "--source", str(tmp_path / "src"),
            "--no-reset-queues",
        )  # fmt: skip
        try:
            out, err = rng.communicate(timeout=30)
        finally:
            assert serve.stop() == 0
    finally:
        if rng.poll() is None:
            rng.kill()
            rng.wait()
    assert rng.returncode == 0, err
    assert out == data


def test_console_bytes_both_ways_through_the_commands(tmp_path, fabric):
    host_r, host_w = os.pipe()
    serve = Serve(tmp_path, fabric, "--device-type", "console", stdin=host_r)
    os.close(host_r)
    try:
        os.write(host_w, b"from the host side\n")
        got = run("console", "--fake", str(fabric), "--linger", "1", stdin=b"from the driver\n")
        assert got.returncode == 0, got.stderr
        assert got.stdout == b"from the host side\n"
        deadline = time.monotonic() + 10
        while serve.out.read_bytes() != b"from the driver\n" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert serve.out.read_bytes() == b"from the driver\n"  # the console's bytes only
        assert b"serving virtio console (id 3)" in serve.err.read_bytes()
    finally:
        os.close(host_w)
        assert serve.stop() == 0
    # the last lines (the stop and the bus's counters) are the command's own: stderr, too
    assert serve.out.read_bytes() == b"from the driver\n"
    assert b"stopped after " in serve.err.read_bytes()


def test_console_over_a_unix_socket(tmp_path, fabric):
    import socket

    path = tmp_path / "console.sock"
    serve = Serve(tmp_path, fabric, "--device-type", "console", "--console-socket", str(path))
    try:
        assert f"console on UNIX socket {path}".encode() in serve.out.read_bytes()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))
        client.settimeout(10)
        client.sendall(b"typed at the socket\n")
        got = run("console", "--fake", str(fabric), "--linger", "1", stdin=b"to the socket\n")
        assert got.returncode == 0, got.stderr
        assert got.stdout == b"typed at the socket\n"
        seen = b""
        while len(seen) < 14:
            seen += client.recv(100)
        assert seen == b"to the socket\n"
        client.close()
    finally:
        assert serve.stop() == 0


def test_a_terminal_console_follows_the_terminal_size(tmp_path, fabric):
    import fcntl
    import pty
    import struct
    import termios

    from ivshmem_bus.backends import open_backend
    from ivshmem_bus.backends.fabric import fake_socket
    from ivshmem_bus.bus import VirtioMsgBus
    from ivshmem_bus.drivers import ConsoleDriver, VirtioMsgDriver
    from ivshmem_bus.memory import open_window
    from ivshmem_bus.ownership import resolve_driver_remote

    master, slave = pty.openpty()
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    try:
        fake_socket(str(fabric))  # the fabric's server, before either side joins
        serve = subprocess.Popen(
            # the driver below may join first: serve must not zero its request (--help)
            cli("serve", "--fake", str(fabric), "--device-type", "console", "--no-reset-queues"),
            stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.DEVNULL, cwd=ROOT,
        )  # fmt: skip
        try:
            with open_backend(fake=str(fabric)) as dev:
                remote = resolve_driver_remote(dev, "auto", wait=10)
                with (
                    VirtioMsgBus(dev, "driver", remote) as bus,
                    open_window("pool", device=dev, role="driver") as window,
                ):
                    driver = VirtioMsgDriver(bus, timeout=5)
                    console = ConsoleDriver(driver, window)
                    assert console.size() == (100, 30)
                    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 43, 132, 0, 0))
                    serve.send_signal(signal.SIGWINCH)
                    event = driver.wait_event(5)
                    while event is not None and not isinstance(event, p.EventConfig):
                        event = driver.wait_event(5)
                    assert event is not None and driver.config_generation == 1
                    assert console.size() == (132, 43)
                    console.close()
        finally:
            serve.send_signal(signal.SIGINT)
            assert serve.wait(10) == 0
    finally:
        os.close(master)
        os.close(slave)


def test_console_on_a_terminal_is_raw_and_ctrl_close_bracket_detaches(tmp_path, fabric):
    import pty
    import termios

    host_r, host_w = os.pipe()
    serve = Serve(tmp_path, fabric, "--device-type", "console", stdin=host_r)
    os.close(host_r)
    master, slave = pty.openpty()
    try:
        console = subprocess.Popen(
            cli("console", "--fake", str(fabric)), stdin=slave, stdout=slave,
            stderr=subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        assert console.stderr.readline().startswith(b"attached; Ctrl-] detaches")
        assert not termios.tcgetattr(slave)[3] & termios.ECHO  # raw: no local echo
        os.write(master, b"keys\x1dnot sent")
        assert console.wait(20) == 0
        while serve.out.read_bytes() != b"keys" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert serve.out.read_bytes() == b"keys"
        assert termios.tcgetattr(slave)[3] & termios.ECHO  # the terminal is given back
        console.stderr.close()
    finally:
        os.close(master)
        os.close(slave)
        os.close(host_w)
        assert serve.stop() == 0

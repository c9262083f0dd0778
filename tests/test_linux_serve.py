"""``ivshmem-bus serve --profile linux-v0 --device-type rng,console`` against the Linux-like
driver side, over an ivshmem server, as guest A serving guest B.

The serve process joins the server first, so it is VMID 0 (the Linux driver hard-codes it);
the peer joins second. Guest B's RAM is a file: serve reads it through ``--mem FILE`` (a
``FileWindow`` at mem-offset 0), and the peer maps the same file as a ``BufferWindow`` at
base 0, so the driver's guest-physical addresses are file offsets as on x86 q35.
"""

from __future__ import annotations

import mmap
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ivshmem_bus.backends.server_client import ServerClientDevice
from ivshmem_bus.core import protocol as p
from ivshmem_bus.core.window import BufferWindow
from ivshmem_bus.server import IvshmemServer

from .linux_peer import LinuxLikePeer

ROOT = Path(__file__).resolve().parent.parent
RAM = 4 << 20


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ivshmem_bus", *args]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[IvshmemServer]:
    with IvshmemServer(tmp_path / "ivshmem.sock", shm_size="1M", vectors=2) as srv:
        srv.start()
        yield srv


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_serve_rng_and_console_to_the_linux_like_driver(tmp_path, server):
    ram = tmp_path / "guest-b-ram"
    ram.write_bytes(bytes(RAM))
    source = os.urandom(4096)
    (tmp_path / "source").write_bytes(source)
    console_sock = tmp_path / "console.sock"
    out = (tmp_path / "serve.out").open("w+b")
    serve = subprocess.Popen(
        cli("serve", "--server", server.socket_path, "--vectors", "2", "--profile", "linux-v0",
            "--device-type", "rng,console", "--source", str(tmp_path / "source"),
            "--mem", str(ram), "--console-socket", str(console_sock)),
        stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    peer = dev = mm = conn = None
    try:
        wait_until(lambda: server.peer_ids == (0,), 20, "serve to join as vmid 0")
        dev = ServerClientDevice(server.socket_path, vectors=2)
        assert dev.vmid == 1
        with ram.open("r+b") as f:
            mm = mmap.mmap(f.fileno(), RAM)
        peer = LinuxLikePeer(dev, BufferWindow(mm, 0, name="guest B's RAM")).start()
        # GET_DEVICES goes out at once, before serve looks (it waits for the driver's peer to
        # settle): it stays queued and is answered when serve starts
        devices = peer.probe_all()
        assert [(d.dev_id, d.device_id) for d in devices] == [(0, 4), (1, 3)]
        assert peer.read_entropy(0, 1024) == source[:1024]
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(str(console_sock))
        peer.console_open(1)
        peer.console_write(1, b"x\n")
        assert conn.recv(16) == b"x\n"
        conn.sendall(b"hello from A")
        assert peer.console_read(1, 12) == b"hello from A"
        # a message for a dev_id nobody serves: dropped; the bus goes on
        peer.send(p.GetDeviceStatus(dev_num=5))
        assert peer.request(p.GetDeviceStatus(dev_num=1)).status == 0x0F
        wait_until(lambda: peer.ping_responses >= 1, 3, "a PING response")
        assert not peer.stale
        serve.send_signal(signal.SIGINT)
        assert serve.wait(10) == 0
        wait_until(lambda: peer.removed == [0, 1], 2, "EVENT_DEVICE removed")
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        if peer is not None:
            peer.close()
            peer.release_ram()
        for closer in (conn, mm, dev):
            if closer is not None:
                closer.close()
        out.seek(0)
        log = out.read().decode()
        out.close()
    assert "serving virtio rng (id 4) at dev_id 0, console (id 3) at dev_id 1 (linux-v0)" in log
    assert "dev_id 1 driver status ACKNOWLEDGE|DRIVER|FEATURES_OK -> " in log
    assert "unknown_dev=1" in log


def test_linux_profile_refuses_a_vmid_other_than_0(tmp_path, server):
    first = ServerClientDevice(server.socket_path, vectors=2)  # the driver's guest came first
    try:
        got = subprocess.run(
            cli("serve", "--server", server.socket_path, "--vectors", "2", "--profile",
                "linux-v0"),
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
    finally:
        first.close()
    assert got.returncode == 1
    lines = got.stderr.strip().splitlines()
    assert len(lines) == 1, got.stderr
    assert "vmid 1, but the Linux virtio-msg driver talks only to vmid 0" in lines[0]
    assert "start the device side first" in lines[0]


def test_several_device_types_need_the_linux_profile_and_distinct_types(server):
    base = cli("serve", "--server", server.socket_path, "--vectors", "2")
    got = subprocess.run([*base, "--device-type", "rng,console"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert got.returncode == 2 and "use --profile linux-v0 (or spec-v1) for several" in got.stderr
    got = subprocess.run([*base, "--device-type", "rng,rng", "--profile", "linux-v0"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert got.returncode == 2 and "names a device type twice" in got.stderr

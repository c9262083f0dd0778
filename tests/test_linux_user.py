"""The linux-user backend: queue files, the 0xED socket doorbell, and every way opening fails.

Against ``linux_user_peer.py`` (a QEMU-like end written from linux-user-bus.md, importing
nothing of ivshmem_bus) through the real ``ivshmem-bus`` entry point and as a library; the
errors are checked for their one line and the fix they name; every fd is closed.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ivshmem_bus.backends import open_backend
from ivshmem_bus.backends.linux_user import (
    QUEUE_FILE_SIZE,
    LinuxUserDevice,
    QueueFiles,
    queue_file_paths,
)
from ivshmem_bus.bus import VirtioMsgBus
from ivshmem_bus.core import protocol
from ivshmem_bus.core.queue import SpscQueue
from ivshmem_bus.devices import RngDevice
from ivshmem_bus.drivers import VirtioMsgDriver
from ivshmem_bus.errors import LinuxUserError

ROOT = Path(__file__).resolve().parent.parent
PEER = Path(__file__).with_name("linux_user_peer.py")


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ivshmem_bus", *args],
        capture_output=True, text=True, timeout=30, cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


class Peer:
    """The QEMU-like peer in its own process."""

    def __init__(self, tmp_path: Path, role: str, *args: str) -> None:
        self.log = tmp_path / f"peer-{role}.log"
        self._file = self.log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER), role, "--socket", "vmsg.sock", *args],
            stdout=self._file, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        )  # fmt: skip

    def wait_for(self, text: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not seen:\n{self.log.read_text()}")
            time.sleep(0.01)

    def finish(self, timeout: float = 20) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            rc = self.proc.wait(5)
        self._file.close()
        return rc, self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.finish()


@pytest.fixture
def qemu_device(tmp_path: Path) -> Iterator[Peer]:
    """A QEMU-like device end listening on tmp_path/vmsg.sock (it made the queue files)."""
    peer = Peer(tmp_path, "device")
    peer.wait_for("listening on")
    yield peer
    peer.stop()


def write_index(path: str, head: int, tail: int) -> None:
    with open(path, "r+b") as f:
        f.write(struct.pack("<I", head))
        f.seek(0x40)
        f.write(struct.pack("<I", tail))


# Queue files ----------------------------------------------------------------------------------


def test_the_listener_creates_both_files_zeroed_at_the_contract_size(tmp_path: Path) -> None:
    drv, dev = queue_file_paths(tmp_path, "linux-user")
    assert (os.path.basename(drv), os.path.basename(dev)) == (
        "queue-linux-user-driver",
        "queue-linux-user-device",
    )
    with QueueFiles(tmp_path, create=True) as files:
        a, b = files.message_queues()
        queues = SpscQueue(a), SpscQueue(b)
        assert [q.capacity for q in queues] == [4096, 4096]
        for q in queues:
            q.release()
        a.release()
        b.release()
    for path in (drv, dev):
        assert os.path.getsize(path) == 262_272 == QUEUE_FILE_SIZE == 128 + 4096 * 64
        assert Path(path).read_bytes() == bytes(262_272)


def test_the_listener_resets_stale_indexes_and_slots(tmp_path: Path) -> None:
    drv, dev = queue_file_paths(tmp_path, "vm")
    for path in (drv, dev):
        Path(path).write_bytes(b"\xab" * QUEUE_FILE_SIZE)  # an earlier run's leftovers
    QueueFiles(tmp_path, "vm", create=True).close()
    assert Path(drv).read_bytes() == Path(dev).read_bytes() == bytes(QUEUE_FILE_SIZE)


def test_the_connecting_end_opens_files_as_qemu_left_them(tmp_path: Path) -> None:
    drv, dev = queue_file_paths(tmp_path, "linux-user")
    QueueFiles(tmp_path, create=True).close()
    write_index(drv, 7, 7)  # consumed up to 7: a clean file with history
    write_index(dev, 4095, 4095)
    with QueueFiles(tmp_path) as files:
        a, b = files.message_queues()
        assert struct.unpack_from("<I", a, 0)[0] == 7
        assert struct.unpack_from("<I", b, 0x40)[0] == 4095
        a.release()
        b.release()
    assert struct.unpack_from("<I", Path(drv).read_bytes(), 0)[0] == 7  # not zeroed


@pytest.mark.parametrize("size", [0, 4096, QUEUE_FILE_SIZE - 64, QUEUE_FILE_SIZE + 1])
@pytest.mark.parametrize("create", [False, True])
def test_a_file_of_the_wrong_size_is_one_line_naming_rm(
    tmp_path: Path, size: int, create: bool
) -> None:
    drv, dev = queue_file_paths(tmp_path, "linux-user")
    Path(dev).write_bytes(bytes(QUEUE_FILE_SIZE))
    Path(drv).write_bytes(bytes(size))
    if create and size == 0:  # an empty file is one the listener just made: sized
        QueueFiles(tmp_path, create=True).close()
        assert os.path.getsize(drv) == QUEUE_FILE_SIZE
        return
    before = open_fds()
    with pytest.raises(LinuxUserError) as err:
        QueueFiles(tmp_path, create=create)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"queue file {drv} is {size} bytes, not 262272" in msg
    assert f"rm {drv}" in msg
    assert err.value.path == drv
    assert open_fds() == before
    assert os.path.getsize(drv) == size  # refused, not "fixed"


def test_missing_files_name_qemu_and_queue_dir(tmp_path: Path) -> None:
    with pytest.raises(LinuxUserError, match=r"does not exist: start QEMU first .*--queue-dir"):
        QueueFiles(tmp_path)
    assert not list(tmp_path.iterdir())  # the connecting end creates nothing


@settings(max_examples=60, deadline=None)
@given(
    drv=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    dev=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    equal=st.booleans(),
)
def test_any_index_pair_is_accepted_only_if_fresh(tmp_path_factory, drv, dev, equal) -> None:
    """Indexes in the files are the peer's bytes: out of range or in flight = stale."""
    where = tmp_path_factory.mktemp("q")
    QueueFiles(where, create=True).close()
    if equal:
        drv = (drv[0], drv[0])
    paths = queue_file_paths(where, "linux-user")
    for path, (head, tail) in zip(paths, (drv, dev), strict=True):
        write_index(path, head, tail)
    fresh = all(h == t < 4096 for h, t in (drv, dev))
    if fresh:
        QueueFiles(where).close()
    else:
        with pytest.raises(LinuxUserError, match=r"^stale queue file .* remove .* \(rm\)"):
            QueueFiles(where)


def test_readonly_files_are_never_written(tmp_path: Path) -> None:
    drv, _dev = queue_file_paths(tmp_path, "linux-user")
    QueueFiles(tmp_path, create=True).close()
    write_index(drv, 5, 3)  # in flight: a monitor must see it, not refuse it
    with QueueFiles(tmp_path, readonly=True) as files:
        a, b = files.message_queues()
        assert a.readonly and b.readonly
        a.release()
        b.release()
    assert struct.unpack_from(
        "<II", Path(drv).read_bytes()[:4] + Path(drv).read_bytes()[0x40:0x44]
    ) == (5, 3)


# Socket ---------------------------------------------------------------------------------------


def test_no_socket_is_one_line_naming_qemu(tmp_path: Path) -> None:
    before = open_fds()
    path = str(tmp_path / "vmsg.sock")
    with pytest.raises(LinuxUserError) as err:
        LinuxUserDevice(path, queue_dir=tmp_path)
    assert str(err.value).startswith(f"no socket at {path}: start QEMU first")
    assert "server=on" in str(err.value) and "\n" not in str(err.value)
    assert open_fds() == before


def test_a_socket_nobody_listens_on_is_one_line(tmp_path: Path) -> None:
    path = str(tmp_path / "vmsg.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)  # bound, never listening, then gone: a stale socket file
    before = open_fds()
    with pytest.raises(LinuxUserError, match=r"^nobody listens on .*vmsg.sock \(a stale socket"):
        LinuxUserDevice(path, queue_dir=tmp_path)
    assert open_fds() == before


def test_a_listener_replaces_a_stale_socket_and_removes_its_own(tmp_path: Path) -> None:
    path = str(tmp_path / "vmsg.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)
    dev = LinuxUserDevice(path, listen=True, queue_dir=tmp_path)
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)  # it listens now
    finally:
        dev.close()
    assert not os.path.exists(path)


def test_a_listener_refuses_a_live_socket_and_a_non_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "vmsg.sock")
    with LinuxUserDevice(path, listen=True, queue_dir=tmp_path):
        drv, _dev = queue_file_paths(tmp_path, "linux-user")
        write_index(drv, 3, 1)  # the live link's messages in flight
        before = open_fds()
        with pytest.raises(LinuxUserError, match=r"^socket .* is in use: another end listens"):
            LinuxUserDevice(path, listen=True, queue_dir=tmp_path)
        assert open_fds() == before
        with open(drv, "rb") as f:
            assert struct.unpack("<I", f.read(4)) == (3,)  # not zeroed under the live end
    other = tmp_path / "not-a-socket"
    other.write_text("x")
    with pytest.raises(LinuxUserError, match=r"exists and is not a socket: remove it"):
        LinuxUserDevice(str(other), listen=True, queue_dir=tmp_path)
    assert other.read_text() == "x"


def test_the_doorbell_is_one_0xed_byte_and_any_bytes_wake(tmp_path: Path) -> None:
    path = str(tmp_path / "vmsg.sock")
    with LinuxUserDevice(path, listen=True, queue_dir=tmp_path) as dev:
        assert dev.vmid == 0 and dev.peers() == {0} and dev.vectors == 1
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(path)
        try:
            dev.ring(1234, 7)  # the bus has one peer: peer and vector are ignored
            raw.settimeout(2)
            assert raw.recv(16) == b"\xed"
            raw.sendall(b"\x01" * 1000)  # more than one 128-byte read
            assert dev.wait(2.0) == {0}
            time.sleep(0.05)
            assert dev.drain() == set()  # all 1000 taken by that one wake-up
            assert dev.wait(0.02) == set()
        finally:
            raw.close()
        assert dev.wait(1.0) == set()  # EOF: the peer left, not a doorbell
        assert dev.peer_gone
        again = socket.socket(socket.AF_UNIX)  # a restarted QEMU connects again
        again.connect(path)
        try:
            again.sendall(b"\xed")
            assert dev.wait(2.0) == {0}
        finally:
            again.close()


def test_shmem_is_empty_and_the_default_queues_are_not_used(tmp_path: Path) -> None:
    with LinuxUserDevice(str(tmp_path / "s"), listen=True, queue_dir=tmp_path) as dev:
        assert len(dev.shmem) == 0  # no BAR2: a pool finds no room
        a, b = dev.message_queues()
        assert len(a) == len(b) == QUEUE_FILE_SIZE
        a.release()
        b.release()


def test_open_backend_chooses_it_and_refuses_two_backends(tmp_path: Path) -> None:
    with open_backend(
        linux_user=str(tmp_path / "s"), listen=True, queue_dir=str(tmp_path), bus_name="b0"
    ) as dev:
        assert isinstance(dev, LinuxUserDevice)
        assert (tmp_path / "queue-b0-driver").exists()
    with pytest.raises(ValueError, match="name exactly one backend"):
        open_backend(linux_user="x", fake="y")


def test_the_ram_file_is_the_window_at_mem_offset(tmp_path: Path) -> None:
    from ivshmem_bus.memory import FileWindow, open_window

    ram = tmp_path / "vm-ram"
    ram.write_bytes(bytes(1 << 16))
    with LinuxUserDevice(str(tmp_path / "s"), listen=True, queue_dir=tmp_path, mem=str(ram)) as dev:
        assert (dev.mem, dev.mem_offset) == (str(ram), 0x40000000)  # the seed's default
        window = open_window(dev.mem, mem_offset=dev.mem_offset)
        try:
            assert isinstance(window, FileWindow)
            view = window.view(0x40000000 + 0x1234, 7)  # driver address A: file A - offset
            view[:] = b"entropy"
            view.release()
        finally:
            window.close()
    assert ram.read_bytes()[0x1234 : 0x1234 + 7] == b"entropy"


# As a library -----------------------------------------------------------------------------------


def test_probe_and_requests_as_a_library_against_the_qemu_like_device(
    tmp_path: Path, qemu_device: Peer
) -> None:
    before = open_fds()
    with (
        LinuxUserDevice(str(tmp_path / "vmsg.sock"), queue_dir=tmp_path) as dev,
        VirtioMsgBus(dev, "driver", 0) as bus,
    ):
        d = VirtioMsgDriver(bus).probe()
        status = bus.request(protocol.GetDeviceStatus())
    assert (d.device_id, d.vendor_id, d.num_feature_bits, d.config_size) == (
        4, 0x554D4551, 64, 0,
    )  # fmt: skip
    assert d.features == (1 << 32) | (1 << 33)  # despite num 0 in the response
    assert [(q.index, q.max_size) for q in d.queues] == [(0, 1024)]
    assert isinstance(status, protocol.GetDeviceStatusResponse)
    assert open_fds() == before


def test_a_spinning_driver_reads_the_devices_doorbells(tmp_path: Path) -> None:
    """Thousands of back-to-back requests, answered while the driver spins: the device's
    doorbells are read as they come, so its writes never block."""
    peer = Peer(tmp_path, "device")
    try:
        peer.wait_for("listening on")
        with (
            LinuxUserDevice(str(tmp_path / "vmsg.sock"), queue_dir=tmp_path) as dev,
            VirtioMsgBus(dev, "driver", 0, spin=1.0) as bus,
        ):
            for _ in range(3000):
                bus.request(protocol.GetDeviceStatus())
    finally:
        peer.proc.terminate()
        rc, log = peer.finish()
    assert rc == 0, log
    assert json.loads(log.splitlines()[-1])["doorbells_blocked"] == 0


def test_both_ends_in_one_process_serve_and_probe(tmp_path: Path) -> None:
    sock = str(tmp_path / "vmsg.sock")
    before = open_fds()
    stop = threading.Event()
    with LinuxUserDevice(sock, listen=True, queue_dir=tmp_path) as server:
        served: list[int] = []

        def run() -> None:
            with VirtioMsgBus(server, "device", 0) as bus:
                served.append(bus.serve(RngDevice().handle, stop=stop.is_set))

        thread = threading.Thread(target=run)
        thread.start()
        try:
            with (
                LinuxUserDevice(sock, queue_dir=tmp_path) as client,
                VirtioMsgBus(client, "driver", 0) as bus,
            ):
                d = VirtioMsgDriver(bus).probe()
        finally:
            stop.set()
            thread.join()
    assert d.device_id == 4 and served and served[0] >= 3
    assert open_fds() == before


# Through the entry point --------------------------------------------------------------------------


def test_probe_command_against_the_qemu_like_device(tmp_path: Path, qemu_device: Peer) -> None:
    out = cli("probe", "--linux-user", "vmsg.sock", "--mem", "ram", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "probe of vmid 0:",
        "  device:    entropy (virtio id 4)",
        "  vendor:    0x554d4551 (QEMU)",
        "  features:  0x300000000 VERSION_1 ACCESS_PLATFORM",
        "  config:    0 bytes",
        "  queues:    0 (max 1024)",
    ]
    js = cli("probe", "--linux-user", str(tmp_path / "vmsg.sock"), "--queue-dir", str(tmp_path),
             "--json", cwd=ROOT)  # fmt: skip
    assert js.returncode == 0, js.stderr
    got = json.loads(js.stdout)
    assert (got["device_id"], got["vendor_id"], got["remote_vmid"]) == (4, 0x554D4551, 0)


def test_ping_command_against_the_qemu_like_device(tmp_path: Path, qemu_device: Peer) -> None:
    out = cli("ping", "-c", "3", "-i", "0.01", "--linux-user", "vmsg.sock", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 requests sent, 3 replies received, 0% loss" in out.stdout


def test_serve_command_answers_a_qemu_like_driver_within_its_deadline(tmp_path: Path) -> None:
    serve = subprocess.Popen(
        [sys.executable, "-m", "ivshmem_bus", "serve", "--linux-user", "vmsg.sock"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert serve.stdout is not None
        lines = [serve.stdout.readline()]
        while lines[-1] and "serving virtio" not in lines[-1]:
            lines.append(serve.stdout.readline())
        assert ": vmid 0; serving virtio rng (id 4) (qemu-v0)" in lines[-1], lines
        assert os.path.getsize(tmp_path / "queue-linux-user-driver") == QUEUE_FILE_SIZE
        # QEMU's own response loop (1024 polls, then abort); the peer reports the slowest
        # response it saw
        driver = Peer(tmp_path, "driver", "--pings", "2000")
        rc, log = driver.finish()
        assert rc == 0, log
        got = json.loads(log.splitlines()[-1])
        assert (got["device_id"], got["vendor_id"], got["feature_bits"]) == (4, 0x554D4551, 64)
        assert got["features"] == 1 << 32 and got["queues"] == [1024] and got["status"] == 11
        # serve reads the driver's doorbells even while it spins: none piled up until the
        # driver's writes would block (QEMU's would)
        assert got["doorbells_blocked"] == 0
    finally:
        serve.send_signal(2)
        out, _ = serve.communicate(timeout=10)
    assert serve.returncode == 0, out
    assert "driver status" in out and "stopped after" in out


def test_monitor_command_shows_the_traffic_read_only(tmp_path: Path, qemu_device: Peer) -> None:
    mon = subprocess.Popen(
        [sys.executable, "-m", "ivshmem_bus", "monitor", "--linux-user", "vmsg.sock",
         "--count", "2", "--duration", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    time.sleep(1.0)  # the monitor starts from the queues' current heads
    assert cli("ping", "-c", "1", "--linux-user", "vmsg.sock", cwd=tmp_path).returncode == 0
    out, err = mon.communicate(timeout=20)
    assert mon.returncode == 0, err
    lines = out.splitlines()
    assert "driver->device GetDeviceStatus" in lines[0]
    assert "device->driver GetDeviceStatusResponse status=0" in lines[1]


def test_stale_files_left_by_a_qemu_are_refused_with_the_fix(tmp_path: Path) -> None:
    drv, dev = queue_file_paths(tmp_path, "linux-user")
    for path in (drv, dev):
        Path(path).write_bytes(bytes(QUEUE_FILE_SIZE))
    write_index(drv, 9, 4)  # five requests of an earlier run never consumed
    peer = Peer(tmp_path, "device")  # QEMU does not zero existing files
    try:
        peer.wait_for("listening on")
        out = cli("probe", "--linux-user", "vmsg.sock", cwd=tmp_path)
    finally:
        peer.stop()
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr.startswith("ivshmem-bus: error: stale queue file ")
    assert "(head 9, tail 4)" in out.stderr and "rm" in out.stderr
    assert out.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("setup", "expect"),
    [
        ("none", "no socket at vmsg.sock: start QEMU first"),
        ("stale-socket", "nobody listens on vmsg.sock"),
        ("wrong-size", "is 4096 bytes, not 262272"),
    ],
)
def test_link_commands_fail_in_one_line_exit_1(tmp_path: Path, setup: str, expect: str) -> None:
    listener = None
    if setup == "stale-socket":
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(tmp_path / "vmsg.sock"))
    if setup == "wrong-size":
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(tmp_path / "vmsg.sock"))
        listener.listen(1)
        drv, dev = queue_file_paths(tmp_path, "linux-user")
        Path(drv).write_bytes(bytes(4096))
        Path(dev).write_bytes(bytes(QUEUE_FILE_SIZE))
    try:
        for command in ("probe", "ping"):
            out = cli(command, "--linux-user", "vmsg.sock", cwd=tmp_path)
            assert out.returncode == 1, out
            assert out.stderr.startswith("ivshmem-bus: error: ") and expect in out.stderr
            assert out.stderr.count("\n") == 1
    finally:
        if listener is not None:
            listener.close()


def test_serve_and_monitor_refuse_bad_files_in_one_line(tmp_path: Path) -> None:
    drv, dev = queue_file_paths(tmp_path, "linux-user")
    out = cli("monitor", "--linux-user", "vmsg.sock", "--count", "1", cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr == (
        "ivshmem-bus: error: queue file ./queue-linux-user-driver does not exist: start QEMU "
        "first (it creates its queue files in its working directory), or name that directory "
        "with --queue-dir\n"
    )
    Path(drv).write_bytes(bytes(100))
    Path(dev).write_bytes(bytes(QUEUE_FILE_SIZE))
    out = cli("serve", "--linux-user", "vmsg.sock", cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr.startswith("ivshmem-bus: error: queue file ./queue-linux-user-driver is 100")
    assert out.stderr.count("\n") == 1
    assert not (tmp_path / "vmsg.sock").exists()  # refused before listening


def test_entropy_through_the_ram_file_with_the_virtqueue_core(tmp_path: Path) -> None:
    """The data path on the linux-user bus, below any rng driver: a split virtqueue in the
    RAM file at mem-offset, SET_VQUEUE and EVENT_AVAIL over the queue files; the QEMU-like
    device fills every buffer from its known stream and answers EVENT_USED."""
    from ivshmem_bus.core.virtqueue import DriverQueue, VirtqLayout
    from ivshmem_bus.memory import FileWindow

    from .linux_user_peer import entropy_stream

    base, chunk, count = 0x40000000, 65536, 6
    with (tmp_path / "vm-ram").open("wb") as f:
        f.truncate(1 << 20)
    peer = Peer(tmp_path, "device", "--mem", "vm-ram")
    try:
        peer.wait_for("listening on")
        with (
            LinuxUserDevice(str(tmp_path / "vmsg.sock"), queue_dir=tmp_path) as dev,
            VirtioMsgBus(dev, "driver", 0) as bus,
            FileWindow(tmp_path / "vm-ram", base) as window,
        ):
            for status in (1, 3):
                bus.request(protocol.SetDeviceStatus(status=status))
            bus.request(protocol.SetFeatures(index=0, num=2, features=1 << 32))
            bus.request(protocol.SetDeviceStatus(status=11))
            layout = VirtqLayout.packed_at(base + 0x1000, 64)
            vq = DriverQueue(window, 0, layout)
            bus.request(
                protocol.SetVqueue(
                    index=0, size=64, descriptor_addr=layout.desc_addr,
                    driver_addr=layout.avail_addr, device_addr=layout.used_addr,
                )
            )  # fmt: skip
            bufs = [base + 0x10000 + i * chunk for i in range(count)]
            for i, addr in enumerate(bufs):
                vq.add([], [(addr, chunk)], i)
            assert vq.publish()
            bus.send(protocol.EventAvail(index=0, next_offset_wrap=0))
            event = bus.receive(10.0)
            assert isinstance(event, protocol.EventUsed) and event.index == 0
            used = vq.reap()
            views = [window.view(bufs[int(str(token))], n) for token, n in used]
            got = b"".join(bytes(v) for v in views)
            for v in views:
                v.release()
            vq.release()
    finally:
        peer.stop()
    assert [(token, n) for token, n in used] == [(i, chunk) for i in range(count)]
    assert got == entropy_stream(0, count * chunk)

"""Issue 14, item 4: one queue pair per fabric. Each ivshmem_bus end claims the queue it
produces on (BAR2 0x0004 driver, 0x1004 device: 0x0001_0000 | vmid); a second device or
driver refuses, naming the owner; a dead owner's claim expires; QEMU peers never claim and
are never refused."""

from __future__ import annotations

import signal
import struct
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ivshmem_bus import ownership
from ivshmem_bus.backends.server_client import ServerClientDevice
from ivshmem_bus.errors import QueueClaimed, RemoteVmidError
from ivshmem_bus.server import IvshmemServer

from .clitools import Background, run
from .qemu_like import first_response


def _word(dev: ServerClientDevice, offset: int) -> int:
    return struct.unpack_from("<I", dev.shmem, offset)[0]


@pytest.fixture
def fabric(tmp_path):
    with IvshmemServer(tmp_path / "s.sock", shm_size="64K", vectors=2) as server:
        server.start()
        yield tmp_path / "s.sock"


def test_claim_words_bytes_and_release(fabric):
    with ServerClientDevice(fabric, 2) as a, ServerClientDevice(fabric, 2) as b:
        ownership.claim(a, "device")
        ownership.claim(b, "driver")
        assert _word(a, 0x1004) == 0x0001_0000 | a.vmid  # device queue, producer line + 4
        assert _word(a, 0x0004) == 0x0001_0000 | b.vmid  # driver queue, producer line + 4
        assert _word(a, 0x1044) == 0 and _word(a, 0x0044) == 0  # polling flags untouched
        assert ownership.claim_of(b, "device") == a.vmid
        ownership.release(b, "device")  # not b's claim: left alone
        assert _word(a, 0x1004) == 0x0001_0000 | a.vmid
        ownership.release(a, "device")
        assert _word(a, 0x1004) == 0 and ownership.claim_of(b, "device") is None


def test_a_second_device_is_refused_naming_the_owner(fabric):
    with ServerClientDevice(fabric, 2) as first, ServerClientDevice(fabric, 2) as second:
        ownership.claim(first, "device")
        with pytest.raises(
            QueueClaimed, match=rf"vmid {first.vmid} already serves a device .*0x1004"
        ):
            ownership.claim(second, "device")
        assert ownership.claim_of(second, "device") == first.vmid  # nothing overwritten


def test_a_dead_owners_claim_expires(fabric):
    with ServerClientDevice(fabric, 2) as gone:
        ownership.claim(gone, "driver")
        dead = gone.vmid  # it leaves without releasing (as after SIGKILL)
        gone.close()
        with ServerClientDevice(fabric, 2) as new:
            assert _word(new, 0x0004) == 0x0001_0000 | dead
            ownership.claim(new, "driver")  # the server said `dead` left: no refusal
            assert ownership.claim_of(new, "driver") == new.vmid


@given(st.integers(0, 0xFFFFFFFF))
def test_only_the_claim_pattern_reads_as_a_claim(value):
    class Shm:  # the one thing claims use: the two queue regions (BAR2 0x0000 and 0x1000)
        shmem = memoryview(bytearray(0x2000))

        @classmethod
        def message_queues(cls) -> tuple[memoryview, memoryview]:
            return cls.shmem[:0x1000], cls.shmem[0x1000:]

    struct.pack_into("<I", Shm.shmem, 0x1004, value)
    got = ownership.claim_of(Shm, "device")  # type: ignore[arg-type]
    assert got == (value & 0xFFFF if value >> 16 == 1 else None)


def test_second_serve_refuses_and_leaves_the_first_ones_queues(tmp_path):
    sock = tmp_path / "s.sock"
    server = Background(tmp_path, "server", "server", "-S", str(sock), "-l", "1M", "-n", "2")
    server.wait_for("ivshmem server on")
    first = Background(tmp_path, "serve", "serve", "--server", str(sock), "--vectors", "2")
    try:
        first.wait_for("waiting for the driver's peer")
        second = run("serve", "--server", str(sock), "--vectors", "2")
        assert second.returncode == 1
        err = second.stderr.strip().splitlines()
        assert err == [
            f"ivshmem-bus: error: ivshmem server {sock} (peer 1): vmid 0 already serves a device "
            f"on this fabric (its claim at BAR2 0x1004); one fabric carries one device: stop "
            f"vmid 0's ivshmem-bus serve, or use another fabric"
        ]
        ping = run("ping", "--server", str(sock), "--vectors", "2", "-c", "3", "-i", "0")
        assert ping.returncode == 0, ping.stdout + ping.stderr
        # the QEMU-like driver never claims: still answered by the first serve
        assert first_response(sock, 0) < 1.0
    finally:
        assert first.stop(signal.SIGINT) == 0
        assert server.stop() == 0
    log = first.out.read_text()
    assert "malformed=0" in log  # the refused serve reset nothing
    # the refused serve was peer 1, ping peer 2, the QEMU-like driver peer 3
    assert "peers seen: 2; serving vmid 2 (it claims the driver queue)" in log
    assert "vmid 2 left; peers seen: 3; serving vmid 3 (the only other peer)" in log


def test_second_driver_refuses_while_one_drives(tmp_path):
    sock = tmp_path / "s.sock"
    server = Background(tmp_path, "server", "server", "-S", str(sock), "-l", "1M", "-n", "2")
    server.wait_for("ivshmem server on")
    serve = Background(tmp_path, "serve", "serve", "--server", str(sock), "--vectors", "2")
    ping = None
    try:
        serve.wait_for("waiting for the driver's peer")
        ping = Background(
            tmp_path, "ping", "ping", "--server", str(sock), "--vectors", "2", "-c", "100"
        )
        ping.wait_for("reply from vmid 0: seq=1")
        probe = run("probe", "--server", str(sock), "--vectors", "2", "--remote-vmid", "0")
        assert probe.returncode == 1
        assert "vmid 1 already drives the device on this fabric (its claim at BAR2 0x0004)" in (
            probe.stderr
        )
        assert probe.stderr.count("\n") == 1
    finally:
        if ping is not None:
            assert ping.stop(signal.SIGINT) == 0
        assert serve.stop(signal.SIGINT) == 0
        assert server.stop() == 0


def test_two_devices_started_at_once_the_later_claim_wins(fabric):
    """Both found the word free; the one whose claim was overwritten learns it (serve checks
    every 0.5 s) and stops instead of sharing the driver queue."""
    with ServerClientDevice(fabric, 2) as a, ServerClientDevice(fabric, 2) as b:
        ownership.claim(a, "device")
        struct.pack_into("<I", b.shmem, 0x1004, 0x0001_0000 | b.vmid)  # b's racing store
        with pytest.raises(QueueClaimed, match=f"vmid {b.vmid} already serves"):
            ownership.PeerChoice(a, None).check_claim("device")
        ownership.PeerChoice(b, None).check_claim("device")  # b keeps it
        struct.pack_into("<I", b.shmem, 0x1004, 0)  # a QEMU peer's reset-queues
        ownership.PeerChoice(b, None).check_claim("device")
        assert _word(b, 0x1004) == 0x0001_0000 | b.vmid  # re-asserted


def test_without_a_peer_list_a_foreign_claim_is_taken_over_and_logged(caplog, monkeypatch):
    from ivshmem_bus.backends.fake import fake_pair

    a, b = fake_pair(shm_size=16384, vmids=(3, 4))
    try:
        monkeypatch.setattr(b, "peers", lambda: None)  # as VFIO: no list of the fabric's peers
        ownership.claim(a, "device")
        with caplog.at_level("WARNING"):
            ownership.claim(b, "device")
        assert ownership.claim_of(a, "device") == 4
        assert "names vmid 3 as its device" in caplog.text
    finally:
        a.close()
        b.close()


def test_auto_driver_prefers_the_peer_that_claims_the_device_queue(fabric):
    with ServerClientDevice(fabric, 2) as device, ServerClientDevice(fabric, 2) as monitor, \
            ServerClientDevice(fabric, 2) as driver:  # fmt: skip
        with pytest.raises(Exception, match=r"several peers \(0, 1\)"):
            ownership.resolve_driver_remote(driver, "auto")
        ownership.claim(device, "device")
        assert ownership.resolve_driver_remote(driver, "auto") == device.vmid
        assert monitor.vmid not in (device.vmid,)


def test_serve_auto_needs_a_peer_list(monkeypatch):
    from ivshmem_bus.backends.fake import fake_pair
    from ivshmem_bus.errors import RemoteVmidError
    from ivshmem_bus.serving import serve_link

    a, b = fake_pair(shm_size=16384)
    try:
        monkeypatch.setattr(a, "peers", lambda: None)  # as VFIO
        with pytest.raises(RemoteVmidError, match="cannot list peers: give --remote-vmid N"):
            serve_link(a, None, remote="auto")  # type: ignore[arg-type]
        assert ownership.claim_of(a, "device") is None  # refused before claiming anything
    finally:
        a.close()
        b.close()


# --- The driver's choice of device with ``auto``: looked for until ``wait`` runs out ---------


def test_auto_driver_with_one_peer_returns_at_once_whatever_the_wait(fabric):
    with ServerClientDevice(fabric, 2) as device, ServerClientDevice(fabric, 2) as driver:
        t0 = time.monotonic()
        assert ownership.resolve_driver_remote(driver, "auto", wait=30) == device.vmid
        assert time.monotonic() - t0 < 1.0  # no settle delay: the choice was clear


def test_auto_driver_waits_for_a_device_that_joins_later(fabric):
    with ServerClientDevice(fabric, 2) as driver:
        joined: list[ServerClientDevice] = []
        later = threading.Timer(0.3, lambda: joined.append(ServerClientDevice(fabric, 2)))
        later.start()
        try:
            t0 = time.monotonic()
            got = ownership.resolve_driver_remote(driver, "auto", wait=30)
            took = time.monotonic() - t0
            later.join()
            assert got == joined[0].vmid == driver.vmid + 1
        finally:
            later.join()
            for dev in joined:
                dev.close()
        assert 0.2 < took < 10.0  # it came back when the peer joined, far from the 30 s


def test_auto_driver_with_no_peer_fails_naming_the_fix_after_the_wait(fabric):
    with ServerClientDevice(fabric, 2) as driver:
        t0 = time.monotonic()
        with pytest.raises(RemoteVmidError) as err:
            ownership.resolve_driver_remote(driver, "auto", hint="serve it", wait=0.4)
        took = time.monotonic() - t0
    assert str(err.value) == (
        f"ivshmem server {fabric} (peer 0): no other peer is connected after 0.4 s: start the "
        f"device first (serve it)"
    )
    assert 0.4 <= took < 5.0
    with ServerClientDevice(fabric, 2) as driver:  # wait=0: one look, the same error at once
        t0 = time.monotonic()
        with pytest.raises(RemoteVmidError, match=r"connected: start the device first \(ivsh"):
            ownership.resolve_driver_remote(driver, "auto")
        assert time.monotonic() - t0 < 1.0


def test_auto_driver_with_several_unclaimed_peers_fails_listing_them(fabric):
    with ServerClientDevice(fabric, 2) as a, ServerClientDevice(fabric, 2) as b, \
            ServerClientDevice(fabric, 2) as driver:  # fmt: skip
        t0 = time.monotonic()
        with pytest.raises(RemoteVmidError) as err:
            ownership.resolve_driver_remote(driver, "auto", wait=0.4)
        assert time.monotonic() - t0 >= 0.4
        assert str(err.value).endswith(
            f"several peers ({a.vmid}, {b.vmid}) after 0.4 s: choose one with --remote-vmid N"
        )


def test_auto_driver_takes_the_peer_left_when_a_monitor_leaves_during_the_wait(fabric):
    with ServerClientDevice(fabric, 2) as device, ServerClientDevice(fabric, 2) as driver:
        monitor = ServerClientDevice(fabric, 2)  # a tap joins to take BAR2, and leaves
        later = threading.Timer(0.3, monitor.close)
        later.start()
        try:
            assert ownership.resolve_driver_remote(driver, "auto", wait=30) == device.vmid
        finally:
            later.join()


def test_auto_driver_takes_a_device_that_claims_during_the_wait(fabric):
    with ServerClientDevice(fabric, 2) as other, ServerClientDevice(fabric, 2) as device, \
            ServerClientDevice(fabric, 2) as driver:  # fmt: skip
        later = threading.Timer(0.3, ownership.claim, (device, "device"))
        later.start()
        try:
            assert ownership.resolve_driver_remote(driver, "auto", wait=30) == device.vmid
        finally:
            later.join()
        assert other.vmid != device.vmid


@pytest.mark.parametrize(("spec", "want"), [("46", 46), ("0x2e", 46), ("0", 0), ("65535", 65535)])
def test_a_given_remote_vmid_is_that_number(spec, want):
    assert ownership.resolve_driver_remote(None, spec) == want  # type: ignore[arg-type]


def test_a_remote_vmid_past_65535_is_refused():
    with pytest.raises(ValueError, match="remote vmid 65536 is not a peer id"):
        ownership.resolve_driver_remote(None, "65536")  # type: ignore[arg-type]

"""Crash and restart (issue 9, part 2): either peer SIGKILLed at a random point mid-traffic.

Two processes, as two VMs: over the fake pair (like ``demo.served_device``), and as two
``ServerClientDevice`` peers of an ``IvshmemServer`` run by the test. The survivor must notice
(a request times out with ``BusTimeout``; with a server, the peer-gone notice drops the id
from ``peers()``), never hang (every wait here is bounded), and the link must resume when the
peer is restarted, following the recovery protocol of docs/recovery.md:

- the driver owns reset: a (re)started driver attaches with ``reset_queues=True``; a
  (re)started device attaches without, picking the indexes up from BAR2;
- a surviving driver keeps its bus (only the remote id changes with a server);
- a surviving device drops its bus when it notices the driver is gone, drains its doorbells,
  and re-attaches on the first doorbell that follows: the new driver rings only after its
  reset, so the re-attached bus reads the reset indexes.

Traffic: the driver sends ``GET_CONFIG(offset=n)`` and the device (``RngDevice``) echoes the
offset, so every answer is checked against its request. The device pings the driver (qemu-v0
``IOMMU_TRANSLATE``, spec-v1 ``BUS_PING``), which is how a device notices a dead driver on a
link with no server. spec-v1 matches by token, so a wrong answer is never accepted; qemu-v0
matches by msg_id only, so after a timeout the late answer to the timed-out request may be
taken for the next one (at most one per timeout; docs/recovery.md).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ivshmem_bus.backends.base import IvshmemDevice
from ivshmem_bus.backends.fake import fake_pair
from ivshmem_bus.backends.server_client import ServerClientDevice
from ivshmem_bus.bus import VirtioMsgBus, reset_queues_of
from ivshmem_bus.core import protocol as p
from ivshmem_bus.devices import RngDevice
from ivshmem_bus.errors import BusTimeout
from ivshmem_bus.server import IvshmemServer

CTX = multiprocessing.get_context("fork")
CYCLES = 3  # kill / restart rounds per test
REQUEST_TIMEOUT = 0.15
PING_EVERY = 0.02
SLACK = 0.5  # what a bounded wait may overrun on a loaded CI machine
BOUND = 10.0  # no phase of a test may take longer than this
RESUMED = 10  # verified round trips that show a link is up again
POLL = 0.002


class Deadline:
    """A bounded wait: ``check()`` fails the test once ``seconds`` have passed."""

    def __init__(self, seconds: float, what: str) -> None:
        self.end = time.monotonic() + seconds
        self.what = what

    def check(self) -> None:
        assert time.monotonic() < self.end, f"timed out: {self.what}"


def ping(profile: str, n: int) -> p.Message:
    """The device's liveness request to the driver."""
    n &= 0xFFFF_FFFF
    return p.IommuTranslate(va=n, prot=1) if profile == "qemu-v0" else p.BusPing(data=n)


def echo_ping(msg: p.Message) -> p.Message | None:
    """The driver's handler: answer the device's pings."""
    if isinstance(msg, p.IommuTranslate):
        return p.IommuTranslateResponse(va=msg.va, pa=msg.va, prot=msg.prot)
    if isinstance(msg, p.BusPing):
        return p.BusPingResponse(data=msg.data)
    return None


def ping_echoed(request: p.Message, reply: p.Message) -> bool:
    if isinstance(request, p.IommuTranslate):
        return isinstance(reply, p.IommuTranslateResponse) and reply.va == request.va
    return isinstance(reply, p.BusPingResponse) and reply.data == request.data


def only_peer(device: IvshmemDevice) -> int:
    """The one other peer a device sees (waits, bounded, for it to appear)."""
    deadline = Deadline(BOUND, "a peer to appear")
    while True:
        peers = device.peers()
        if peers:
            (peer,) = peers
            return peer
        deadline.check()
        device.wait(0.01)


# --- The peer processes -------------------------------------------------------------------------


@dataclass
class Progress:
    """Counters a child updates in shared memory (no lock: a SIGKILL must not leave one held)."""

    verified: Any  # ctypes c_longlong in shared memory (multiprocessing.RawValue)
    mismatched: Any
    timeouts: Any

    @classmethod
    def new(cls) -> Progress:
        return cls(*(CTX.RawValue("q", 0) for _ in range(3)))


def _device_process(open_device: Callable[[], IvshmemDevice], profile: str) -> None:
    """A device that attaches without reset and serves RngDevice until killed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    device = open_device()
    remote = only_peer(device)
    with VirtioMsgBus(device, "device", remote, profile, poll_interval=POLL) as bus:
        RngDevice(profile).serve(bus)


def _driver_process(
    open_device: Callable[[], IvshmemDevice], profile: str, progress: Progress
) -> None:
    """A driver that owns reset: resets the queues, then sends GET_CONFIG until killed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    device = open_device()
    remote = only_peer(device)
    bus = VirtioMsgBus(
        device, "driver", remote, profile, reset_queues=True, handler=echo_ping, poll_interval=POLL
    )
    n = 0
    while True:
        n = (n + 1) & 0xFFFF_FFFF
        try:
            reply = bus.request(p.GetConfig(offset=n, size=4), REQUEST_TIMEOUT)
        except BusTimeout:
            progress.timeouts.value += 1
            continue
        if isinstance(reply, p.GetConfigResponse) and reply.offset == n:
            progress.verified.value += 1
        else:
            progress.mismatched.value += 1


def start(target: Callable[..., None], *args: object) -> multiprocessing.process.BaseProcess:
    proc = CTX.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def reap(proc: multiprocessing.process.BaseProcess) -> None:
    if proc.is_alive():
        proc.kill()
    proc.join(5)
    assert not proc.is_alive()
    proc.close()


class Killer:
    """SIGKILL a process after a random delay, from a thread, while traffic flows."""

    def __init__(self, proc: multiprocessing.process.BaseProcess, delay: float) -> None:
        self.pid = proc.pid
        self.killed_at: float | None = None
        self.thread = threading.Timer(delay, self._kill)
        self.thread.start()

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.killed_at = time.monotonic()

    def join(self) -> None:
        self.thread.join(BOUND)
        assert self.killed_at is not None

    def cancel(self) -> None:
        """On a failed test: never fire later (at a reaped, maybe reused, pid)."""
        self.thread.cancel()
        self.thread.join(BOUND)


def cancel(killer: Killer | None) -> None:
    if killer is not None:
        killer.cancel()


# --- Surviving driver ---------------------------------------------------------------------------


@dataclass
class DriverSide:
    """The surviving driver: GET_CONFIG round trips, each checked and each bounded."""

    bus: VirtioMsgBus
    n: int = 0
    verified: int = 0
    mismatched: int = 0
    timeouts: int = 0
    last_timeout: float = 0.0

    def round_trip(self) -> bool:
        self.n = (self.n + 1) & 0xFFFF_FFFF
        t0 = time.monotonic()
        try:
            reply = self.bus.request(p.GetConfig(offset=self.n, size=4), REQUEST_TIMEOUT)
        except BusTimeout:
            self.timeouts += 1
            self.last_timeout = time.monotonic()
            ok = False
        else:
            ok = isinstance(reply, p.GetConfigResponse) and reply.offset == self.n
            self.verified += ok
            self.mismatched += not ok
        assert time.monotonic() - t0 < REQUEST_TIMEOUT + SLACK, "a request overran its timeout"
        return ok

    def until_resumed(self) -> None:
        deadline = Deadline(BOUND, "the link to resume")
        run = 0
        while run < RESUMED:
            run = run + 1 if self.round_trip() else 0
            deadline.check()

    def until_noticed(self, killer: Killer, gone: Callable[[], bool] = lambda: True) -> float:
        """Round trips until a timeout after the kill (and ``gone()``); the delay after it."""
        deadline = Deadline(BOUND, "the survivor to notice")
        while killer.killed_at is None or self.last_timeout <= killer.killed_at or not gone():
            self.round_trip()
            deadline.check()
        killer.join()
        return time.monotonic() - killer.killed_at


def check_answers(side: DriverSide | Progress, profile: str) -> None:
    """No request was ever answered with the answer to another.

    spec-v1 matches by token. qemu-v0 has no token, but GET_CONFIG's answer echoes the
    offset (and IOMMU_TRANSLATE's the va): a late answer to a timed-out request must be
    dropped as a stray, not taken for the next request of the same kind.
    """
    mismatched = side.mismatched if isinstance(side, DriverSide) else side.mismatched.value
    timeouts = side.timeouts if isinstance(side, DriverSide) else side.timeouts.value
    assert mismatched == 0, (
        f"{profile}: {mismatched} requests got the answer to an earlier request "
        f"(after {timeouts} timeouts)"
    )


@pytest.mark.parametrize("profile", p.PROFILES)
def test_fake_pair_device_killed_and_restarted(profile: str) -> None:
    rng = random.Random(f"device-killed-{profile}")
    a, b = fake_pair()
    bus = VirtioMsgBus(a, "driver", b.vmid, profile, reset_queues=True, poll_interval=POLL)
    side = DriverSide(bus)

    def open_b() -> IvshmemDevice:
        bus.close()  # the child keeps only the device side (these are its copies)
        a.close()
        return b

    killer = None
    try:
        for _ in range(CYCLES):
            child = start(_device_process, open_b, profile)
            try:
                side.until_resumed()
                killer = Killer(child, rng.uniform(0.0, 0.1))
                delay = side.until_noticed(killer)
                assert delay < 2 * REQUEST_TIMEOUT + SLACK
            finally:
                cancel(killer)
                reap(child)
        child = start(_device_process, open_b, profile)
        try:
            side.until_resumed()
        finally:
            reap(child)
        check_answers(side, profile)
        assert side.timeouts >= CYCLES
    finally:
        bus.close()
        a.close()
        b.close()


# --- Surviving device ---------------------------------------------------------------------------


class DeviceSide:
    """The surviving device: serves, pings, and re-attaches after the driver's reset."""

    def __init__(self, device: IvshmemDevice, profile: str) -> None:
        self.device = device
        self.profile = profile
        self.rng_device = RngDevice(profile)
        self.bus: VirtioMsgBus | None = None
        self.remote = -1
        self.n = 0
        self.noticed_at = 0.0

    def link_down(self) -> None:
        """Stop touching the queues, forget pending doorbells (the protocol's first step)."""
        if self.bus is not None:
            self.bus.close()
            self.bus = None
        self.noticed_at = time.monotonic()
        self.device.drain()

    def attach_on_doorbell(self, remote: Callable[[], int | None]) -> None:
        """Wait (bounded) for the restarted driver's first doorbell, then re-attach."""
        deadline = Deadline(BOUND, "the restarted driver's doorbell")
        while not self.device.wait(0.01) or remote() is None:
            deadline.check()
        self.remote = remote()  # type: ignore[assignment]
        self.bus = VirtioMsgBus(
            self.device,
            "device",
            self.remote,
            self.profile,
            handler=self.rng_device.handle,
            poll_interval=POLL,
        )

    def step(self) -> bool:
        """Serve for PING_EVERY, then ping once; False when the driver did not answer."""
        assert self.bus is not None
        bus = self.bus
        until = time.monotonic() + PING_EVERY
        try:
            bus.serve(self.rng_device.handle, stop=lambda: time.monotonic() >= until, timeout=0.2)
            self.n += 1
            t0 = time.monotonic()
            request = ping(self.profile, self.n)
            reply = bus.request(request, REQUEST_TIMEOUT)
            assert time.monotonic() - t0 < REQUEST_TIMEOUT + SLACK
        except BusTimeout:
            return False
        assert ping_echoed(request, reply), f"{request} was answered with {reply}"
        return True

    def serve_until(self, done: Callable[[], bool], what: str) -> None:
        deadline = Deadline(BOUND, what)
        while not done():
            assert self.step(), f"the driver stopped answering while waiting for {what}"
            deadline.check()

    def until_noticed(self, killer: Killer, gone: Callable[[], bool] | None = None) -> float:
        """Serve and ping until the driver is noticed gone; then take the link down."""
        deadline = Deadline(BOUND, "the survivor to notice")
        while True:
            alive = self.step()
            if gone is not None and gone():
                break  # the server's peer-gone notice
            if not alive and killer.killed_at is not None:
                break  # a ping timed out
            deadline.check()
        self.link_down()
        killer.join()
        return self.noticed_at - killer.killed_at  # type: ignore[operator]


@pytest.mark.parametrize("profile", p.PROFILES)
def test_fake_pair_driver_killed_and_restarted_with_reset(profile: str) -> None:
    rng = random.Random(f"driver-killed-{profile}")
    a, b = fake_pair()
    survivor = DeviceSide(b, profile)

    def open_a() -> IvshmemDevice:
        b.close()
        return a

    killer = None
    try:
        for cycle in range(CYCLES + 1):
            survivor.link_down()
            progress = Progress.new()
            child = start(_driver_process, open_a, profile, progress)
            try:
                survivor.attach_on_doorbell(lambda: a.vmid)
                survivor.serve_until(
                    lambda progress=progress: progress.verified.value >= RESUMED, "resumption"
                )
                check_answers(progress, profile)
                if cycle == CYCLES:
                    break  # the last restart only has to resume
                killer = Killer(child, rng.uniform(0.0, 0.1))
                delay = survivor.until_noticed(killer)
                assert delay < PING_EVERY + 2 * REQUEST_TIMEOUT + SLACK
            finally:
                cancel(killer)
                reap(child)
    finally:
        survivor.link_down()
        a.close()
        b.close()


# --- Two peers of an ivshmem server -----------------------------------------------------------


def _server_process(path: str, ready, stop) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with IvshmemServer(path, shm_size="64K", vectors=1) as server:
        ready.set()
        server.serve_forever(stop_event=stop)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "ivshmem.sock")
    ready, stop = CTX.Event(), CTX.Event()
    proc = start(_server_process, path, ready, stop)
    try:
        assert ready.wait(BOUND), "the server did not start"
        yield path
    finally:
        stop.set()
        proc.join(BOUND)
        reap(proc)


def gone_within(device: IvshmemDevice, peer: int, seconds: float) -> bool:
    """Poll ``peers()`` (bounded) until ``peer`` has left."""
    end = time.monotonic() + seconds
    while peer in device.peers():
        if time.monotonic() >= end:
            return False
        time.sleep(0.005)
    return True


def test_server_peers_device_killed_and_restarted(server: str) -> None:
    rng = random.Random("server-device-killed")
    me = ServerClientDevice(server)
    bus: VirtioMsgBus | None = None

    def connect() -> IvshmemDevice:
        if bus is not None:
            bus.close()  # the parent's bus and connection, inherited: closing these copies
        me.close()  # leaves the parent's link up
        return ServerClientDevice(server)

    killer = None
    reset_queues_of(me)  # the driver owns reset and starts first: before any device attaches
    try:
        side = None
        for cycle in range(CYCLES + 1):
            child = start(_device_process, connect, "qemu-v0")
            try:
                peer = only_peer(me)
                # A new device is a new id: the driver re-attaches to it, without reset.
                if bus is not None:
                    bus.close()
                bus = VirtioMsgBus(me, "driver", peer, poll_interval=POLL)
                if side is None:
                    side = DriverSide(bus)
                side.bus = bus
                side.until_resumed()
                if cycle == CYCLES:
                    break
                killer = Killer(child, rng.uniform(0.0, 0.1))
                delay = side.until_noticed(killer, gone=lambda peer=peer: peer not in me.peers())
                assert delay < 2 * REQUEST_TIMEOUT + SLACK
                assert peer not in me.peers()
            finally:
                cancel(killer)
                reap(child)
        assert side is not None
        check_answers(side, "qemu-v0")
    finally:
        if bus is not None:
            bus.close()
        me.close()


def test_server_peers_driver_killed_and_restarted_with_reset(server: str) -> None:
    rng = random.Random("server-driver-killed")
    me = ServerClientDevice(server)
    survivor = DeviceSide(me, "qemu-v0")

    def connect() -> IvshmemDevice:
        me.close()
        return ServerClientDevice(server)

    gone_ids: set[int] = set()

    def new_driver() -> int | None:
        peers = me.peers() - gone_ids
        return next(iter(peers)) if peers else None

    killer = None
    try:
        for cycle in range(CYCLES + 1):
            survivor.link_down()
            progress = Progress.new()
            child = start(_driver_process, connect, "qemu-v0", progress)
            try:
                survivor.attach_on_doorbell(new_driver)
                survivor.serve_until(
                    lambda progress=progress: progress.verified.value >= RESUMED, "resumption"
                )
                check_answers(progress, "qemu-v0")
                if cycle == CYCLES:
                    break
                peer = survivor.remote
                killer = Killer(child, rng.uniform(0.0, 0.1))
                delay = survivor.until_noticed(
                    killer, gone=lambda peer=peer: peer not in me.peers()
                )
                assert delay < PING_EVERY + 2 * REQUEST_TIMEOUT + SLACK
                assert gone_within(me, peer, BOUND)  # the server's peer-gone notice arrived
                gone_ids.add(peer)
            finally:
                cancel(killer)
                reap(child)
    finally:
        survivor.link_down()
        me.close()


def test_survivor_waits_are_bounded_when_the_peer_never_comes_back() -> None:
    """With the peer dead for good, every call on the survivor returns within its timeout."""
    a, b = fake_pair()
    try:
        with contextlib.ExitStack() as stack:
            child = start(_device_process, lambda: (a.close(), b)[1], "qemu-v0")
            stack.callback(reap, child)
            bus = stack.enter_context(
                VirtioMsgBus(a, "driver", b.vmid, reset_queues=True, poll_interval=POLL)
            )
            DriverSide(bus).until_resumed()
            os.kill(child.pid, signal.SIGKILL)
            child.join(BOUND)
            for call, timeout in (
                (lambda: bus.request(p.GetDeviceStatus(), 0.1), 0.1),
                (lambda: bus.receive(0.1), 0.1),
            ):
                t0 = time.monotonic()
                with contextlib.suppress(BusTimeout):
                    call()
                assert time.monotonic() - t0 < timeout + SLACK
            for i in range(200):  # the queue fills, then send times out instead of blocking
                t0 = time.monotonic()
                try:
                    bus.send(p.EventAvail(i, 0), 0.05)
                except BusTimeout:
                    assert time.monotonic() - t0 < 0.05 + SLACK
                    break
            else:
                pytest.fail("sending to a dead peer never filled the queue")
    finally:
        a.close()
        b.close()

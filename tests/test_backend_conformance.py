"""One suite, every backend: the device interface behaves alike whatever is behind it.

Each backend is opened as a ``Rig``: the device under test, a way to make a doorbell arrive
on it (``poke``), and a way to see that a doorbell it rang reached its peer (``rang``). The
same tests then run on the fake pair, a client of an ivshmem server, VFIO over the fake
kernel with MSI-X, VFIO over the fake kernel with the INTx fallback, and both ends of a
linux-user bus (the listening one and the connecting one). A new backend is one more rig
here.
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field

import pytest

from ivshmem_bus.backends.base import IvshmemDevice
from ivshmem_bus.backends.fake import fake_pair
from ivshmem_bus.backends.linux_user import LinuxUserDevice
from ivshmem_bus.backends.server_client import ServerClientDevice
from ivshmem_bus.bus import VirtioMsgBus, reset_queues_of
from ivshmem_bus.core import protocol
from ivshmem_bus.core.queue import SpscQueue
from ivshmem_bus.server import IvshmemServer

from .fakevfio import BAR0_OFF, FakeKernel, make_sysfs, opened

SET_IRQS = 0x3B6E
UNMASK_INTX = (20, 0x11, 0, 0, 1)  # argsz, DATA_NONE | ACTION_UNMASK, INTx, start 0, count 1


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@dataclass
class Rig:
    dut: IvshmemDevice
    peer_vmid: int
    poke: Callable[[int], None]  # make a doorbell arrive on dut's vector v
    rang: Callable[[int], bool]  # did dut.ring(peer_vmid, v) reach the peer?
    stack: ExitStack
    kernel: FakeKernel | None = None
    vectors: int = 2
    extra: dict[str, object] = field(default_factory=dict)


def _fake(tmp_path, stack: ExitStack) -> Rig:
    a, b = fake_pair(vectors=2)
    stack.callback(b.close)
    stack.callback(a.close)
    return Rig(a, b.vmid, lambda v: b.ring(a.vmid, v), lambda v: v in b.wait(2.0), stack)


def _server(tmp_path, stack: ExitStack) -> Rig:
    server = IvshmemServer(str(tmp_path / "s.sock"), shm_size=1 << 20, vectors=2).start()
    stack.callback(server.close)
    a = ServerClientDevice(str(tmp_path / "s.sock"), vectors=2)
    stack.callback(a.close)
    b = ServerClientDevice(str(tmp_path / "s.sock"), vectors=2)
    stack.callback(b.close)
    return Rig(a, b.vmid, lambda v: b.ring(a.vmid, v), lambda v: v in b.wait(2.0), stack)


def _vfio(tmp_path, stack: ExitStack, *, msix: int) -> Rig:
    make_sysfs(tmp_path)
    kernel = FakeKernel(tmp_path, msix=msix, intx=1)
    dev = opened(tmp_path, kernel)
    stack.callback(dev.close)
    index = 2 if msix else 0  # the IRQ index whose eventfds the kernel was given

    def poke(v: int) -> None:
        os.eventfd_write(kernel.irq_fds[index][v], 1)

    def rang(v: int) -> bool:  # the one Doorbell store, as the device model sees it
        return kernel.file(BAR0_OFF + 0x0C, 4) == ((7 << 16) | v).to_bytes(4, "little")

    return Rig(dev, 7, poke, rang, stack, kernel=kernel, vectors=msix or 1)


def _linux_user(tmp_path, stack: ExitStack, *, dut_listens: bool) -> Rig:
    sock = str(tmp_path / "vmsg.sock")
    listener = LinuxUserDevice(sock, listen=True, queue_dir=tmp_path)
    stack.callback(listener.close)
    client = LinuxUserDevice(sock, queue_dir=tmp_path)
    stack.callback(client.close)
    a, b = (listener, client) if dut_listens else (client, listener)
    return Rig(a, 0, lambda v: b.ring(0, v), lambda v: v in b.wait(2.0), stack, vectors=1)


RIGS: dict[str, Callable[..., Rig]] = {
    "linux-user-listen": lambda t, s: _linux_user(t, s, dut_listens=True),
    "linux-user-connect": lambda t, s: _linux_user(t, s, dut_listens=False),
    "fake": _fake,
    "server-client": _server,
    "vfio-msix": lambda t, s: _vfio(t, s, msix=2),
    "vfio-intx": lambda t, s: _vfio(t, s, msix=0),
}


@pytest.fixture(params=sorted(RIGS))
def rig(request, tmp_path) -> Iterator[Rig]:
    with ExitStack() as stack:
        yield RIGS[request.param](tmp_path, stack)


def _unmasks(rig: Rig) -> int:
    assert rig.kernel is not None
    return sum(
        1
        for req, arg in rig.kernel.calls
        if req == SET_IRQS and struct.unpack_from("<IIIII", arg) == UNMASK_INTX
    )


def test_vectors_are_distinct_nonblocking_fds(rig: Rig) -> None:
    fds = list(rig.dut.vector_fds())
    assert rig.dut.vectors == len(fds) == rig.vectors
    assert len(set(fds)) == len(fds)
    assert all(os.get_blocking(fd) is False for fd in fds)


def test_wait_times_out_with_nothing(rig: Rig) -> None:
    assert rig.dut.wait(0.02) == set()
    assert rig.dut.wait(0) == set()


@pytest.mark.parametrize("times", [1, 3])
def test_wait_reports_the_vector_once_and_drains_it(rig: Rig, times: int) -> None:
    v = rig.vectors - 1
    for _ in range(times):  # eventfd counters coalesce: one wake-up for all of them
        rig.poke(v)
    assert rig.dut.wait(2.0) == {v}
    assert rig.dut.wait(0) == set()


def test_drain_takes_what_fired_without_blocking(rig: Rig) -> None:
    assert rig.dut.drain() == set()
    rig.poke(0)
    assert rig.dut.drain() == {0}
    assert rig.dut.drain() == set()


def test_async_wait_wakes_on_a_doorbell_and_times_out(rig: Rig) -> None:
    async def main() -> tuple[set[int], set[int]]:
        asyncio.get_running_loop().call_later(0.01, rig.poke, 0)
        woke = await rig.dut.async_wait(2.0)
        return woke, await rig.dut.async_wait(0.02)

    assert asyncio.run(main()) == ({0}, set())


def test_ring_reaches_the_peer_and_is_range_checked(rig: Rig) -> None:
    rig.dut.ring(rig.peer_vmid, 0)
    assert rig.rang(0)
    with pytest.raises(ValueError):
        rig.dut.ring(0x10000, 0)
    with pytest.raises(ValueError):
        rig.dut.ring(rig.peer_vmid, 256)


def test_a_message_without_its_doorbell_is_found_by_the_poll(rig: Rig) -> None:
    """Lost-doorbell recovery: the bus looks at its queue every poll interval anyway, and
    counts the doorbell that never came."""
    reset_queues_of(rig.dut)
    with VirtioMsgBus(rig.dut, "device", rig.peer_vmid, poll_interval=0.02) as bus:
        rx = SpscQueue(rig.dut.message_queues()[0])  # the driver->device queue, as the peer
        late = threading.Timer(0.05, rx.put, [protocol.encode(protocol.DeviceInfo())])
        late.start()  # while the bus sleeps, and no doorbell
        try:
            assert isinstance(bus.receive(2.0), protocol.DeviceInfo)
        finally:
            late.join()
        assert bus.stats.lost_doorbells == 1


def test_every_wait_path_runs_the_backend_hooks(rig: Rig) -> None:
    """The INTx unmask (and the server client's announcement reading) live in hooks of the
    one wait, so wait, async_wait and drain all run them: an AsyncVirtioMsgBus on an INTx
    device used to stay masked and fall back to its poll."""
    if rig.kernel is None or rig.vectors != 1:  # not INTx: count the hook's calls
        calls: list[str] = []
        dut = rig.dut
        original = dut._after_doorbells
        dut._after_doorbells = lambda fired: (calls.append("after"), original(fired))  # type: ignore[method-assign]
        rig.poke(0)
        dut.drain()
        rig.poke(0)
        dut.wait(2.0)
        rig.poke(0)
        asyncio.run(dut.async_wait(2.0))
        assert calls == ["after"] * 3
        return
    before = _unmasks(rig)
    for way in ("drain", "wait", "async_wait"):
        rig.poke(0)
        if way == "drain":
            assert rig.dut.drain() == {0}
        elif way == "wait":
            assert rig.dut.wait(2.0) == {0}
        else:
            assert asyncio.run(rig.dut.async_wait(2.0)) == {0}
    assert _unmasks(rig) == before + 3


def test_the_aio_bus_unmasks_intx_and_rerings_halfway(rig: Rig) -> None:
    from ivshmem_bus.aio import AsyncVirtioMsgBus
    from ivshmem_bus.errors import BusTimeout

    reset_queues_of(rig.dut)
    bus = VirtioMsgBus(rig.dut, "driver", rig.peer_vmid, poll_interval=0.02)
    rings: list[int] = []
    real_ring = bus._ring
    bus._ring = lambda: (rings.append(1), real_ring())  # type: ignore[method-assign]

    async def main() -> None:
        async with AsyncVirtioMsgBus(bus) as abus:
            with pytest.raises(BusTimeout):
                await abus.request(protocol.DeviceInfo(), timeout=0.2)

    asyncio.run(main())
    assert len(rings) == 2  # the send's doorbell and the half-way re-ring


@pytest.mark.parametrize("kind", sorted(RIGS))
def test_close_is_idempotent_and_releases_every_fd(tmp_path, kind: str) -> None:
    before = open_fds()
    stack = ExitStack()
    rig = RIGS[kind](tmp_path, stack)
    rig.poke(0)
    assert rig.dut.wait(1.0) == {0}
    stack.close()
    rig.dut.close()  # a second close is a no-op
    assert open_fds() == before

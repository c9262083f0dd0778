"""Resource hygiene (issue 9, part 4): nothing leaks an fd or a mapping, on any path.

Fake pairs with buses, server connections with buses, and the error paths (a failed
connect, a bus that finds a corrupt index, a server that refuses its path) run 1,000 times;
servers and file-backed fake pairs (slower: files on disk) 200 times. After a warm-up (lazy
imports, the allocator's arenas, cached thread stacks), ``/proc/self/fd`` must be exactly
as it was, the file-backed mappings too, and ``/proc/self/maps`` must not have more lines; a
single extra anonymous mapping is accepted only if further rounds add none (the allocator's,
not a leak, which grows with the rounds).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ivshmem_bus.backends.fake import FakeDevice, fake_pair
from ivshmem_bus.backends.server_client import ServerClientDevice
from ivshmem_bus.bus import DEVICE_QUEUE_OFFSET, VirtioMsgBus
from ivshmem_bus.core import protocol as p
from ivshmem_bus.core.queue import SpscQueue
from ivshmem_bus.errors import QueueCorrupt, ServerClientError, ServerError
from ivshmem_bus.server import IvshmemServer

ROUNDS = 1000
WARM_UP = 20


def fds() -> list[str]:
    """Open fds with what they point at (sorted), for a readable diff when one leaks."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own fd, closed by now
            out.append(f"{name} -> {os.readlink(f'/proc/self/fd/{name}')}")
    return sorted(out)


def maps() -> list[str]:
    with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
        return f.read().splitlines()


def ivshmem_maps() -> list[str]:
    """Mappings of BAR0/BAR2 files made by the fake pair or an ivshmem server."""
    return [
        line
        for line in maps()
        if "/memfd:ivshmem" in line
        or "/bar0-" in line
        or line.split()[-1:] == ["shm"]
        or line.endswith("/shm (deleted)")
        or line.endswith("/shm")
    ]


def named(lines: list[str]) -> list[str]:
    """The file-backed (or memfd, or socket) mappings: path and permissions, sorted."""
    return sorted(
        f"{line.split()[1]} {line.split(maxsplit=5)[5]}" for line in lines if len(line.split()) > 5
    )


def settle() -> None:
    gc.collect()


def no_growth(cycle: Callable[[], None], rounds: int = ROUNDS) -> None:
    """Run ``cycle`` WARM_UP times, snapshot, run it ``rounds`` times: nothing may grow."""
    for _ in range(WARM_UP):
        cycle()
    settle()
    fds0, maps0, shm0 = fds(), maps(), ivshmem_maps()
    for _ in range(rounds):
        cycle()
    settle()
    fds1, maps1, shm1 = fds(), maps(), ivshmem_maps()
    assert fds1 == fds0, f"fds leaked: {sorted(set(fds1) - set(fds0))[:5]}"
    assert shm1 == shm0, f"BAR mappings leaked: {sorted(set(shm1) - set(shm0))[:5]}"
    assert named(maps1) == named(maps0), "file-backed mappings changed"
    if len(maps1) > len(maps0):
        # One more anonymous mapping can be the allocator's (a new arena, a cached thread
        # stack), not ours: then more rounds must not add any. A leak grows with the rounds.
        for _ in range(rounds // 5):
            cycle()
        settle()
        maps2 = maps()
        assert len(maps2) <= len(maps1), f"mappings grew: {sorted(set(maps2) - set(maps0))[:5]}"


def test_fake_pairs_and_buses_1000_times() -> None:
    def cycle() -> None:
        a, b = fake_pair(shm_size=16384)
        with (
            a,
            b,
            VirtioMsgBus(a, "driver", b.vmid, reset_queues=True) as drv,
            VirtioMsgBus(b, "device", a.vmid) as dev,
        ):
            drv.send(p.EventAvail(0, 1))
            assert dev.receive(1.0) == p.EventAvail(0, 1)
            b.drain()

    no_growth(cycle)


def test_fake_pairs_in_a_directory_200_times(tmp_path: Path) -> None:
    def cycle() -> None:
        a, b = fake_pair(shm_size=8192, directory=tmp_path)
        with a, b, VirtioMsgBus(a, "driver", b.vmid, reset_queues=True):
            pass

    no_growth(cycle, 200)  # files on disk: slower than memfds


@pytest.fixture
def server(tmp_path: Path) -> Iterator[IvshmemServer]:
    with IvshmemServer(tmp_path / "s.sock", shm_size="64K", vectors=2).start() as srv:
        yield srv


def wait_for_no_peers(server: IvshmemServer) -> None:
    deadline = time.monotonic() + 5
    while server.peer_ids:
        assert time.monotonic() < deadline, f"peers still connected: {server.peer_ids}"
        time.sleep(0.001)


def test_server_connections_and_buses_1000_times(server: IvshmemServer) -> None:
    """Both ends in this process: the client's fds and the server's must come back."""
    path = server.socket_path
    anchor = ServerClientDevice(path, vectors=2)  # a peer that stays: every client meets it

    def cycle() -> None:
        with ServerClientDevice(path, vectors=2) as dev:
            assert anchor.vmid in dev.peers()
            with VirtioMsgBus(dev, "device", anchor.vmid, reset_queues=True) as bus:
                bus.send(p.EventUsed(1))
        assert anchor.wait(1.0) == {0}  # the doorbell arrived; drained
        deadline = time.monotonic() + 5
        while anchor.peers():  # the server's peer-gone notice closes the peer's eventfds
            assert time.monotonic() < deadline, "no peer-gone notice"
            time.sleep(0.0005)

    try:
        no_growth(cycle)
        assert server.peer_ids == (anchor.vmid,)
    finally:
        anchor.close()


def test_servers_200_times(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"

    def cycle() -> None:
        with IvshmemServer(path, shm_size="64K").start() as srv:
            with ServerClientDevice(path):
                pass
            wait_for_no_peers(srv)
        assert not path.exists()

    no_growth(cycle, 200)


def test_failed_connects_1000_times(tmp_path: Path) -> None:
    missing = tmp_path / "nobody.sock"
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))  # a socket file nobody listens on

    def cycle() -> None:
        for path in (missing, stale):
            with pytest.raises(ServerClientError):
                ServerClientDevice(path, timeout=0.5)

    no_growth(cycle)


def test_refused_server_paths_1000_times(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("precious")

    def cycle() -> None:
        with pytest.raises(ServerError, match="not a socket"):
            IvshmemServer(tmp_path / "file", shm_size="64K")

    no_growth(cycle)


def corrupt_pair() -> tuple[FakeDevice, FakeDevice]:
    a, b = fake_pair(shm_size=16384)
    b.shmem[DEVICE_QUEUE_OFFSET : DEVICE_QUEUE_OFFSET + 4] = (999).to_bytes(4, "little")
    return a, b


def test_a_bus_refused_at_construction_holds_no_view_of_bar2(caplog) -> None:
    """A bus whose second queue finds a corrupt index must release the first queue's view.

    Otherwise closing the device cannot unmap BAR2 (the mmap is still exported): the device
    logs "still in use" and the mapping lives on for as long as the exception does.
    """
    caplog.set_level(logging.WARNING)
    a, b = corrupt_pair()
    with pytest.raises(QueueCorrupt) as info:  # held: its traceback holds the frame
        VirtioMsgBus(a, "driver", b.vmid)
    a.close()
    b.close()
    assert info.value.index == "head"
    assert "still in use" not in caplog.text
    assert not ivshmem_maps(), "BAR2 still mapped after both devices were closed"


def test_buses_refused_at_construction_1000_times(caplog) -> None:
    caplog.set_level(logging.WARNING)

    def cycle() -> None:
        a, b = corrupt_pair()
        try:
            VirtioMsgBus(a, "driver", b.vmid)
        except QueueCorrupt:  # the usual error path: close the device while handling it
            a.close()
            b.close()
        else:
            pytest.fail("no QueueCorrupt")

    no_growth(cycle)
    unmapped_late = caplog.text.count("still in use")
    assert unmapped_late == 0, f"{unmapped_late} closes could not unmap BAR2 (a view was held)"


def test_resource_owners_are_context_managers_closed_on_leaving(tmp_path: Path) -> None:
    a, b = fake_pair(shm_size=8192)
    with a as entered, b:
        assert entered is a
        with VirtioMsgBus(a, "driver", b.vmid) as bus:
            pass
        assert bus.closed
    assert a.closed and b.closed
    with pytest.raises(ValueError, match="closed"):
        a.shmem  # noqa: B018
    with SpscQueue(bytearray(4096)) as queue:
        pass
    with pytest.raises(ValueError):
        queue.put(b"x")
    path = tmp_path / "cm.sock"
    with IvshmemServer(path, shm_size="64K").start() as server, ServerClientDevice(path) as dev:
        pass
    assert server.closed and not path.exists()
    with pytest.raises(ValueError, match="closed"):
        dev.shmem  # noqa: B018

"""The fake ivshmem device: what a guest sees of ivshmem-doorbell, without hardware."""

from __future__ import annotations

import os
import time

import pytest

from ivshmem_bus.backends.fake import fake_pair


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def pair():
    a, b = fake_pair(shm_size=64 * 1024, vectors=2, vmids=(5, 9))
    yield a, b
    a.close()
    b.close()


def test_vmids_vectors_and_shared_bar2(pair):
    a, b = pair
    assert (a.vmid, b.vmid) == (5, 9)
    assert a.vectors == b.vectors == 2
    assert len(a.shmem) == len(b.shmem) == 64 * 1024
    a.shmem[100:104] = b"ping"
    assert bytes(b.shmem[100:104]) == b"ping"  # two mappings of the same pages
    assert a.peers() == {9} and b.peers() == {5}


def test_doorbell_reaches_the_peer_vector_and_counters_coalesce(pair):
    a, b = pair
    assert b.wait(0) == set()
    a.ring(9, 1)
    a.ring(9, 1)
    a.ring(9, 0)
    assert b.wait(1.0) == {0, 1}  # three doorbells, one wake-up, all drained
    assert b.wait(0) == set()
    assert a.wait(0) == set()  # nothing rang a


def test_doorbell_is_written_to_the_register_file_as_one_word(pair):
    a, _ = pair
    a.ring(9, 1)
    assert a.regs.words.read32(0x0C) == 9 << 16 | 1


def test_wait_times_out_empty(pair):
    _, b = pair
    t0 = time.monotonic()
    assert b.wait(0.05) == set()
    assert 0.04 <= time.monotonic() - t0 < 1.0


def test_unknown_peer_or_vector_is_dropped_like_hardware(pair):
    a, b = pair
    a.ring(1234, 0)
    a.ring(9, 7)  # vector beyond the peer's 2
    assert b.wait(0) == set()
    with pytest.raises(ValueError, match="out of range"):
        a.ring(9, 256)


def test_files_in_a_directory_let_other_processes_read_ivposition(tmp_path):
    a, b = fake_pair(directory=tmp_path, vmids=(3, 4))
    try:
        assert int.from_bytes((tmp_path / "bar0-4").read_bytes()[8:12], "little") == 4
        assert (tmp_path / "shm").stat().st_size == 1 << 20
        assert oct((tmp_path / "shm").stat().st_mode & 0o777) == "0o600"
    finally:
        a.close()
        b.close()


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"vectors must be 1\.\.64"):
        fake_pair(vectors=0)
    with pytest.raises(ValueError, match="two different ids"):
        fake_pair(vmids=(1, 1))
    with pytest.raises(ValueError, match="multiple of 4096"):
        fake_pair(shm_size=1000)


def test_close_is_idempotent_and_shmem_after_close_is_an_error(pair):
    a, _ = pair
    a.close()
    a.close()
    assert a.closed
    with pytest.raises(ValueError, match="is closed"):
        _ = a.shmem


def test_no_fd_leak_over_many_pairs():
    before = open_fds()
    for _ in range(300):
        a, b = fake_pair(shm_size=8192)
        a.ring(b.vmid)
        b.wait(0)
        a.close()
        b.close()
    assert open_fds() == before


def test_close_with_a_view_still_held_closes_fds_and_warns(caplog):
    before = open_fds()
    a, b = fake_pair(shm_size=8192)
    view = a.shmem[0:16]
    a.close()
    b.close()
    assert "still in use" in caplog.text
    # CPython's mmap keeps a dup of its fd while the mapping lives: that one fd goes when
    # the last view does, and everything else is already closed.
    assert open_fds() == before + 1
    view.release()
    del view
    assert open_fds() == before


def test_async_wait_uses_the_same_eventfds(pair):
    import asyncio

    a, b = pair

    async def main():
        assert await b.async_wait(0.01) == set()
        asyncio.get_running_loop().call_later(0.02, a.ring, 9, 1)
        return await b.async_wait(2.0)

    assert asyncio.run(main()) == {1}


def test_queues_get_a_fence_only_on_weakly_ordered_cpus(pair, monkeypatch):
    from ivshmem_bus.bus import VirtioMsgBus
    from ivshmem_bus.core import protocol
    from ivshmem_bus.native import ffi as _ffi

    a, _ = pair
    assert a.fence is None  # x86-64: TSO already orders slot and index
    calls = []
    monkeypatch.setattr(_ffi, "_TSO", False)
    monkeypatch.setattr(_ffi, "fence", lambda: calls.append(1))
    assert a.fence is not None
    with VirtioMsgBus(a, "driver", 9, reset_queues=True) as bus:
        bus.send(protocol.EventUsed(index=1))
    assert calls == [1]  # one release fence between the slot copy and the head store

"""Two processes, one 4 KiB queue in a shared mmap'd file: nothing lost, duplicated or reordered.

The producer and the consumer are separate processes (fork), as the two VMs are: the only
thing they share is the file's pages. The throughput printed is what this test measured; it
is a figure for the notes, not an assertion (timed assertions do not belong in unit tests).
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import struct
import time

import pytest

from ivshmem_bus.core.queue import SpscQueue

COUNT = 1_000_000
REGION = 4096
SEQ = struct.Struct("<Q")
DEADLINE_S = 300.0


def _consumer(path: str, count: int, conn) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, REGION) as mem:
            q = SpscQueue(memoryview(mem))
            expected = lost_or_bad = 0
            deadline = time.monotonic() + DEADLINE_S
            get = q.get
            unpack = SEQ.unpack_from
            while expected < count:
                slot = get(8)
                if slot is None:
                    if time.monotonic() > deadline:
                        break
                    continue
                (seq,) = unpack(slot)
                if seq != expected:
                    lost_or_bad += 1
                    expected = seq
                expected += 1
            q.release()
            conn.send((expected, lost_or_bad, time.monotonic()))
    finally:
        os.close(fd)
        conn.close()


@pytest.mark.slow
def test_one_million_slots_between_two_processes(tmp_path, record_property):
    path = tmp_path / "queue.shm"
    path.write_bytes(bytes(REGION))
    ctx = multiprocessing.get_context("fork")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_consumer, args=(str(path), COUNT, child_conn))
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, REGION) as mem:
            q = SpscQueue(memoryview(mem))
            assert q.capacity == 62
            child.start()
            child_conn.close()
            start = time.monotonic()
            deadline = start + DEADLINE_S
            put = q.put
            pack = SEQ.pack
            seq = 0
            while seq < COUNT:
                if put(pack(seq)):
                    seq += 1
                elif time.monotonic() > deadline:
                    pytest.fail(f"producer stalled at {seq}: consumer not draining")
            assert parent_conn.poll(DEADLINE_S), "consumer did not finish"
            received, bad, end = parent_conn.recv()
            q.release()
    finally:
        os.close(fd)
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join()
    assert (received, bad) == (COUNT, 0)
    assert child.exitcode == 0
    rate = COUNT / (end - start)
    record_property("slots_per_second", round(rate))
    print(f"\ntwo-process 4 KiB queue: {COUNT} slots in {end - start:.2f} s = {rate:,.0f} slots/s")

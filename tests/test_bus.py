"""VirtioMsgBus over the fake pair: bytes in BAR2, doorbells, matching, ordering, timeouts."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from ivshmem_bus.aio import AsyncVirtioMsgBus
from ivshmem_bus.backends.fake import fake_pair
from ivshmem_bus.bus import VirtioMsgBus
from ivshmem_bus.core import protocol as p
from ivshmem_bus.core.queue import SpscQueue
from ivshmem_bus.errors import BusClosed, BusTimeout, QueueCorrupt


@pytest.fixture
def devices():
    a, b = fake_pair(shm_size=16384, vmids=(1, 2))
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def buses(devices):
    a, b = devices
    drv = VirtioMsgBus(a, "driver", 2, reset_queues=True, poll_interval=0.005)
    dev = VirtioMsgBus(b, "device", 1, poll_interval=0.005)
    yield drv, dev
    drv.close()
    dev.close()


def in_thread(fn: Callable[[], object]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def test_driver_sends_on_the_driver_queue_and_rings_the_peer(devices, buses):
    a, b = devices
    drv, _ = buses
    drv.send(p.GetVqueue(index=3))
    shm = b.shmem
    assert int.from_bytes(shm[0x0000:0x0004], "little") == 1  # driver queue head
    assert bytes(shm[0x80 : 0x80 + 44]) == p.encode(p.GetVqueue(index=3))
    assert int.from_bytes(shm[0x1000:0x1004], "little") == 0  # device queue untouched
    assert a.regs.words.read32(0x0C) == 2 << 16  # doorbell: vmid 2, vector 0
    assert b.wait(1.0) == {0}
    assert drv.stats.sent == 1 and drv.stats.doorbells_rung == 1


def test_device_sends_on_the_device_queue(devices, buses):
    _, b = devices
    _, dev = buses
    dev.send(p.EventUsed(index=1))
    assert int.from_bytes(b.shmem[0x1000:0x1004], "little") == 1
    assert bytes(b.shmem[0x1080 : 0x1080 + 44]) == p.encode(p.EventUsed(index=1))


def test_spec_v1_slots_are_48_bytes_with_allocated_tokens(devices):
    a, b = devices
    drv = VirtioMsgBus(a, "driver", 2, "spec-v1", reset_queues=True)
    dev = VirtioMsgBus(b, "device", 1, "spec-v1")
    stop = threading.Event()
    t = in_thread(
        lambda: dev.serve(lambda m: p.GetDeviceStatusResponse(status=3), stop=stop.is_set)
    )
    try:
        r1 = drv.request(p.GetDeviceStatus())
        r2 = drv.request(p.GetDeviceStatus())
        assert (r1.token, r2.token, r1.status) == (1, 2, 3)  # the bus copied the token
        assert bytes(a.shmem[0xC0 : 0xC0 + 48]) == p.encode(p.GetDeviceStatus(token=2), "spec-v1")
    finally:
        stop.set()
        t.join(5)
        drv.close()
        dev.close()


def test_request_response_and_events_in_order_after_it(buses):
    drv, dev = buses

    def scripted_device():
        req = dev.receive(5)
        assert isinstance(req, p.GetVqueue)
        dev.send(p.EventUsed(index=1))
        dev.send(p.EventConfig(1, 2, 0, 0))
        dev.send(p.GetVqueueResponse(index=0, max_size=1024))
        dev.send(p.EventUsed(index=3))

    t = in_thread(scripted_device)
    resp = drv.request(p.GetVqueue(index=0), timeout=5)
    t.join(5)
    assert resp == p.GetVqueueResponse(index=0, max_size=1024)
    got = [drv.receive(1) for _ in range(3)]
    assert got == [p.EventUsed(index=1), p.EventConfig(1, 2, 0, 0), p.EventUsed(index=3)]
    assert drv.receive(0.01) is None


def test_stray_responses_are_dropped_and_counted(buses):
    drv, dev = buses
    dev.send(p.GetFeaturesResponse(0, 2, 1))  # nobody asked
    assert drv.receive(0.05) is None
    assert drv.stats.stray_responses == 1

    def device():
        dev.receive(5)
        dev.send(p.GetDeviceStatusResponse(status=9))  # answers something else
        dev.send(p.SetDeviceStatusResponse(status=1))

    t = in_thread(device)
    assert drv.request(p.SetDeviceStatus(status=1), 5) == p.SetDeviceStatusResponse(status=1)
    t.join(5)
    assert drv.stats.stray_responses == 2
    assert drv.stats.dropped == 2


def test_handler_answers_requests_that_arrive_while_waiting(devices):
    a, b = devices
    translations = []

    def handler(msg):
        translations.append(msg)
        return p.IommuTranslateResponse(va=msg.va, pa=msg.va + 0x4000_0000, prot=msg.prot)

    drv = VirtioMsgBus(a, "driver", 2, reset_queues=True, handler=handler)
    dev = VirtioMsgBus(b, "device", 1)

    def device():
        dev.receive(5)  # the driver's SET_VQUEUE
        reply = dev.request(p.IommuTranslate(va=0x1000, prot=1), 5)  # QEMU's device does this
        assert reply == p.IommuTranslateResponse(0x1000, 0x4000_1000, 1)
        dev.send(p.SetVqueueResponse(0, 8, 1, 2, 3))

    t = in_thread(device)
    try:
        assert drv.request(p.SetVqueue(0, 8, 1, 2, 3), 5) == p.SetVqueueResponse(0, 8, 1, 2, 3)
        t.join(5)
        assert translations == [p.IommuTranslate(va=0x1000, prot=1)]
    finally:
        drv.close()
        dev.close()


def test_malformed_and_unknown_slots_are_dropped_and_counted(devices, buses):
    a, _ = devices
    drv, _dev = buses
    raw_tx = SpscQueue(a.shmem[0x1000:0x2000])  # write into the device queue as a peer would
    raw_tx.put(bytes([0, 0x03, 0, 0, 200, 0]) + bytes(38))  # msg_size 200
    raw_tx.put(bytes([0, 0x77, 0, 0, 6, 0]) + bytes(38))  # unknown msg_id
    raw_tx.put(p.encode(p.EventUsed(index=5)))
    raw_tx.release()
    assert drv.receive(1) == p.EventUsed(index=5)
    assert (drv.stats.malformed, drv.stats.unknown, drv.stats.received) == (1, 1, 1)


def test_silent_peer_gives_a_timeout_error_after_one_re_ring(buses):
    drv, _ = buses
    t0 = time.monotonic()
    with pytest.raises(BusTimeout, match="no response to GetFeatures from vmid 2") as info:
        drv.request(p.GetFeatures(0, 2), timeout=0.2)
    elapsed = time.monotonic() - t0
    assert 0.2 <= elapsed < 2.0
    assert isinstance(info.value, TimeoutError)
    assert drv.stats.doorbells_rung == 2  # the send, then once more halfway
    assert drv.stats.timeouts == 1


def test_full_queue_waits_then_times_out(buses):
    drv, _ = buses
    for i in range(61):
        drv.send(p.EventUsed(index=i))
    with pytest.raises(BusTimeout, match=r"stayed full for 0\.05 s"):
        drv.send(p.EventUsed(index=99), timeout=0.05)
    assert drv.stats.queue_full_waits == 1


def test_full_queue_send_completes_once_the_peer_drains(buses):
    drv, dev = buses
    for i in range(61):
        drv.send(p.EventUsed(index=i))

    def drain_later():
        time.sleep(0.05)
        for _ in range(61):
            dev.receive(1)

    t = in_thread(drain_later)
    drv.send(p.EventUsed(index=61), timeout=5)
    t.join(5)
    assert dev.receive(1) == p.EventUsed(index=61)


def test_lost_doorbell_is_covered_by_the_periodic_look(devices, buses):
    a, _b = devices
    _drv, dev = buses
    SpscQueue(a.shmem[0:0x1000]).put(p.encode(p.EventAvail(0, 1)))  # enqueued, never rung
    t0 = time.monotonic()
    assert dev.receive(2) == p.EventAvail(0, 1)
    assert time.monotonic() - t0 < 0.5


def test_corrupt_index_raises_queue_corrupt(devices, buses):
    _, b = devices
    drv, _ = buses
    b.shmem[0x1000:0x1004] = (1000).to_bytes(4, "little")  # device queue head
    with pytest.raises(QueueCorrupt, match="head index 1000"):
        drv.receive(0.01)


def test_closed_bus_and_bad_arguments(devices):
    a, _ = devices
    bus = VirtioMsgBus(a, "driver", 2)
    bus.close()
    bus.close()
    with pytest.raises(BusClosed, match="closed"):
        bus.send(p.DeviceInfo())
    with pytest.raises(ValueError, match="role"):
        VirtioMsgBus(a, "host", 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="remote_vmid"):
        VirtioMsgBus(a, "driver", 70000)
    with pytest.raises(ValueError, match="no response in qemu-v0: use send"):
        VirtioMsgBus(a, "driver", 2).request(p.ResetVqueue(index=0))


def test_small_bar2_is_refused():
    a, b = fake_pair(shm_size=4096)
    try:
        with pytest.raises(ValueError, match="BAR2 is 4096 bytes; the bus needs 8192"):
            VirtioMsgBus(a, "driver", 2)
    finally:
        a.close()
        b.close()


def test_asyncio_request_and_iteration(buses):
    drv, dev = buses
    stop = threading.Event()
    t = in_thread(
        lambda: dev.serve(
            lambda m: (
                p.GetDeviceStatusResponse(status=5) if isinstance(m, p.GetDeviceStatus) else None
            ),
            stop=stop.is_set,
        )
    )

    async def main():
        async with AsyncVirtioMsgBus(drv) as abus:
            return [await abus.request(p.GetDeviceStatus(), 5) for _ in range(20)]

    try:
        got = asyncio.run(main())
    finally:
        stop.set()
        t.join(5)
    assert got == [p.GetDeviceStatusResponse(status=5)] * 20


def test_async_iteration_yields_incoming_events(buses):
    drv, dev = buses

    async def main():
        out = []
        async for msg in AsyncVirtioMsgBus(drv):
            out.append(msg)
            if len(out) == 3:
                break
        return out

    def sender():
        for i in range(3):
            time.sleep(0.01)
            dev.send(p.EventUsed(index=i))

    t = in_thread(sender)
    got = asyncio.run(asyncio.wait_for(main(), 5))
    t.join(5)
    assert got == [p.EventUsed(index=i) for i in range(3)]


def test_asyncio_request_timeout_and_receive(buses):
    drv, dev = buses

    async def main():
        abus = AsyncVirtioMsgBus(drv)
        with pytest.raises(BusTimeout):
            await abus.request(p.GetFeatures(0, 2), timeout=0.05)
        assert await abus.receive(0.02) is None
        dev.send(p.EventUsed(index=4))
        return await abus.receive(1)

    assert asyncio.run(main()) == p.EventUsed(index=4)

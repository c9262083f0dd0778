"""The read-only tap: sees every message of a live link, writes nothing, pcap as specified."""

from __future__ import annotations

import io
import struct
import threading

import pytest

from ivshmem_bus.backends.fake import fake_pair
from ivshmem_bus.bus import VirtioMsgBus
from ivshmem_bus.core import protocol as p
from ivshmem_bus.core.queue import SpscQueue
from ivshmem_bus.errors import QueueCorrupt
from ivshmem_bus.monitor import LINKTYPE_USER0, LinkTap, PcapWriter, QueueTap


def test_tap_sees_in_flight_and_new_slots_and_needs_no_write_access():
    region = bytearray(0x80 + 64 * 4)
    q = SpscQueue(region)
    q.put(b"one")
    tap = QueueTap(bytes(region))  # a read-only snapshot: a write would raise
    assert [s[:3] for s in tap.poll()] == [b"one"]
    live = QueueTap(memoryview(region).toreadonly(), from_tail=False)
    assert live.poll() == []
    q.put(b"two")
    q.put(b"three")
    assert [s[:5] for s in live.poll()] == [b"two\0\0", b"three"]
    assert q.get(3) == b"one"  # the consumer is unaffected by the tap
    assert live.poll() == []


def test_tap_range_checks_head():
    region = bytearray(0x80 + 64 * 4)
    region[0:4] = (9).to_bytes(4, "little")
    with pytest.raises(QueueCorrupt, match="head index 9"):
        QueueTap(memoryview(region).toreadonly(), from_tail=False)


def test_overrun_is_counted_when_the_producer_laps_during_a_copy():
    region = bytearray(0x80 + 64 * 4)  # capacity 4, 3 in flight at most
    q = SpscQueue(region)
    tap = QueueTap(memoryview(region).toreadonly())
    q.put_many([b"a", b"b", b"c"])
    q.get_many()
    orig = tap._load
    calls = []

    def racing_load(word, name):  # between the two head loads, the producer writes 2 more
        calls.append(word)
        if len(calls) == 2:
            q.put_many([b"d", b"e"])
        return orig(word, name)

    tap._load = racing_load
    assert len(tap.poll()) == 3
    assert tap.overruns == 1


def test_link_tap_on_a_live_link_sees_both_directions_and_changes_nothing():
    a, b = fake_pair(shm_size=16384)
    drv = VirtioMsgBus(a, "driver", 2, reset_queues=True)
    dev = VirtioMsgBus(b, "device", 1)
    tap = LinkTap(a.shmem.toreadonly())
    stop = threading.Event()
    t = threading.Thread(
        target=dev.serve,
        args=(lambda m: p.GetDeviceStatusResponse(status=1),),
        kwargs={"stop": stop.is_set},
    )
    t.start()
    seen = []
    try:
        for _ in range(20):
            drv.request(p.GetDeviceStatus(), 5)
            seen.extend(tap.poll())
    finally:
        stop.set()
        t.join(5)
    seen.extend(tap.poll())
    assert [s.direction for s in seen].count(0) == 20
    assert [s.direction for s in seen].count(1) == 20
    assert {type(s.message) for s in seen} == {p.GetDeviceStatus, p.GetDeviceStatusResponse}
    assert drv.stats.sent == dev.stats.received == 20
    line = next(s for s in seen if s.direction == 1).describe()
    assert "device->driver GetDeviceStatusResponse status=1" in line
    tap.release()
    drv.close()
    dev.close()
    a.close()
    b.close()


def test_pcap_file_layout():
    a, b = fake_pair(shm_size=16384)
    drv = VirtioMsgBus(a, "driver", 2, reset_queues=True)
    tap = LinkTap(a.shmem.toreadonly())
    drv.send(p.GetFeatures(0, 2))
    out = io.BytesIO()
    writer = PcapWriter(out)
    seen = tap.poll()
    for s in seen:
        writer.write(s, "qemu-v0")
    data = out.getvalue()
    magic, major, minor, _, _, snaplen, linktype = struct.unpack_from("<IHHiIII", data)
    assert (magic, major, minor, linktype) == (0xA1B2C3D4, 2, 4, LINKTYPE_USER0)
    assert snaplen == 4 + 64
    _, _, incl, orig = struct.unpack_from("<IIII", data, 24)
    assert incl == orig == 4 + 14  # pseudo-header + msg_size 14
    assert data[40:44] == bytes([0, 0, 0, 0])  # driver->device, qemu-v0
    assert data[44:58] == p.encode(p.GetFeatures(0, 2))[:14]
    tap.release()
    drv.close()
    a.close()
    b.close()

"""The virtio-msg transport: the device's answers (QEMU's semantics) and the driver's probe."""

from __future__ import annotations

import os
import time

import pytest

from ivshmem_bus.backends.fake import fake_pair
from ivshmem_bus.bus import VirtioMsgBus, reset_queues_of
from ivshmem_bus.core import protocol as p
from ivshmem_bus.core.virtio import (
    ACKNOWLEDGE,
    DRIVER,
    DRIVER_OK,
    FEATURES_OK,
    feature_names,
    status_names,
)
from ivshmem_bus.demo import served_device
from ivshmem_bus.devices import RngDevice, VirtioMsgDevice
from ivshmem_bus.drivers import VirtioMsgDriver
from ivshmem_bus.errors import BusTimeout


class ConfigDevice(VirtioMsgDevice):
    device_id = 1
    device_features = (1 << 32) | (1 << 5)
    num_queues = 2


# --- Device answers, without a bus ------------------------------------------------------------


def test_rng_device_answers_like_qemus_device():
    dev = RngDevice()
    assert dev.handle(p.DeviceInfo()) == p.DeviceInfoResponse(4, 0x554D4551, 64, 0)
    assert dev.handle(p.GetFeatures(0, 2)) == p.GetFeaturesResponse(0, 2, 1 << 32)
    assert dev.handle(p.GetVqueue(0)) == p.GetVqueueResponse(0, 1024)
    assert dev.handle(p.GetVqueue(1)) == p.GetVqueueResponse(1, 0)  # past the last queue
    assert dev.handle(p.ResetVqueue(0)) is None  # QEMU's device never replies (qemu-v0)
    assert dev.handle(p.EventAvail(0, 5)) is None
    assert dev.events == [p.EventAvail(0, 5)]


def test_spec_v1_device_info_and_empty_responses():
    dev = RngDevice(profile="spec-v1")
    assert dev.handle(p.DeviceInfo()).max_virtqueues == 1
    assert dev.handle(p.SetFeatures(0, 2, 1 << 32)) == p.SetFeaturesResponse()
    assert dev.handle(p.SetVqueue(0, 256, 1, 2, 3)) == p.SetVqueueResponse()
    assert dev.handle(p.ResetVqueue(0)) == p.ResetVqueueResponse()
    assert dev.handle(p.GetFeatures(1, 1)) == p.GetFeaturesResponse(1, 1, 1)  # block 1 = bit 32


def test_features_ok_is_refused_for_features_not_offered():
    dev = RngDevice()
    seen = []
    dev.on_status = lambda old, new: seen.append((old, new))
    dev.handle(p.SetFeatures(0, 2, (1 << 32) | 1))  # bit 0 is not offered
    resp = dev.handle(p.SetDeviceStatus(ACKNOWLEDGE | DRIVER | FEATURES_OK))
    assert resp == p.SetDeviceStatusResponse(ACKNOWLEDGE | DRIVER)
    dev.handle(p.SetFeatures(0, 2, 1 << 32))
    assert dev.handle(p.SetDeviceStatus(ACKNOWLEDGE | DRIVER | FEATURES_OK)).status & FEATURES_OK
    assert dev.handle(p.SetDeviceStatus(0)) == p.SetDeviceStatusResponse(0)
    assert dev.driver_features == 0
    assert seen == [(0, 3), (3, 11), (11, 0)]


def test_config_reads_writes_and_generation():
    dev = ConfigDevice(config=bytes(range(16)))
    assert dev.handle(p.GetConfig(4, 4)) == p.GetConfigResponse(0, 4, 4, bytes([4, 5, 6, 7]))
    assert dev.handle(p.GetConfig(4, 3)) == p.GetConfigResponse(0, 4, 0)  # size 3 invalid
    assert dev.handle(p.GetConfig(14, 4)) == p.GetConfigResponse(0, 14, 0)  # past the end
    assert dev.handle(p.SetConfig(0, 0, 2, b"\xaa\xbb")).generation == 1
    assert dev.config[:2] == b"\xaa\xbb"
    assert dev.handle(p.GetConfig(0, 0)) == p.GetConfigResponse(1, 0, 0)  # generation only


def test_queue_setup_and_reset():
    dev = ConfigDevice()
    dev.handle(p.SetVqueue(1, 256, 0x1000, 0x2000, 0x3000))
    assert dev.handle(p.GetVqueue(1)) == p.GetVqueueResponse(1, 1024, 256, 0x1000, 0x2000, 0x3000)
    dev.handle(p.ResetVqueue(1))
    assert dev.handle(p.GetVqueue(1)) == p.GetVqueueResponse(1, 1024)


def test_names():
    assert feature_names((1 << 32) | (1 << 29) | 1) == ["bit 0", "RING_EVENT_IDX", "VERSION_1"]
    assert status_names(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK) == (
        "ACKNOWLEDGE|DRIVER|DRIVER_OK|FEATURES_OK"
    )
    assert status_names(0) == "0"
    assert status_names(0x10) == "0x10"


# --- End to end: driver and device in two processes over the fake pair --------------------------


@pytest.fixture(params=p.PROFILES)
def link(request):
    """A driver bus in this process, ConfigDevice served from a forked child."""
    profile = request.param
    a, b = fake_pair(shm_size=16384)
    reset_queues_of(a)
    try:
        with served_device(
            b, a.vmid, profile, make=lambda: ConfigDevice(config=bytes(8)), others=(a,)
        ):
            b.close()
            with VirtioMsgBus(a, "driver", 2, profile) as bus:
                yield VirtioMsgDriver(bus, timeout=5)
    finally:
        a.close()
        b.close()


def test_probe_and_initialize_across_processes(link):
    desc = link.probe()
    assert (desc.device_id, desc.device_name, desc.vendor_id) == (1, "network", 0x554D4551)
    assert desc.vendor == "0x554d4551 (QEMU)"
    assert desc.features == (1 << 32) | (1 << 5)
    assert desc.feature_names == ["bit 5", "VERSION_1"]
    assert desc.config_size == 8
    assert [(q.index, q.max_size) for q in desc.queues] == [(0, 1024), (1, 1024)]
    assert link.initialize(wanted=1 << 32) == 1 << 32
    assert link.get_status() == ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    link.write_config(2, b"\x12\x34")
    assert link.read_config(2, 2) == (1, b"\x12\x34")


@pytest.mark.slow
def test_100000_round_trips_none_lost(link):
    bus = link.bus
    t0 = time.monotonic()
    for i in range(100_000):
        status = i & 0x7F
        assert bus.request(p.SetDeviceStatus(status=status), 5).status == status
    elapsed = time.monotonic() - t0
    assert bus.stats.sent == bus.stats.received == 100_000
    assert bus.stats.dropped == 0 and bus.stats.timeouts == 0
    print(f"\n100000 round trips ({bus.profile}) in {elapsed:.2f} s")


def test_a_device_that_stops_answering_gives_a_timeout_not_a_hang():
    a, b = fake_pair(shm_size=16384)
    reset_queues_of(a)
    try:
        with served_device(b, a.vmid, others=(a,)) as proc:
            b.close()
            with VirtioMsgBus(a, "driver", 2) as bus:
                driver = VirtioMsgDriver(bus, timeout=0.3)
                assert driver.get_status() == 0
                os.kill(proc.pid, 9)
                proc.join(5)
                t0 = time.monotonic()
                with pytest.raises(BusTimeout):
                    driver.get_status()
                assert time.monotonic() - t0 < 2
    finally:
        a.close()
        b.close()

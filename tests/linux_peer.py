"""A Linux-like driver side, written from the contract (linux-peer.md), for the tests.

It does what the Linux virtio-msg driver stack was measured to do, quirks included, so the
tests can hold ``ivshmem-bus serve --profile linux-v0`` to it without a Linux guest:

- linux-v0 framing; the device is VMID 0 and is rung on vector 0; any doorbell drains the
  whole queue;
- start-up: GET_DEVICES (offset 0, num 32) dropped unless it echoes offset 0 and num 32; then
  per listed device DEVICE_INFO (num_feature_bits must be 64, device_id 0 = none), status 0,
  1, 3, GET_DEV_FEATURES (0, 2), SET_DRV_FEATURES with the short msg_size (14), status 0x0b and
  a read-back, GET_VQUEUE / SET_VQUEUE per queue (exactly max_size entries, in its own RAM),
  status 0x0f;
- every request waits for its response under one lock;
- keep-alive: the first PING ~50 ms after GET_DEVICES once a device is registered, then every
  second; it answers every PING it receives, responses included (the echo storm a device must
  never start); one ping window with nothing from the device is fatal and permanent
  ("Bus went stale. teardown!");
- the bitmap race: bus messages share one receive buffer, and the probe loop re-reads the
  GET_DEVICES bitmap from it, so a bus message arriving during the probe (a PING response)
  erases the devices after the one being probed.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ivshmem_bus.backends.base import IvshmemDevice
from ivshmem_bus.core import protocol as p
from ivshmem_bus.core.queue import SpscQueue
from ivshmem_bus.core.virtqueue import DriverQueue, VirtqLayout
from ivshmem_bus.core.window import MemoryWindow

PROFILE = "linux-v0"
DEVICE_VMID = 0
VERSION_1 = 1 << 32
STALE = "Bus went stale. teardown!"


class Teardown(Exception):
    """The peer tore the bus down (stale device), or a request got no answer."""


@dataclass
class Probed:
    dev_id: int
    device_id: int
    features: int
    queues: list[DriverQueue] = field(default_factory=list)


class LinuxLikePeer:
    """Driver side of a linux-v0 bus over ``dev`` with its RAM in ``ram``."""

    def __init__(
        self,
        dev: IvshmemDevice,
        ram: MemoryWindow,
        *,
        ping_period: float = 1.0,
        first_ping: float = 0.05,
        request_timeout: float = 2.0,
        racy_bitmap: bool = True,
    ) -> None:
        self.dev = dev
        self.ram = ram
        self.ping_period = ping_period
        self.first_ping = first_ping
        self.request_timeout = request_timeout
        self.racy_bitmap = racy_bitmap
        queues = dev.shmem
        self._tx = SpscQueue(queues[0x0000:0x1000])  # driver -> device
        self._rx = SpscQueue(queues[0x1000:0x2000])  # device -> driver
        self._send_lock = threading.Lock()
        self._request_lock = threading.Lock()  # the stack's one lock over every request
        self._cond = threading.Condition()
        self._responses: deque[p.Message] = deque()
        self._used: dict[tuple[int, int], int] = {}
        self.events: list[p.Message] = []
        self.bus_buf = bytes(64)  # the one receive buffer bus messages share
        self.devices: list[Probed] = []
        self.log: list[str] = []
        self.pings_sent = 0
        self.ping_responses = 0
        self.echoes = 0  # PING responses this side answered (each one an echo storm step)
        self.received = 0
        self.stale = False
        self._heard = time.monotonic()
        self._ping_seq = 0
        self._next_addr = ram.base + 0x10000
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read_loop, name="linux-peer-rx", daemon=True)
        self._pinger: threading.Thread | None = None

    # --- transport ---------------------------------------------------------------------------

    def start(self) -> LinuxLikePeer:
        self._reader.start()
        return self

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._reader.join(5)
        if self._pinger is not None:
            self._pinger.join(5)

    def send(self, msg: p.Message, *, msg_size: int | None = None) -> None:
        raw = bytearray(p.encode(msg, PROFILE))
        if msg_size is not None:  # the stack's under-counted msg_size
            raw[4:6] = msg_size.to_bytes(2, "little")
        with self._send_lock:
            deadline = time.monotonic() + self.request_timeout
            while not self._tx.put(bytes(raw)):
                if time.monotonic() > deadline:
                    raise Teardown("driver queue stayed full")
                time.sleep(0.001)
            self.dev.ring(DEVICE_VMID, 0)

    def request(self, msg: p.Message, *, msg_size: int | None = None) -> p.Message:
        if self.stale:
            raise Teardown(STALE)
        with self._request_lock:
            self.send(msg, msg_size=msg_size)
            deadline = time.monotonic() + self.request_timeout
            with self._cond:
                while True:
                    while self._responses:
                        reply = self._responses.popleft()
                        if p.response_matches(msg, reply, PROFILE):
                            return reply
                    left = deadline - time.monotonic()
                    if left <= 0 or self.stale or self._stop.is_set():
                        raise Teardown(f"no response to {type(msg).__name__}")
                    self._cond.wait(left)

    def _read_loop(self) -> None:
        while not self._stop.is_set():
            self.dev.wait(0.01)
            while True:  # any interrupt: drain the whole queue
                raw = self._rx.get()
                if raw is None:
                    break
                self._on_message(bytes(raw))

    def _on_message(self, raw: bytes) -> None:
        self._heard = time.monotonic()  # the watchdog counts every message from the device
        self.received += 1
        try:
            msg = p.decode(raw, PROFILE)
        except p.ProtocolError as exc:
            self.log.append(f"malformed: {exc}")
            return
        if msg.BUS:
            self.bus_buf = raw  # one shared buffer: the next bus message overwrites it
            if isinstance(msg, p.BusPingResponse):
                self.ping_responses += 1
                self.echoes += 1  # the stack answers responses too
                self.send(p.BusPingResponse(data=msg.data))
                return
            if isinstance(msg, p.BusPing):
                self.send(p.BusPingResponse(data=msg.data))
                return
        with self._cond:
            if p.is_response(msg):
                self._responses.append(msg)
            elif isinstance(msg, p.EventUsed):
                key = (msg.dev_num, msg.index)
                self._used[key] = self._used.get(key, 0) + 1
                self.events.append(msg)
            else:
                self.events.append(msg)
            self._cond.notify_all()

    # --- keep-alive ----------------------------------------------------------------------------

    def _ping_loop(self) -> None:
        tick = self.first_ping
        window_start = time.monotonic()
        while not self._stop.wait(tick):
            tick = self.ping_period
            if not self.devices:  # PINGs start once a device is registered
                continue
            if self._heard < window_start:  # a whole window with nothing from the device
                self.stale = True
                self.log.append(STALE)
                with self._cond:
                    self._cond.notify_all()
                return
            window_start = time.monotonic()
            self._ping_seq += 1
            self.pings_sent += 1
            self.send(p.BusPing(data=self._ping_seq))

    # --- start-up --------------------------------------------------------------------------------

    def _bit(self, reply: p.BusGetDevicesResponse, i: int) -> bool:
        if self.racy_bitmap:  # re-read from the shared buffer: payload offset 6 = slot 12
            return bool(self.bus_buf[12 + i // 8] >> (i % 8) & 1)
        return bool(reply.bitmap[i // 8] >> (i % 8) & 1)

    def probe_all(self) -> list[Probed]:
        """The whole start-up; returns the devices that reached DRIVER_OK."""
        reply = self.request(p.BusGetDevices(offset=0, num=32))
        assert isinstance(reply, p.BusGetDevicesResponse)
        if (reply.offset, reply.num) != (0, 32):
            raise Teardown("GET_DEVICES response dropped: offset/num not echoed")
        self._pinger = threading.Thread(target=self._ping_loop, name="linux-peer-ping", daemon=True)
        self._pinger.start()
        for i in range(32):
            if self._bit(reply, i):
                probed = self.probe(i)
                if probed is not None:
                    self.devices.append(probed)
        return self.devices

    def probe(self, dev_id: int) -> Probed | None:
        info = self.request(p.DeviceInfo(dev_num=dev_id))
        assert isinstance(info, p.DeviceInfoResponse)
        if info.device_id == 0:
            return None
        if info.num_feature_bits != 64:
            self.log.append(f"dev {dev_id}: num_feature_bits {info.num_feature_bits}, not 64")
            return None
        for status in (0, 1, 3):
            self.request(p.SetDeviceStatus(status=status, dev_num=dev_id))
            self.request(p.GetDeviceStatus(dev_num=dev_id))
        offered = self.request(p.GetFeatures(index=0, num=2, dev_num=dev_id))
        assert isinstance(offered, p.GetFeaturesResponse)
        features = offered.features & VERSION_1
        self.request(p.SetFeatures(index=0, num=2, features=features, dev_num=dev_id), msg_size=14)
        self.request(p.SetDeviceStatus(status=0x0B, dev_num=dev_id))
        back = self.request(p.GetDeviceStatus(dev_num=dev_id))
        assert isinstance(back, p.GetDeviceStatusResponse)
        if not back.status & 0x08:
            self.log.append(f"dev {dev_id}: FEATURES_OK not kept")
            return None
        probed = Probed(dev_id, info.device_id, features)
        for index in range(info.max_virtqueues or 8):
            vq = self.request(p.GetVqueue(index=index, dev_num=dev_id))
            assert isinstance(vq, p.GetVqueueResponse)
            if vq.max_size == 0:
                break
            assert vq.max_size & (vq.max_size - 1) == 0, "max_size must be a power of two"
            size = VirtqLayout.packed_at(0, vq.max_size).total_bytes
            layout = VirtqLayout.packed_at(self._alloc(size), vq.max_size)
            queue = DriverQueue(self.ram, index, layout)
            self.request(
                p.SetVqueue(index, vq.max_size, layout.desc_addr, layout.avail_addr,
                            layout.used_addr, dev_num=dev_id)
            )  # fmt: skip
            probed.queues.append(queue)
        self.request(p.SetDeviceStatus(status=0x0F, dev_num=dev_id))
        return probed

    def _alloc(self, size: int, align: int = 4096) -> int:
        addr = (self._next_addr + align - 1) & ~(align - 1)
        self._next_addr = addr + size
        if self._next_addr > self.ram.base + self.ram.size:
            raise MemoryError("peer RAM exhausted")
        return addr

    # --- data ------------------------------------------------------------------------------------

    def kick(self, dev_id: int, index: int) -> None:
        self.send(p.EventAvail(index=index, next_offset_wrap=0, dev_num=dev_id))

    def wait_used(self, dev_id: int, index: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._used.get((dev_id, index)):
                left = deadline - time.monotonic()
                if left <= 0 or self.stale:
                    raise Teardown(f"no EVENT_USED from dev {dev_id} queue {index}")
                self._cond.wait(left)
            self._used[(dev_id, index)] -= 1

    def read_entropy(self, dev_id: int, n: int, *, chunk: int = 64) -> bytes:
        """What virtio-rng does: one ``chunk``-byte buffer at a time, one EVENT_AVAIL each."""
        dev = next(d for d in self.devices if d.dev_id == dev_id)
        queue = dev.queues[0]
        buf = self._alloc(chunk, 64)
        out = bytearray()
        while len(out) < n:
            queue.add([], [(buf, chunk)], token=buf)
            if queue.publish():
                self.kick(dev_id, 0)
            reaped: list[tuple[object, int]] = []
            deadline = time.monotonic() + self.request_timeout
            while not reaped:
                if time.monotonic() > deadline:
                    raise Teardown("rng buffer never used")
                try:
                    self.wait_used(dev_id, 0, 0.05)
                except Teardown:
                    if self.stale:
                        raise
                reaped = queue.reap()
            for _token, used in reaped:
                out += self.ram.view(buf, used)
        return bytes(out[:n])

    def power_off(self) -> None:
        for d in self.devices:
            self.request(p.SetDeviceStatus(status=0, dev_num=d.dev_id))

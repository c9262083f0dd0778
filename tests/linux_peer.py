"""A Linux-like driver side, written from the contract (linux-peer.md), for the tests.

It does what the Linux virtio-msg driver stack was measured to do, quirks included, so the
tests can hold ``ivshmem-bus serve --profile linux-v0`` to it without a Linux guest:

- linux-v0 framing; the device is VMID 0 and is rung on vector 0; any doorbell drains the
  whole queue;
- start-up: GET_DEVICES (offset 0, num 32) dropped unless it echoes offset 0 and num 32; then
  per listed device DEVICE_INFO (num_feature_bits must be 64, device_id 0 = none), status 0,
  then 1 and 3 (each a GET then a SET, as the virtio core adds a bit), GET_DEV_FEATURES (0, 2),
  SET_DRV_FEATURES with the short msg_size (14), status 0x0b and a read-back, GET_VQUEUE /
  SET_VQUEUE per queue (exactly max_size entries, in its own RAM), status 0x0f;
- every request waits for its response under one lock;
- keep-alive: a ping timer armed when GET_DEVICES is sent fires ~50 ms later, then every
  second; it sends a PING only once a device is registered (its probe began), so a GET_DEVICES
  answered later than ~50 ms makes the first PING come ~1 s later; the peer answers every
  PING it receives, responses included (the echo storm a device must never start); a ping
  window with nothing from the device (any message counts) is fatal and permanent
  ("Bus went stale. teardown!": every device removed, no request answered again);
- EVENT_DEVICE is handled only for removal (dev_state 2): there is no hot-add;
- the bitmap race: bus messages share one receive buffer, and the probe loop re-reads the
  GET_DEVICES bitmap from it, so a bus message arriving during the probe (a PING response)
  erases the devices after the one being probed.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import cast

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
    offered: int = 0  # what GET_DEV_FEATURES (index 0, num 2) said


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
        self._queues: list[DriverQueue] = []
        self._buffers: dict[tuple[int, str], int] = {}  # (dev_id, use) -> a reused buffer
        self.log: list[str] = []
        self.pings_sent = 0
        self.ping_responses = 0
        self.echoes = 0  # PING responses this side answered (each one an echo storm step)
        self.received = 0
        self.stale = False
        self.registered = False  # a device's probe began: the ping timer may send
        self.ping_rtts: list[float] = []  # seconds from each PING to its response
        self._ping_sent: dict[int, float] = {}
        self.removed: list[int] = []  # dev_ids EVENT_DEVICE removed
        self.bus_messages: list[p.Message] = []  # every bus message received, in order
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
        """Stop the threads (the module is unloaded); the queues stay as they are."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._reader.join(5)
        if self._pinger is not None:
            self._pinger.join(5)
        with self._send_lock:  # the queues' views of BAR2 go (the device can then close)
            self._tx.release()
            self._rx.release()
        for q in self._queues:  # and the virtqueues' views of the RAM, removed devices' too
            q.release()

    def release_ram(self) -> None:
        """After ``close``: let go of the RAM window too (its buffer can then close)."""
        self.ram.release()  # type: ignore[attr-defined]

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
            self.bus_messages.append(msg)
            if isinstance(msg, p.BusPingResponse):
                self.ping_responses += 1
                sent = self._ping_sent.pop(msg.data, None)
                if sent is not None:
                    self.ping_rtts.append(self._heard - sent)
                self.echoes += 1  # the stack answers responses too
                self._send_quietly(p.BusPingResponse(data=msg.data))
                return
            if isinstance(msg, p.BusPing):
                self._send_quietly(p.BusPingResponse(data=msg.data))
                return
            if isinstance(msg, p.BusEventDevice):
                if msg.dev_state == 2:  # removal: the device goes; anything else is ignored
                    self.removed.append(msg.target_dev_num)
                    self.devices = [d for d in self.devices if d.dev_id != msg.target_dev_num]
                    self.log.append(f"dev {msg.target_dev_num} removed")
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

    def _send_quietly(self, msg: p.Message) -> None:
        try:
            self.send(msg)
        except Teardown as exc:
            self.log.append(f"not sent: {exc}")

    def _ping_loop(self) -> None:
        tick = self.first_ping
        window_start: float | None = None  # the ping window runs from the first PING
        while not self._stop.wait(tick):
            tick = self.ping_period
            if not self.registered:  # PINGs start once a device is registered
                continue
            # a whole window with nothing from the device: nothing read, and nothing waiting
            # in its queue (a reader this side did not run in time is not a silent device)
            if window_start is not None and self._heard < window_start and not len(self._rx):
                self.teardown()
                return
            window_start = time.monotonic()
            self._ping_seq += 1
            self.pings_sent += 1
            self._ping_sent[self._ping_seq] = time.monotonic()
            self._send_quietly(p.BusPing(data=self._ping_seq))

    def teardown(self) -> None:
        """What the stack does on a stale bus: every device removed, for good."""
        self.stale = True
        self.log.append(STALE)
        self.devices = []
        with self._cond:
            self._cond.notify_all()

    # --- start-up --------------------------------------------------------------------------------

    def _bit(self, reply: p.BusGetDevicesResponse, i: int) -> bool:
        if self.racy_bitmap:  # re-read from the shared buffer: payload offset 6 = slot 12
            return bool(self.bus_buf[12 + i // 8] >> (i % 8) & 1)
        return bool(reply.bitmap[i // 8] >> (i % 8) & 1)

    def probe_all(self) -> list[Probed]:
        """The whole start-up; returns the devices that reached DRIVER_OK."""
        if self._pinger is None:  # armed when GET_DEVICES goes out
            self._pinger = threading.Thread(
                target=self._ping_loop, name="linux-peer-ping", daemon=True
            )
            self._pinger.start()
        reply = self.request(p.BusGetDevices(offset=0, num=32))
        assert isinstance(reply, p.BusGetDevicesResponse)
        if (reply.offset, reply.num) != (0, 32):
            raise Teardown("GET_DEVICES response dropped: offset/num not echoed")
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
        self.registered = True
        self.request(p.SetDeviceStatus(status=0, dev_num=dev_id))  # reset
        for status in (1, 3):  # the virtio core adds a bit: read the status, write it with it
            self.request(p.GetDeviceStatus(dev_num=dev_id))
            self.request(p.SetDeviceStatus(status=status, dev_num=dev_id))
        offered = self.request(p.GetFeatures(index=0, num=2, dev_num=dev_id))
        assert isinstance(offered, p.GetFeaturesResponse)
        features = offered.features & VERSION_1
        self.request(p.SetFeatures(index=0, num=2, features=features, dev_num=dev_id), msg_size=14)
        self.request(p.GetDeviceStatus(dev_num=dev_id))
        self.request(p.SetDeviceStatus(status=0x0B, dev_num=dev_id))
        back = self.request(p.GetDeviceStatus(dev_num=dev_id))  # the FEATURES_OK check
        assert isinstance(back, p.GetDeviceStatusResponse)
        if not back.status & 0x08:
            self.log.append(f"dev {dev_id}: FEATURES_OK not kept")
            return None
        probed = Probed(dev_id, info.device_id, features, offered=offered.features)
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
            self._queues.append(queue)
        self.request(p.GetDeviceStatus(dev_num=dev_id))
        self.request(p.SetDeviceStatus(status=0x0F, dev_num=dev_id))
        return probed

    def _buffer(self, dev_id: int, use: str, size: int) -> int:
        """A buffer for one use, allocated once (the data of a long run reuses it)."""
        key = (dev_id, use + str(size))
        if key not in self._buffers:
            self._buffers[key] = self._alloc(size, 64)
        return self._buffers[key]

    def _alloc(self, size: int, align: int = 4096) -> int:
        with self._send_lock:  # rng and console users may allocate from two threads
            addr = (self._next_addr + align - 1) & ~(align - 1)
            if addr + size > self.ram.base + self.ram.size:
                raise MemoryError("peer RAM exhausted")
            self._next_addr = addr + size
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
        buf = self._buffer(dev_id, "rng", chunk)
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

    # --- virtio-console, port 0 without MULTIPORT (receiveq 0, transmitq 1) --------------------

    def _device(self, dev_id: int) -> Probed:
        for d in self.devices:
            if d.dev_id == dev_id:
                return d
        raise Teardown(f"dev {dev_id} is not registered")

    def console_open(self, dev_id: int, *, buffers: int = 64, size: int = 64) -> None:
        """What virtio_console does at probe: ``buffers`` receive buffers, one EVENT_AVAIL each."""
        queue = self._device(dev_id).queues[0]
        for _ in range(buffers):
            buf = self._alloc(size, 64)
            queue.add([], [(buf, size)], token=(buf, size))
            queue.publish()
            self.kick(dev_id, 0)

    def console_write(self, dev_id: int, data: bytes) -> None:
        """``echo data > /dev/hvc0``: one readable buffer on transmitq, until it is used."""
        queue = self._device(dev_id).queues[1]
        if len(data) > 4096:
            raise ValueError("one transmit buffer holds at most 4096 bytes")
        buf = self._buffer(dev_id, "tx", 4096)
        self.ram.view(buf, len(data))[:] = data
        queue.add([(buf, len(data))], [], token=buf)
        if queue.publish():
            self.kick(dev_id, 1)
        deadline = time.monotonic() + self.request_timeout
        while not queue.reap():
            if time.monotonic() > deadline or self.stale:
                raise Teardown("transmit buffer never used")
            time.sleep(0.002)

    def console_read(self, dev_id: int, n: int, timeout: float = 5.0) -> bytes:
        """A reader of /dev/hvc0: bytes from used receive buffers (each re-posted)."""
        queue = self._device(dev_id).queues[0]
        out = bytearray()
        deadline = time.monotonic() + timeout
        while len(out) < n:
            reaped = queue.reap()
            for token, used in reaped:
                buf, size = cast(tuple[int, int], token)
                out += self.ram.view(buf, used)
                queue.add([], [(buf, size)], token=token)
            if reaped and queue.publish():
                self.kick(dev_id, 0)
            if not reaped:
                if time.monotonic() > deadline or self.stale:
                    break
                time.sleep(0.002)
        return bytes(out)

"""The device hub against the Linux-like driver side (tests/linux_peer.py), in one process.

The device side is VMID 0 of a fake pair (the Linux driver hard-codes it), the driver VMID 1;
guest B's RAM is one buffer both sides see through their own ``BufferWindow`` at the same
base. The hub serves rng at dev_id 0 and console at dev_id 1 on a thread, as ``serve`` runs
it. Timed assertions are deadline tests only, with the contract's own numbers (a PING
answered within 250 ms, nothing past the driver's 1 s window) and margins a busy 2-core
machine keeps.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ivshmem_bus.backends.fake import FakeDevice, fake_pair
from ivshmem_bus.bus import VirtioMsgBus
from ivshmem_bus.core import protocol as p
from ivshmem_bus.core.virtio import DRIVER_OK
from ivshmem_bus.core.window import BufferWindow
from ivshmem_bus.devices import ConsoleDevice, DeviceHub, RngDevice, VirtioMsgDevice
from ivshmem_bus.devices.hostio import MemoryIO
from ivshmem_bus.devices.hub import SWITCH_INTERVAL
from ivshmem_bus.devices.workers import IDLE_WAIT, DeviceWorker

from .linux_peer import STALE, LinuxLikePeer, Teardown

RAM_BASE = 0x100000
KEEPALIVE = 0.25  # the hub's guarantee for a PING outside the start-up hold
WINDOW = 1.0  # the driver's stale window


def wait_for(cond: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


@dataclass
class Link:
    device_side: FakeDevice
    driver_side: FakeDevice
    ram: bytearray
    source: bytes
    io: MemoryIO
    devices: list[VirtioMsgDevice]
    hub: DeviceHub
    bus: VirtioMsgBus
    peer: LinuxLikePeer
    thread: threading.Thread | None = None
    stop: threading.Event | None = None

    def window(self) -> BufferWindow:
        return BufferWindow(self.ram, RAM_BASE, name="guest B's RAM")

    def serve(self, **kwargs: object) -> None:
        """Run the hub on its thread (the bus thread)."""
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=self.hub.serve, args=(self.bus, self.stop.is_set), kwargs=kwargs, daemon=True
        )
        self.thread.start()

    def halt(self) -> None:
        """Stop the hub (what SIGINT does to serve) and close the bus."""
        if self.thread is not None and self.stop is not None:
            self.stop.set()
            self.thread.join(10)
            assert not self.thread.is_alive()
            self.thread = None
        if not self.bus.closed:
            self.bus.close()


def slowed(device: VirtioMsgDevice, delay: float) -> VirtioMsgDevice:
    """Every response of ``device`` ``delay`` late (the contract's stressed device)."""
    handle = device.handle

    def slow(msg: p.Message) -> p.Message | None:
        time.sleep(delay)
        return handle(msg)

    device.handle = slow  # type: ignore[method-assign]
    return device


@pytest.fixture
def make_link(tmp_path: Path) -> Iterator[Callable[..., Link]]:
    made: list[Link] = []

    def make(
        *, hold_pings: bool = True, delay: float = 0.0, ping_period: float = 1.0,
        devices: list[VirtioMsgDevice] | None = None, serve: bool = True,
    ) -> Link:  # fmt: skip
        a, b = fake_pair(shm_size=1 << 20, vmids=(0, 1))
        ram = bytearray(4 << 20)
        source = bytes(range(256)) * 64
        (tmp_path / "source").write_bytes(source)
        io = MemoryIO()
        window = BufferWindow(ram, RAM_BASE, name="guest B's RAM (device)")
        if devices is None:
            devices = [
                RngDevice("linux-v0", source=tmp_path / "source", window=window),
                ConsoleDevice(io, "linux-v0", window=window),
            ]
        for d in devices:
            slowed(d, delay) if delay else None
        hub = DeviceHub(devices, hold_pings=hold_pings)
        bus = VirtioMsgBus(a, "device", 1, "linux-v0")
        peer = LinuxLikePeer(b, BufferWindow(ram, RAM_BASE), ping_period=ping_period)
        link = Link(a, b, ram, source, io, devices, hub, bus, peer)
        made.append(link)
        if serve:
            link.serve()
        peer.start()
        return link

    yield make
    for link in made:
        link.peer.close()
        link.halt()
        for d in link.devices:
            d.close()
        link.io.close()
        link.device_side.close()
        link.driver_side.close()


# --- Start-up, queues and data -----------------------------------------------------------------


def test_whole_startup_then_entropy_and_console_both_ways(make_link):
    link = make_link()
    peer = link.peer
    devices = peer.probe_all()
    assert [(d.dev_id, d.device_id) for d in devices] == [(0, 4), (1, 3)]
    rng, console = link.devices
    assert rng.status == console.status == 0x0F  # ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK
    for d in devices:  # VERSION_1 offered, ACCESS_PLATFORM (bit 33) not
        assert d.offered >> 32 & 0b11 == 0b01
    # GET_VQUEUE's max_size was a power of two and the driver allocated exactly that many
    assert [q.layout.size for d in devices for q in d.queues] == [1024, 1024, 1024]
    # SET_DRV_FEATURES went out with msg_size 14: the words past it were read all the same
    assert rng.driver_features == console.driver_features == 1 << 32
    assert peer.read_entropy(0, 1000) == link.source[:1000]  # 64-byte buffers, in order
    peer.console_open(1)  # 64 receive buffers, one EVENT_AVAIL each
    peer.console_write(1, b"echo x > /dev/hvc0\n")
    wait_for(lambda: console.received == 19)
    assert link.io.take() == b"echo x > /dev/hvc0\n"
    assert link.io.feed(b"login: ") == 7
    assert peer.console_read(1, 7) == b"login: "
    assert link.hub.stats.unknown_dev == 0 and peer.log == []


def test_messages_queued_before_the_device_starts_are_answered_when_it_starts(make_link):
    link = make_link(serve=False)
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(link.peer.probe_all()), daemon=True)
    t.start()  # GET_DEVICES waits in the driver queue: nobody serves yet
    time.sleep(0.3)
    assert got == [] and link.peer.received == 0
    link.serve()
    t.join(10)
    assert [d.dev_id for d in got[0]] == [0, 1]  # type: ignore[attr-defined]
    # GET_DEVICES was answered later than ~50 ms: the first PING comes a second later
    assert link.peer.pings_sent == 0
    wait_for(lambda: link.peer.ping_responses == 1, 2.0)


def test_both_devices_work_at_the_same_time(make_link):
    link = make_link()
    peer = link.peer
    peer.probe_all()
    peer.console_open(1)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(peer.read_entropy(0, 4096)))
    reader.start()
    host = b""
    for i in range(20):
        peer.console_write(1, b"line %02d\n" % i)
        host += link.io.take()  # a reader on the host side (the device holds back otherwise)
    reader.join(10)
    assert got == [link.source[:4096]]
    wait_for(lambda: link.devices[1].received == 160)
    assert host + link.io.take() == b"".join(b"line %02d\n" % i for i in range(20))


@pytest.mark.parametrize("layout", ["console,rng", "rng at 1 alone"])
def test_either_order_and_a_single_device_at_dev_id_1(make_link, tmp_path, layout):
    io = MemoryIO()
    if layout == "console,rng":
        devices = {0: ConsoleDevice(io, "linux-v0"), 1: RngDevice("linux-v0")}
    else:
        devices = {1: RngDevice("linux-v0")}
    link = make_link(serve=False)
    link.hub = DeviceHub(devices)
    for d in devices.values():
        d.window = link.window()
    link.devices += list(devices.values())
    link.serve()
    got = link.peer.probe_all()
    want = [(0, 3), (1, 4)] if layout == "console,rng" else [(1, 4)]
    assert [(d.dev_id, d.device_id) for d in got] == want
    assert len(link.peer.read_entropy(1, 256)) == 256
    io.close()


def test_set_config_with_the_short_msg_size_and_reset_vqueue(make_link):
    link = make_link()
    peer = link.peer
    peer.probe_all()
    console = link.devices[1]
    # the stack's SET_CONFIG: msg_size 18 covers generation/offset/size, not the bytes
    set_cols = p.SetConfig(console.generation, 0, 2, b"\x84\x00", dev_num=1)
    reply = peer.request(set_cols, msg_size=18)
    assert isinstance(reply, p.SetConfigResponse) and reply.data == b"\x84\x00"
    assert bytes(console.config[:2]) == b"\x84\x00"  # cols 132
    got = peer.request(p.GetConfig(offset=0, size=2, dev_num=1))
    assert got.data == b"\x84\x00"
    # RESET_VQUEUE waits for its response too (the index echoed); the queue is gone after
    assert peer.request(p.ResetVqueue(index=1, dev_num=1)) == p.ResetVqueueResponse(1, dev_num=1)
    assert console.queues[1].queue is None
    assert peer.request(p.GetVqueue(index=1, dev_num=1)).size == 0


def test_hostile_queue_addresses_are_refused_and_the_bus_goes_on(make_link):
    link = make_link()
    peer = link.peer
    peer.probe_all()
    far = RAM_BASE + len(link.ram)  # just past guest B's RAM
    reply = peer.request(p.SetVqueue(0, 256, far, far + 4096, far + 8192, dev_num=0))
    assert isinstance(reply, p.SetVqueueResponse)
    assert peer.request(p.GetVqueue(index=0, dev_num=0)).size == 0  # refused: left unset
    assert link.devices[0].refused == 1
    assert peer.request(p.GetDeviceStatus(dev_num=1)).status == 0x0F


def test_power_off_drops_the_queues_then_a_fresh_startup_works(make_link):
    link = make_link()
    peer = link.peer
    peer.probe_all()
    first = peer.read_entropy(0, 128)
    peer.power_off()  # SET_DEVICE_STATUS 0 to every device: a reset
    for d in link.devices:
        assert d.status == 0
        assert all(vq.queue is None and vq.size == 0 for vq in d.queues.values())
    peer.devices = []
    assert [d.dev_id for d in peer.probe_all()] == [0, 1]  # GET_DEVICES and all again
    assert first + peer.read_entropy(0, 128) == link.source[:256]


# --- The bus messages --------------------------------------------------------------------------


def test_get_devices_response_bytes_from_the_contract_table():
    hub = DeviceHub({0: RngDevice("linux-v0"), 1: RngDevice("linux-v0")})
    raw = p.encode(hub.get_devices(p.BusGetDevices(offset=0, num=32)), "linux-v0")
    header = bytes([0x03, 0x02, 0, 0, 16, 0])  # bus response, GET_DEVICES, dev_id 0, 6+10
    payload = bytes([0, 0, 32, 0, 0, 0]) + bytes([0b11, 0, 0, 0])  # offset, num, next, bits
    assert raw == header + payload + bytes(64 - 16)
    far = DeviceHub({0: RngDevice("linux-v0"), 20: RngDevice("linux-v0")})
    assert far.get_devices(p.BusGetDevices(0, 16)) == p.BusGetDevicesResponse(
        0, 16, 16, b"\x01\x00"
    )  # dev_id 20 lies past the window: next_offset says where to look
    assert far.get_devices(p.BusGetDevices(16, 16)) == p.BusGetDevicesResponse(
        16, 16, 0, b"\x10\x00"
    )  # bit 4 = dev_id 16 + 4


def test_ping_answered_and_ping_responses_never_answered(make_link):
    link = make_link(ping_period=0.3)
    peer = link.peer
    peer.probe_all()
    peer.send(p.BusPingResponse(data=0xC0FFEE))  # an unsolicited PING response
    time.sleep(1.2)
    assert not [m for m in peer.bus_messages if getattr(m, "data", None) == 0xC0FFEE]
    # every PING answered once; the peer echoed each answer and no echo came back
    assert peer.pings_sent >= 3
    wait_for(lambda: peer.ping_responses == peer.pings_sent, 1.0)
    assert peer.echoes == peer.ping_responses
    assert link.bus.stats.stray_responses >= peer.echoes + 1  # dropped by the bus, unanswered
    assert max(peer.ping_rtts) < KEEPALIVE


def test_unknown_dev_id_is_dropped_and_counted(make_link):
    link = make_link()
    peer = link.peer
    peer.probe_all()
    peer.send(p.GetDeviceStatus(dev_num=7))
    peer.send(p.EventAvail(index=0, next_offset_wrap=0, dev_num=9))
    wait_for(lambda: link.hub.stats.unknown_dev == 2)
    reply = peer.request(p.GetDeviceStatus(dev_num=0))  # the bus goes on
    assert reply == p.GetDeviceStatusResponse(0x0F)
    assert not [m for m in peer.events if m.dev_num in (7, 9)]


def test_event_device_when_a_device_is_added_or_removed_while_running(make_link):
    link = make_link()
    peer = link.peer
    peer.probe_all()
    extra = RngDevice("linux-v0", window=link.window())
    link.hub.add(2, extra)
    wait_for(lambda: p.BusEventDevice(target_dev_num=2, dev_state=1) in peer.bus_messages)
    assert [d.dev_id for d in peer.devices] == [0, 1]  # no hot-add in the driver
    assert peer.request(p.DeviceInfo(dev_num=2)).device_id == 4  # routed to it all the same
    link.hub.remove(1).close()
    wait_for(lambda: peer.removed == [1])
    assert [d.dev_id for d in peer.devices] == [0]
    link.halt()  # serve ends: the rest are announced removed
    wait_for(lambda: peer.removed == [1, 0, 2])
    extra.close()


# --- The bitmap race and the start-up hold -------------------------------------------------------

SLOW = 0.008  # per response: the contract's 4 ms stress, doubled for a busy machine's timers


@pytest.mark.parametrize("attempt", range(3))
def test_bitmap_race_loses_the_second_device_without_the_hold(make_link, attempt):
    link = make_link(hold_pings=False, delay=SLOW)
    devices = link.peer.probe_all()
    # the first PING (~50 ms after GET_DEVICES) was answered at once, during dev 0's probe,
    # and its response overwrote the bitmap the driver re-reads: dev 1 is never probed
    assert [d.dev_id for d in devices] == [0]
    assert link.devices[1].status == 0
    assert link.hub.stats.pings_held == 0 and link.peer.ping_responses >= 1


@pytest.mark.parametrize("attempt", range(3))
def test_the_hold_keeps_both_devices_under_the_same_stress(make_link, attempt):
    link = make_link(delay=SLOW)
    devices = link.peer.probe_all()
    assert [d.dev_id for d in devices] == [0, 1]
    assert link.hub.stats.pings_held == 1  # the first PING waited for both DRIVER_OKs
    wait_for(lambda: link.peer.ping_responses == 1)
    assert link.peer.ping_rtts[0] < WINDOW


def test_the_hold_ends_in_time_when_a_listed_device_never_reaches_driver_ok(make_link, caplog):
    class Narrow(RngDevice):
        num_feature_bits = 32  # the driver fails the probe of such a device

    caplog.set_level(logging.INFO, logger="ivshmem_bus.devices.hub")
    link = make_link(devices=[RngDevice("linux-v0"), Narrow("linux-v0")], delay=SLOW)
    assert [d.dev_id for d in link.peer.probe_all()] == [0]
    wait_for(lambda: link.peer.ping_responses == 1, 2.0)
    assert link.hub.stats.pings_held == 1
    assert link.peer.ping_rtts[0] < WINDOW  # held, but not past the driver's window
    assert "dev_id(s) [1] not at DRIVER_OK after 0.7 s" in caplog.text
    time.sleep(1.2)
    assert not link.peer.stale


# --- Keep-alive ---------------------------------------------------------------------------------


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:  # pure Python: holds the GIL but for CPython's switches
        pass


@pytest.mark.parametrize("stall", [time.sleep, _spin], ids=["sleeps", "computes"])
def test_pings_answered_within_250_ms_while_a_handler_takes_2_s(make_link, caplog, stall):
    link = make_link(ping_period=0.2)
    peer = link.peer
    peer.probe_all()
    rng = link.devices[0]
    fill = rng.handlers[0]

    def slow_fill(chain):  # a slow --source (one read takes 2 s), or a long computation
        stall(2.0)
        return fill(chain)

    rng.handlers[0] = slow_fill
    caplog.set_level(logging.WARNING, logger="ivshmem_bus.devices.hub")
    before = len(peer.ping_rtts)
    peer.request_timeout = 10.0  # the driver waits (up to 100 s) for the slow buffer
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(peer.read_entropy(0, 64)), daemon=True)
    t0 = time.monotonic()
    reader.start()
    time.sleep(0.3)
    # the other device is answered at once meanwhile (its own worker)
    t = time.monotonic()
    assert peer.request(p.GetDeviceStatus(dev_num=1)).status == 0x0F
    assert time.monotonic() - t < KEEPALIVE
    reader.join(15)
    assert got == [link.source[:64]]
    assert time.monotonic() - t0 >= 2.0  # the handler really took its 2 s
    during = peer.ping_rtts[before:]
    assert len(during) >= 6  # a PING every 0.2 s
    assert max(during) < KEEPALIVE
    assert not peer.stale
    assert "dev_id 0 (RngDevice) has been inside one call for" in caplog.text


def test_a_held_up_bus_thread_says_so_in_the_log(make_link, caplog):
    link = make_link(serve=False)

    def stall(msg: p.Message) -> None:
        if isinstance(msg, p.BusPing):
            time.sleep(0.4)  # what a stopped process or a long GIL hold would do

    link.serve(on_message=stall)
    caplog.set_level(logging.WARNING, logger="ivshmem_bus.devices.hub")
    link.peer.probe_all()
    wait_for(lambda: link.hub.stats.late_pings == 1, 3.0)
    assert "answered 4" in caplog.text and "tears the bus down after 1 s" in caplog.text
    assert link.hub.stats.stalls >= 1


# --- The device side going away while the driver keeps running -----------------------------------


def test_device_killed_the_driver_tears_the_bus_down_for_good(make_link):
    link = make_link()
    link.hub.announce_removal = False  # a killed process says nothing
    peer = link.peer
    peer.probe_all()
    link.halt()
    wait_for(lambda: peer.stale, 2 * WINDOW + 0.5)
    assert STALE in peer.log and peer.devices == []
    with pytest.raises(Teardown):
        peer.request(p.GetDeviceStatus(dev_num=0))


def test_device_restart_while_the_driver_keeps_running(make_link, tmp_path):
    link = make_link()
    peer = link.peer
    peer.probe_all()
    link.halt()  # serve stops: every device announced removed
    wait_for(lambda: peer.removed == [0, 1])
    assert peer.devices == []
    # serve comes back on the same ivshmem device (VMID 0), without zeroing the queues
    window = link.window()
    again = [
        RngDevice("linux-v0", source=tmp_path / "source", window=window),
        ConsoleDevice(link.io, "linux-v0", window=window),
    ]
    link.devices += again
    link.hub = DeviceHub(again)
    link.bus = VirtioMsgBus(link.device_side, "device", 1, "linux-v0")
    link.serve()
    time.sleep(1.5)
    assert not peer.stale and peer.devices == []  # pings answered again; no hot-add
    # a reloaded driver (a new module instance on the same function) starts from scratch;
    # its GET_DEVICES is queued before the device side looks
    peer.close()
    fresh = LinuxLikePeer(link.driver_side, BufferWindow(link.ram, RAM_BASE)).start()
    link.peer = fresh
    assert [d.dev_id for d in fresh.probe_all()] == [0, 1]
    assert fresh.read_entropy(0, 64) == link.source[:64]
    assert again[0].status & DRIVER_OK


# --- GET_DEVICES for any window the driver asks about ---------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    offset=st.integers(0, 0xFFFF),
    num=st.integers(0, 0xFFFF),
    dev_ids=st.sets(st.integers(0, 31), max_size=8),  # what a hub serves (MAX_DEVICES)
)
def test_get_devices_echoes_the_window_and_sets_exactly_the_served_bits(offset, num, dev_ids):
    hub = DeviceHub({d: RngDevice("linux-v0") for d in dev_ids})
    reply = hub.get_devices(p.BusGetDevices(offset=offset, num=num))
    assert (reply.offset, reply.num) == (offset, min(num, 416))  # 58 - 6 payload bytes
    bits = {reply.offset + i for i in range(reply.num) if reply.bitmap[i // 8] >> (i % 8) & 1}
    assert bits == {d for d in dev_ids if offset <= d < offset + reply.num}
    assert all(b <= 31 for b in bits)  # never a bit past dev_id 31, whatever the window
    raw = p.encode(reply, "linux-v0")  # always fits the 64-byte slot
    assert len(raw) == 64 and p.decode(raw, "linux-v0") == reply
    beyond = any(d >= offset + reply.num for d in dev_ids)
    assert reply.next_offset == (min(offset + reply.num, 0xFFFF) if beyond else 0)


# --- Answered on the bus thread, and the GIL switch interval -------------------------------------


class _Sent:
    """A sender that keeps what it is given (the worker's thread is not started)."""

    def __init__(self) -> None:
        self.sent: list[p.Message] = []

    def send(self, msg: p.Message, timeout: float = 1.0) -> None:
        self.sent.append(msg)

    def try_send(self, msg: p.Message) -> bool:
        self.sent.append(msg)
        return True


def test_try_inline_answers_only_bounded_reads_of_an_idle_worker():
    rng = RngDevice("linux-v0")
    sent = _Sent()
    worker = DeviceWorker(3, rng, sent)  # type: ignore[arg-type]
    read = p.GetDeviceStatus(dev_num=3)
    assert worker.try_inline(read)  # idle: answered here, with its dev_id
    assert sent.sent == [p.GetDeviceStatusResponse(0, dev_num=3)]
    for msg in (  # callbacks, queue binding, queue work: always the worker's
        p.SetDeviceStatus(status=1, dev_num=3),
        p.SetVqueue(0, 256, 0x2000, 0x3000, 0x4000, dev_num=3),
        p.SetConfig(0, 0, 0, b"", dev_num=3),
        p.ResetVqueue(index=0, dev_num=3),
        p.EventAvail(index=0, next_offset_wrap=0, dev_num=3),
    ):
        assert not worker.try_inline(msg), msg
    with worker.device_lock:  # the worker is inside the device: never waited for
        assert not worker.try_inline(read)
    worker.put(p.EventAvail(index=0, next_offset_wrap=0, dev_num=3))
    assert not worker.try_inline(read)  # an earlier message is unanswered: no overtaking
    assert len(sent.sent) == 1 and worker.inline == 1
    slow = slowed(RngDevice("linux-v0"), 0.0)  # handle patched on the instance

    class OwnStatus(RngDevice):
        def _get_status(self, msg: p.GetDeviceStatus) -> p.Message:
            return p.GetDeviceStatusResponse(0x40)

    for device in (slow, OwnStatus("linux-v0")):
        assert not DeviceWorker(0, device, sent).try_inline(read)  # type: ignore[arg-type]


def test_reads_skip_the_hop_and_the_other_requests_take_it(make_link):
    link = make_link()
    peer = link.peer
    peer.probe_all()
    worker = link.hub._workers[0]
    assert worker.inline > 0  # the probe's reads
    before, handled = worker.inline, worker.handled
    assert peer.request(p.GetDeviceStatus(dev_num=0)).status == 0x0F
    assert peer.request(p.GetConfig(offset=0, size=0, dev_num=0)).size == 0
    assert peer.request(p.SetDeviceStatus(status=0x0F, dev_num=0)).status == 0x0F
    assert (worker.inline, worker.handled) == (before + 2, handled + 3)
    with worker.device_lock:  # the worker busy: the read waits for it, a PING does not
        got: list[p.Message] = []
        t = threading.Thread(target=lambda: got.append(peer.request(p.GetDeviceStatus())))
        t.start()
        peer.send(p.BusPing(data=0x51))
        wait_for(lambda: p.BusPingResponse(data=0x51) in peer.bus_messages, 1.0)
        time.sleep(0.05)
        assert got == []
    t.join(5)
    assert got == [p.GetDeviceStatusResponse(0x0F)] and worker.inline == before + 2


def test_serving_lowers_the_gil_switch_interval_and_gives_it_back(make_link):
    before = sys.getswitchinterval()
    link = make_link()
    link.peer.probe_all()
    assert sys.getswitchinterval() == SWITCH_INTERVAL == 5e-4
    link.halt()
    assert sys.getswitchinterval() == before


def test_an_idle_worker_sleeps_unless_its_device_has_work_without_a_doorbell():
    sent = _Sent()
    rng = DeviceWorker(0, RngDevice("linux-v0"), sent, poll_interval=0.01)  # type: ignore[arg-type]
    io = MemoryIO()
    console = DeviceWorker(1, ConsoleDevice(io, "linux-v0"), sent, poll_interval=0.01)  # type: ignore[arg-type]
    assert (rng.idle_wait, console.idle_wait) == (IDLE_WAIT, 0.01) and IDLE_WAIT == 1.0
    io.close()

"""The lines of the Linux contract (linux-peer.md) that docs/linux.md had as "not covered".

- DEVICE_INFO device_id 0 means "no device": the hub refuses to list such a device, and the
  Linux-like peer skips a dev_id whose answer says 0, as the driver does;
- GET_DEVICES with dev_id 32 is accepted by the driver (an off-by-one): the device side never
  relies on it: at most 32 devices, dev_id 0..31, no bitmap bit past 31, and a transport
  message to dev_id 32 is dropped, counted, and the bus goes on;
- the driver binds every 1af4:1110 function of its guest, plain ones included: the README's
  Linux set-up gives guest B no ivshmem-plain device and guest A exactly one, over B's RAM.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shlex
import threading
from pathlib import Path

import pytest

from ivshmem_bus.backends.fake import fake_pair
from ivshmem_bus.bus import VirtioMsgBus
from ivshmem_bus.core import protocol as p
from ivshmem_bus.core.window import BufferWindow
from ivshmem_bus.devices import DeviceHub, RngDevice, VirtioMsgDevice
from ivshmem_bus.devices.hub import MAX_DEVICES
from ivshmem_bus.errors import HubDeviceError, IvshmemBusError

from .linux_peer import LinuxLikePeer
from .test_linux_hub import RAM_BASE, make_link, wait_for  # noqa: F401 (make_link: a fixture)

README = Path(__file__).resolve().parents[1] / "README.md"


class NoDevice(RngDevice):
    device_id = 0  # what DEVICE_INFO says for "no device"


# --- device_id 0 ---------------------------------------------------------------------------------


def test_a_device_whose_device_info_says_0_is_refused_naming_the_dev_id_and_the_fix():
    fix = (
        "has DEVICE_INFO device_id 0, which the Linux driver reads as 'no device' and skips: "
        "set its class's device_id to the virtio device id it implements (rng 4, console 3)"
    )
    with pytest.raises(HubDeviceError) as got:
        DeviceHub([RngDevice("linux-v0"), NoDevice("linux-v0")])
    assert str(got.value) == f"dev_id 1: NoDevice {fix}"
    assert got.value.dev_id == 1
    assert isinstance(got.value, IvshmemBusError) and isinstance(got.value, ValueError)
    with pytest.raises(HubDeviceError, match=r"^dev_id 0: VirtioMsgDevice has DEVICE_INFO"):
        DeviceHub({0: VirtioMsgDevice("linux-v0")})  # the base class's own device_id is 0
    hub = DeviceHub([RngDevice("linux-v0")])
    with pytest.raises(HubDeviceError, match=rf"^dev_id 3: NoDevice {re.escape(fix)}$"):
        hub.add(3, NoDevice("linux-v0"))
    assert list(hub.devices) == [0]  # not listed
    reply = hub.get_devices(p.BusGetDevices(offset=0, num=32))
    assert reply.bitmap == b"\x01\x00\x00\x00"


def test_the_peer_skips_a_dev_id_whose_device_info_says_0():
    """A device side built by hand lists dev_id 0 and 1; dev_id 0's DEVICE_INFO says 0."""
    a, b = fake_pair(shm_size=1 << 20, vmids=(0, 1))
    ram = bytearray(1 << 20)
    rng = RngDevice("linux-v0", window=BufferWindow(ram, RAM_BASE, name="guest B's RAM"))
    bus = VirtioMsgBus(a, "device", 1, "linux-v0")
    peer = LinuxLikePeer(b, BufferWindow(ram, RAM_BASE)).start()
    to_dev0: list[p.Message] = []
    stop = threading.Event()
    no_device = p.DeviceInfoResponse(0, 0x554D4551, 64, 0, 1, dev_num=0)  # device_id 0

    def device_side() -> None:
        while not stop.is_set():
            msg = bus.receive(0.01)
            if isinstance(msg, p.BusGetDevices):  # dev_id 0 and 1, offset/num echoed
                bus.send(p.BusGetDevicesResponse(0, 32, 0, b"\x03\x00\x00\x00"))
            elif isinstance(msg, p.BusPing):
                bus.send(p.BusPingResponse(data=msg.data))
            elif msg is not None and msg.dev_num == 0:
                to_dev0.append(msg)
                if isinstance(msg, p.DeviceInfo):
                    bus.send(no_device)
            elif msg is not None:
                reply = rng.handle(msg)
                if reply is not None:
                    bus.send(dataclasses.replace(reply, dev_num=msg.dev_num))

    t = threading.Thread(target=device_side, daemon=True)
    t.start()
    try:
        raw = p.encode(no_device, "linux-v0")
        assert raw[:10] == bytes([0x01, 0x02, 0, 0, 30, 0, 0, 0, 0, 0])  # device_id u32 0
        got = peer.probe_all()
        assert [(d.dev_id, d.device_id) for d in got] == [(1, 4)]
        assert to_dev0 == [p.DeviceInfo(dev_num=0)]  # nothing after DEVICE_INFO: skipped
        assert rng.status == 0x0F
        assert peer.log == []
    finally:
        stop.set()
        t.join(5)
        peer.close()
        rng.close()
        bus.close()
        a.close()
        b.close()


# --- dev_id 32 -----------------------------------------------------------------------------------


def test_at_most_32_devices_at_dev_id_0_to_31():
    with pytest.raises(HubDeviceError) as got:
        DeviceHub([RngDevice("linux-v0") for _ in range(33)])
    assert str(got.value) == (
        "33 devices: a hub serves at most 32 (dev_id 0..31, what the Linux driver's "
        "GET_DEVICES asks about): serve the rest on another ivshmem device"
    )
    for dev_id in (32, 40, 0xFFFF, -1):
        with pytest.raises(HubDeviceError) as got:
            DeviceHub({dev_id: RngDevice("linux-v0")})
        assert str(got.value) == (
            f"dev_id {dev_id}: a hub serves dev_id 0..31 (the Linux driver's GET_DEVICES asks "
            f"for 0..31 and never looks further): give it a free dev_id below 32"
        )
    full = DeviceHub([RngDevice("linux-v0") for _ in range(MAX_DEVICES)])
    with pytest.raises(HubDeviceError, match=r"^dev_id 32: a hub serves dev_id 0\.\.31"):
        full.add(32, RngDevice("linux-v0"))  # the 33rd
    with pytest.raises(HubDeviceError, match=r"^dev_id 5 is served already: remove it first$"):
        full.add(5, RngDevice("linux-v0"))
    assert full.get_devices(p.BusGetDevices(0, 32)) == p.BusGetDevicesResponse(
        0, 32, 0, b"\xff\xff\xff\xff"
    )
    # a window past 31 has no bit set, however wide it is
    wide = full.get_devices(p.BusGetDevices(0, 0xFFFF))
    assert wide.bitmap[:4] == b"\xff" * 4 and not any(wide.bitmap[4:])
    assert full.get_devices(p.BusGetDevices(32, 32)) == p.BusGetDevicesResponse(32, 32, 0, bytes(4))


def test_messages_to_dev_id_32_are_dropped_counted_and_the_bus_goes_on(
    make_link,  # noqa: F811 (the fixture imported above)
    caplog,
):
    caplog.set_level(logging.WARNING, logger="ivshmem_bus.devices.hub")
    link = make_link()
    peer = link.peer
    assert [d.dev_id for d in peer.probe_all()] == [0, 1]
    events = len(peer.events)
    peer.send(p.DeviceInfo(dev_num=32))  # what the driver's off-by-one would let through
    peer.send(p.GetDeviceStatus(dev_num=32))
    peer.send(p.EventAvail(index=0, next_offset_wrap=0, dev_num=32))
    peer.send(p.GetDeviceStatus(dev_num=31))  # served by nobody either
    wait_for(lambda: link.hub.stats.unknown_dev == 4)
    peer.send(p.BusPing(data=0x3232))  # the bus goes on: PING answered
    wait_for(lambda: p.BusPingResponse(data=0x3232) in peer.bus_messages, 1.0)
    assert peer.request(p.GetDeviceStatus(dev_num=1)) == p.GetDeviceStatusResponse(0x0F, dev_num=1)
    assert peer.events[events:] == [] and not peer.stale
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert dropped == [  # logged once per dev_id
        "DeviceInfo for dev_id 32 dropped: this bus serves dev_id(s) [0, 1]",
        "GetDeviceStatus for dev_id 31 dropped: this bus serves dev_id(s) [0, 1]",
    ]


# --- the README's Linux set-up: plain functions --------------------------------------------


def _linux_qemu_lines() -> list[list[str]]:
    """The qemu-system command lines of the README's "Serving a Linux guest" sh block, each
    with its continuation lines joined, as argv lists."""
    text = README.read_text()
    section = text.split("### Serving a Linux guest\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"^```sh\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    assert block, "the Linux section lost its sh block"
    joined = block.group(1).replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.startswith("qemu-system")]


def _options(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == name]


def _props(value: str) -> tuple[str, dict[str, str]]:
    kind, *rest = value.split(",")
    return kind, dict(kv.split("=", 1) for kv in rest)


def _backends(argv: list[str]) -> dict[str, dict[str, str]]:
    """id -> properties of every ``-object memory-backend-file``."""
    out = {}
    for value in _options(argv, "-object"):
        kind, props = _props(value)
        if kind == "memory-backend-file":
            out[props["id"]] = props
    return out


def test_readme_gives_guest_b_no_plain_device_and_guest_a_the_one_over_b_ram():
    lines = _linux_qemu_lines()
    assert len(lines) == 2, "guest A's line, then guest B's"
    a, b = lines
    assert not [arg for arg in b if "ivshmem-plain" in arg]  # the stack would bind it
    plain = [_props(v)[1] for v in _options(a, "-device") if _props(v)[0] == "ivshmem-plain"]
    assert len(plain) == 1 and set(plain[0]) == {"memdev"}
    a_mem = _backends(a)[plain[0]["memdev"]]
    (b_ram_id,) = [
        v.split("=", 1)[1] for v in _options(b, "-machine") if v.startswith("memory-backend=")
    ]
    b_ram = _backends(b)[b_ram_id]
    assert b_ram["share"] == "on"  # B's RAM reaches the file, so A sees B's writes
    assert a_mem["share"] == "on"  # and A's writes reach B
    assert a_mem["mem-path"] == b_ram["mem-path"] == "/dev/shm/guest-b-ram"
    assert a_mem["size"] == b_ram["size"] == _options(b, "-m")[0] == "1G"
    for argv in (a, b):  # both on the server's doorbell, one function each
        doorbells = [_props(v) for v in _options(argv, "-device") if "ivshmem" in v]
        assert [kind for kind, _ in doorbells].count("ivshmem-doorbell") == 1
        chardev = _props(_options(argv, "-chardev")[0])
        assert chardev == ("socket", {"path": "/tmp/ivshmem.sock", "id": "ivs"})

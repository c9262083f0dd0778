"""Profile linux-v0: golden vectors written from the contract's table (linux-peer.md,
"Framing" and "Messages"), byte by byte, not produced by the codec.

Header: type u8, msg_id u8, dev_id le16, msg_size le16 (header + payload); payload offsets
from byte 6; one message per 64-byte slot, so an encoded message is the whole slot.
"""

from __future__ import annotations

import pytest

from ivshmem_bus.core import protocol as p
from ivshmem_bus.errors import ProtocolError

P = "linux-v0"


def u16(v: int) -> bytes:
    return v.to_bytes(2, "little")


def u32(v: int) -> bytes:
    return v.to_bytes(4, "little")


def u64(v: int) -> bytes:
    return v.to_bytes(8, "little")


def frame(type_: int, msg_id: int, dev_id: int, payload: bytes, size: int | None = None) -> bytes:
    """One 64-byte slot: the 6-byte header, the payload, zeros."""
    size = 6 + len(payload) if size is None else size
    return (bytes([type_, msg_id]) + u16(dev_id) + u16(size) + payload).ljust(64, b"\0")


GOLDEN = [
    # bus messages: type 0x02 request / 0x03 response, dev_id 0
    (p.BusGetDevices(offset=0, num=32), frame(0x02, 0x02, 0, u16(0) + u16(32))),
    (
        p.BusGetDevicesResponse(offset=0, num=32, next_offset=0, bitmap=b"\x03\x00\x00\x00"),
        frame(0x03, 0x02, 0, u16(0) + u16(32) + u16(0) + b"\x03\x00\x00\x00"),
    ),
    (p.BusPing(data=0xDEADBEEF), frame(0x02, 0x03, 0, u32(0xDEADBEEF))),
    (p.BusPingResponse(data=7), frame(0x03, 0x03, 0, u32(7))),
    (p.BusEventDevice(target_dev_num=1, dev_state=2), frame(0x02, 0x40, 0, u16(1) + u16(2))),
    # transport messages: type 0x00 / 0x01, dev_id = the device number
    (p.DeviceInfo(dev_num=1), frame(0x00, 0x02, 1, b"")),
    (
        p.DeviceInfoResponse(4, 0x554D4551, 64, 0, max_virtqueues=1, dev_num=1),
        frame(
            0x01, 0x02, 1, u32(4) + u32(0x554D4551) + u32(64) + u32(0) + u32(1) + u16(0) + u16(0)
        ),
    ),
    (p.GetFeatures(index=0, num=2), frame(0x00, 0x03, 0, u32(0) + u32(2))),
    (
        p.GetFeaturesResponse(index=0, num=2, features=1 << 32),
        frame(0x01, 0x03, 0, u32(0) + u32(2) + u32(0) + u32(1)),
    ),
    (
        p.SetFeaturesResponse(index=0, num=2, features=1 << 32),
        frame(0x01, 0x04, 0, u32(0) + u32(2) + u32(0) + u32(1)),
    ),
    (p.GetConfig(offset=2, size=4), frame(0x00, 0x05, 0, u32(2) + u32(4))),
    (
        p.GetConfigResponse(generation=3, offset=2, size=4, data=b"\x50\x00\x19\x00"),
        frame(0x01, 0x05, 0, u32(3) + u32(2) + u32(4) + b"\x50\x00\x19\x00"),
    ),
    (
        p.SetConfigResponse(generation=1, offset=0, size=1, data=b"\x7f"),
        frame(0x01, 0x06, 0, u32(1) + u32(0) + u32(1) + b"\x7f"),
    ),
    (p.GetDeviceStatus(), frame(0x00, 0x07, 0, b"")),
    (p.GetDeviceStatusResponse(status=0x0F), frame(0x01, 0x07, 0, u32(0x0F))),
    (p.SetDeviceStatus(status=0x0B), frame(0x00, 0x08, 0, u32(0x0B))),
    (p.SetDeviceStatusResponse(status=0x0B), frame(0x01, 0x08, 0, u32(0x0B))),
    (p.GetVqueue(index=1), frame(0x00, 0x09, 0, u32(1))),
    (
        p.GetVqueueResponse(1, 256, 0, 0, 0, 0),
        frame(0x01, 0x09, 0, u32(1) + u32(256) + u32(0) + u64(0) + u64(0) + u64(0)),
    ),
    (
        p.SetVqueue(0, 256, 0x1000, 0x2000, 0x3000),
        frame(0x00, 0x0A, 0, u32(0) + u32(0) + u32(256) + u64(0x1000) + u64(0x2000) + u64(0x3000)),
    ),
    (
        p.SetVqueueResponse(0, 256, 0x1000, 0x2000, 0x3000),
        frame(0x01, 0x0A, 0, u32(0) + u32(0) + u32(256) + u64(0x1000) + u64(0x2000) + u64(0x3000)),
    ),
    (p.ResetVqueue(index=1), frame(0x00, 0x0B, 0, u32(1))),
    (p.ResetVqueueResponse(index=1), frame(0x01, 0x0B, 0, u32(1))),
    (p.GetShm(index=0), frame(0x00, 0x0C, 0, u32(0))),
    (p.GetShmResponse(0, 2, 0x8000), frame(0x01, 0x0C, 0, u32(0) + u32(2) + u32(0x8000))),
    (
        p.EventConfig(status=0, generation=2, offset=0, size=2, config_value=b"\x50\x00"),
        frame(0x00, 0x40, 0, u32(0) + u32(2) + u32(0) + u32(2) + b"\x50\x00"),
    ),
    (p.EventAvail(index=1, next_offset_wrap=0), frame(0x00, 0x41, 0, u32(1) + u32(0))),
    (p.EventUsed(index=0, dev_num=1), frame(0x00, 0x42, 1, u32(0))),
]


@pytest.mark.parametrize(("msg", "wire"), GOLDEN, ids=[type(m).__name__ for m, _ in GOLDEN])
def test_golden_vectors_encode_and_decode(msg: p.Message, wire: bytes) -> None:
    assert p.encode(msg, P) == wire
    assert p.decode(wire, P) == msg


def test_set_drv_features_words_past_the_short_msg_size_are_read() -> None:
    """The stack writes the words after index/num, but its msg_size is 14 (the fixed part)."""
    slot = frame(0x00, 0x04, 0, u32(0) + u32(2) + u32(0) + u32(1), size=14)
    assert p.decode(slot, P) == p.SetFeatures(index=0, num=2, features=1 << 32)
    # only as far as the slot: a message cut to its msg_size has no words to read
    with pytest.raises(ProtocolError, match="num 2 needs 8 payload bytes"):
        p.decode(slot[:14], P)


def test_set_config_bytes_past_the_short_msg_size_are_read() -> None:
    slot = frame(0x00, 0x06, 0, u32(1) + u32(0) + u32(2) + b"\x50\x00", size=18)
    assert p.decode(slot, P) == p.SetConfig(generation=1, offset=0, size=2, data=b"\x50\x00")


def test_a_count_past_the_slot_is_refused() -> None:
    slot = frame(0x00, 0x06, 0, u32(1) + u32(0) + u32(47), size=18)  # 47 > 46 bytes left
    with pytest.raises(ProtocolError):
        p.decode(slot, P)


def test_no_token_and_no_iommu_messages() -> None:
    with pytest.raises(ValueError, match="no token"):
        p.encode(p.GetDeviceStatus(token=1), P)
    with pytest.raises(ValueError, match="not a linux-v0 message"):
        p.encode(p.IommuEnable(enable=1), P)


def test_every_request_but_the_events_gets_a_response() -> None:
    assert p.expects_response(p.ResetVqueue(index=0), P)
    assert p.expects_response(p.SetDeviceStatus(status=0), P)
    assert p.expects_response(p.BusPing(data=0), P)
    assert not p.expects_response(p.EventAvail(index=0, next_offset_wrap=0), P)
    assert not p.expects_response(p.BusPingResponse(data=0), P)


def test_matching_by_type_msg_id_and_dev_id() -> None:
    req = p.GetDeviceStatus(dev_num=1)
    assert p.response_matches(req, p.GetDeviceStatusResponse(status=0, dev_num=1), P)
    assert not p.response_matches(req, p.GetDeviceStatusResponse(status=0, dev_num=0), P)
    # bus messages carry dev_id 0; GET_DEVICES must echo offset
    gd = p.BusGetDevices(offset=0, num=32)
    ok = p.BusGetDevicesResponse(offset=0, num=32, next_offset=0, bitmap=bytes(4))
    assert p.response_matches(gd, ok, P)
    moved = p.BusGetDevicesResponse(offset=32, num=32, next_offset=0, bitmap=bytes(4))
    assert not p.response_matches(gd, moved, P)
    assert not p.response_matches(p.BusPing(data=1), p.GetDeviceStatusResponse(status=0), P)

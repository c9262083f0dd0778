"""virtio-msg codec tests.

Fuzz invariant (h11's afl-server rule, for this codec): for ANY input bytes, ``decode``
returns a message or raises ``ProtocolError``; nothing else, and it never reads past the
buffer or past msg_size. Golden vectors in tests/data were written from the spec tables
(the contract's sections 4 and 5, docs/wire-format.md §4.2, §5.2-§5.3, and the virtio-msg
draft), not produced by this code.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ivshmem_bus.core import protocol as p
from ivshmem_bus.errors import ProtocolError

DATA = Path(__file__).parent / "data"
GOLDEN = json.loads((DATA / "golden_messages.json").read_text())
BAD = json.loads((DATA / "bad_messages.json").read_text())
BYTES_FIELDS = ("data", "config_value", "bitmap")


def _golden_msg(vector: dict) -> p.Message:
    fields = dict(vector["fields"])
    for key in BYTES_FIELDS:
        if isinstance(fields.get(key), str):
            fields[key] = bytes.fromhex(fields[key])
    return getattr(p, vector["name"])(**fields)


def _vid(vector: dict) -> str:
    return f"{vector['profile']}-{vector['name']}-{vector['hex'][:16]}"


# --- The issue's own check --------------------------------------------------------------------


def test_get_features_bytes_from_the_spec_table():
    # type 0 (request), msg_id 0x03, dev_num 0, msg_size 6+8=14, index 0, num 2, 30 zero bytes
    expected = bytes.fromhex("00 03 0000 0e00 00000000 02000000") + bytes(30)
    assert p.encode(p.GetFeatures(index=0, num=2)) == expected
    assert len(expected) == 44


# --- Golden vectors ------------------------------------------------------------------------------


@pytest.mark.parametrize("vector", GOLDEN, ids=_vid)
def test_golden_encode(vector):
    assert p.encode(_golden_msg(vector), vector["profile"]).hex() == vector["hex"]


@pytest.mark.parametrize("vector", GOLDEN, ids=_vid)
def test_golden_decode(vector):
    assert p.decode(bytes.fromhex(vector["hex"]), vector["profile"]) == _golden_msg(vector)


@pytest.mark.parametrize("vector", GOLDEN, ids=_vid)
def test_one_pack_encoder_gives_the_general_paths_bytes(vector, monkeypatch):
    """The precompiled encoders (header + fields + padding in one struct) are an
    optimisation: with them switched off, every golden message encodes the same."""
    msg, profile = _golden_msg(vector), vector["profile"]
    fast = p.encode(msg, profile)
    monkeypatch.setattr(p, "_FAST_ENCODERS", {})
    assert p.encode(msg, profile) == fast


@pytest.mark.parametrize("vector", GOLDEN, ids=_vid)
def test_decode_reads_a_slot_view_in_place_and_ignores_what_follows(vector):
    raw = bytes.fromhex(vector["hex"])
    slot = bytearray(b"\xee" * 64)
    slot[: len(raw)] = raw
    assert p.decode(memoryview(slot), vector["profile"]) == _golden_msg(vector)
    words = memoryview(slot).cast("I")  # not a byte view: cast back, same message
    assert p.decode(words, vector["profile"]) == _golden_msg(vector)


def test_a_field_too_wide_for_the_profile_still_names_itself():
    """The one-pack encoder falls back to the general path, whose error says which."""
    with pytest.raises(ValueError, match="GetShmResponse does not fit spec-v1"):
        p.encode(p.GetShmResponse(index=0, length=1 << 40, address=0), "spec-v1")


def test_golden_vectors_cover_every_message_of_each_profile():
    covered = {(v["profile"], v["name"]) for v in GOLDEN}
    qemu = {n for prof, n in covered if prof == "qemu-v0"}
    spec = {n for prof, n in covered if prof == "spec-v1"}
    assert len(qemu) == 26
    assert len(spec) == 30
    assert {"IommuEnable", "IommuTranslate", "IommuTranslateResponse"} <= qemu
    assert {"GetShm", "BusGetDevicesResponse", "BusEventDevice", "BusPing"} <= spec


@pytest.mark.parametrize("bad", BAD, ids=lambda b: f"{b['profile']}-{b['why'][:40]}")
def test_bad_messages_raise_protocol_error(bad):
    with pytest.raises(ProtocolError) as info:
        p.decode(bytes.fromhex(bad["hex"]), bad["profile"])
    assert info.value.reason


def test_decoded_slot_ignores_bytes_after_msg_size():
    msg = p.SetDeviceStatus(status=0x0F)
    slot = bytearray(p.encode(msg)) + bytes(20)
    slot[6 + 4 :] = b"\xee" * (len(slot) - 10)  # garbage past msg_size 10, up to 64 bytes
    assert p.decode(bytes(slot)) == msg


@pytest.mark.parametrize("profile", p.PROFILES)
def test_reserved_type_bits_are_ignored(profile):
    # The draft: receivers MUST ignore type bits 2..7 (QEMU only looks at bit 0).
    raw = bytearray(p.encode(p.GetDeviceStatusResponse(status=7), profile))
    raw[0] |= 0xFC
    assert p.decode(bytes(raw), profile) == p.GetDeviceStatusResponse(status=7)


def test_protocol_error_names_the_msg_id_and_reason():
    raw = bytearray(p.encode(p.GetFeaturesResponse(index=0, num=2, features=1)))
    raw[4:6] = (14).to_bytes(2, "little")  # msg_size too small for the 16-byte payload
    with pytest.raises(ProtocolError) as info:
        p.decode(bytes(raw))
    assert info.value.msg_id == 0x03
    assert "16 payload bytes" in info.value.reason
    assert "0x03" in str(info.value)


def test_header_too_short_has_no_msg_id():
    with pytest.raises(ProtocolError) as info:
        p.decode(b"\x00\x03\x00")
    assert info.value.msg_id is None


def test_unknown_msg_id_keeps_the_raw_bytes():
    raw = bytes.fromhex("00 77 0300 0a00 deadbeef") + bytes(34)
    msg = p.decode(raw)
    assert isinstance(msg, p.UnknownMessage)
    assert (msg.msg_type, msg.unknown_id, msg.dev_num) == (0, 0x77, 3)
    assert msg.raw == raw[:10]
    assert p.encode(msg) == raw


def test_event_with_response_bit_is_unknown_not_an_event():
    raw = bytearray(p.encode(p.EventUsed(index=1)))
    raw[0] = 0x01
    assert isinstance(p.decode(bytes(raw)), p.UnknownMessage)


def test_spec_only_messages_are_unknown_to_qemu_v0():
    raw = p.encode(p.BusPing(data=5), "spec-v1")
    as_qemu = bytes(raw[:2]) + bytes(raw[2:4]) + bytes([6, 0]) + bytes(38)
    assert isinstance(p.decode(as_qemu), p.UnknownMessage)


# --- encode refuses what a profile cannot carry ---------------------------------------------


@pytest.mark.parametrize(
    ("msg", "profile", "words"),
    [
        (p.GetFeatures(index=0, num=2, token=5), "qemu-v0", "no token"),
        (p.SetFeatures(index=0, num=3, features=1 << 64), "qemu-v0", "does not fit"),
        (p.GetConfigResponse(0, 0, 9, b"x" * 9), "qemu-v0", "size=9 exceeds 8"),
        (p.EventConfig(0, 0, 0, 17, b"x" * 17), "qemu-v0", "size=17 exceeds 16"),
        (p.DeviceInfoResponse(1, 2, 3, 4, max_virtqueues=2), "qemu-v0", "max_virtqueues"),
        (p.SetFeatures(index=0, num=9, features=0), "spec-v1", "num=9 exceeds 8"),
        (p.SetFeatures(index=0, num=1, features=1 << 32), "spec-v1", "beyond 1 32-bit"),
        (p.SetFeaturesResponse(index=1), "spec-v1", "cannot be carried"),
        (p.SetVqueueResponse(index=1, size=8), "spec-v1", "cannot be carried"),
        (p.SetConfig(0, 0, 29, b"x" * 29), "spec-v1", "size=29 exceeds 28"),
        (p.GetShmResponse(0, 1 << 32, 0), "spec-v1", "does not fit"),
        (p.IommuEnable(enable=1), "spec-v1", "not a spec-v1 message"),
        (p.BusPing(data=1), "qemu-v0", "not a qemu-v0 message"),
    ],
)
def test_encode_refuses_what_the_profile_cannot_carry(msg, profile, words):
    with pytest.raises(ValueError, match=words):
        p.encode(msg, profile)


def test_unknown_profile_is_a_value_error():
    with pytest.raises(ValueError, match="unknown profile 'qemu-v9'"):
        p.encode(p.DeviceInfo(), "qemu-v9")
    with pytest.raises(ValueError, match="unknown profile"):
        p.decode(bytes(44), "v2")


# --- Construction validates every field ----------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (lambda: p.GetFeatures(index=-1, num=0), ValueError, "GetFeatures.index=-1"),
        (lambda: p.GetFeatures(index=1 << 32, num=0), ValueError, "does not fit u32"),
        (lambda: p.GetVqueue(index=True), TypeError, "GetVqueue.index must be an int"),
        (lambda: p.SetDeviceStatus(status="1"), TypeError, "must be an int"),
        (lambda: p.DeviceInfo(dev_num=1 << 16), ValueError, "DeviceInfo.dev_num"),
        (lambda: p.DeviceInfo(token=-1), ValueError, "DeviceInfo.token"),
        (lambda: p.GetConfigResponse(0, 0, 2, b"abc"), ValueError, "holds 3 bytes but size=2"),
        (lambda: p.SetConfig(0, 0, 1, "a"), TypeError, "must be bytes"),
        (lambda: p.IommuTranslate(va=0, prot=256), ValueError, "does not fit u8"),
        (lambda: p.BusGetDevicesResponse(0, 9, 0, b"\x01"), ValueError, "num=9 needs 2"),
    ],
)
def test_constructor_rejects_bad_fields(make, error, words):
    with pytest.raises(error, match=words):
        make()


def test_messages_are_frozen():
    msg = p.GetVqueue(index=1)
    with pytest.raises(AttributeError):
        msg.index = 2  # type: ignore[misc]


# --- Matching --------------------------------------------------------------------------------


def test_response_matching_qemu_v0_is_by_msg_id():
    req = p.GetVqueue(index=0)
    assert p.response_matches(req, p.GetVqueueResponse(index=0, max_size=1024))
    assert not p.response_matches(req, p.GetFeaturesResponse(index=0, num=2, features=0))
    assert not p.response_matches(req, p.GetVqueue(index=0))  # a request is not a reply
    assert not p.response_matches(p.BusPing(data=1), p.GetFeaturesResponse(0, 2, 0))


def test_response_matching_spec_v1_needs_token_and_dev_num():
    req = p.GetDeviceStatus(token=7, dev_num=2)
    assert p.response_matches(
        req, p.GetDeviceStatusResponse(status=1, token=7, dev_num=2), "spec-v1"
    )
    assert not p.response_matches(
        req, p.GetDeviceStatusResponse(status=1, token=8, dev_num=2), "spec-v1"
    )
    assert not p.response_matches(
        req, p.GetDeviceStatusResponse(status=1, token=7, dev_num=3), "spec-v1"
    )
    # the bus bit must agree too: a bus PING reply never answers a transport 0x03
    assert not p.response_matches(
        p.GetFeatures(0, 2, token=1), p.BusPingResponse(1, token=1), "spec-v1"
    )


@pytest.mark.parametrize(
    ("msg", "profile", "expected"),
    [
        (p.DeviceInfo(), "qemu-v0", True),
        (p.SetVqueue(0, 8, 1, 2, 3), "qemu-v0", True),
        (p.ResetVqueue(index=0), "qemu-v0", False),  # QEMU's device never replies
        (p.ResetVqueue(index=0), "spec-v1", True),
        (p.IommuEnable(enable=1), "qemu-v0", False),
        (p.IommuTranslate(va=0x1000, prot=1), "qemu-v0", True),
        (p.EventAvail(index=0, next_offset_wrap=1), "qemu-v0", False),
        (p.BusEventDevice(target_dev_num=1, dev_state=1), "spec-v1", False),
        (p.BusPing(data=3), "spec-v1", True),
        (p.GetFeaturesResponse(0, 2, 0), "qemu-v0", False),
    ],
)
def test_expects_response(msg, profile, expected):
    assert p.expects_response(msg, profile) is expected
    assert p.is_response(msg) is isinstance(msg, p.GetFeaturesResponse)


def test_event_avail_splits_offset_and_wrap():
    ev = p.EventAvail(index=1, next_offset_wrap=0x8000_0005)
    assert (ev.next_offset, ev.wrap) == (5, True)


# --- Property tests ------------------------------------------------------------------------------

u8, u16, u32, u64 = (st.integers(0, (1 << b) - 1) for b in (8, 16, 32, 64))


def _config(cls, limit):
    return st.integers(0, limit).flatmap(
        lambda n: st.builds(cls, u32, u32, st.just(n), st.binary(min_size=n, max_size=n))
    )


def _features(cls, profile):
    if profile == "qemu-v0":
        return st.builds(cls, u32, u32, u64)
    return st.integers(0, 8).flatmap(
        lambda n: st.builds(cls, u32, st.just(n), st.integers(0, (1 << (32 * n)) - 1))
    )


def _strategies(profile: str) -> list[st.SearchStrategy]:
    v0 = profile == "qemu-v0"
    linux = profile == "linux-v0"  # spec-v1's bodies, but every response carries its fields
    cfg_limit, ev_limit = {"qemu-v0": (8, 16), "spec-v1": (28, 24), "linux-v0": (46, 42)}[profile]
    common = [
        st.builds(p.DeviceInfo),
        (
            st.builds(p.DeviceInfoResponse, u32, u32, u32, u32)
            if v0
            else st.builds(p.DeviceInfoResponse, u32, u32, u32, u32, u32, u16, u16)
        ),
        st.builds(p.GetFeatures, u32, u32),
        _features(p.GetFeaturesResponse, profile),
        _features(p.SetFeatures, profile),
        (
            _features(p.SetFeaturesResponse, profile)
            if v0 or linux
            else st.builds(p.SetFeaturesResponse)
        ),
        st.builds(p.GetConfig, u32, u32),
        _config(p.GetConfigResponse, cfg_limit),
        _config(p.SetConfig, cfg_limit),
        _config(p.SetConfigResponse, cfg_limit),
        st.builds(p.GetDeviceStatus),
        st.builds(p.GetDeviceStatusResponse, u32),
        st.builds(p.SetDeviceStatus, u32),
        st.builds(p.SetDeviceStatusResponse, u32),
        st.builds(p.GetVqueue, u32),
        st.builds(p.GetVqueueResponse, u32, u32, u32, u64, u64, u64),
        st.builds(p.SetVqueue, u32, u32, u64, u64, u64),
        (
            st.builds(p.SetVqueueResponse, u32, u32, u64, u64, u64)
            if v0 or linux
            else st.builds(p.SetVqueueResponse)
        ),
        st.builds(p.ResetVqueue, u32),
        st.builds(p.ResetVqueueResponse, index=u32) if linux else st.builds(p.ResetVqueueResponse),
        st.integers(0, ev_limit).flatmap(
            lambda n: st.builds(
                p.EventConfig, u32, u32, u32, st.just(n), st.binary(min_size=n, max_size=n)
            )
        ),
        st.builds(p.EventAvail, u32, u32),
        st.builds(p.EventUsed, u32),
    ]
    if v0:
        return [
            *common,
            st.builds(p.IommuEnable, u8),
            st.builds(p.IommuTranslate, u64, u8),
            st.builds(p.IommuTranslateResponse, u64, u64, u8),
        ]
    return [
        *common,
        st.builds(p.GetShm, u32),
        st.builds(p.GetShmResponse, u32, u32, u32),
        st.builds(p.BusGetDevices, u16, u16),
        st.integers(0, 8 * 52 if linux else 272).flatmap(
            lambda n: st.builds(
                p.BusGetDevicesResponse,
                u16,
                st.just(n),
                u16,
                st.binary(min_size=(n + 7) // 8, max_size=(n + 7) // 8),
            )
        ),
        st.builds(p.BusPing, u32),
        st.builds(p.BusPingResponse, u32),
        st.builds(p.BusEventDevice, u16, u16),
    ]


def _with_header(profile: str):
    """Messages of ``profile`` with random dev_num (and token, for spec-v1)."""
    token = u16 if p.HAS_TOKEN[profile] else st.just(0)
    return st.builds(dataclasses.replace, st.one_of(_strategies(profile)), dev_num=u16, token=token)


@pytest.mark.parametrize("profile", p.PROFILES)
def test_strategies_cover_every_class_of_the_profile(profile):
    expected = {"qemu-v0": 26, "spec-v1": 30, "linux-v0": 30}[profile]
    assert len(_strategies(profile)) == expected


@settings(max_examples=1500)
@given(
    st.sampled_from(p.PROFILES).flatmap(lambda prof: st.tuples(st.just(prof), _with_header(prof)))
)
def test_roundtrip_every_message(case):
    profile, msg = case
    raw = p.encode(msg, profile)
    assert len(raw) == p.MESSAGE_SIZE[profile]
    size = int.from_bytes(raw[p.HEADER_SIZE[profile] - 2 : p.HEADER_SIZE[profile]], "little")
    assert raw[size:] == bytes(len(raw) - size)  # unused payload bytes are zero
    decoded = p.decode(raw, profile)
    assert decoded == msg
    assert dataclasses.replace(decoded) == decoded  # the decoder built a valid message
    # and the message is decoded from its first msg_size bytes alone
    assert p.decode(raw[:size], profile) == msg


@settings(max_examples=3000)
@given(st.sampled_from(p.PROFILES), st.binary(max_size=80))
def test_random_bytes_decode_or_raise_protocol_error(profile, data):
    try:
        msg = p.decode(data, profile)
    except ProtocolError:
        return
    assert isinstance(msg, p.Message)
    assert dataclasses.replace(msg) == msg  # valid, though decode skipped the checks


@settings(max_examples=3000)
@given(
    st.sampled_from(p.PROFILES),
    st.integers(0, 3),
    st.sampled_from(
        [
            0x02,
            0x03,
            0x04,
            0x05,
            0x06,
            0x07,
            0x08,
            0x09,
            0x0A,
            0x0B,
            0x0C,
            0x40,
            0x41,
            0x42,
            0x80,
            0x81,
            0xFF,
        ]
    ),
    st.integers(0, 70),
    st.binary(min_size=0, max_size=64),
)
def test_plausible_headers_decode_or_raise_protocol_error(profile, type_, msg_id, size, body):
    """Known (type, msg_id) pairs with arbitrary msg_size and payload: reaches every layout."""
    hsize = p.HEADER_SIZE[profile]
    header = (
        bytes([type_, msg_id, 0, 0]) + (b"\0\0" if hsize == 8 else b"") + size.to_bytes(2, "little")
    )
    data = header + body
    try:
        msg = p.decode(data, profile)
    except ProtocolError as exc:
        assert exc.msg_id == msg_id
        return
    assert size <= len(data)  # a decoded message never came from bytes it did not have
    assert isinstance(msg, p.Message)
    # whatever decoded is a valid message (the constructor's checks pass, though decode
    # skipped them) of the profile: it re-encodes and decodes equal
    assert dataclasses.replace(msg) == msg
    assert p.decode(p.encode(msg, profile), profile) == msg


def test_qemu_v0_matching_also_checks_echoed_fields():
    # a late response to an earlier GetConfig must not answer a later one
    req = p.GetConfig(offset=2, size=4)
    assert not p.response_matches(req, p.GetConfigResponse(0, 1, 0))
    assert p.response_matches(req, p.GetConfigResponse(0, 2, 4, b"abcd"))
    assert not p.response_matches(p.GetVqueue(1), p.GetVqueueResponse(0, 1024))
    assert not p.response_matches(p.SetFeatures(1, 1, 0), p.SetFeaturesResponse(0, 1, 0))
    assert not p.response_matches(
        p.IommuTranslate(0x2000, 1), p.IommuTranslateResponse(0x1000, 5, 1)
    )
    # nothing to echo: msg_id alone, as QEMU
    assert p.response_matches(p.GetDeviceStatus(), p.GetDeviceStatusResponse(3))

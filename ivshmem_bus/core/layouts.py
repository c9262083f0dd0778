"""The virtio-msg wire layouts of both profiles, as data (docs/wire-format.md §4.2, §5.2, §5.3).

``protocol`` is the code that reads them: ``_BY_WIRE[profile][(type, msg_id)]`` and
``_BY_CLASS[profile][cls]`` give a ``_Layout`` (a ``struct`` format at payload offset 0, the
fields it packs in order, and an optional variable ``_Tail``). Adding a message is a line here,
not a branch there. Sans-I/O: imports only ``messages``. Checked at import: no layout can
overflow its profile's payload.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
from dataclasses import dataclass
from typing import Any, Final

from . import messages as m
from .messages import Message

PROFILES: Final = ("qemu-v0", "spec-v1", "linux-v0")
HEADER_SIZE: Final = {"qemu-v0": 6, "spec-v1": 8, "linux-v0": 6}
# Bytes of a message in its slot (the rest of the 64-byte slot is not written): QEMU copies
# 44; spec-v1 (QEMU's later code) 48; the Linux stack's bus maximum is the whole slot.
MESSAGE_SIZE: Final = {"qemu-v0": 44, "spec-v1": 48, "linux-v0": 64}
HAS_TOKEN: Final = {"qemu-v0": False, "spec-v1": True, "linux-v0": False}
_HEADER = {
    "qemu-v0": struct.Struct("<BBHH"),
    "spec-v1": struct.Struct("<BBHHH"),
    "linux-v0": struct.Struct("<BBHH"),  # type, msg_id, dev_id, msg_size
}
_RESERVED_TYPE_BITS = 0xFF & ~(m.TYPE_RESPONSE | m.TYPE_BUS)


# --- Variable tails ----------------------------------------------------------------------------
# A tail follows the fixed struct. It gets the fields decoded so far and the remaining payload
# bytes, and must check every length against what is really there.


@dataclass(frozen=True, slots=True)
class _Tail:
    """How a variable (or zero-padded) part after the fixed fields is carried."""

    field: str  # the message field it fills
    count: str  # the field that says how long it is
    unit: int  # bytes per count (4 for feature blocks, 1 for bytes)
    limit: int  # the largest count the payload can hold
    padded: int = 0  # > 0: a fixed-size field of this many bytes (qemu-v0 config fields)
    bitmap: bool = False  # count is in bits, rounded up to bytes
    # The sender's msg_size covers only the fixed fields (the Linux stack's SET_DRV_FEATURES
    # and SET_CONFIG): the tail is read as its count implies, within the slot.
    past_size: bool = False


def _tail_len(tail: _Tail, count: int) -> int:
    return (count + 7) // 8 if tail.bitmap else count * tail.unit


# --- Layouts -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)  # hashed by identity: a dict key on hot paths
class _Layout:
    cls: type[Message]
    fixed: struct.Struct  # at payload offset 0; "x" bytes are reserved, written as zero
    names: tuple[str, ...]  # the fields packed by `fixed`, in order
    tail: _Tail | None = None
    # Fields this profile cannot carry must hold these values (else encode raises).
    absent: tuple[str, ...] = ()

    @property
    def absent_defaults(self) -> tuple[tuple[str, object], ...]:
        return _absent_defaults(self)


@functools.cache  # keyed on the layout (hashed by identity): one computation per layout
def _absent_defaults(layout: _Layout) -> tuple[tuple[str, object], ...]:
    fields = {f.name: f.default for f in dataclasses.fields(layout.cls)}
    return tuple((name, fields[name]) for name in layout.absent)


def _L(cls: type[Message], fmt: str = "", names: str = "", **kw: Any) -> _Layout:
    return _Layout(cls, struct.Struct("<" + fmt), tuple(names.split()), **kw)


_CFG_NAMES = "generation offset size"
_VQ_ADDRS = "descriptor_addr driver_addr device_addr"
_QEMU_CFG = _Tail("data", "size", 1, 8, padded=8)
_SPEC_CFG = _Tail("data", "size", 1, 28)
_SPEC_BLOCKS = _Tail("features", "num", 4, m.MAX_FEATURE_BLOCKS)

_QEMU_V0: list[_Layout] = [
    _L(m.DeviceInfo),
    _L(
        m.DeviceInfoResponse,
        "IIII",
        "device_id vendor_id num_feature_bits config_size",
        absent=("max_virtqueues", "admin_vq_start", "admin_vq_count"),
    ),
    _L(m.GetFeatures, "II", "index num"),
    _L(m.GetFeaturesResponse, "IIQ", "index num features"),
    _L(m.SetFeatures, "IIQ", "index num features"),
    _L(m.SetFeaturesResponse, "IIQ", "index num features"),
    _L(m.GetConfig, "II", "offset size"),
    _L(m.GetConfigResponse, "III", _CFG_NAMES, tail=_QEMU_CFG),
    _L(m.SetConfig, "III", _CFG_NAMES, tail=_QEMU_CFG),
    _L(m.SetConfigResponse, "III", _CFG_NAMES, tail=_QEMU_CFG),
    _L(m.GetDeviceStatus),
    _L(m.GetDeviceStatusResponse, "I", "status"),
    _L(m.SetDeviceStatus, "I", "status"),
    _L(m.SetDeviceStatusResponse, "I", "status"),
    _L(m.GetVqueue, "I", "index"),
    _L(m.GetVqueueResponse, "IIIQQQ", "index max_size size " + _VQ_ADDRS),
    _L(m.SetVqueue, "I4xIQQQ", "index size " + _VQ_ADDRS),  # u32 "unused" at 4
    _L(m.SetVqueueResponse, "I4xIQQQ", "index size " + _VQ_ADDRS),
    _L(m.ResetVqueue, "I", "index"),
    _L(m.ResetVqueueResponse, absent=("index",)),
    _L(
        m.EventConfig,
        "IIII",
        "status " + _CFG_NAMES,
        tail=_Tail("config_value", "size", 1, 16, padded=16),
    ),
    _L(m.EventAvail, "II", "index next_offset_wrap"),
    _L(m.EventUsed, "I", "index"),
    _L(m.IommuEnable, "B", "enable"),
    _L(m.IommuTranslate, "QB", "va prot"),
    _L(m.IommuTranslateResponse, "QQB", "va pa prot"),
]

_SPEC_V1: list[_Layout] = [
    _L(m.DeviceInfo),
    _L(
        m.DeviceInfoResponse,
        "IIIIIHH",
        "device_id vendor_id num_feature_bits config_size max_virtqueues admin_vq_start "
        "admin_vq_count",
    ),
    _L(m.GetFeatures, "II", "index num"),
    _L(m.GetFeaturesResponse, "II", "index num", tail=_SPEC_BLOCKS),
    _L(m.SetFeatures, "II", "index num", tail=_SPEC_BLOCKS),
    _L(m.SetFeaturesResponse, absent=("index", "num", "features")),
    _L(m.GetConfig, "II", "offset size"),
    _L(m.GetConfigResponse, "III", _CFG_NAMES, tail=_SPEC_CFG),
    _L(m.SetConfig, "III", _CFG_NAMES, tail=_SPEC_CFG),
    _L(m.SetConfigResponse, "III", _CFG_NAMES, tail=_SPEC_CFG),
    _L(m.GetDeviceStatus),
    _L(m.GetDeviceStatusResponse, "I", "status"),
    _L(m.SetDeviceStatus, "I", "status"),
    _L(m.SetDeviceStatusResponse, "I", "status"),
    _L(m.GetVqueue, "I", "index"),
    _L(m.GetVqueueResponse, "III4xQQQ", "index max_size size " + _VQ_ADDRS),
    _L(m.SetVqueue, "I4xI4xQQQ", "index size " + _VQ_ADDRS),
    _L(m.SetVqueueResponse, absent=("index", "size", *_VQ_ADDRS.split())),
    _L(m.ResetVqueue, "I", "index"),
    _L(m.ResetVqueueResponse, absent=("index",)),
    _L(m.GetShm, "I", "index"),
    _L(m.GetShmResponse, "III", "index length address"),  # u32s in the draft
    _L(m.EventConfig, "IIII", "status " + _CFG_NAMES, tail=_Tail("config_value", "size", 1, 24)),
    _L(m.EventAvail, "II", "index next_offset_wrap"),
    _L(m.EventUsed, "I", "index"),
    _L(m.BusGetDevices, "HH", "offset num"),
    _L(
        m.BusGetDevicesResponse,
        "HHH",
        "offset num next_offset",
        tail=_Tail("bitmap", "num", 1, 8 * 34, bitmap=True),
    ),
    _L(m.BusPing, "I", "data"),
    _L(m.BusPingResponse, "I", "data"),
    _L(m.BusEventDevice, "HH", "target_dev_num dev_state"),
]


# The Linux virtio-msg driver stack's framing (docs/wire-format.md §12): qemu-v0's 6-byte
# header with a real dev_id, spec-v1-like bodies with u32 feature words and config bytes, and
# every response carrying its fields (SET_* and RESET_VQUEUE included).
_LINUX_PAYLOAD = 64 - 6
_LINUX_BLOCKS = _Tail("features", "num", 4, m.MAX_FEATURE_BLOCKS)
_LINUX_CFG = _Tail("data", "size", 1, _LINUX_PAYLOAD - 12)

_LINUX_V0: list[_Layout] = [
    _L(m.DeviceInfo),
    _L(
        m.DeviceInfoResponse,
        "IIIIIHH",
        "device_id vendor_id num_feature_bits config_size max_virtqueues admin_vq_start "
        "admin_vq_count",
    ),
    _L(m.GetFeatures, "II", "index num"),
    _L(m.GetFeaturesResponse, "II", "index num", tail=_LINUX_BLOCKS),
    _L(m.SetFeatures, "II", "index num", tail=dataclasses.replace(_LINUX_BLOCKS, past_size=True)),
    _L(m.SetFeaturesResponse, "II", "index num", tail=_LINUX_BLOCKS),
    _L(m.GetConfig, "II", "offset size"),
    _L(m.GetConfigResponse, "III", _CFG_NAMES, tail=_LINUX_CFG),
    _L(m.SetConfig, "III", _CFG_NAMES, tail=dataclasses.replace(_LINUX_CFG, past_size=True)),
    _L(m.SetConfigResponse, "III", _CFG_NAMES, tail=_LINUX_CFG),
    _L(m.GetDeviceStatus),
    _L(m.GetDeviceStatusResponse, "I", "status"),
    _L(m.SetDeviceStatus, "I", "status"),
    _L(m.SetDeviceStatusResponse, "I", "status"),
    _L(m.GetVqueue, "I", "index"),
    _L(m.GetVqueueResponse, "IIIQQQ", "index max_size size " + _VQ_ADDRS),
    _L(m.SetVqueue, "I4xIQQQ", "index size " + _VQ_ADDRS),  # u32 "unused" at 4
    _L(m.SetVqueueResponse, "I4xIQQQ", "index size " + _VQ_ADDRS),
    _L(m.ResetVqueue, "I", "index"),
    _L(m.ResetVqueueResponse, "I", "index"),
    _L(m.GetShm, "I", "index"),
    _L(m.GetShmResponse, "III", "index length address"),  # index, count, addr
    _L(
        m.EventConfig,
        "IIII",
        "status " + _CFG_NAMES,
        tail=_Tail("config_value", "size", 1, _LINUX_PAYLOAD - 16),
    ),
    _L(m.EventAvail, "II", "index next_offset_wrap"),
    _L(m.EventUsed, "I", "index"),
    _L(m.BusGetDevices, "HH", "offset num"),
    _L(
        m.BusGetDevicesResponse,
        "HHH",
        "offset num next_offset",
        tail=_Tail("bitmap", "num", 1, 8 * (_LINUX_PAYLOAD - 6), bitmap=True),
    ),
    _L(m.BusPing, "I", "data"),
    _L(m.BusPingResponse, "I", "data"),
    _L(m.BusEventDevice, "HH", "target_dev_num dev_state"),
]


def _index(layouts: list[_Layout]) -> tuple[dict[tuple[int, int], _Layout], dict[type, _Layout]]:
    by_wire: dict[tuple[int, int], _Layout] = {}
    by_cls: dict[type, _Layout] = {}
    for layout in layouts:
        cls = layout.cls
        wire_type = (m.TYPE_RESPONSE if cls.RESPONSE else 0) | (m.TYPE_BUS if cls.BUS else 0)
        by_wire[(wire_type, cls.MSG_ID)] = layout
        by_cls[cls] = layout
    return by_wire, by_cls


_BY_WIRE: dict[str, dict[tuple[int, int], _Layout]] = {}
_BY_CLASS: dict[str, dict[type, _Layout]] = {}
for _profile, _layouts in (("qemu-v0", _QEMU_V0), ("spec-v1", _SPEC_V1), ("linux-v0", _LINUX_V0)):
    _BY_WIRE[_profile], _BY_CLASS[_profile] = _index(_layouts)
    for _layout in _layouts:  # a layout that overflows the payload is a bug in this file
        _tail_max = _layout.tail and (
            _layout.tail.padded or _tail_len(_layout.tail, _layout.tail.limit)
        )
        if _layout.fixed.size + (_tail_max or 0) > MESSAGE_SIZE[_profile] - HEADER_SIZE[_profile]:
            raise AssertionError(f"{_profile} {_layout.cls.__name__} overflows the payload")

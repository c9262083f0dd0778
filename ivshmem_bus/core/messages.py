"""The virtio-msg messages as values: one frozen, slotted dataclass per message.

A message object cannot hold a value its wire field cannot carry: every field is range-checked
at construction (``ValueError`` naming the field), so a caller's mistake fails where it is
made, not in the codec. What a *profile* can carry (qemu-v0 has no token, an 8-byte config
field, a u64 features word) is checked by ``protocol.encode``.

Field names are the specification's, in snake_case. Every message has ``dev_num`` (the device
on the bus; always 0 on QEMU's one-device ivshmem bus) and ``token`` (spec-v1 request/response
matching; must stay 0 for qemu-v0), both keyword-only.

Representations chosen so that one class serves both profiles:

- ``features`` is an integer: bit ``32*k + b`` is bit ``b`` of 32-bit block ``index + k``;
  qemu-v0 carries it in a u64, spec-v1 as ``num`` u32 blocks.
- config ``data`` / ``config_value`` is ``bytes`` with ``len == size``: qemu-v0 carries it in
  a zero-padded fixed field (8 or 16 bytes, first byte lowest), spec-v1 as ``size`` bytes.

Don't subclass these: the codec's tables key on the exact class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import ClassVar, TypeVar, dataclass_transform

__all__ = [
    "BusEventDevice",
    "BusGetDevices",
    "BusGetDevicesResponse",
    "BusPing",
    "BusPingResponse",
    "DeviceInfo",
    "DeviceInfoResponse",
    "EventAvail",
    "EventConfig",
    "EventUsed",
    "GetConfig",
    "GetConfigResponse",
    "GetDeviceStatus",
    "GetDeviceStatusResponse",
    "GetFeatures",
    "GetFeaturesResponse",
    "GetShm",
    "GetShmResponse",
    "GetVqueue",
    "GetVqueueResponse",
    "IommuEnable",
    "IommuTranslate",
    "IommuTranslateResponse",
    "Message",
    "ResetVqueue",
    "ResetVqueueResponse",
    "SetConfig",
    "SetConfigResponse",
    "SetDeviceStatus",
    "SetDeviceStatusResponse",
    "SetFeatures",
    "SetFeaturesResponse",
    "SetVqueue",
    "SetVqueueResponse",
    "UnknownMessage",
]

# Header type bits (docs/wire-format.md §4.1, §5.1).
TYPE_RESPONSE = 0x01
TYPE_BUS = 0x02

# Transport message ids.
MSG_DEVICE_INFO = 0x02
MSG_GET_FEATURES = 0x03
MSG_SET_FEATURES = 0x04
MSG_GET_CONFIG = 0x05
MSG_SET_CONFIG = 0x06
MSG_GET_DEVICE_STATUS = 0x07
MSG_SET_DEVICE_STATUS = 0x08
MSG_GET_VQUEUE = 0x09
MSG_SET_VQUEUE = 0x0A
MSG_RESET_VQUEUE = 0x0B
MSG_GET_SHM = 0x0C
MSG_EVENT_CONFIG = 0x40
MSG_EVENT_AVAIL = 0x41
MSG_EVENT_USED = 0x42
MSG_IOMMU_ENABLE = 0x80
MSG_IOMMU_TRANSLATE = 0x81
# Bus message ids (TYPE_BUS set).
BUS_MSG_GET_DEVICES = 0x02
BUS_MSG_PING = 0x03
BUS_MSG_EVENT_DEVICE = 0x40

MAX_FEATURE_BLOCKS = 8  # spec-v1: 8 u32 blocks fill a 40-byte payload with index and num


def _check_uint(cls: str, name: str, value: object, bits: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{cls}.{name} must be an int, not {type(value).__name__}")
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{cls}.{name}={value} does not fit u{bits}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Base of every message. ``MSG_ID``/``RESPONSE``/``BUS`` identify the wire type."""

    MSG_ID: ClassVar[int] = -1
    RESPONSE: ClassVar[bool] = False
    BUS: ClassVar[bool] = False
    EVENT: ClassVar[bool] = False
    # Field name -> bit width, for the range checks; bytes fields are listed in _BYTES.
    _WIDTHS: ClassVar[dict[str, int]] = {}
    _BYTES: ClassVar[dict[str, str]] = {}  # bytes field -> the int field that is its length

    dev_num: int = 0
    token: int = 0

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_uint(name, "dev_num", self.dev_num, 16)
        _check_uint(name, "token", self.token, 16)
        for field, bits in self._WIDTHS.items():
            _check_uint(name, field, getattr(self, field), bits)
        for field, size_field in self._BYTES.items():
            value = getattr(self, field)
            if not isinstance(value, bytes):
                raise TypeError(f"{name}.{field} must be bytes, not {type(value).__name__}")
            if len(value) != getattr(self, size_field):
                raise ValueError(
                    f"{name}.{field} holds {len(value)} bytes but {size_field}="
                    f"{getattr(self, size_field)}"
                )

    @property
    def type(self) -> int:
        """The header's type byte."""
        return (TYPE_RESPONSE if self.RESPONSE else 0) | (TYPE_BUS if self.BUS else 0)

    @property
    def msg_id(self) -> int:
        """The header's msg_id byte."""
        return self.MSG_ID

    def payload_fields(self) -> dict[str, object]:
        """The message's own fields (no dev_num/token), for printing and monitors."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("dev_num", "token")
        }


_M = TypeVar("_M", bound=Message)


# dataclass_transform: type checkers see each decorated class as the frozen dataclass it is, so
# ``GetFeatures(index=0, num=2)`` type-checks (its base's dev_num/token stay keyword-only).
@dataclass_transform(frozen_default=True)
def _msg(
    msg_id: int,
    *,
    response: bool = False,
    bus: bool = False,
    widths: dict[str, int] | None = None,
    sized: dict[str, str] | None = None,
) -> Callable[[type[_M]], type[_M]]:
    """Class decorator: a frozen slotted message with its wire identity and field checks."""

    def wrap(cls: type[_M]) -> type[_M]:
        cls.MSG_ID = msg_id
        cls.RESPONSE = response
        cls.BUS = bus
        cls.EVENT = 0x40 <= msg_id <= 0x7F or msg_id >= 0xC0
        cls._WIDTHS = widths or {}
        cls._BYTES = sized or {}
        return dataclass(frozen=True, slots=True)(cls)

    return wrap


_U32 = 32
_FEAT = {"index": _U32, "num": _U32, "features": 32 * MAX_FEATURE_BLOCKS}
_CFG = {"generation": _U32, "offset": _U32, "size": _U32}
_VQ_ADDRS = {"descriptor_addr": 64, "driver_addr": 64, "device_addr": 64}


# --- Transport requests and responses ----------------------------------------------------


@_msg(MSG_DEVICE_INFO)
class DeviceInfo(Message):
    """DEVICE_INFO (spec-v1: GET_DEVICE_INFO) request: no payload."""


@_msg(
    MSG_DEVICE_INFO,
    response=True,
    widths={
        "device_id": _U32,
        "vendor_id": _U32,
        "num_feature_bits": _U32,
        "config_size": _U32,
        "max_virtqueues": _U32,
        "admin_vq_start": 16,
        "admin_vq_count": 16,
    },
)
class DeviceInfoResponse(Message):
    """The virtio device's identity; the last three fields exist only in spec-v1."""

    device_id: int
    vendor_id: int
    num_feature_bits: int
    config_size: int
    max_virtqueues: int = 0
    admin_vq_start: int = 0
    admin_vq_count: int = 0


@_msg(MSG_GET_FEATURES, widths={"index": _U32, "num": _U32})
class GetFeatures(Message):
    """Read ``num`` 32-bit blocks of device features starting at block ``index``."""

    index: int
    num: int


@_msg(MSG_GET_FEATURES, response=True, widths=_FEAT)
class GetFeaturesResponse(Message):
    index: int
    num: int
    features: int


@_msg(MSG_SET_FEATURES, widths=_FEAT)
class SetFeatures(Message):
    """Write driver features (spec-v1: SET_DRIVER_FEATURES)."""

    index: int
    num: int
    features: int


@_msg(MSG_SET_FEATURES, response=True, widths=_FEAT)
class SetFeaturesResponse(Message):
    """qemu-v0 echoes the request; spec-v1's response is empty (all fields 0)."""

    index: int = 0
    num: int = 0
    features: int = 0


@_msg(MSG_GET_CONFIG, widths={"offset": _U32, "size": _U32})
class GetConfig(Message):
    offset: int
    size: int


@_msg(MSG_GET_CONFIG, response=True, widths=_CFG, sized={"data": "size"})
class GetConfigResponse(Message):
    generation: int
    offset: int
    size: int
    data: bytes = b""


@_msg(MSG_SET_CONFIG, widths=_CFG, sized={"data": "size"})
class SetConfig(Message):
    generation: int
    offset: int
    size: int
    data: bytes = b""


@_msg(MSG_SET_CONFIG, response=True, widths=_CFG, sized={"data": "size"})
class SetConfigResponse(Message):
    generation: int
    offset: int
    size: int
    data: bytes = b""


@_msg(MSG_GET_DEVICE_STATUS)
class GetDeviceStatus(Message):
    """GET_DEVICE_STATUS request: no payload."""


@_msg(MSG_GET_DEVICE_STATUS, response=True, widths={"status": _U32})
class GetDeviceStatusResponse(Message):
    status: int


@_msg(MSG_SET_DEVICE_STATUS, widths={"status": _U32})
class SetDeviceStatus(Message):
    status: int


@_msg(MSG_SET_DEVICE_STATUS, response=True, widths={"status": _U32})
class SetDeviceStatusResponse(Message):
    """The status the device ended up with (it may refuse FEATURES_OK)."""

    status: int


@_msg(MSG_GET_VQUEUE, widths={"index": _U32})
class GetVqueue(Message):
    index: int


@_msg(
    MSG_GET_VQUEUE,
    response=True,
    widths={"index": _U32, "max_size": _U32, "size": _U32, **_VQ_ADDRS},
)
class GetVqueueResponse(Message):
    """``max_size`` 0 means there is no queue ``index`` (probing stops there)."""

    index: int
    max_size: int
    size: int = 0
    descriptor_addr: int = 0
    driver_addr: int = 0
    device_addr: int = 0


_SETVQ = {"index": _U32, "size": _U32, **_VQ_ADDRS}


@_msg(MSG_SET_VQUEUE, widths=_SETVQ)
class SetVqueue(Message):
    index: int
    size: int
    descriptor_addr: int
    driver_addr: int
    device_addr: int


@_msg(MSG_SET_VQUEUE, response=True, widths=_SETVQ)
class SetVqueueResponse(Message):
    """qemu-v0 echoes the request; spec-v1's response is empty (all fields 0)."""

    index: int = 0
    size: int = 0
    descriptor_addr: int = 0
    driver_addr: int = 0
    device_addr: int = 0


@_msg(MSG_RESET_VQUEUE, widths={"index": _U32})
class ResetVqueue(Message):
    index: int


@_msg(MSG_RESET_VQUEUE, response=True, widths={"index": _U32})
class ResetVqueueResponse(Message):
    """QEMU's device never sends it; spec-v1 devices send it empty; linux-v0 echoes the
    ``index`` (0 where the profile does not carry it)."""

    index: int = 0


@_msg(MSG_GET_SHM, widths={"index": _U32})
class GetShm(Message):
    """spec-v1 only: ask for shared memory region ``index``."""

    index: int


@_msg(MSG_GET_SHM, response=True, widths={"index": _U32, "length": 64, "address": 64})
class GetShmResponse(Message):
    index: int
    length: int
    address: int


# --- Transport events ----------------------------------------------------------------------


@_msg(MSG_EVENT_CONFIG, widths=_CFG | {"status": _U32}, sized={"config_value": "size"})
class EventConfig(Message):
    """Device -> driver: configuration (and status) changed."""

    status: int
    generation: int
    offset: int
    size: int
    config_value: bytes = b""


@_msg(MSG_EVENT_AVAIL, widths={"index": _U32, "next_offset_wrap": _U32})
class EventAvail(Message):
    """Driver -> device: buffers made available on queue ``index``."""

    index: int
    next_offset_wrap: int

    @property
    def next_offset(self) -> int:
        """Bits 30..0 of ``next_offset_wrap``."""
        return self.next_offset_wrap & 0x7FFFFFFF

    @property
    def wrap(self) -> bool:
        """Bit 31 of ``next_offset_wrap``."""
        return bool(self.next_offset_wrap >> 31)


@_msg(MSG_EVENT_USED, widths={"index": _U32})
class EventUsed(Message):
    """Device -> driver: buffers used on queue ``index``."""

    index: int


# --- QEMU's experimental soft IOMMU (qemu-v0 only) ----------------------------------------


@_msg(MSG_IOMMU_ENABLE, widths={"enable": 8})
class IommuEnable(Message):
    """Driver -> device; QEMU sends no response."""

    enable: int


@_msg(MSG_IOMMU_TRANSLATE, widths={"va": 64, "prot": 8})
class IommuTranslate(Message):
    """Device -> driver request; ``prot`` bit 0 read, bit 1 write."""

    va: int
    prot: int


@_msg(MSG_IOMMU_TRANSLATE, response=True, widths={"va": 64, "pa": 64, "prot": 8})
class IommuTranslateResponse(Message):
    va: int
    pa: int
    prot: int


# --- Bus messages (spec-v1) ------------------------------------------------------------------


@_msg(BUS_MSG_GET_DEVICES, bus=True, widths={"offset": 16, "num": 16})
class BusGetDevices(Message):
    """Ask which device numbers ``offset .. offset+num-1`` exist."""

    offset: int
    num: int


@_msg(
    BUS_MSG_GET_DEVICES,
    response=True,
    bus=True,
    widths={"offset": 16, "num": 16, "next_offset": 16},
)
class BusGetDevicesResponse(Message):
    """``bitmap`` bit ``i`` (LSB first, byte by byte) says device ``offset + i`` exists."""

    offset: int
    num: int
    next_offset: int
    bitmap: bytes = b""

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        if not isinstance(self.bitmap, bytes):
            raise TypeError(f"BusGetDevicesResponse.bitmap must be bytes, not {type(self.bitmap)}")
        if len(self.bitmap) != (self.num + 7) // 8:
            raise ValueError(
                f"BusGetDevicesResponse.bitmap holds {len(self.bitmap)} bytes; num={self.num} "
                f"needs {(self.num + 7) // 8}"
            )


@_msg(BUS_MSG_PING, bus=True, widths={"data": _U32})
class BusPing(Message):
    data: int


@_msg(BUS_MSG_PING, response=True, bus=True, widths={"data": _U32})
class BusPingResponse(Message):
    data: int


@_msg(BUS_MSG_EVENT_DEVICE, bus=True, widths={"target_dev_num": 16, "dev_state": 16})
class BusEventDevice(Message):
    """A device appeared (``dev_state`` 1) or went away (2). The payload's dev_num is
    ``target_dev_num`` here, so it cannot be confused with the header's ``dev_num``."""

    target_dev_num: int
    dev_state: int


# --- Anything else -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class UnknownMessage(Message):
    """A well-formed header with a (type, msg_id) this profile does not define.

    ``raw`` is the message as received, header included, up to its msg_size, so a monitor
    can still show it and a bus can count and drop it.
    """

    msg_type: int
    unknown_id: int
    raw: bytes

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_uint("UnknownMessage", "msg_type", self.msg_type, 8)
        _check_uint("UnknownMessage", "unknown_id", self.unknown_id, 8)
        if not isinstance(self.raw, bytes):
            raise TypeError(f"UnknownMessage.raw must be bytes, not {type(self.raw).__name__}")

    @property
    def type(self) -> int:
        return self.msg_type

    @property
    def msg_id(self) -> int:
        return self.unknown_id

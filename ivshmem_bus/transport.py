"""The virtio-msg transport on a bus: the driver's probe, and a virtio device in Python.

Driver side (``VirtioMsgDriver``): what QEMU's proxy driver does at reset (DEVICE_INFO,
GET_FEATURES, then GET_VQUEUE 0, 1, ... until max_size is 0) gives a ``DeviceDescription``;
the status/feature/config calls are one request each.

Device side (``VirtioMsgDevice``): answers every request the way QEMU's virtio-msg.c device
side does (docs/wire-format.md §4): vendor "QEMU", 64 feature bits, GET_VQUEUE max_size
1024 for an existing queue and 0 past the last, config sizes 0/1/2/4 (and 8, which the
qemu-v0 data field also carries), FEATURES_OK refused when the driver asked for features
the device does not offer, no reply to RESET_VQUEUE in qemu-v0. ``RngDevice`` (virtio id 4)
is the small concrete device the tests and the README demo use.

The data path is out of scope here: a device reaches the driver's virtqueues through a
second ivshmem window onto the driver's RAM (docs/virtqueues.md §4), which this module does not map.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TypeVar

from .bus import VirtioMsgBus
from .core import protocol as p
from .core.messages import MAX_FEATURE_BLOCKS
from .errors import ProtocolError

__all__ = [
    "DEVICE_NAMES",
    "FEATURE_NAMES",
    "STATUS_NAMES",
    "DeviceDescription",
    "QueueInfo",
    "RngDevice",
    "VirtioMsgDevice",
    "VirtioMsgDriver",
    "feature_names",
    "status_names",
]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=p.Message)

VIRTIO_MSG_VENDOR_ID = 0x554D4551  # "QEMU", what QEMU's device answers
QEMU_MAX_QUEUE_SIZE = 1024

# Virtio device ids (virtio spec, "Device Types").
DEVICE_NAMES = {
    1: "network", 2: "block", 3: "console", 4: "entropy", 5: "balloon", 8: "scsi",
    9: "9p", 16: "gpu", 18: "input", 19: "vsock", 20: "crypto", 26: "fs", 29: "mem",
    34: "i2c", 35: "scmi", 41: "gpio", 42: "rpmb", 49: "sound",
}  # fmt: skip

# Device-independent feature bits (virtio spec, "Reserved Feature Bits").
FEATURE_NAMES = {
    24: "NOTIFY_ON_EMPTY", 27: "ANY_LAYOUT", 28: "RING_INDIRECT_DESC", 29: "RING_EVENT_IDX",
    32: "VERSION_1", 33: "ACCESS_PLATFORM", 34: "RING_PACKED", 35: "IN_ORDER",
    36: "ORDER_PLATFORM", 37: "SR_IOV", 38: "NOTIFICATION_DATA", 39: "NOTIF_CONFIG_DATA",
    40: "RING_RESET", 41: "ADMIN_VQ",
}  # fmt: skip

# Device status bits (virtio spec, "Device Status Field").
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED = 1, 2, 4, 8, 64, 128
STATUS_NAMES = {
    ACKNOWLEDGE: "ACKNOWLEDGE", DRIVER: "DRIVER", DRIVER_OK: "DRIVER_OK",
    FEATURES_OK: "FEATURES_OK", NEEDS_RESET: "NEEDS_RESET", FAILED: "FAILED",
}  # fmt: skip
VIRTIO_F_VERSION_1 = 1 << 32


def feature_names(features: int) -> list[str]:
    """Names of the set bits; device-specific or unknown bits as ``bit N``."""
    return [
        FEATURE_NAMES.get(bit, f"bit {bit}")
        for bit in range(features.bit_length())
        if features >> bit & 1
    ]


def status_names(status: int) -> str:
    """``"ACKNOWLEDGE|DRIVER"``, or ``"0"`` for a reset device."""
    names = [name for bit, name in STATUS_NAMES.items() if status & bit]
    unknown = status & ~sum(STATUS_NAMES)
    if unknown:
        names.append(f"0x{unknown:x}")
    return "|".join(names) or "0"


@dataclasses.dataclass(frozen=True, slots=True)
class QueueInfo:
    index: int
    max_size: int


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceDescription:
    """What a probe learned about the remote virtio device."""

    device_id: int
    vendor_id: int
    num_feature_bits: int
    config_size: int
    features: int
    queues: tuple[QueueInfo, ...]

    @property
    def device_name(self) -> str:
        return DEVICE_NAMES.get(self.device_id, f"unknown ({self.device_id})")

    @property
    def vendor(self) -> str:
        raw = self.vendor_id.to_bytes(4, "little")
        text = raw.decode("ascii", "replace")
        return (
            f"0x{self.vendor_id:08x} ({text})" if text.isprintable() else f"0x{self.vendor_id:08x}"
        )

    @property
    def feature_names(self) -> list[str]:
        return feature_names(self.features)

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready form (for ``--json``)."""
        return {
            "device_id": self.device_id,
            "device_name": self.device_name,
            "vendor_id": self.vendor_id,
            "num_feature_bits": self.num_feature_bits,
            "config_size": self.config_size,
            "features": f"0x{self.features:x}",
            "feature_names": self.feature_names,
            "queues": [{"index": q.index, "max_size": q.max_size} for q in self.queues],
        }


class VirtioMsgDriver:
    """The driver role of the transport: one request per call over a driver-role bus."""

    def __init__(self, bus: VirtioMsgBus, timeout: float = 1.0) -> None:
        if bus.role != "driver":
            raise ValueError(f"VirtioMsgDriver needs a driver-role bus, not {bus.role!r}")
        self.bus = bus
        self.timeout = timeout

    def _req(self, msg: p.Message, cls: type[M]) -> M:
        resp = self.bus.request(msg, self.timeout)
        if not isinstance(resp, cls):  # cannot happen with the codec's table; never -O'd away
            raise ProtocolError(resp.msg_id, f"{type(resp).__name__} answered {type(msg).__name__}")
        return resp

    def _blocks(self, num_feature_bits: int) -> int:
        if self.bus.profile == "qemu-v0":
            return 2  # QEMU's GET_FEATURES: index 0, num 2, one u64 word
        return max(1, min(MAX_FEATURE_BLOCKS, (num_feature_bits + 31) // 32))

    def probe(self, max_queues: int = 256) -> DeviceDescription:
        """DEVICE_INFO, GET_FEATURES, GET_VQUEUE 0, 1, ... until max_size 0.

        Raises:
            BusTimeout: the device did not answer one of them.
        """
        info = self._req(p.DeviceInfo(), p.DeviceInfoResponse)
        features = self.get_features(num=self._blocks(info.num_feature_bits))
        queues = []
        for index in range(max_queues):
            vq = self._req(p.GetVqueue(index=index), p.GetVqueueResponse)
            if vq.max_size == 0:
                break
            queues.append(QueueInfo(index, vq.max_size))
        return DeviceDescription(
            info.device_id, info.vendor_id, info.num_feature_bits, info.config_size,
            features, tuple(queues),
        )  # fmt: skip

    def get_features(self, index: int = 0, num: int = 2) -> int:
        return self._req(p.GetFeatures(index=index, num=num), p.GetFeaturesResponse).features

    def set_features(self, features: int, index: int = 0, num: int = 2) -> None:
        self._req(p.SetFeatures(index=index, num=num, features=features), p.SetFeaturesResponse)

    def get_status(self) -> int:
        return self._req(p.GetDeviceStatus(), p.GetDeviceStatusResponse).status

    def set_status(self, status: int) -> int:
        """Write the status; returns the status the device ended up with."""
        return self._req(p.SetDeviceStatus(status=status), p.SetDeviceStatusResponse).status

    def read_config(self, offset: int, size: int) -> tuple[int, bytes]:
        """``(generation, data)``; data is empty when the device refused the range."""
        resp = self._req(p.GetConfig(offset=offset, size=size), p.GetConfigResponse)
        return resp.generation, resp.data

    def write_config(self, offset: int, data: bytes, generation: int = 0) -> None:
        self._req(p.SetConfig(generation, offset, len(data), data), p.SetConfigResponse)

    def initialize(self, wanted: int | None = None) -> int:
        """The virtio init sequence: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK,
        DRIVER_OK. Returns the negotiated features.

        Raises:
            RuntimeError: the device refused FEATURES_OK.
        """
        self.set_status(0)
        self.set_status(ACKNOWLEDGE)
        self.set_status(ACKNOWLEDGE | DRIVER)
        offered = self.get_features()
        chosen = offered if wanted is None else offered & wanted
        self.set_features(chosen)
        status = self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK)
        if not status & FEATURES_OK:
            self.set_status(status | FAILED)
            raise RuntimeError(
                f"device refused features 0x{chosen:x} (status {status_names(status)})"
            )
        self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
        return chosen


@dataclasses.dataclass
class _Vqueue:
    size: int = 0
    descriptor_addr: int = 0
    driver_addr: int = 0
    device_addr: int = 0


class VirtioMsgDevice:
    """A virtio device presented over virtio-msg: subclass, set the class attributes.

    Attributes:
        device_id: virtio device id.
        device_features: the feature bits offered.
        num_queues: how many virtqueues exist.
        config: the device's config space.
        on_status: called with (old, new) whenever the driver changes the status.
    """

    device_id = 0
    vendor_id = VIRTIO_MSG_VENDOR_ID
    device_features = VIRTIO_F_VERSION_1
    num_feature_bits = 64
    num_queues = 1
    queue_max_size = QEMU_MAX_QUEUE_SIZE
    config_sizes = frozenset({0, 1, 2, 4, 8})

    def __init__(self, profile: str = "qemu-v0", config: bytes = b"") -> None:
        self.profile = profile
        self.config = bytearray(config)
        self.on_status: Callable[[int, int], None] | None = None
        self.events: list[p.Message] = []
        self._handlers: dict[type, Callable] = {
            p.DeviceInfo: self._device_info, p.GetFeatures: self._get_features,
            p.SetFeatures: self._set_features, p.GetDeviceStatus: self._get_status,
            p.SetDeviceStatus: self._set_status, p.GetConfig: self._get_config,
            p.SetConfig: self._set_config, p.GetVqueue: self._get_vqueue,
            p.SetVqueue: self._set_vqueue, p.ResetVqueue: self._reset_vqueue,
        }  # fmt: skip
        self.reset()

    def reset(self) -> None:
        """Back to power-on state: status 0, no driver features, queues unconfigured."""
        self.status = 0
        self.driver_features = 0
        self.generation = 0
        self.queues = {i: _Vqueue() for i in range(self.num_queues)}

    def handle(self, msg: p.Message) -> p.Message | None:
        """The response to ``msg``, or None (events, RESET_VQUEUE in qemu-v0, unknowns)."""
        handler = self._handlers.get(type(msg))
        if handler is None:
            if msg.EVENT:
                self.on_event(msg)
            return None
        return handler(msg)

    def serve(self, bus: VirtioMsgBus, stop: Callable[[], bool] | None = None) -> int:
        """Answer the driver on a device-role bus until ``stop()``."""
        self.profile = bus.profile
        return bus.serve(self.handle, stop=stop)

    def on_event(self, msg: p.Message) -> None:
        """EVENT_AVAIL and friends; the default keeps them in ``events``."""
        self.events.append(msg)

    # Per-message answers ----------------------------------------------------------------------

    def _device_info(self, msg: p.DeviceInfo) -> p.Message:
        extra = {"max_virtqueues": self.num_queues} if self.profile == "spec-v1" else {}
        return p.DeviceInfoResponse(
            self.device_id, self.vendor_id, self.num_feature_bits, len(self.config), **extra
        )

    def _window(self, index: int, num: int) -> tuple[int, int]:
        """(shift, mask) of feature blocks ``index .. index+num-1``, clipped to the device's
        ``num_feature_bits``: index and num come from the peer, and an unclipped
        ``mask << 32 * index`` with index 0xFFFFFFFF is a 17 GB integer."""
        if self.profile == "qemu-v0":
            num = min(num, 2)  # one u64 word carries the answer
        shift = 32 * index
        if shift >= self.num_feature_bits:
            return 0, 0  # past the last feature block: nothing there
        bits = min(32 * min(num, MAX_FEATURE_BLOCKS), self.num_feature_bits - shift)
        return shift, (1 << bits) - 1

    def _get_features(self, msg: p.GetFeatures) -> p.Message:
        shift, mask = self._window(msg.index, msg.num)
        num = min(msg.num, 2 if self.profile == "qemu-v0" else MAX_FEATURE_BLOCKS)
        return p.GetFeaturesResponse(msg.index, num, (self.device_features >> shift) & mask)

    def _set_features(self, msg: p.SetFeatures) -> p.Message:
        shift, mask = self._window(msg.index, msg.num)
        self.driver_features = (self.driver_features & ~(mask << shift)) | (
            (msg.features & mask) << shift
        )
        if self.profile == "spec-v1":
            return p.SetFeaturesResponse()
        return p.SetFeaturesResponse(msg.index, msg.num, msg.features)

    def _get_status(self, msg: p.GetDeviceStatus) -> p.Message:
        return p.GetDeviceStatusResponse(self.status)

    def _set_status(self, msg: p.SetDeviceStatus) -> p.Message:
        old, new = self.status, msg.status
        if new == 0:
            self.reset()
        else:
            if new & FEATURES_OK and self.driver_features & ~self.device_features:
                new &= ~FEATURES_OK  # asked for something we do not offer: refuse
            self.status = new
        if self.on_status is not None and old != self.status:
            self.on_status(old, self.status)
        return p.SetDeviceStatusResponse(self.status)

    def _get_config(self, msg: p.GetConfig) -> p.Message:
        if msg.size not in self.config_sizes or msg.offset + msg.size > len(self.config):
            return p.GetConfigResponse(self.generation, msg.offset, 0)
        data = bytes(self.config[msg.offset : msg.offset + msg.size])
        return p.GetConfigResponse(self.generation, msg.offset, msg.size, data)

    def _set_config(self, msg: p.SetConfig) -> p.Message:
        if msg.size in self.config_sizes and msg.offset + msg.size <= len(self.config):
            self.config[msg.offset : msg.offset + msg.size] = msg.data
            self.generation = (self.generation + 1) & 0xFFFFFFFF
        return p.SetConfigResponse(self.generation, msg.offset, msg.size, msg.data)

    def _get_vqueue(self, msg: p.GetVqueue) -> p.Message:
        vq = self.queues.get(msg.index)
        if vq is None:
            return p.GetVqueueResponse(msg.index, 0)
        return p.GetVqueueResponse(
            msg.index, self.queue_max_size, vq.size, vq.descriptor_addr, vq.driver_addr,
            vq.device_addr,
        )  # fmt: skip

    def _set_vqueue(self, msg: p.SetVqueue) -> p.Message:
        if msg.index in self.queues and msg.size <= self.queue_max_size:
            self.queues[msg.index] = _Vqueue(
                msg.size, msg.descriptor_addr, msg.driver_addr, msg.device_addr
            )
        if self.profile == "spec-v1":
            return p.SetVqueueResponse()
        return p.SetVqueueResponse(
            msg.index, msg.size, msg.descriptor_addr, msg.driver_addr, msg.device_addr
        )

    def _reset_vqueue(self, msg: p.ResetVqueue) -> p.Message | None:
        if msg.index in self.queues:
            self.queues[msg.index] = _Vqueue()
        return p.ResetVqueueResponse() if self.profile == "spec-v1" else None


class RngDevice(VirtioMsgDevice):
    """virtio-rng (entropy source, id 4): one request queue, no config, VERSION_1."""

    device_id = 4
    device_features = VIRTIO_F_VERSION_1
    num_queues = 1

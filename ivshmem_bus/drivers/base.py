"""The driver role of the virtio-msg transport: probe, initialization, events.

What QEMU's proxy driver does at reset (DEVICE_INFO, GET_FEATURES, then GET_VQUEUE 0, 1, ...
until max_size is 0) gives a ``DeviceDescription``; the status/feature/config calls are one
request each. ``negotiate`` + ``queue.DriverVirtqueue`` (one per queue) + ``driver_ok`` is the
virtio initialization with queues; ``initialize`` is the same without queues.

Events from the device (EVENT_USED, EVENT_CONFIG) arrive on the bus like requests do;
``wait_event`` takes the next one and remembers the config generation and status an
EVENT_CONFIG carried.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TypeVar

from ..bus import VirtioMsgBus
from ..core import protocol as p
from ..core.messages import MAX_FEATURE_BLOCKS
from ..core.virtio import (
    ACKNOWLEDGE,
    DEVICE_NAMES,
    DRIVER,
    DRIVER_OK,
    FAILED,
    FEATURES_OK,
    feature_names,
    status_names,
)
from ..errors import DriverError, ProtocolError

__all__ = ["DeviceDescription", "QueueInfo", "VirtioMsgDriver"]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=p.Message)


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
    """The driver role of the transport: one request per call over a driver-role bus.

    Attributes:
        features: the features ``negotiate`` chose.
        config_generation: the generation the last EVENT_CONFIG carried (None: none came).
        device_status: the status the last EVENT_CONFIG carried (NEEDS_RESET shows here).
    """

    def __init__(self, bus: VirtioMsgBus, timeout: float = 1.0) -> None:
        if bus.role != "driver":
            raise ValueError(f"VirtioMsgDriver needs a driver-role bus, not {bus.role!r}")
        self.bus = bus
        self.timeout = timeout
        self.config_generation: int | None = None
        self.device_status: int | None = None
        self.features = 0  # what negotiate() chose

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
            vq = self.get_vqueue(index)
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

    def get_vqueue(self, index: int) -> p.GetVqueueResponse:
        return self._req(p.GetVqueue(index=index), p.GetVqueueResponse)

    def set_vqueue(self, index: int, size: int, desc: int, avail: int, used: int) -> None:
        """SET_VQUEUE, then GET_VQUEUE to see whether the device took it (the response to
        SET_VQUEUE carries no error: a refusing device reports size 0 afterwards).

        Raises:
            DriverError: the device refused the queue.
        """
        self._req(p.SetVqueue(index, size, desc, avail, used), p.SetVqueueResponse)
        got = self.get_vqueue(index)
        reported = (got.descriptor_addr, got.driver_addr, got.device_addr)
        moved = any(r and r != want for r, want in zip(reported, (desc, avail, used), strict=True))
        if got.size != size or moved:  # addresses reported as 0: a device that does not say
            raise DriverError(
                f"the device refused virtqueue {index} (size {size} at 0x{desc:x}; max_size "
                f"{got.max_size}): use a power-of-two size up to max_size in a memory window "
                "the device maps (its --mem)"
            )

    def reset_vqueue(self, index: int) -> None:
        """RESET_VQUEUE (qemu-v0: no response comes; spec-v1: one does)."""
        msg = p.ResetVqueue(index=index)
        if p.expects_response(msg, self.bus.profile):
            self._req(msg, p.ResetVqueueResponse)
        else:
            self.bus.send(msg)

    def negotiate(self, wanted: int | None = None) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns the features chosen.
        Queues are set up next, then ``driver_ok``.

        Raises:
            DriverError: the device refused FEATURES_OK (FAILED is set).
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
            raise DriverError(
                f"device refused features 0x{chosen:x} of 0x{offered:x} offered (status "
                f"{status_names(status)}): it needs one the driver left out, or got one it "
                "does not offer"
            )
        self.features = chosen
        return chosen

    def driver_ok(self) -> int:
        """Set DRIVER_OK; returns the device's status."""
        return self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)

    def initialize(self, wanted: int | None = None) -> int:
        """The virtio init sequence without queues: ``negotiate`` then ``driver_ok``.
        Returns the negotiated features."""
        chosen = self.negotiate(wanted)
        self.driver_ok()
        return chosen

    def wait_event(self, timeout: float | None = None) -> p.Message | None:
        """The next event from the device, or None after ``timeout`` (default: the driver's).

        EVENT_CONFIG updates ``config_generation`` and ``device_status``.
        """
        msg = self.bus.receive(self.timeout if timeout is None else timeout)
        if isinstance(msg, p.EventConfig):
            self.config_generation = msg.generation
            self.device_status = msg.status
        return msg

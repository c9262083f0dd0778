"""A Python driver for virtio-rng: ``read_entropy(n)`` from the remote device's requestq.

Up to ``buffers`` writable buffers are in flight at once, together never more than the bytes
still wanted (so a device serving a file in order gives exactly its first N bytes, and the
next call continues where this one stopped). Buffers come back in used order, which is the
order this driver reads them in.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..core.virtio import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1
from ..core.virtqueue import VIRTIO_F_EVENT_IDX
from ..core.window import MemoryWindow
from ..errors import DriverError
from .base import VirtioMsgDriver
from .queue import Allocator, DriverVirtqueue, allocator_for

__all__ = ["RngDriver"]

DEVICE_ID = 4


class RngDriver:
    """Entropy from a remote virtio-rng device.

    Args:
        driver: a transport driver on a driver-role bus.
        window: the memory both sides reach (the driver's pool window).
        allocator: defaults to the window's own (``queue.allocator_for``).
        buffers, buffer_size, queue_size: the request queue's shape.
        event_idx: ask for VIRTIO_F_EVENT_IDX (used when the device offers it).

    Raises:
        DriverError: the remote device is not an entropy device, or refused the setup.
    """

    def __init__(
        self,
        driver: VirtioMsgDriver,
        window: MemoryWindow,
        *,
        allocator: Allocator | None = None,
        buffers: int = 8,
        buffer_size: int = 65536,
        queue_size: int = 64,
        event_idx: bool = False,
    ) -> None:
        info = driver.probe(max_queues=1)
        if info.device_id != DEVICE_ID:
            raise DriverError(
                f"the remote device is {info.device_name} (id {info.device_id}), not entropy "
                "(id 4): serve it with --device-type rng"
            )
        self.driver = driver
        features = driver.negotiate(
            VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM | event_idx << VIRTIO_F_EVENT_IDX
        )
        self.requestq = DriverVirtqueue(
            driver, 0, queue_size, window, allocator or allocator_for(window),
            buffers=buffers, buffer_size=buffer_size,
            event_idx=bool(features >> VIRTIO_F_EVENT_IDX & 1),
        )  # fmt: skip
        driver.driver_ok()
        self._lengths = [0] * buffers
        self._outstanding = 0  # bytes posted and not yet returned (kept across calls)

    def iter_entropy(self, n: int) -> Iterator[bytes]:
        """``n`` bytes of entropy, as chunks in the order the device filled them (one chunk
        per batch of buffers returned together).

        Raises:
            DriverError: the device returned an empty buffer (its source is exhausted) or
                nothing within the driver's timeout.
        """
        if n < 0:
            raise ValueError(f"cannot read {n} bytes")
        q = self.requestq
        received = 0
        while received < n:
            while q.free_buffers and received + self._outstanding < n:
                buf = q.free_buffers.popleft()
                length = min(q.buffer_size, n - received - self._outstanding)
                q.post_writable(buf, length)
                self._lengths[buf] = length
                self._outstanding += length
            q.kick()
            done = q.reap()
            if not done:
                if self.driver.wait_event() is None:
                    raise DriverError(
                        f"no entropy from the rng device within {self.driver.timeout} s "
                        f"({received} of {n} bytes): is it serving?"
                    )
                continue
            parts = []
            for buf, used in done:
                self._outstanding -= self._lengths[buf]
                q.free_buffers.append(buf)
                if used == 0:
                    raise DriverError(
                        f"the rng device returned an empty buffer after {received} of {n} "
                        "bytes: its entropy source is exhausted (a --source file too short?)"
                    )
                received += used
                parts.append(q.view(buf, used))
            yield b"".join(parts)  # one copy out of the window per batch of buffers

    def read_entropy(self, n: int) -> bytes:
        """``n`` bytes of entropy (see ``iter_entropy``)."""
        return b"".join(self.iter_entropy(n))

    def close(self) -> None:
        """Reset the device (it drops the queue), then give the memory back."""
        try:
            self.driver.set_status(0)
        finally:
            self.requestq.close()

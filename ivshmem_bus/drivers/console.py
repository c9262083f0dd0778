"""A Python driver for virtio-console port 0 (no MULTIPORT): a byte stream both ways.

receiveq (0) keeps ``rx_buffers`` writable buffers posted; each one the device returns is
read in used order and posted again at once, so the device never waits longer than this
driver takes to call ``read``. transmitq (1) sends ``write``'s bytes in ``buffer_size``
chunks through ``tx_buffers`` readable buffers, waiting (reaping) when all are in flight:
back-pressure, no drops, order kept on both queues.

``attach`` bridges the stream to two file descriptors (a terminal, or pipes).
"""

from __future__ import annotations

import os
import select
import struct
import time

from ..core.virtio import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1
from ..core.virtqueue import VIRTIO_F_EVENT_IDX
from ..core.window import MemoryWindow
from ..errors import DriverError
from .base import VirtioMsgDriver
from .queue import Allocator, DriverVirtqueue, allocator_for

__all__ = ["DETACH", "ConsoleDriver"]

DEVICE_ID = 3
VIRTIO_CONSOLE_F_SIZE = 0
DETACH = b"\x1d"  # Ctrl-]: leaves an attached terminal (as telnet's escape)


class ConsoleDriver:
    """Port 0 of a remote virtio-console device.

    Raises:
        DriverError: the remote device is not a console, or refused the setup.
    """

    def __init__(
        self,
        driver: VirtioMsgDriver,
        window: MemoryWindow,
        *,
        allocator: Allocator | None = None,
        rx_buffers: int = 8,
        tx_buffers: int = 8,
        buffer_size: int = 4096,
        queue_size: int = 16,
        event_idx: bool = False,
    ) -> None:
        info = driver.probe(max_queues=2)
        if info.device_id != DEVICE_ID:
            raise DriverError(
                f"the remote device is {info.device_name} (id {info.device_id}), not a "
                "console (id 3): serve it with --device-type console"
            )
        self.driver = driver
        alloc = allocator or allocator_for(window)
        self.features = driver.negotiate(
            VIRTIO_F_VERSION_1
            | VIRTIO_F_ACCESS_PLATFORM
            | 1 << VIRTIO_CONSOLE_F_SIZE
            | event_idx << VIRTIO_F_EVENT_IDX
        )
        eidx = bool(self.features >> VIRTIO_F_EVENT_IDX & 1)
        self.rx = DriverVirtqueue(
            driver, 0, queue_size, window, alloc, buffers=rx_buffers, buffer_size=buffer_size,
            event_idx=eidx,
        )  # fmt: skip
        try:
            self.tx = DriverVirtqueue(
                driver, 1, queue_size, window, alloc, buffers=tx_buffers, buffer_size=buffer_size,
                event_idx=eidx,
            )  # fmt: skip
        except BaseException:
            self.rx.close()
            raise
        driver.driver_ok()
        while self.rx.free_buffers:
            self.rx.post_writable(self.rx.free_buffers.popleft())
        self.rx.kick()

    def size(self) -> tuple[int, int] | None:
        """(cols, rows) from the config space, or None without VIRTIO_CONSOLE_F_SIZE."""
        if not self.features >> VIRTIO_CONSOLE_F_SIZE & 1:
            return None
        _, raw = self.driver.read_config(0, 4)
        return struct.unpack("<HH", raw) if len(raw) == 4 else None

    def read(self, timeout: float = 0.0) -> bytes:
        """Bytes the device sent, b"" when none came within ``timeout`` seconds."""
        end = time.monotonic() + timeout
        while True:
            done = self.rx.reap()
            if done:
                parts = [bytes(self.rx.view(buf, n)) for buf, n in done]
                for buf, _ in done:
                    self.rx.post_writable(buf)
                self.rx.kick()
                return b"".join(parts)
            left = end - time.monotonic()
            if left <= 0:
                return b""
            self.driver.wait_event(left)

    def write(self, data: bytes) -> None:
        """Send ``data`` in order, waiting for transmit buffers as needed.

        Raises:
            DriverError: no transmit buffer came back within the driver's timeout.
        """
        tx = self.tx
        view = memoryview(data)
        while view:
            if not tx.free_buffers:
                self._reap_tx(wait=True)
                continue
            buf = tx.free_buffers.popleft()
            chunk = view[: tx.buffer_size]
            tx.view(buf, len(chunk))[:] = chunk
            tx.post_readable(buf, len(chunk))
            view = view[len(chunk) :]
            if not tx.free_buffers or not view:
                tx.kick()

    def _reap_tx(self, wait: bool) -> None:
        done = self.tx.reap()
        self.tx.free_buffers.extend(buf for buf, _ in done)
        if not done and wait and self.driver.wait_event() is None and not self.tx.reap():
            raise DriverError(
                f"the console device took no transmit buffer within {self.driver.timeout} s: "
                "is it serving, and is its host side reading?"
            )

    def drain(self) -> None:
        """Wait until the device has taken every byte written."""
        while self.tx.queue.in_flight:
            self._reap_tx(wait=True)

    def attach(self, in_fd: int, out_fd: int, *, linger: float = 0.5, escape: bool = False) -> None:
        """Copy ``in_fd`` to the device and the device to ``out_fd`` until ``in_fd`` ends
        (then until the device is quiet for ``linger`` s), or, with ``escape``, Ctrl-]."""
        while True:
            ready = select.select([in_fd], [], [], 0.01)[0]
            if ready:
                data = os.read(in_fd, 4096)
                if escape and DETACH in data:
                    self.write(data[: data.index(DETACH)])
                    self.drain()
                    return
                if not data:
                    break
                self.write(data)
            self._copy_out(out_fd, 0.0)
        self.drain()
        while self._copy_out(out_fd, linger):
            pass

    def _copy_out(self, out_fd: int, timeout: float) -> bool:
        data = self.read(timeout)
        view = memoryview(data)
        while view:
            view = view[os.write(out_fd, view) :]
        return bool(data)

    def close(self) -> None:
        """Reset the device (it drops the queues), then give the memory back."""
        try:
            self.driver.set_status(0)
        finally:
            self.rx.close()
            self.tx.close()

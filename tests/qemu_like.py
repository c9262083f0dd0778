"""A driver that starts as QEMU's virtio-msg-bus-ivshmem does (wire-format spec sections 2-4).

It joins the ivshmem server, puts DEVICE_INFO in the driver queue the instant its greeting is
complete, rings the device (vector 0), and polls the device queue for the response without
sleeping; QEMU gives up (aborts the whole guest) after about 1 ms. It never claims a queue
and never resets one: what QEMU does not do, it does not do either.
"""

from __future__ import annotations

import os
import time

from ivshmem_bus.backends.server_client import ServerClientDevice
from ivshmem_bus.core import protocol
from ivshmem_bus.core.queue import SpscQueue

QEMU_DEADLINE = 1e-3  # seconds: QEMU's ~1024 polls of the response queue


class QemuLikeDriver:
    """A joined driver peer; ``first_response`` sends its DEVICE_INFO at once."""

    def __init__(self, sock: str | os.PathLike[str], vectors: int = 2) -> None:
        self.dev = ServerClientDevice(sock, vectors=vectors)

    def first_response(self, device_vmid: int, give_up: float = 1.0) -> float:
        """Seconds from the request's enqueue to its response's arrival (inf: none within
        ``give_up``: it polls longer than QEMU, so that a slow answer shows its time)."""
        shm = self.dev.shmem
        regions = [shm[0:0x1000], shm[0x1000:0x2000]]
        tx, rx = (SpscQueue(r) for r in regions)
        try:
            raw = protocol.encode(protocol.DeviceInfo())
            t0 = time.perf_counter()
            assert tx.put(raw), "the driver queue is full"
            self.dev.ring(device_vmid, 0)
            while (elapsed := time.perf_counter() - t0) < give_up:
                slot = rx.get()
                if slot is not None:
                    reply = protocol.decode(slot)
                    assert isinstance(reply, protocol.DeviceInfoResponse), reply
                    return elapsed
            return float("inf")
        finally:
            tx.release()
            rx.release()
            for r in regions:
                r.release()

    def close(self) -> None:
        self.dev.close()

    def __enter__(self) -> QemuLikeDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def first_response(sock: str | os.PathLike[str], device_vmid: int, vectors: int = 2) -> float:
    """Join, send at once, time the response, leave: one QEMU guest's start."""
    with QemuLikeDriver(sock, vectors) as driver:
        return driver.first_response(device_vmid)

"""A driver that starts as QEMU's virtio-msg-bus-ivshmem does (wire-format spec sections 2-4).

It joins the ivshmem server, puts DEVICE_INFO in the driver queue at once, rings the device
(vector 0), and polls the device queue for the response: 128 pure spins, then yielding the
CPU between polls; QEMU gives up (aborts the whole guest) after about 1 ms. It never claims
a queue and never resets one: what QEMU does not do, it does not do either.

It runs in a process of its own, with SCHED_FIFO when permitted (as ``serve`` has), so what
it measures is the device side's answer, not the test process being preempted on a busy
machine. ``python -m tests.qemu_like SOCK`` speaks a line protocol on stdin/stdout:
it prints ``joined VMID``; each ``go DEVICE_VMID`` gets the seconds to the response (inf
for none within a second: it polls longer than QEMU, so a slow answer shows its time).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

QEMU_DEADLINE = 1e-3  # seconds: QEMU's ~1024 polls of the response queue, "about 1 ms"
ROOT = Path(__file__).resolve().parent.parent


class QemuLikeDriver:
    """A joined driver peer (a child process); ``first_response`` sends its DEVICE_INFO."""

    def __init__(self, sock: str | os.PathLike[str], vectors: int = 2) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.qemu_like", os.fspath(sock), str(vectors)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        line = self._line()
        assert line.startswith("joined "), line
        self.vmid = int(line.split()[1])

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the QEMU-like driver exited ({self.proc.wait()})")
        return line.strip()

    def first_response(self, device_vmid: int) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"go {device_vmid}\n")
        self.proc.stdin.flush()
        return float(self._line())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> QemuLikeDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def first_response(sock: str | os.PathLike[str], device_vmid: int, vectors: int = 2) -> float:
    """Join, send at once, time the response, leave: one QEMU guest's start."""
    with QemuLikeDriver(sock, vectors) as driver:
        return driver.first_response(device_vmid)


def _child(sock: str, vectors: int) -> None:
    from ivshmem_bus.backends.server_client import ServerClientDevice
    from ivshmem_bus.core import protocol
    from ivshmem_bus.core.queue import SpscQueue

    if os.environ.get("QEMU_LIKE_SCHED") != "normal":  # normal: to measure a normal serve
        with contextlib.suppress(PermissionError):
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    raw = protocol.encode(protocol.DeviceInfo())
    with ServerClientDevice(sock, vectors=vectors) as dev:
        print(f"joined {dev.vmid}", flush=True)
        for line in sys.stdin:
            device_vmid = int(line.split()[1])
            shm = dev.shmem
            regions = [shm[0:0x1000], shm[0x1000:0x2000]]
            tx, rx = (SpscQueue(r) for r in regions)
            try:
                t0 = time.perf_counter()
                assert tx.put(raw), "the driver queue is full"
                dev.ring(device_vmid, 0)
                polls, elapsed = 0, float("inf")
                while time.perf_counter() - t0 < 1.0:
                    slot = rx.get()
                    if slot is not None:
                        elapsed = time.perf_counter() - t0
                        reply = protocol.decode(slot)
                        assert isinstance(reply, protocol.DeviceInfoResponse), reply
                        break
                    polls += 1
                    if polls > 128:
                        os.sched_yield()  # QEMU sleeps 1-7 us here; the device may share our CPU
            finally:
                tx.release()
                rx.release()
                for r in regions:
                    r.release()
            print(repr(elapsed), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]))

"""``ping`` over a driver-role bus: round trips, one line each, and statistics like ping(8).

qemu-v0 has no PING message: GET_DEVICE_STATUS is the cheapest round trip there (a read that
changes nothing on the device); spec-v1 sends the bus PING with the sequence number.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

from .bus import VirtioMsgBus
from .core import protocol
from .errors import BusTimeout

__all__ = ["PingResult", "ping"]


@dataclasses.dataclass
class PingResult:
    remote: int
    sent: int = 0
    times_us: list[float] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every request sent got its reply (and at least one was sent)."""
        return bool(self.times_us) and len(self.times_us) == self.sent

    def summary(self) -> list[str]:
        times, sent = self.times_us, self.sent
        loss = 100.0 * (sent - len(times)) / sent if sent else 0.0
        lines = [
            f"--- vmid {self.remote} ping statistics ---",
            f"{sent} requests sent, {len(times)} replies received, {loss:.0f}% loss",
        ]
        if times:
            avg = sum(times) / len(times)
            lines.append(f"round trip min/avg/max = {min(times):.1f}/{avg:.1f}/{max(times):.1f} us")
        return lines


def ping(
    bus: VirtioMsgBus,
    count: int,
    interval: float,
    timeout: float,
    stop: threading.Event,
    say: Callable[[str], None] = print,
) -> PingResult:
    """``count`` round trips ``interval`` seconds apart, until ``stop`` is set."""
    result = PingResult(bus.remote_vmid)
    for seq in range(1, count + 1):
        if stop.is_set():
            break
        msg = protocol.BusPing(data=seq) if bus.profile == "spec-v1" else protocol.GetDeviceStatus()
        result.sent += 1
        t0 = time.perf_counter()
        try:
            bus.request(msg, timeout)
        except BusTimeout:
            say(f"no reply from vmid {result.remote}: seq={seq}")
            continue
        result.times_us.append((time.perf_counter() - t0) * 1e6)
        say(f"reply from vmid {result.remote}: seq={seq} time={result.times_us[-1]:.1f} us")
        if seq < count:
            stop.wait(interval)
    return result

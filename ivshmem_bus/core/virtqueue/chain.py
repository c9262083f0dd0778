"""One available descriptor chain as the device sees it: zero-copy views, in chain order."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Chain"]


class Chain(NamedTuple):
    """One available descriptor chain, as the device sees it.

    Attributes:
        head: the chain's head descriptor index (what ``push`` returns to the driver).
        readable: read-only views of the device-readable buffers, in chain order.
        writable: writable views of the device-writable buffers, in chain order.

    The views point into the shared window (zero-copy); they are valid until the chain is
    pushed back. The driver may change the bytes under them at any time: copy what must not
    change while it is parsed.

    A named tuple rather than a dataclass: ``DeviceQueue.pop`` makes one per buffer, and a
    tuple is built in C (``tuple.__new__``) where a dataclass runs a Python ``__init__``.
    """

    head: int
    readable: list[memoryview]
    writable: list[memoryview]

    @property
    def readable_len(self) -> int:
        return sum(len(v) for v in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(len(v) for v in self.writable)

    def read_all(self) -> bytes:
        """The readable buffers concatenated (one copy)."""
        return b"".join(self.readable)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Fill the writable buffers in order from ``data``; returns the bytes written.

        Writes ``min(len(data), writable_len)`` bytes: the value for ``push(head, written)``.
        """
        src = memoryview(data).cast("B")
        total = len(src)
        off = 0
        for buf in self.writable:
            n = min(len(buf), total - off)
            if n <= 0:
                break
            buf[:n] = src[off : off + n]
            off += n
        return off

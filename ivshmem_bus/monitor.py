"""A read-only tap on a live link's two queues, and a pcap writer for what it sees.

The tap never writes shared memory: it may run on a read-only mapping of BAR2 beside two
peers (QEMU to QEMU too) and the link's traffic is byte-for-byte what it would be without
it. It polls each queue's head index (range-checked: the tap trusts nobody), copies the
slots between the last head it saw and the new one, and decodes them.

Limits, said plainly: the tap races the consumer. A slot is safe to read until the
producer reuses it, one lap later; a tap that falls a whole lap behind cannot tell (indexes
are slot numbers, not free-running counters), and sees the newer message. A tap that reads
a slot while it is being rewritten notices the head moving past it and counts an overrun.

pcap: link type LINKTYPE_USER0 (147); each record is a 4-byte pseudo-header (direction:
0 driver->device, 1 device->driver; profile: 0 qemu-v0, 1 spec-v1; two reserved bytes)
then the message bytes up to its msg_size. tools/virtio-msg.lua decodes it in Wireshark.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from .bus import DEVICE_QUEUE_OFFSET, DRIVER_QUEUE_OFFSET, QUEUE_SIZE
from .core import protocol
from .core.queue import HEAD_OFFSET, QUEUE_HEADER_SIZE, SLOT_SIZE, TAIL_OFFSET, queue_capacity
from .errors import MonitorError, ProtocolError, QueueCorrupt

__all__ = ["LINKTYPE_USER0", "LinkTap", "PcapWriter", "QueueTap", "Seen", "open_pcap", "tap_fd"]

LINKTYPE_USER0 = 147
DIRECTIONS = ("driver->device", "device->driver")


class QueueTap:
    """Observes one queue's new slots without writing anything.

    Args:
        region: the queue's bytes; read-only buffers are fine.
        from_tail: start with the messages already in flight (else only new ones).
    """

    def __init__(self, region: memoryview | bytes, *, from_tail: bool = True) -> None:
        view = memoryview(region).cast("B")
        self._capacity = queue_capacity(len(view))
        if self._capacity < 2:
            raise ValueError(f"queue region of {len(view)} bytes holds fewer than 2 slots")
        self._view = view
        self._idx = view[:QUEUE_HEADER_SIZE].cast("I")
        self.overruns = 0
        if from_tail:
            self._seen = self._load(TAIL_OFFSET // 4, "tail")
        else:
            self._seen = self._load(HEAD_OFFSET // 4, "head")

    def _load(self, word: int, name: str) -> int:
        value = self._idx[word]  # one aligned 32-bit load
        if value >= self._capacity:
            raise QueueCorrupt(name, value, self._capacity)
        return value

    def poll(self) -> list[bytes]:
        """Copies of the slots published since the last poll, oldest first (64 bytes each).

        Raises:
            QueueCorrupt: the head index is out of range.
        """
        head = self._load(HEAD_OFFSET // 4, "head")
        out = []
        i = self._seen
        while i != head:
            off = QUEUE_HEADER_SIZE + i * SLOT_SIZE
            out.append(bytes(self._view[off : off + SLOT_SIZE]))
            i = i + 1 if i + 1 < self._capacity else 0
        after = self._load(HEAD_OFFSET // 4, "head")
        moved = (after - head) % self._capacity
        # the producer wrote slots head..after-1 meanwhile; they overlap what we copied
        # (seen..head-1) only if copied + moved exceeds the ring
        if out and (head - self._seen) % self._capacity + moved > self._capacity:
            self.overruns += 1  # the producer may have lapped into slots we were copying
        self._seen = head
        return out

    def release(self) -> None:
        self._idx.release()
        self._view.release()


@dataclass(frozen=True, slots=True)
class Seen:
    """One message the tap saw."""

    time: float
    direction: int  # 0 driver->device, 1 device->driver
    raw: bytes  # the whole 64-byte slot
    message: protocol.Message | None  # None when it did not decode
    error: str | None = None

    def describe(self, profile: str = "qemu-v0") -> str:
        """One line: time, direction, type, the fields the profile carries."""
        micros = int(self.time * 1e6) % 1_000_000
        stamp = time.strftime("%H:%M:%S", time.localtime(self.time)) + f".{micros:06d}"
        head = f"{stamp} {DIRECTIONS[self.direction]}"
        msg = self.message
        if msg is None:
            return f"{head} MALFORMED {self.error} raw={self.raw[:16].hex()}"
        fields = " ".join(
            f"{k}={_show(v)}" for k, v in protocol.wire_fields(msg, profile).items() if k != "raw"
        )
        extra = f" dev_num={msg.dev_num}" if msg.dev_num else ""
        extra += f" token={msg.token}" if msg.token else ""
        return f"{head} {type(msg).__name__}{extra} {fields}".rstrip()


def _show(value: object) -> str:
    if isinstance(value, bytes):
        return value.hex() or "''"
    if isinstance(value, int) and value > 9:
        return f"0x{value:x}"
    return str(value)


class LinkTap:
    """Both queues of a link's BAR2, observed read-only.

    Raises:
        ValueError: unknown profile.
        MonitorError: the memory is smaller than the two queues (8 KiB).
    """

    def __init__(
        self,
        shmem: memoryview | bytes | None,
        profile: str = "qemu-v0",
        *,
        queues: tuple[memoryview, memoryview] | None = None,
    ) -> None:
        """Tap BAR2's two queues (0x0000 and 0x1000), or ``queues`` (driver -> device,
        device -> driver: a backend's ``message_queues()``, the linux-user bus's files)."""
        if profile not in protocol.PROFILES:
            raise ValueError(f"unknown profile {profile!r}")
        if (shmem is None) == (queues is None):
            raise ValueError("give the shared memory or the two queue regions, not both")
        view: memoryview | None = None
        if queues is None:
            assert shmem is not None
            view = memoryview(shmem).cast("B")
            need = DEVICE_QUEUE_OFFSET + QUEUE_SIZE
            if (size := len(view)) < need:
                view.release()
                raise MonitorError(
                    f"the shared memory is {size} bytes; a link needs "
                    f"{need} (two 4 KiB queues): is this the server's -m file?"
                )
            queues = (
                view[DRIVER_QUEUE_OFFSET : DRIVER_QUEUE_OFFSET + QUEUE_SIZE],
                view[DEVICE_QUEUE_OFFSET : DEVICE_QUEUE_OFFSET + QUEUE_SIZE],
            )
        self.profile = profile
        self._view = view
        self.taps = (QueueTap(queues[0]), QueueTap(queues[1]))

    def poll(self) -> list[Seen]:
        now = time.time()
        out = []
        for direction, tap in enumerate(self.taps):
            for raw in tap.poll():
                try:
                    out.append(Seen(now, direction, raw, protocol.decode(raw, self.profile)))
                except ProtocolError as exc:
                    out.append(Seen(now, direction, raw, None, exc.reason))
        return out

    def follow(
        self,
        interval: float = 1e-4,
        duration: float | None = None,
        *,
        stop: Callable[[], bool] | None = None,
        count: int = 0,
    ) -> Iterator[Seen]:
        """Poll every ``interval`` seconds, yielding what is seen, for ``duration`` seconds,
        until ``stop()`` is true, or (``count`` > 0) after ``count`` messages."""
        end = None if duration is None else time.monotonic() + duration
        shown = 0
        while (end is None or time.monotonic() < end) and not (stop and stop()):
            for seen in self.poll():
                yield seen
                shown += 1
                if count and shown >= count:
                    return
            time.sleep(interval)

    def release(self) -> None:
        for tap in self.taps:
            tap.release()
        if self._view is not None:
            self._view.release()

    def __enter__(self) -> LinkTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def tap_fd(fd: int, profile: str = "qemu-v0", name: str = "") -> Iterator[LinkTap]:
    """A ``LinkTap`` on a read-only mapping of the shared-memory ``fd`` (not closed here).

    Every view is released before the mapping closes, on every path (an mmap with a view
    left cannot close: ``BufferError``).

    Raises:
        MonitorError: ``fd`` cannot be mapped or is smaller than the two queues.
    """
    where = name or f"fd {fd}"
    try:
        size = os.fstat(fd).st_size
        mem = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise MonitorError(
            f"{where}: cannot map it as shared memory ({reason}): give the server's -m file, "
            f"--server PATH or --fake DIR"
        ) from exc
    try:
        view = memoryview(mem)
        try:
            try:
                tap = LinkTap(view, profile)
            except MonitorError as exc:
                raise MonitorError(f"{where}: {exc}") from None
            with tap:
                yield tap
        finally:
            view.release()
    finally:
        mem.close()


def open_pcap(path: str) -> BinaryIO:
    """Open ``path`` for a pcap, or raise ``MonitorError`` naming it and the fix."""
    try:
        return open(path, "wb")
    except OSError as exc:
        raise MonitorError(
            f"cannot write the pcap {path}: {exc.strerror}: give a file path in a directory "
            f"that exists and is writable"
        ) from exc


class PcapWriter:
    """Writes seen messages as a classic pcap file (LINKTYPE_USER0)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        # magic, v2.4, thiszone, sigfigs, snaplen, linktype
        header = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 4 + SLOT_SIZE, LINKTYPE_USER0)
        stream.write(header)

    def write(self, seen: Seen, profile: str) -> None:
        hsize = protocol.HEADER_SIZE[profile]
        size = int.from_bytes(seen.raw[hsize - 2 : hsize], "little")  # msg_size, untrusted
        body = seen.raw[: min(max(size, hsize), len(seen.raw))]
        record = bytes([seen.direction, protocol.PROFILES.index(profile), 0, 0]) + body
        secs = int(seen.time)
        self._stream.write(
            struct.pack("<IIII", secs, int((seen.time - secs) * 1e6), len(record), len(record))
        )
        self._stream.write(record)
        self._stream.flush()

"""Test helpers for the virtqueue core: raw spec-layout accessors and an auditing window.

The raw accessors below write and read the rings at the byte offsets of the virtio spec's
"Split Virtqueues" tables, written out here from the spec, not imported from the code under
test: descriptor {addr le64 @0, len le32 @8, flags le16 @12, next le16 @14}, 16 bytes each;
available ring flags @0, idx @2, ring[i] @4 + 2i, used_event @4 + 2N; used ring flags @0,
idx @2, ring[i] = {id le32 @4 + 8i, len le32 @8 + 8i}, avail_event @4 + 8N.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from ivshmem_bus.core.window import BufferWindow

BASE = 0x4000_0000  # driver address of the window's first byte (a non-zero mem-offset)


class StepLimit(AssertionError):
    """The device walked more steps than any bounded walk can: a hang, caught without a timer."""


@dataclass
class AuditWindow:
    """A ``MemoryWindow`` over a bytearray that logs every access and refuses runaway walks.

    Every request goes to a real ``BufferWindow`` (which refuses out-of-window ranges); every
    range it *granted* is asserted inside ``[base, base + size)`` and logged as (op, addr,
    length). ``max_views`` bounds ``view`` calls since the last ``reset_steps()``: one more
    raises ``StepLimit``, so an unbounded descriptor walk fails at a known count, not on a
    timeout.
    """

    buf: bytearray
    base: int = BASE
    name: str = "audit window"
    max_views: int | None = None
    log: list[tuple[str, int, int]] = field(default_factory=list)
    views: int = 0
    on_fence: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        self._w = BufferWindow(self.buf, self.base, name=self.name)

    @property
    def size(self) -> int:
        return len(self.buf)

    def _inside(self, addr: int, length: int) -> None:
        assert self.base <= addr and addr + length <= self.base + len(self.buf), (addr, length)

    def view(self, addr: int, length: int) -> memoryview:
        self.views += 1
        if self.max_views is not None and self.views > self.max_views:
            raise StepLimit(f"{self.views} view() calls: the walk is not bounded")
        v = self._w.view(addr, length)
        self._inside(addr, length)
        self.log.append(("view", addr, length))
        return v

    def load16(self, addr: int) -> int:
        value = self._w.load16(addr)
        self._inside(addr, 2)
        self.log.append(("load16", addr, 2))
        return value

    def store16(self, addr: int, value: int) -> None:
        self._w.store16(addr, value)
        self._inside(addr, 2)
        self.log.append(("store16", addr, 2))

    def fence(self) -> None:
        self.log.append(("fence", 0, 0))
        if self.on_fence is not None:
            self.on_fence()

    def reset_steps(self) -> None:
        self.views = 0
        self.log.clear()


# -- raw spec-layout access (independent of the code under test) ---------------------------

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_ELEM = struct.Struct("<II")


@dataclass
class RawRings:
    """Reads and writes one queue's rings at the spec's byte offsets in ``buf``."""

    buf: bytearray
    base: int
    size: int
    desc: int
    avail: int
    used: int

    def put_desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        _DESC.pack_into(self.buf, self.desc - self.base + 16 * i, addr, length, flags, nxt)

    def get_desc(self, i: int) -> tuple[int, int, int, int]:
        return _DESC.unpack_from(self.buf, self.desc - self.base + 16 * i)

    def put_table(self, addr: int, j: int, a: int, length: int, flags: int, nxt: int) -> None:
        """One descriptor of an indirect table at driver address ``addr``."""
        _DESC.pack_into(self.buf, addr - self.base + 16 * j, a, length, flags, nxt)

    def _u16(self, addr: int) -> int:
        return _U16.unpack_from(self.buf, addr - self.base)[0]

    def _set16(self, addr: int, value: int) -> None:
        _U16.pack_into(self.buf, addr - self.base, value & 0xFFFF)

    # available ring: flags @0, idx @2, ring @4, used_event @4 + 2N
    avail_flags = property(lambda s: s._u16(s.avail), lambda s, v: s._set16(s.avail, v))
    avail_idx = property(lambda s: s._u16(s.avail + 2), lambda s, v: s._set16(s.avail + 2, v))
    used_event = property(
        lambda s: s._u16(s.avail + 4 + 2 * s.size),
        lambda s, v: s._set16(s.avail + 4 + 2 * s.size, v),
    )

    def avail_entry(self, slot: int) -> int:
        return self._u16(self.avail + 4 + 2 * slot)

    def put_avail_entry(self, slot: int, head: int) -> None:
        self._set16(self.avail + 4 + 2 * slot, head)

    # used ring: flags @0, idx @2, ring @4 (8 bytes each), avail_event @4 + 8N
    used_flags = property(lambda s: s._u16(s.used), lambda s, v: s._set16(s.used, v))
    used_idx = property(lambda s: s._u16(s.used + 2), lambda s, v: s._set16(s.used + 2, v))
    avail_event = property(
        lambda s: s._u16(s.used + 4 + 8 * s.size),
        lambda s, v: s._set16(s.used + 4 + 8 * s.size, v),
    )

    def used_elem(self, slot: int) -> tuple[int, int]:
        return _ELEM.unpack_from(self.buf, self.used - self.base + 4 + 8 * slot)

    def put_used_elem(self, slot: int, head: int, length: int) -> None:
        _ELEM.pack_into(self.buf, self.used - self.base + 4 + 8 * slot, head, length)

    def offer(self, head: int) -> None:
        """The driver's side of one chain made available: ring entry, then idx + 1."""
        idx = self.avail_idx
        self.put_avail_entry(idx % self.size, head)
        self.avail_idx = idx + 1

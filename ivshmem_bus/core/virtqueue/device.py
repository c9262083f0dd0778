"""The device side of a split virtqueue: pop available chains, push used elements, publish.

Everything the driver wrote is hostile (the driver is another VM): avail.idx, every ring entry,
every descriptor field, every indirect table. Each is range-checked before it is used; a chain
is walked a bounded number of steps (at most N descriptors in the table, at most ``len / 16``
in an indirect table), so a loop ends in an error, never in a hang; every buffer becomes a
view through ``MemoryWindow.view``, which refuses any byte outside the window. The first bad
value raises ``VirtqueueError`` and the queue is broken for good: the device sets
DEVICE_NEEDS_RESET and keeps serving its other queues.

Ordering (spec "Receiving Used Buffers" / "Supplying Buffers", device's mirror):

- pop: load avail.idx (one 16-bit access), fence (acquire), then ring entries and descriptors;
- publish: used elements, fence (release), store used.idx (one 16-bit access), fence
  (StoreLoad), then read the driver's avail.flags / used_event to decide on EVENT_USED.

A device loop is ``while (chain := q.pop()) is not None: ...; q.push(chain.head, n)`` then
``if q.publish(): send EVENT_USED``. ``pop()`` returning ``None`` means "empty, and the driver
will kick for the next chain" when notifications are enabled: with EVENT_IDX it writes
avail_event and re-reads avail.idx after a full fence before saying so.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...errors import VirtqueueError, WindowError
from ..window import BufferWindow, MemoryWindow
from .chain import Chain
from .layout import (
    DESC,
    MAX_QUEUE_SIZE,
    RING_HEADER,
    USED_ELEM_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    VirtqLayout,
    ring_views,
    vring_need_event,
)

__all__ = ["MAX_INDIRECT", "Chain", "DeviceQueue"]

MAX_INDIRECT = MAX_QUEUE_SIZE
"""The most descriptors one indirect table may hold: 32768, the largest queue size.

Drivers do write tables longer than their queue (Linux, for a request of many segments), so
the bound is not the queue's size; it only keeps one pop's walk short, whatever the table."""

_NEXT = VIRTQ_DESC_F_NEXT
_WRITE = VIRTQ_DESC_F_WRITE
_INDIRECT = VIRTQ_DESC_F_INDIRECT
_FIX = "the driver wrote a corrupt virtqueue; reset the device to recover"
_chain = tuple.__new__  # Chain(head, readable, writable) built in C: one per buffer


def _name(head: int, outer: int, i: int) -> str:
    """How an error names descriptor ``i`` of chain ``head``: in the descriptor table
    (``outer`` -1), or in the indirect table that descriptor ``outer`` points to."""
    if outer < 0:
        return f"chain head={head}: descriptor {i}"
    return f"chain head={head}: descriptor {outer}: indirect descriptor {i}"


def _loop_message(head: int, outer: int, n: int, i: int, nxt: int) -> str:
    """The error for a chain longer than its table (``n`` descriptors): a loop."""
    if outer < 0:
        return (
            f"chain head={head} is longer than the queue size {n} "
            f"(descriptor {i} next={nxt}: a loop)"
        )
    return (
        f"chain head={head}: descriptor {outer}: the chain in the indirect table is longer "
        f"than its {n} descriptors (indirect descriptor {i} next={nxt}: a loop)"
    )


class DeviceQueue:
    """One split virtqueue, device role, over a memory window (sans-I/O).

    Args:
        window: the memory the driver's addresses resolve through.
        index: the virtqueue index (names the queue in every error).
        layout: where the driver put the queue (SET_VQUEUE); checked here.
        event_idx: VIRTIO_F_EVENT_IDX was negotiated (used_event / avail_event replace flags).
        indirect: VIRTIO_F_INDIRECT_DESC was negotiated (else an INDIRECT flag is refused).
        base_idx: the index both rings start from (virtio: 0; vhost's SET_VRING_BASE). The
            driver starts its rings at the same value.

    Raises:
        VirtqueueError: the layout fails ``VirtqLayout.check``.
    """

    def __init__(
        self,
        window: MemoryWindow,
        index: int,
        layout: VirtqLayout,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        base_idx: int = 0,
    ) -> None:
        rings = ring_views(window, layout, index)
        self.index = index
        self.layout = layout
        self.broken = False
        self._error: str | None = None
        self._window = window
        self._view = window.view
        self._fence = window.fence
        size = layout.size
        self._size = size
        self._mask = size - 1
        self._event_idx = event_idx
        self._indirect = indirect
        self._desc, self._avail, self._used = rings.desc, rings.avail, rings.used
        # Typed views of the two rings for the data path: one item access per ring entry or
        # used-element field instead of a struct call (native order: the project's hosts are
        # little-endian, as the window's own 16-bit accesses already assume).
        self._ring = self._avail[RING_HEADER : RING_HEADER + 2 * size].cast("H")
        self._elems = self._used[RING_HEADER : RING_HEADER + USED_ELEM_SIZE * size].cast("I")
        # The descriptor table as u64 / u32 / u16 items for the direct path: descriptor i's
        # addr is _desc_q[2i], len _desc_i[4i + 2], flags _desc_h[8i + 6]; three item reads
        # instead of one struct call and its tuple (the fields are checked the same way).
        self._desc_q = self._desc.cast("Q")
        self._desc_i = self._desc.cast("I")
        self._desc_h = self._desc.cast("H")
        # A plain BufferWindow (view() not overridden) is sliced here directly for a chain of
        # one descriptor: the same range check as BufferWindow.view, without the call.
        flat = isinstance(window, BufferWindow) and type(window).view is BufferWindow.view
        self._flat = window.buffer if isinstance(window, BufferWindow) and flat else None
        # Its read-only twin: a readable buffer is one slice of it, not a slice then a
        # ``toreadonly()`` (two view objects per chain).
        self._flat_ro = self._flat.toreadonly() if self._flat is not None else None
        self._flat_base = window.base
        self._avail_flags_addr = rings.avail_flags
        self._avail_idx_addr = rings.avail_idx
        self._used_event_addr = rings.used_event
        self._used_flags_addr = rings.used_flags
        self._used_idx_addr = rings.used_idx
        self._avail_event_addr = rings.avail_event
        base = base_idx & 0xFFFF
        self._last_avail = base  # next ring index to pop
        self._avail_seen = base  # avail.idx as last read (checked)
        self._used_idx = base  # next used index to write
        self._used_published = base  # used.idx as last stored
        self._in_flight = 0  # popped, not yet pushed
        self._notify = True  # we want EVENT_AVAIL
        self._avail_event = -1  # avail_event as last stored (-1: never)

    # -- errors -------------------------------------------------------------------------------

    def _break(self, reason: str) -> VirtqueueError:
        """Mark the queue broken and return the error to raise."""
        self.broken = True
        if self._error is None:
            self._error = reason
        return VirtqueueError(self.index, f"{reason}: {_FIX}")

    def _refuse_broken(self) -> VirtqueueError:
        return VirtqueueError(
            self.index, f"queue is broken ({self._error}); reset the device to use it again"
        )

    # -- the available ring -------------------------------------------------------------------

    def _load_avail_idx(self) -> int:
        """Read avail.idx once and check the jump; the only read of that word."""
        idx = self._window.load16(self._avail_idx_addr)
        if ((idx - self._last_avail) & 0xFFFF) > self._size:
            raise self._break(
                f"avail.idx jumped from {self._last_avail} to {idx}, more than the "
                f"queue size {self._size}"
            )
        self._avail_seen = idx
        return idx

    def pending(self) -> int:
        """Chains the driver made available that have not been popped (reads avail.idx).

        Raises:
            VirtqueueError: avail.idx moved by more than the queue size (the queue breaks).
        """
        if self.broken:
            raise self._refuse_broken()
        return (self._load_avail_idx() - self._last_avail) & 0xFFFF

    def pop(self) -> Chain | None:
        """The next available chain, or ``None`` when there is none.

        With notifications enabled and EVENT_IDX, ``None`` is returned only after avail_event
        was set to the next index and avail.idx re-read after a full fence: the driver will
        send EVENT_AVAIL for the next chain.

        Raises:
            VirtqueueError: a hostile ring entry, descriptor or avail.idx (reason names the
                head and the field); the queue is then broken and every later pop raises.
        """
        if self.broken:
            raise self._refuse_broken()
        last = self._last_avail
        if last == self._avail_seen:
            if self._load_avail_idx() == last:
                if not (self._notify and self._event_idx) or self._avail_event == last:
                    return None
                self._window.store16(self._avail_event_addr, last)
                self._avail_event = last
                self._fence()  # StoreLoad: avail_event before re-reading avail.idx
                if self._load_avail_idx() == last:
                    return None
            self._fence()  # acquire: ring entries and descriptors after avail.idx
        head = self._ring[last & self._mask]
        self._last_avail = (last + 1) & 0xFFFF
        size = self._size
        if head >= size:
            raise self._break(
                f"avail ring entry {last} head={head} is out of range (queue size {size})"
            )
        flat = self._flat
        if flat is not None:  # the common chain, one direct buffer, without the general walk
            flags = self._desc_h[(head << 3) + 6]
            if not flags & (_NEXT | _INDIRECT):
                addr = self._desc_q[head << 1]
                length = self._desc_i[(head << 2) + 2]
                off = addr - self._flat_base
                end = off + length
                if off < 0 or end > len(flat):
                    raise self._break(
                        f"chain head={head}: descriptor {head} addr=0x{addr:x} len={length} "
                        f"lies outside {self._window.name}"
                    )
                self._in_flight += 1
                if flags & _WRITE:
                    return _chain(Chain, (head, [], [flat[off:end]]))
                return _chain(Chain, (head, [self._flat_ro[off:end]], []))  # type: ignore[index]
        desc = self._desc
        # The walk, inline (the data path): one descriptor read, one checked view per step;
        # at most ``n`` steps in a table, each one counted before ``next`` is followed. An
        # INDIRECT descriptor in the descriptor table switches the walk to its table
        # (``outer``: that descriptor; -1 while in the descriptor table), where the chain ends.
        view = self._view
        unpack = DESC.unpack_from
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        table, n, outer = desc, size, -1
        i = head
        count = 1
        while True:
            addr, length, flags, nxt = unpack(table, i << 4)
            if flags & _INDIRECT:
                if outer >= 0:
                    raise self._break(
                        f"{_name(head, outer, i)} is itself INDIRECT (a table in a table)"
                    )
                table, n = self._indirect_table(head, i, addr, length, flags)
                outer, i, count = i, 0, 1
                continue
            try:
                buf = view(addr, length)
            except WindowError:
                raise self._break(
                    f"{_name(head, outer, i)} addr=0x{addr:x} len={length} lies outside "
                    f"{self._window.name}"
                ) from None
            if flags & _WRITE:
                writable.append(buf)
            elif writable:
                raise self._break(
                    f"{_name(head, outer, i)} is device-readable after a device-writable one "
                    f"(flags=0x{flags:x})"
                )
            else:
                readable.append(buf.toreadonly())
            if not flags & _NEXT:
                break
            if count >= n:
                raise self._break(_loop_message(head, outer, n, i, nxt))
            if nxt >= n:
                bound = f"queue size {n}" if outer < 0 else f"table of {n}"
                raise self._break(f"{_name(head, outer, i)} next={nxt} is out of range ({bound})")
            i = nxt
            count += 1
        self._in_flight += 1
        return Chain(head, readable, writable)

    def pop_many(self, limit: int) -> list[Chain]:
        """Up to ``limit`` chains that are available now, in ring order; ``[]`` when none is.

        The batch form of ``pop``, for a device that has kicks disabled while it works
        (``set_notify(False)``): one avail.idx load and one acquire fence for the run, then
        each head and each one-descriptor chain checked as ``pop`` checks it, without a call
        per chain. Unlike ``pop``, an empty result never re-arms notification (the caller's
        ``set_notify(True)`` does, and looks again). A chain the direct path does not take
        (more descriptors, INDIRECT) or that is hostile ends the batch before it: it is the
        next call's, which hands it to ``pop``, so the chains returned and the error raised
        are those of as many ``pop`` calls. A window that is not a plain ``BufferWindow``
        gets one ``pop`` per call.

        Raises:
            VirtqueueError: as ``pop`` (the queue is then broken).
        """
        if self.broken:
            raise self._refuse_broken()
        last = self._last_avail
        seen = self._avail_seen
        if last == seen:
            seen = self._load_avail_idx()
            if seen == last:
                return []
            self._fence()  # acquire: ring entries and descriptors after avail.idx
        n = min(limit, (seen - last) & 0xFFFF)
        flat = self._flat
        ro = self._flat_ro
        if flat is None or ro is None:  # every view through the window's own view(): one
            chain = self.pop()  # pop at a time, so an error comes after the chains before it
            return [] if chain is None else [chain]
        ring, mask, size = self._ring, self._mask, self._size
        desc_q, desc_i, desc_h = self._desc_q, self._desc_i, self._desc_h
        base, limit_off = self._flat_base, len(flat)
        out: list[Chain] = []
        for k in range(n):
            head = ring[(last + k) & mask]
            if head >= size:
                break
            flags = desc_h[(head << 3) + 6]
            if flags & (_NEXT | _INDIRECT):
                break
            off = desc_q[head << 1] - base
            end = off + desc_i[(head << 2) + 2]
            if off < 0 or end > limit_off:
                break
            if flags & _WRITE:
                out.append(_chain(Chain, (head, [], [flat[off:end]])))
            else:
                out.append(_chain(Chain, (head, [ro[off:end]], [])))
        if not out and n:
            chain = self.pop()  # the general walk, or the error, of the first chain
            return [] if chain is None else [chain]
        self._last_avail = (last + len(out)) & 0xFFFF
        self._in_flight += len(out)
        return out

    def unpop(self, n: int) -> None:
        """Give the last ``n`` chains popped back to the ring, unused: the next pop returns
        them again (read and checked afresh). For a batch cut short by a time budget; the
        chains' views must not be used afterwards.

        Raises:
            ValueError: more chains than are popped and not pushed.
        """
        if not 0 <= n <= self._in_flight:
            raise ValueError(
                f"virtqueue {self.index}: cannot give back {n} chains, {self._in_flight} are popped"
            )
        self._last_avail = (self._last_avail - n) & 0xFFFF
        self._in_flight -= n

    def _indirect_table(
        self, head: int, i: int, addr: int, length: int, flags: int
    ) -> tuple[memoryview, int]:
        """The indirect table descriptor ``i`` points to, checked: (its view, descriptors)."""
        where = f"chain head={head}: descriptor {i}"
        if not self._indirect:
            raise self._break(
                f"{where} has the INDIRECT flag but VIRTIO_F_INDIRECT_DESC was not negotiated"
            )
        if flags & _NEXT:
            raise self._break(f"{where} has both INDIRECT and NEXT (flags=0x{flags:x})")
        if length == 0 or length % 16:
            raise self._break(
                f"{where} indirect table len={length} is not a non-zero multiple of 16"
            )
        n = length >> 4
        if n > MAX_INDIRECT:
            raise self._break(
                f"{where} indirect table of {n} descriptors is longer than {MAX_INDIRECT}"
            )
        try:
            return self._view(addr, length), n
        except WindowError:
            raise self._break(
                f"{where} indirect table addr=0x{addr:x} len={length} lies outside "
                f"{self._window.name}"
            ) from None

    # -- the used ring ------------------------------------------------------------------------

    def push(self, head: int, written: int) -> None:
        """Write one used element (``head``, bytes ``written``); visible after ``publish``.

        Raises:
            ValueError: ``head`` out of range, ``written`` not a u32, or more pushes than pops
                (the caller's bug, not the driver's).
        """
        if self._in_flight <= 0 or not 0 <= head < self._size or not 0 <= written <= 0xFFFFFFFF:
            raise self._bad_push(head, written)  # one test on the data path, then which
        used = self._used_idx
        at = 2 * (used & self._mask)  # the element's id; its len follows (u32 each)
        elems = self._elems
        elems[at] = head
        elems[at + 1] = written
        self._used_idx = (used + 1) & 0xFFFF
        self._in_flight -= 1

    def push_many(self, chains: Sequence[Chain], written: Sequence[int]) -> None:
        """``push(chains[k].head, written[k])`` for each of ``written``, in order, in one
        loop: the first ``len(written)`` chains (the rest of ``chains`` is left alone).

        Raises:
            ValueError: as ``push``; the elements before the bad one are written.
        """
        n = len(written)
        if n > len(chains):
            raise ValueError(
                f"virtqueue {self.index}: {n} written lengths for {len(chains)} chains"
            )
        used, mask, size, elems = self._used_idx, self._mask, self._size, self._elems
        room = self._in_flight
        for k in range(n):
            head = chains[k][0]
            w = written[k]
            if k >= room or not 0 <= head < size or not 0 <= w <= 0xFFFFFFFF:
                self._used_idx = used
                self._in_flight = room - k
                raise self._bad_push(head, w)
            at = 2 * (used & mask)  # the element's id; its len follows (u32 each)
            elems[at] = head
            elems[at + 1] = w
            used = (used + 1) & 0xFFFF
        self._used_idx = used
        self._in_flight = room - n

    def _bad_push(self, head: int, written: int) -> ValueError:
        if self._in_flight <= 0:
            return ValueError(f"virtqueue {self.index}: push without a popped chain to return")
        if not 0 <= head < self._size:
            return ValueError(f"virtqueue {self.index}: head {head} is out of range")
        return ValueError(f"virtqueue {self.index}: written length {written} is not a u32")

    def publish(self) -> bool:
        """Make the pushed elements visible (one store of used.idx); True: send EVENT_USED.

        Without EVENT_IDX the driver wants the event unless avail.flags has NO_INTERRUPT; with
        it, when used.idx passed used_event (``vring_need_event``). Nothing pushed since the
        last publish: no store, False.
        """
        new = self._used_idx
        old = self._used_published
        if new == old:
            return False
        window = self._window
        self._fence()  # release: used elements before used.idx
        window.store16(self._used_idx_addr, new)
        self._used_published = new
        self._fence()  # StoreLoad: used.idx before reading the driver's suppression word
        if self._event_idx:
            return vring_need_event(window.load16(self._used_event_addr), new, old)
        return not window.load16(self._avail_flags_addr) & VIRTQ_AVAIL_F_NO_INTERRUPT

    def set_notify(self, enabled: bool) -> bool:
        """Ask the driver for (``True``) or not for EVENT_AVAIL; returns "chains are pending".

        Without EVENT_IDX this sets or clears used.flags NO_NOTIFY; with it, enabling stores
        avail_event = the next index to pop, disabling moves it to the index just behind (the
        farthest the driver can be from reaching it). After enabling, a full fence and a fresh
        read of avail.idx: when this returns True the driver may have skipped its kick, so the
        caller pops them now. Disabling returns False without reading anything.

        Raises:
            VirtqueueError: (enabling) avail.idx jumped by more than the queue size.
        """
        if self.broken:
            raise self._refuse_broken()
        self._notify = enabled
        window = self._window
        if self._event_idx:
            event = self._last_avail if enabled else (self._last_avail - 1) & 0xFFFF
            window.store16(self._avail_event_addr, event)
            self._avail_event = event
            if not enabled:
                return False
        else:
            window.store16(self._used_flags_addr, 0 if enabled else VIRTQ_USED_F_NO_NOTIFY)
            if not enabled:
                return False
        self._fence()  # StoreLoad: the suppression word before avail.idx
        return self._load_avail_idx() != self._last_avail

    @property
    def in_flight(self) -> int:
        """Chains popped and not yet pushed."""
        return self._in_flight

    @property
    def error(self) -> str | None:
        """The first reason the queue broke, or ``None``."""
        return self._error

    def release(self) -> None:
        """Drop the ring views (before the window's owner closes its mapping); idempotent.

        The queue is unusable afterwards. Views handed out in chains are the caller's.
        """
        for area in (self._ring, self._elems, self._desc_q, self._desc_i, self._desc_h,
                     self._desc, self._avail, self._used):  # fmt: skip
            area.release()
        if self._flat_ro is not None:
            self._flat_ro.release()  # ours (the window's own view stays the window's)
        self._flat = self._flat_ro = None
        self.broken = True
        self._error = self._error or "released"

    def __repr__(self) -> str:
        state = "broken" if self.broken else f"last_avail={self._last_avail}"
        return f"<DeviceQueue {self.index} size={self._size} {state}>"

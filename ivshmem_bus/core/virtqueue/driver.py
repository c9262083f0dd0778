"""The driver side of a split virtqueue: add chains, publish avail.idx, reap used elements.

The driver owns the descriptor table and the available ring; the device owns the used ring,
whose every word is hostile. The free list lives here in Python, never in the descriptor
table's ``next`` fields (the device could rewrite those); a used element is accepted only if
its id is the head of a chain in flight and its len is at most that chain's writable bytes.

Ordering (spec "Supplying Buffers to The Device"):

- add: descriptors, then the ring entry (not yet visible);
- publish: fence (release), store avail.idx (one 16-bit access), fence (StoreLoad), then read
  used.flags / avail_event to decide on EVENT_AVAIL;
- reap: load used.idx (one 16-bit access), fence (acquire), then the used elements.

With interrupts enabled and EVENT_IDX, ``reap()`` leaves used_event at the next index and
re-reads used.idx after a full fence before it returns, so an empty result means "the device
will send EVENT_USED for the next one".
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from ...errors import QueueFull, VirtqueueError
from ..window import MemoryWindow, load16_reader
from .device import MAX_INDIRECT
from .layout import (
    DESC,
    DESC_SIZE,
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

__all__ = ["DriverQueue"]

_NEXT = VIRTQ_DESC_F_NEXT
_WRITE = VIRTQ_DESC_F_WRITE
_FIX = "the device wrote a corrupt used ring; reset the device to recover"


class DriverQueue:
    """One split virtqueue, driver role, over a memory window (sans-I/O).

    Args:
        window: memory holding the queue (and, usually, the buffers).
        index: the virtqueue index (names the queue in every error).
        layout: where the queue lives (what SET_VQUEUE will carry).
        event_idx: VIRTIO_F_EVENT_IDX was negotiated.
        indirect: VIRTIO_F_INDIRECT_DESC was negotiated (``add(indirect_table=)`` allowed).
        base_idx: the index both rings start from (virtio: 0); the device uses the same.

    The constructor zeroes the three areas, stores avail.idx = used.idx = ``base_idx`` and
    (EVENT_IDX) used_event = avail_event = ``base_idx``, and puts every descriptor on the
    free list: call it before SET_VQUEUE.

    Raises:
        ValueError: the layout fails ``VirtqLayout.check`` (the caller's own layout).
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
        try:
            rings = ring_views(window, layout, index)
        except VirtqueueError as exc:
            raise ValueError(str(exc)) from None
        self.index = index
        self.layout = layout
        self.broken = False
        self._error: str | None = None
        self._window = window
        self._fence = window.fence
        size = layout.size
        self._size = size
        self._mask = size - 1
        self._event_idx = event_idx
        self._indirect = indirect
        self._desc, self._avail, self._used = rings.desc, rings.avail, rings.used
        # The available ring's entries and the used ring's elements as u16 / u32 items
        # (native order: the project's hosts are little-endian, as the window's own 16-bit
        # accesses already assume): one item access each instead of a struct call.
        self._ring = self._avail[RING_HEADER : RING_HEADER + 2 * size].cast("H")
        self._elems = self._used[RING_HEADER : RING_HEADER + USED_ELEM_SIZE * size].cast("I")
        self._avail_flags_addr = rings.avail_flags
        self._avail_idx_addr = rings.avail_idx
        self._used_event_addr = rings.used_event
        self._used_flags_addr = rings.used_flags
        self._used_idx_addr = rings.used_idx
        self._avail_event_addr = rings.avail_event
        # used.idx is polled by every reap: read through one held 16-bit view when it can be
        self._load_used_idx, self._used_idx_word = load16_reader(window, self._used_idx_addr)
        base = base_idx & 0xFFFF
        for area in (self._desc, self._avail, self._used):
            area[:] = bytes(len(area))
        for addr in (self._avail_idx_addr, self._used_idx_addr):
            window.store16(addr, base)
        if event_idx:
            window.store16(self._used_event_addr, base)
            window.store16(self._avail_event_addr, base)
        self._avail_idx = base  # next avail index to fill
        self._avail_published = base  # avail.idx as last stored
        self._last_used = base  # next used index to reap
        self._used_event = base if event_idx else -1  # used_event as last stored
        self._interrupts = True
        # Descriptor bookkeeping, all private: a stack of free indexes and, per head in
        # flight, its descriptors, its writable byte count and the caller's token.
        self._free: list[int] = list(range(size - 1, -1, -1))
        self._chains: list[list[int] | None] = [None] * size
        self._wlen: list[int] = [0] * size
        self._tokens: list[object] = [None] * size
        self._in_flight = 0

    # -- adding -------------------------------------------------------------------------------

    def add(
        self,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
        token: object,
        *,
        indirect_table: tuple[int, int] | None = None,
    ) -> int:
        """Put one chain of buffers in the ring (visible after ``publish``); returns its head.

        Args:
            readable: (driver address, length) of each device-readable buffer, in order.
            writable: the same for each device-writable buffer (after the readable ones).
            token: returned by ``reap`` with the used length when the device is done.
            indirect_table: (driver address, length) of memory the caller owns, at least
                16 bytes per buffer, kept untouched until the chain is reaped: the buffers
                are described there and the chain takes one descriptor of the queue
                (VIRTIO_F_INDIRECT_DESC only).

        Raises:
            QueueFull: fewer free descriptors than the chain needs (one with
                ``indirect_table``, else one per buffer); nothing was changed.
            ValueError: no buffers, more buffers than the queue (or an indirect table) can
                ever hold, a length or address that does not fit its field, an indirect
                table without the feature or too small.
            VirtqueueError: the queue is broken.
        """
        if self.broken:
            raise self._refuse_broken()
        nr = len(readable)
        n = nr + len(writable)
        if n == 0:
            raise ValueError(f"virtqueue {self.index}: a chain needs at least one buffer")
        free = self._free
        if indirect_table is not None:
            return self._add_indirect(readable, writable, token, indirect_table)
        if n > self._size:
            raise ValueError(
                f"virtqueue {self.index}: a chain of {n} buffers never fits a queue of "
                f"{self._size} descriptors: use an indirect table or fewer buffers"
            )
        if len(free) < n:
            raise QueueFull(self.index, n, len(free))
        pack = DESC.pack_into
        desc = self._desc
        if n == 1:
            head = free.pop()
            if nr:
                (addr, length), flags, wlen = readable[0], 0, 0
            else:
                (addr, length) = writable[0]
                flags, wlen = _WRITE, length
            try:
                pack(desc, head << 4, addr, length, flags, 0)
            except struct.error:
                free.append(head)
                raise self._bad_buffer(addr, length) from None
            ids = [head]
        else:
            ids = free[-n:]
            del free[-n:]
            ids.reverse()  # a fresh queue chains 0 -> 1 -> 2, as a reader expects
            head = ids[0]
            wlen = 0
            try:
                for k, (addr, length) in enumerate((*readable, *writable)):
                    last = k + 1 == n
                    if k < nr:
                        flags = 0 if last else _NEXT
                    else:
                        flags = _WRITE if last else _WRITE | _NEXT
                        wlen += length
                    pack(desc, ids[k] << 4, addr, length, flags, 0 if last else ids[k + 1])
            except struct.error:
                free.extend(ids)
                raise self._bad_buffer(addr, length) from None
        return self._expose(head, ids, wlen, token)

    def add_buffers(
        self, buffers: Sequence[tuple[int, int]], tokens: Sequence[object], *, writable: bool
    ) -> None:
        """One single-buffer chain per (driver address, length) of ``buffers``, all readable
        or all ``writable``, with ``tokens[k]`` for ``buffers[k]``; visible after
        ``publish``. The batch form of ``add`` (one call and one free-list check for the
        run, not one per buffer): what a driver streaming equal buffers refills with.

        Raises:
            QueueFull: fewer free descriptors than buffers; nothing was changed.
            ValueError: ``tokens`` is not as long as ``buffers``; an address or length that
                does not fit its field (the buffers before it are added).
            VirtqueueError: the queue is broken.
        """
        if self.broken:
            raise self._refuse_broken()
        n = len(buffers)
        if len(tokens) != n:
            raise ValueError(
                f"virtqueue {self.index}: {len(tokens)} tokens for {n} buffers (one each)"
            )
        free = self._free
        if len(free) < n:
            raise QueueFull(self.index, n, len(free))
        pack, desc, ring = DESC.pack_into, self._desc, self._ring
        chains, wlens, toks = self._chains, self._wlen, self._tokens
        flags = _WRITE if writable else 0
        idx, mask = self._avail_idx, self._mask
        k = 0
        try:
            for k in range(n):
                addr, length = buffers[k]
                head = free[-1]
                pack(desc, head << 4, addr, length, flags, 0)
                free.pop()
                chains[head] = [head]
                wlens[head] = length if writable else 0
                toks[head] = tokens[k]
                ring[(idx + k) & mask] = head
            k = n
        except struct.error:
            raise self._bad_buffer(addr, length) from None
        finally:
            self._in_flight += k
            self._avail_idx = (idx + k) & 0xFFFF

    def _add_indirect(
        self,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
        token: object,
        table: tuple[int, int],
    ) -> int:
        if not self._indirect:
            raise ValueError(
                f"virtqueue {self.index}: indirect_table given but VIRTIO_F_INDIRECT_DESC "
                f"was not negotiated"
            )
        taddr, tlen = table
        nr = len(readable)
        n = nr + len(writable)
        if n > MAX_INDIRECT:
            raise ValueError(
                f"virtqueue {self.index}: {n} buffers exceed the {MAX_INDIRECT} an indirect "
                f"table may hold"
            )
        if tlen < DESC_SIZE * n:
            raise ValueError(
                f"virtqueue {self.index}: indirect table of {tlen} bytes is too small for "
                f"{n} buffers ({DESC_SIZE * n} needed)"
            )
        free = self._free
        if not free:
            raise QueueFull(self.index, 1, 0)
        tview = self._window.view(taddr, DESC_SIZE * n)  # WindowError: not our memory
        pack = DESC.pack_into
        wlen = 0
        try:
            for k, (addr, length) in enumerate((*readable, *writable)):
                last = k + 1 == n
                flags = (0 if k < nr else _WRITE) | (0 if last else _NEXT)
                if k >= nr:
                    wlen += length
                pack(tview, k << 4, addr, length, flags, 0 if last else k + 1)
        except struct.error:
            raise self._bad_buffer(addr, length) from None
        head = free.pop()
        pack(self._desc, head << 4, taddr, DESC_SIZE * n, VIRTQ_DESC_F_INDIRECT, 0)
        return self._expose(head, [head], wlen, token)

    def _expose(self, head: int, ids: list[int], wlen: int, token: object) -> int:
        self._chains[head] = ids
        self._wlen[head] = wlen
        self._tokens[head] = token
        self._in_flight += 1
        idx = self._avail_idx
        self._ring[idx & self._mask] = head
        self._avail_idx = (idx + 1) & 0xFFFF
        return head

    def _bad_buffer(self, addr: int, length: int) -> ValueError:
        return ValueError(
            f"virtqueue {self.index}: buffer (0x{addr:x}, {length}) does not fit a descriptor "
            f"(address u64, length u32)"
        )

    def publish(self) -> bool:
        """Make the added chains visible (one store of avail.idx); True: send EVENT_AVAIL.

        Without EVENT_IDX the device wants the kick unless used.flags has NO_NOTIFY; with it,
        when avail.idx passed avail_event (``vring_need_event``). Nothing added since the last
        publish: no store, False.
        """
        new = self._avail_idx
        old = self._avail_published
        if new == old:
            return False
        window = self._window
        self._fence()  # release: descriptors and ring entries before avail.idx
        window.store16(self._avail_idx_addr, new)
        self._avail_published = new
        self._fence()  # StoreLoad: avail.idx before reading the device's suppression word
        if self._event_idx:
            return vring_need_event(window.load16(self._avail_event_addr), new, old)
        return not window.load16(self._used_flags_addr) & VIRTQ_USED_F_NO_NOTIFY

    # -- reaping ------------------------------------------------------------------------------

    def _break(self, reason: str) -> VirtqueueError:
        self.broken = True
        if self._error is None:
            self._error = reason
        return VirtqueueError(self.index, f"{reason}: {_FIX}")

    def _refuse_broken(self) -> VirtqueueError:
        return VirtqueueError(
            self.index, f"queue is broken ({self._error}); reset the device to use it again"
        )

    def reap(self) -> list[tuple[object, int]]:
        """(token, used len) of each chain the device returned, in used-ring order.

        The chains' descriptors go back on the free list.

        Raises:
            VirtqueueError: used.idx moved past the chains published, or a used element's id
                is out of range or not the head of a chain in flight, or its len exceeds the
                chain's writable bytes; the queue is then broken.
        """
        if self.broken:
            raise self._refuse_broken()
        out: list[tuple[object, int]] = []
        window = self._window
        while True:
            last = self._last_used
            idx = self._load_used_idx()
            n = (idx - last) & 0xFFFF
            if n == 0:
                if not (self._interrupts and self._event_idx) or self._used_event == last:
                    return out
                window.store16(self._used_event_addr, last)
                self._used_event = last
                self._fence()  # StoreLoad: used_event before re-reading used.idx
                continue
            outstanding = (self._avail_published - last) & 0xFFFF
            if n > outstanding:
                raise self._break(
                    f"used.idx jumped from {last} to {idx}: {n} used elements but only "
                    f"{outstanding} chain(s) published"
                )
            self._fence()  # acquire: used elements after used.idx
            self._take(last, n, out)
            self._last_used = idx

    def _take(self, last: int, n: int, out: list[tuple[object, int]]) -> None:
        elems = self._elems
        mask = self._mask
        size = self._size
        chains = self._chains
        tokens = self._tokens
        wlens = self._wlen
        free = self._free
        append = out.append
        for k in range(n):
            at = (last + k) & 0xFFFF
            slot = 2 * (at & mask)
            head = elems[slot]
            length = elems[slot + 1]
            if head >= size:
                raise self._break(
                    f"used ring entry {at}: id={head} is out of range (queue size {size})"
                )
            ids = chains[head]
            if ids is None:
                raise self._break(f"used ring entry {at}: id={head} is not a chain in flight")
            if length > wlens[head]:
                raise self._break(
                    f"used ring entry {at}: id={head} len={length} exceeds the chain's "
                    f"{wlens[head]} writable bytes"
                )
            chains[head] = None
            free.extend(ids)
            append((tokens[head], length))
            tokens[head] = None
            self._in_flight -= 1

    def set_interrupts(self, enabled: bool) -> bool:
        """Ask the device for (``True``) or not for EVENT_USED; returns "used elements wait".

        Without EVENT_IDX this sets or clears avail.flags NO_INTERRUPT; with it, enabling
        stores used_event = the next index to reap, disabling moves it to the index just
        behind (the farthest the device can be from reaching it). After enabling, a full
        fence and a fresh read of used.idx: when this returns True the device may have
        skipped its EVENT_USED, so the caller reaps now. Disabling returns False.
        """
        self._interrupts = enabled
        window = self._window
        last = self._last_used
        if self._event_idx:
            event = last if enabled else (last - 1) & 0xFFFF
            window.store16(self._used_event_addr, event)
            self._used_event = event
        else:
            window.store16(self._avail_flags_addr, 0 if enabled else VIRTQ_AVAIL_F_NO_INTERRUPT)
        if not enabled:
            return False
        self._fence()  # StoreLoad: the suppression word before used.idx
        return window.load16(self._used_idx_addr) != last

    @property
    def free(self) -> int:
        """Descriptors free for ``add``."""
        return len(self._free)

    @property
    def in_flight(self) -> int:
        """Chains added and not yet reaped."""
        return self._in_flight

    @property
    def error(self) -> str | None:
        """The first reason the queue broke, or ``None``."""
        return self._error

    def release(self) -> None:
        """Drop the ring views (before the window's owner closes its mapping); idempotent.

        The queue is unusable afterwards.
        """
        for area in (self._ring, self._elems, self._desc, self._avail, self._used):
            area.release()
        if self._used_idx_word is not None:
            self._used_idx_word.release()
        self.broken = True
        self._error = self._error or "released"

    def __repr__(self) -> str:
        state = "broken" if self.broken else f"free={len(self._free)}"
        return f"<DriverQueue {self.index} size={self._size} {state}>"

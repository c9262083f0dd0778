"""The single-producer / single-consumer ring that virtio-msg uses in ivshmem shared memory.

Sans-I/O: a queue sees a writable buffer (a memoryview of an mmap'd BAR2, a bytearray in a
test) and nothing else. No mmap, no fds, no doorbells: ringing the peer is the bus's job.

Layout (docs/wire-format.md §3.1, identical to QEMU's ``spsc_queue.h``)::

    0x00        u32 head   next slot the producer writes (a slot number, not free-running)
    0x04..0x3f  padding    (head has a 64-byte line of its own; 0x04: the claim, below)
    0x40        u32 tail   next slot the consumer reads
    0x44..0x7f  padding    (0x44: the polling flag, below)
    0x80 + 64*i slot i     i in 0 .. capacity-1, capacity = (len - 128) // 64

next(i) = i + 1, or 0 at capacity. Empty: head == tail. Full: next(head) == tail, so at most
capacity - 1 slots are in flight. (QEMU computes capacity as (len - 192) // 64 + 1; for every
len >= 192 that is the same number.)

Theory of operation
-------------------
Rule 1: the producer owns head, the consumer owns tail. Each side keeps its *own* index in a
private attribute and is the only one that stores it; it never reads it back from shared
memory, so a peer that scribbles on our index cannot steer where we write.

Rule 2: the peer's index is untrusted input. It is read in exactly one method per index
(``_load_head`` / ``_load_tail``), which raises ``QueueCorrupt`` for any value >= capacity
before anything is indexed with it. As QEMU does, each side caches the peer's index and
re-reads it only when the cache says full (producer) or empty (consumer).

Rule 3: every index load and store is ONE aligned 32-bit access, through a
``memoryview.cast("I")`` view. ``struct.pack_into``, slice assignment and cffi ABI-mode stores
issue two stores (measured with watchpoints: docs/vfio.md §5); a consumer that
saw half a store would read a torn index.

Rule 4: ordering. The producer copies the slot, then publishes head (store-release); the
consumer loads head (load-acquire), copies the slot out, then publishes tail (store-release).
On x86-64 (TSO) plain loads and stores already have these semantics, and CPython performs the
slot copy and the index store in separate C calls the compiler cannot merge or reorder. On
weakly ordered CPUs (aarch64) a fence is needed: pass ``fence=`` (the compiled helper's full
barrier). Which CPUs need one is the I/O edge's knowledge, not the core's: pass
``native.ffi.queue_fence()`` (None on x86, the fence elsewhere), as every backend's ``fence``
does; ``native.ffi`` warns once where no fence can be had.

Bytes written: ``put`` writes exactly ``len(data)`` bytes of the slot, like QEMU's memcpy of
the message (44 or 48 bytes); the rest of the slot keeps whatever it held. ``put_block``
writes whole slots.

Block copies
------------
``put_block`` / ``get_block`` move consecutive 64-byte slots between a private buffer and the
ring with at most two copies (one at the wrap) and one index publish, for callers that batch
(a benchmark, a bulk transfer). Pure Python they cost about a microsecond per call, whatever
the block size. The compiled helper does the same in C (``ivshmem_bus.native.ffi.QueueBlocks``):
pass ``blocks=`` (the device's ``queue_blocks``, or ``_ffi.queue_blocks()``) and the block
calls go through it, with the same checks of the peer's index, done in C. The queue itself
imports nothing compiled: it is handed the accelerator, as it is handed the fence.

Doorbell coalescing (an extension, off unless both ends opt in)
---------------------------------------------------------------
The spec rings the peer after every enqueue. A producer may skip the doorbell when the
consumer cannot be asleep, if the consumer, before it sleeps, publishes that it stops
polling and looks at the queue once more. Two signals, each a Dekker pair with a full
(StoreLoad) fence on both sides, so at least one side sees the other's store:

* ``POLLING_OFFSET`` (0x44, padding of the consumer's own line): the consumer stores 1
  while it looks at the queue without sleeping (``set_polling``) and 0 before it sleeps
  (``may_sleep``: store 0, fence, re-read head; sleep only if still empty). QEMU never
  writes this word and a reset zeroes it, so a QEMU consumer always gets its doorbells.
* the queue before our enqueue: a consumer that had not yet caught up with our previous
  messages will, after taking them, fence and re-read head before it sleeps, and so see
  ours. ``needs_doorbell`` (producer: fence, then load flag and tail) rings only when the
  flag is not 1 and the consumer had taken everything before our batch.

The second rule relies on the consumer's re-check, which QEMU does not make: coalescing is
for links whose both ends are ivshmem_bus (``VirtioMsgBus(coalesce=True)``).

Claim word (an extension, advisory)
-----------------------------------
``CLAIM_OFFSET`` (0x04, padding of the producer's own line) names the queue's producer: one
fabric carries one queue pair, so a second driver or device must not produce on it too.
``ivshmem_bus.ownership`` stores and checks it (``CLAIM | vmid``, one aligned 32-bit store);
QEMU never writes it, a reset zeroes it, and the queue itself never reads it.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

from ..errors import QueueCorrupt

__all__ = [
    "CLAIM",
    "CLAIM_OFFSET",
    "HEAD_OFFSET",
    "POLLING",
    "POLLING_OFFSET",
    "QUEUE_HEADER_SIZE",
    "SLOT_SIZE",
    "TAIL_OFFSET",
    "BlockCopier",
    "SpscQueue",
    "queue_capacity",
    "reset_queue",
]


SLOT_SIZE = 64
HEAD_OFFSET = 0x00
TAIL_OFFSET = 0x40
QUEUE_HEADER_SIZE = 0x80  # head line + tail line; slot 0 starts here
_HEAD_WORD = HEAD_OFFSET // 4
_TAIL_WORD = TAIL_OFFSET // 4
POLLING_OFFSET = 0x44  # consumer's line: POLLING while it polls (coalescing extension)
POLLING = 1
_POLL_WORD = POLLING_OFFSET // 4
CLAIM_OFFSET = 0x04  # producer's line: CLAIM | vmid of the peer that produces here (ownership)
CLAIM = 0x0001_0000  # bit 16 set: claimed; bits 15..0: the owner's vmid


T = TypeVar("T")


_INT64_MIN = -(1 << 63)


class BlockCopier(Protocol):
    """Compiled ``put_block``/``get_block`` for one region (``ivshmem_bus.native.ffi.QueueBlocks``).

    ``put``/``get`` take the caller's own index, its cached peer index, the buffer and a slot
    count; they return ``(peer_index << 32) | copied``, ``-1 - index`` for a corrupt peer
    index, or ``-2**63`` for arguments out of range (see ``cdefs/helper.h``).
    """

    def put(self, mine: int, cached: int, src: bytes | bytearray | memoryview, n: int) -> int: ...

    def get(self, mine: int, cached: int, dst: bytearray | memoryview, n: int) -> int: ...

    def release(self) -> None: ...


def queue_capacity(region_size: int) -> int:
    """Number of slots a region of ``region_size`` bytes holds (may be < 2: then invalid)."""
    return max(0, (region_size - QUEUE_HEADER_SIZE) // SLOT_SIZE)


def _checked_view(region: memoryview | bytearray) -> memoryview:
    """A byte view of ``region`` fit for a queue; on refusal no view is left exported
    (a traceback holding one would keep the owner's mmap from closing)."""
    raw = memoryview(region)
    try:
        if raw.readonly:
            raise ValueError("queue region is read-only: map shared memory PROT_READ|PROT_WRITE")
        if not raw.c_contiguous:
            raise ValueError("queue region must be a C-contiguous buffer")
        view = raw.cast("B")
    finally:
        raw.release()
    try:
        capacity = queue_capacity(len(view))
        if capacity < 2:
            raise ValueError(
                f"queue region of {len(view)} bytes holds {capacity} slot(s); at least 2 are "
                f"needed ({QUEUE_HEADER_SIZE + 2 * SLOT_SIZE} bytes)"
            )
        if sys.byteorder != "little":
            raise ValueError("queue indexes are little-endian words: big-endian hosts unsupported")
        address = _address_of(view)
        if address % 4:
            raise ValueError(f"queue region starts at 0x{address:x}: not 4-byte aligned")
    except BaseException:
        view.release()
        raise
    return view


def reset_queue(region: memoryview | bytearray) -> None:
    """Empty the queue in ``region`` whatever it holds (even corrupt indexes), with no queue
    object: ``SpscQueue.reset`` without the attach, for the side that owns reset before the
    peer attaches ("reset-queues"). The one implementation of a queue reset.

    Raises:
        ValueError: ``region`` is not fit for a queue (as ``SpscQueue``).
    """
    view = _checked_view(region)
    try:
        with view[:QUEUE_HEADER_SIZE].cast("I") as idx:
            _zero_queue(idx, view)
    finally:
        view.release()


def _zero_queue(idx: memoryview, buf: memoryview) -> None:
    """Zero both indexes (one aligned store each, so no torn index is ever visible), then
    the rest of the region: the header's padding (the polling flag with it) and every slot,
    the "all zeroed" of docs/wire-format.md §3.6."""
    idx[_HEAD_WORD] = 0
    idx[_TAIL_WORD] = 0
    buf[HEAD_OFFSET + 4 : TAIL_OFFSET] = bytes(TAIL_OFFSET - HEAD_OFFSET - 4)
    buf[TAIL_OFFSET + 4 :] = bytes(len(buf) - TAIL_OFFSET - 4)


def _address_of(view: memoryview) -> int:
    """Address of a writable buffer's first byte (used only to check alignment)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class SpscQueue:
    """One SPSC ring over a writable buffer; one object per end (or one for both in tests).

    Args:
        region: the queue's bytes: a writable, C-contiguous buffer (memoryview of an mmap,
            bytearray). Its start must be 4-byte aligned so each index is one aligned word.
        fence: a full memory barrier to call between a slot copy and an index store (and
            between an index load and a slot copy). Not needed on x86-64; pass
            ``native.ffi.queue_fence()``, which knows the CPU.
        blocks: a factory ``blocks(view, capacity) -> BlockCopier`` (``ffi.queue_blocks()``)
            that ``put_block``/``get_block`` use instead of their pure-Python loop. The
            copier holds a pointer into the region until ``release()``.

    Raises:
        ValueError: the region is read-only, not contiguous, misaligned, or too small for
            2 slots; or the host is big-endian (the indexes are little-endian words).
        QueueCorrupt: an index found in the region at construction is out of range.
    """

    __slots__ = (
        "_blocks",
        "_buf",
        "_cached_head",
        "_cached_tail",
        "_capacity",
        "_fence",
        "_head",
        "_idx",
        "_tail",
    )

    def __init__(
        self,
        region: memoryview | bytearray,
        *,
        fence: Callable[[], None] | None = None,
        blocks: Callable[[memoryview, int], BlockCopier] | None = None,
    ):
        view = _checked_view(region)
        self._buf = view
        self._idx = view[:QUEUE_HEADER_SIZE].cast("I")
        self._capacity = queue_capacity(len(view))
        self._fence = fence
        self._blocks: BlockCopier | None = None
        # Pick up where an existing queue left off (QEMU's spsc_open_mem does the same).
        try:
            self._head = self._cached_head = self._load_head()
            self._tail = self._cached_tail = self._load_tail()
            if blocks is not None:
                self._blocks = blocks(view, self._capacity)
        except BaseException:
            self.release()  # a refused queue holds no view of the region
            raise

    # Shared-index access: the only code that touches the index words --------------------

    def _load_head(self) -> int:
        head = self._idx[_HEAD_WORD]  # one aligned 32-bit load
        if head >= self._capacity:
            raise QueueCorrupt("head", head, self._capacity)
        return head

    def _load_tail(self) -> int:
        tail = self._idx[_TAIL_WORD]  # one aligned 32-bit load
        if tail >= self._capacity:
            raise QueueCorrupt("tail", tail, self._capacity)
        return tail

    def _publish_head(self, head: int) -> None:
        if self._fence is not None:
            self._fence()  # slot bytes visible before head (release)
        self._idx[_HEAD_WORD] = head  # one aligned 32-bit store
        self._head = head

    def _publish_tail(self, tail: int) -> None:
        if self._fence is not None:
            self._fence()  # slot copied out before tail is given back (release)
        self._idx[_TAIL_WORD] = tail  # one aligned 32-bit store
        self._tail = tail

    def _refresh_head(self) -> int:
        head = self._cached_head = self._load_head()
        if self._fence is not None:
            self._fence()  # head read before the slot (acquire)
        return head

    # Producer -------------------------------------------------------------------------------

    def put(self, data: bytes | bytearray | memoryview) -> bool:
        """Copy ``data`` into the next slot and publish it.

        Args:
            data: at most 64 bytes; exactly ``len(data)`` bytes of the slot are written.

        Returns:
            True when enqueued, False when the queue is full (nothing written).

        Raises:
            ValueError: ``data`` is longer than a slot.
            QueueCorrupt: the peer's tail index is out of range.
        """
        size = len(data)
        if size > SLOT_SIZE:
            raise ValueError(f"{size} bytes do not fit a {SLOT_SIZE}-byte slot")
        head = self._head
        nxt = head + 1
        if nxt == self._capacity:
            nxt = 0
        if nxt == self._cached_tail:
            self._cached_tail = self._load_tail()
            if nxt == self._cached_tail:
                return False
        off = QUEUE_HEADER_SIZE + head * SLOT_SIZE
        self._buf[off : off + size] = data
        self._publish_head(nxt)
        return True

    def put_many(self, items: Iterable[bytes | bytearray | memoryview]) -> int:
        """Enqueue items in order until the queue is full; publish head once at the end.

        Returns:
            How many items were enqueued (a prefix of ``items``; the rest were not consumed
            from a list, but an iterator has lost the first item that did not fit).

        Raises:
            ValueError: an item is longer than a slot (items before it are still published).
            QueueCorrupt: the peer's tail index is out of range.
        """
        buf, cap = self._buf, self._capacity
        head = start = self._head
        count = 0
        try:
            for data in items:
                size = len(data)
                if size > SLOT_SIZE:
                    raise ValueError(f"{size} bytes do not fit a {SLOT_SIZE}-byte slot")
                nxt = head + 1
                if nxt == cap:
                    nxt = 0
                if nxt == self._cached_tail:
                    self._cached_tail = self._load_tail()
                    if nxt == self._cached_tail:
                        break
                off = QUEUE_HEADER_SIZE + head * SLOT_SIZE
                buf[off : off + size] = data
                head = nxt
                count += 1
        finally:
            if head != start:
                self._publish_head(head)
        return count

    def put_block(self, block: bytes | bytearray | memoryview) -> int:
        """Copy consecutive whole slots from ``block`` into the queue; publish head once.

        Args:
            block: ``n * 64`` bytes (a bytes-like object of unsigned bytes): slot after slot.

        Returns:
            How many slots were enqueued: the first ``min(n, free slots)`` of the block.

        Raises:
            ValueError: ``block`` is not a whole number of slots.
            QueueCorrupt: the peer's tail index is out of range (nothing written).
        """
        n, rest = divmod(len(block), SLOT_SIZE)
        if rest or (type(block) is memoryview and block.itemsize != 1):
            raise ValueError(
                f"a block is whole {SLOT_SIZE}-byte slots of unsigned bytes, not {len(block)} "
                f"items of {type(block).__name__}"
            )
        cap = self._capacity
        if self._blocks is not None:
            r = self._blocks.put(self._head, self._cached_tail, block, n)
            if r < 0:
                raise self._copier_error(r, "tail")
            n = r & 0xFFFFFFFF
            self._cached_tail = r >> 32
            if n:
                head = self._head + n
                self._head = head - cap if head >= cap else head
            return n
        head = self._head
        room = cap - 1 - (head - self._cached_tail) % cap
        if room < n:
            self._cached_tail = self._load_tail()
            room = cap - 1 - (head - self._cached_tail) % cap
        if room < n:
            n = room
        if n:
            first = min(n, cap - head) * SLOT_SIZE
            total = n * SLOT_SIZE
            off = QUEUE_HEADER_SIZE + head * SLOT_SIZE
            with memoryview(block) as src:
                self._buf[off : off + first] = src[:first]
                if total > first:
                    self._buf[QUEUE_HEADER_SIZE : QUEUE_HEADER_SIZE + total - first] = src[
                        first:total
                    ]
            head += n
            self._publish_head(head - cap if head >= cap else head)
        return n

    def _copier_error(self, r: int, name: str) -> Exception:
        if r == _INT64_MIN:
            return ValueError(f"block copier refused its arguments ({self!r})")
        return QueueCorrupt(name, -1 - r, self._capacity)

    # Consumer -------------------------------------------------------------------------------

    def _next_filled(self) -> int | None:
        """Slot offset of the next message, or None when empty (re-reads head only then)."""
        tail = self._tail
        if tail == self._cached_head and tail == self._refresh_head():
            return None
        return QUEUE_HEADER_SIZE + tail * SLOT_SIZE

    def _advance(self) -> None:
        nxt = self._tail + 1
        if nxt == self._capacity:
            nxt = 0
        self._publish_tail(nxt)

    def get(self, size: int = SLOT_SIZE) -> bytes | None:
        """Copy the next slot out and give it back to the producer.

        Args:
            size: how many bytes of the slot to copy (1..64).

        Returns:
            The slot's first ``size`` bytes, or None when the queue is empty.

        Raises:
            QueueCorrupt: the peer's head index is out of range.
        """
        if not 0 < size <= SLOT_SIZE:
            raise ValueError(f"size must be 1..{SLOT_SIZE}, not {size}")
        off = self._next_filled()
        if off is None:
            return None
        data = bytes(self._buf[off : off + size])
        self._advance()
        return data

    def peek(self) -> memoryview | None:
        """Zero-copy view of the next slot (64 bytes) without consuming it, or None if empty.

        The view aliases shared memory the peer may rewrite once the slot is given back:
        use it, then call ``advance()``, and do not keep it.
        """
        off = self._next_filled()
        if off is None:
            return None
        return self._buf[off : off + SLOT_SIZE]

    def empty(self) -> bool:
        """Consumer: True when nothing is waiting (re-reads head only if the cache says so).

        Raises:
            QueueCorrupt: the peer's head index is out of range.
        """
        return self._next_filled() is None

    def advance(self) -> None:
        """Give back the slot last returned by ``peek()``.

        Raises:
            RuntimeError: the queue is empty (there is no peeked slot to give back).
        """
        if self._next_filled() is None:
            raise RuntimeError("advance() on an empty queue: peek() returned None")
        self._advance()

    def consume(self, fn: Callable[[memoryview], T]) -> tuple[bool, T | None]:
        """Hand the next slot to ``fn`` as a 64-byte view, then give the slot back.

        The slot is given back even when ``fn`` raises (a poison message must not be
        delivered forever); the exception propagates.

        Returns:
            ``(True, fn's result)``, or ``(False, None)`` when the queue is empty.
        """
        off = self._next_filled()
        if off is None:
            return False, None
        try:
            return True, fn(self._buf[off : off + SLOT_SIZE])
        finally:
            self._advance()

    def drain(self, fn: Callable[[memoryview], object], limit: int | None = None) -> int:
        """Hand every available slot (at most ``limit``) to ``fn``; publish tail once.

        Returns:
            How many slots were consumed. When ``fn`` raises, the slots handed out so far,
            the raising one included, are given back and the exception propagates.
        """
        buf, cap = self._buf, self._capacity
        tail = start = self._tail
        head = self._cached_head
        refreshed = False
        count = 0
        try:
            while limit is None or count < limit:
                if tail == head:
                    # The cache is used up: look at the shared head once per call, so a
                    # drain takes everything published before it started, and ends.
                    if refreshed:
                        break
                    head = self._refresh_head()
                    refreshed = True
                    if tail == head:
                        break
                off = QUEUE_HEADER_SIZE + tail * SLOT_SIZE
                tail += 1
                if tail == cap:
                    tail = 0
                count += 1
                fn(buf[off : off + SLOT_SIZE])
        finally:
            if tail != start:
                self._publish_tail(tail)
        return count

    def get_block(self, out: bytearray | memoryview) -> int:
        """Copy out up to ``len(out) // 64`` slots, oldest first, into ``out``; publish tail once.

        Args:
            out: a writable buffer of unsigned bytes; slot i lands at ``out[64*i : 64*i+64]``.

        Returns:
            How many slots were copied out and given back (0 when the queue is empty).

        Raises:
            QueueCorrupt: the peer's head index is out of range (nothing copied).
        """
        if type(out) is memoryview and out.itemsize != 1:
            raise ValueError("get_block needs a buffer of unsigned bytes (memoryview format 'B')")
        n = len(out) // SLOT_SIZE
        cap = self._capacity
        if self._blocks is not None:
            r = self._blocks.get(self._tail, self._cached_head, out, n)
            if r < 0:
                raise self._copier_error(r, "head")
            n = r & 0xFFFFFFFF
            self._cached_head = r >> 32
            if n:
                tail = self._tail + n
                self._tail = tail - cap if tail >= cap else tail
            return n
        tail = self._tail
        avail = (self._cached_head - tail) % cap
        if avail < n:
            avail = (self._refresh_head() - tail) % cap
        if avail < n:
            n = avail
        if n:
            first = min(n, cap - tail) * SLOT_SIZE
            total = n * SLOT_SIZE
            off = QUEUE_HEADER_SIZE + tail * SLOT_SIZE
            buf = self._buf
            with memoryview(out) as dst:
                dst[:first] = buf[off : off + first]
                if total > first:
                    dst[first:total] = buf[QUEUE_HEADER_SIZE : QUEUE_HEADER_SIZE + total - first]
            tail += n
            self._publish_tail(tail - cap if tail >= cap else tail)
        return n

    def get_many(self, limit: int | None = None, size: int = SLOT_SIZE) -> list[bytes]:
        """Copy out every available slot (at most ``limit``), oldest first; publish tail once."""
        if not 0 < size <= SLOT_SIZE:
            raise ValueError(f"size must be 1..{SLOT_SIZE}, not {size}")
        out: list[bytes] = []
        append = out.append
        self.drain(lambda view: append(bytes(view[:size])), limit)
        return out

    # Doorbell coalescing (see the module doc) ---------------------------------------------------

    def set_polling(self, on: bool = True) -> None:
        """Consumer: say whether this end looks at the queue without sleeping (one store).

        ``on=False`` writes only when the word is not already 0, so a consumer that never
        coalesces never writes the padding (it clears a flag left by an earlier process).
        """
        if on:
            self._idx[_POLL_WORD] = POLLING
        elif self._idx[_POLL_WORD] != 0:
            self._idx[_POLL_WORD] = 0

    def may_sleep(self, full_fence: Callable[[], None]) -> bool:
        """Consumer, before sleeping: clear the polling flag, fence, look at head again.

        Returns:
            True when the queue is still empty (sleeping is safe: any later enqueue rings);
            False when a message came meanwhile (take it instead of sleeping).

        Raises:
            QueueCorrupt: the peer's head index is out of range.
        """
        self.set_polling(False)
        full_fence()  # the flag's store before the head's load (StoreLoad)
        return self._tail == self._refresh_head()

    def needs_doorbell(self, full_fence: Callable[[], None], sent: int = 1) -> bool:
        """Producer, after enqueuing ``sent`` slots: may the consumer be asleep?

        True unless the consumer's polling flag is ``POLLING`` or it had not yet taken
        everything enqueued before these ``sent`` slots (then it re-checks before sleeping).

        Raises:
            QueueCorrupt: the peer's tail index is out of range.
        """
        full_fence()  # head's store before the flag's and tail's loads (StoreLoad)
        if self._idx[_POLL_WORD] == POLLING:
            return False
        tail = self._cached_tail = self._load_tail()
        return tail == (self._head - sent) % self._capacity

    # Both ends ------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Slots in flight, from both indexes as they are in shared memory now."""
        head, tail = self._load_head(), self._load_tail()
        return (head - tail) % self._capacity

    @property
    def capacity(self) -> int:
        """Number of slots; at most ``capacity - 1`` messages are in flight."""
        return self._capacity

    @property
    def region_size(self) -> int:
        """Size of the region the queue covers, in bytes."""
        return len(self._buf)

    def reset(self) -> None:
        """Empty the queue: zero both indexes (one store each), then the rest of the
        region (the header's padding, the polling flag with it, and every slot), as the
        "all zeroed" of docs/wire-format.md §3.6.

        Only the side that owns reset calls this, before the peer uses the queue (the
        "reset-queues" option): a reset under a live peer loses what was in flight.
        """
        _zero_queue(self._idx, self._buf)
        self._head = self._tail = self._cached_head = self._cached_tail = 0

    def resync(self) -> None:
        """Re-read both indexes from shared memory (after the peer reset the queue).

        Raises:
            QueueCorrupt: an index is out of range.
        """
        self._head = self._cached_head = self._load_head()
        self._tail = self._cached_tail = self._load_tail()

    def release(self) -> None:
        """Drop the queue's views of the region, so the owner can close its mmap.

        An ``mmap`` cannot be closed while a memoryview of it exists (BufferError). After
        ``release()`` any other call raises ValueError. Idempotent.
        """
        if self._blocks is not None:
            self._blocks.release()  # its pointer is an export of the view
        self._idx.release()
        self._buf.release()

    def __enter__(self) -> SpscQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"SpscQueue(capacity={self._capacity}, head={self._head}, tail={self._tail})"

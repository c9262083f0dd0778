"""ivshmem BAR0: the only code that does word arithmetic on the register block.

BAR0 (QEMU docs/specs/ivshmem-spec.rst; docs/wire-format.md §1.1) is 256 bytes of 32-bit
registers that accept 4-byte accesses only:

    0x00 IntrMask    INTx mask, bit 0 = doorbell interrupt
    0x04 IntrStatus  INTx status, read-to-clear
    0x08 IVPosition  read-only: this peer's id, the VMID (0..65535)
    0x0C Doorbell    write-only: (dest_peer << 16) | vector

Every register access is exactly one 4-byte access. Two word backends give that guarantee:
``MmapWords`` on a mapping, through the exact-width accessor its backend hands it (the
compiled helper's volatile load/store) or else a ``memoryview.cast("I")`` view (a single
aligned load or store; ``struct.pack_into`` and slice assignment store twice and would ring
twice), and
``PreadWords`` through ``pread``/``pwrite`` of 4 bytes on a file descriptor (vfio-pci often
cannot mmap the 256-byte BAR0; a 4-byte pwrite at region offset + reg is one access).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

__all__ = [
    "BAR0_SIZE",
    "DOORBELL",
    "INTRMASK",
    "INTRSTATUS",
    "IVPOSITION",
    "MAX_PEER",
    "PEER_IDS",
    "Bar0",
    "ExactWords",
    "MmapWords",
    "PreadWords",
    "WordIO",
    "doorbell_value",
    "is_peer_id",
]

INTRMASK = 0x00
INTRSTATUS = 0x04
IVPOSITION = 0x08
DOORBELL = 0x0C
BAR0_SIZE = 256

# A peer id (VMID, IVPosition) travels in Doorbell bits 31..16: this is the one place that
# says so. The server's id allocator, its clients, the fake pair, the bus and the command
# line all check against it.
MAX_PEER = 0xFFFF
PEER_IDS = f"0..{MAX_PEER}"  # for messages: "... is not a peer id (0..65535)"
MAX_VECTOR = 0xFF  # QEMU's device uses only bits 7..0 of the vector


def is_peer_id(value: int) -> bool:
    """Whether ``value`` can name a peer: ``0 <= value <= MAX_PEER``."""
    return 0 <= value <= MAX_PEER


class WordIO(Protocol):
    """Single 32-bit accesses at byte offsets of a register block."""

    def read32(self, offset: int) -> int: ...

    def write32(self, offset: int, value: int) -> None: ...


def _check(offset: int, size: int) -> None:
    if offset % 4 or not 0 <= offset <= size - 4:
        raise ValueError(f"register offset 0x{offset:x} is not an aligned word of {size} bytes")


class ExactWords(Protocol):
    """An exact-width accessor bound to one buffer (``native.ffi.MmioWords``): each call is
    one aligned 32-bit load or store in compiled code."""

    def read32(self, offset: int) -> int: ...

    def write32(self, offset: int, value: int) -> None: ...

    def release(self) -> None: ...


class MmapWords:
    """Words of a mapped (or any writable) buffer, one aligned 32-bit access each.

    ``exact``, when given, makes the accessor that does the accesses (the backend that maps
    BAR0 hands in ``native.ffi.mmio_words()``: the core stays sans-I/O, as the queue is handed
    its fence); without it, ``memoryview.cast("I")`` items, one access each on CPython
    (measured), and the only path when the compiled helper is not built.
    """

    def __init__(
        self,
        buffer: memoryview | bytearray,
        exact: Callable[[memoryview], ExactWords] | None = None,
    ) -> None:
        view = memoryview(buffer).cast("B")
        self._size = len(view)
        self._words = view[: self._size & ~3].cast("I")
        self._exact = None if exact is None else exact(self._words)

    def read32(self, offset: int) -> int:
        _check(offset, self._size)
        if self._exact is not None:
            return self._exact.read32(offset)
        return self._words[offset >> 2]

    def write32(self, offset: int, value: int) -> None:
        _check(offset, self._size)
        if self._exact is not None:
            self._exact.write32(offset, value)
        else:
            self._words[offset >> 2] = value

    @property
    def exact(self) -> bool:
        """Whether the accesses go through a compiled exact-width accessor."""
        return self._exact is not None

    def release(self) -> None:
        """Drop the accessor and the view so the owner can close its mapping."""
        if self._exact is not None:
            self._exact.release()
        self._words.release()


class PreadWords:
    """Words of a file region (a VFIO device fd at the BAR's region offset), via pread/pwrite."""

    def __init__(self, fd: int, base: int, size: int = BAR0_SIZE) -> None:
        self._fd = fd
        self._base = base
        self._size = size

    def read32(self, offset: int) -> int:
        _check(offset, self._size)
        data = os.pread(self._fd, 4, self._base + offset)
        if len(data) != 4:
            raise OSError(f"short register read at 0x{offset:x}: {len(data)} bytes")
        return int.from_bytes(data, "little")

    def write32(self, offset: int, value: int) -> None:
        _check(offset, self._size)
        written = os.pwrite(self._fd, value.to_bytes(4, "little"), self._base + offset)
        if written != 4:
            raise OSError(f"short register write at 0x{offset:x}: {written} bytes")


def doorbell_value(peer: int, vector: int) -> int:
    """The Doorbell word that rings ``vector`` of ``peer``; range-checked."""
    if not (is_peer_id(peer) and 0 <= vector <= MAX_VECTOR):
        raise ValueError(f"peer {peer} / vector {vector} out of range ({PEER_IDS} / 0..255)")
    return peer << 16 | vector


class Bar0:
    """The four ivshmem registers, by name, over a ``WordIO``."""

    def __init__(self, words: WordIO) -> None:
        self.words = words

    @property
    def intr_mask(self) -> int:
        return self.words.read32(INTRMASK)

    @intr_mask.setter
    def intr_mask(self, value: int) -> None:
        self.words.write32(INTRMASK, value)

    def read_intr_status(self) -> int:
        """Read IntrStatus; on real hardware the read clears it and lowers INTx."""
        return self.words.read32(INTRSTATUS)

    @property
    def ivposition(self) -> int:
        """This peer's id (the VMID)."""
        return self.words.read32(IVPOSITION)

    def ring(self, peer: int, vector: int = 0) -> None:
        """One 32-bit store of ``(peer << 16) | vector`` to Doorbell."""
        self.write_doorbell(doorbell_value(peer, vector))

    def write_doorbell(self, value: int) -> None:
        """Store a Doorbell word already made by ``doorbell_value`` (one 32-bit store)."""
        self.words.write32(DOORBELL, value)

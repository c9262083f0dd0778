"""Memory windows: where the driver's address A is, for the side that dereferences it.

SET_VQUEUE and every descriptor carry addresses in the *driver's* address space. A device side
turns them into bytes through a window: a mapping plus the driver address at which it starts
(QEMU calls it ``mem-offset``). Three kinds exist (docs/virtqueues.md): the peer's RAM behind an
ivshmem-plain BAR2, a pool in the doorbell device's own BAR2, and a shared file. They differ only
in how the mapping is made, so the virtqueue core sees this one small interface:

- ``view(addr, length)``: a writable byte view of ``[addr, addr + length)``, zero-copy;
- ``load16`` / ``store16``: one aligned 16-bit access (ring indexes are read by the peer at the
  same time; a torn access would show it half an index);
- ``fence()``: a full barrier between the accesses before and after it.

Every range comes from the peer and is checked here, once, before any byte is touched: an
address below the base, a range past the end, an overflowing length are ``WindowError``, never
clamped. This module is sans-I/O: it wraps a buffer it is given and maps nothing itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from ..errors import WindowError

__all__ = ["BufferWindow", "MemoryWindow", "load16_reader"]


@runtime_checkable
class MemoryWindow(Protocol):
    """What the virtqueue core needs of the memory both sides reach."""

    @property
    def name(self) -> str:
        """Names the window in errors: "ivshmem-plain 0000:00:11.0 BAR2", "pool in ..."."""
        ...

    @property
    def base(self) -> int:
        """The driver address of the window's first byte (mem-offset)."""
        ...

    @property
    def size(self) -> int:
        """The window's length in bytes."""
        ...

    def view(self, addr: int, length: int) -> memoryview:
        """A writable ``"B"`` view of driver addresses ``[addr, addr + length)``.

        Raises:
            WindowError: any byte of the range is outside the window.
        """
        ...

    def load16(self, addr: int) -> int:
        """One aligned 16-bit load at driver address ``addr``."""
        ...

    def store16(self, addr: int, value: int) -> None:
        """One aligned 16-bit store at driver address ``addr``."""
        ...

    def fence(self) -> None:
        """A full memory barrier (StoreLoad included) between earlier and later accesses."""
        ...


def _no_fence() -> None:
    """x86 without the compiled helper: TSO orders load-load, store-store and load-store;
    CPython issues each access in its own C call. Only StoreLoad is not covered (see the
    virtqueue core's notification checks, which re-read after publishing)."""


def load16_reader(window: MemoryWindow, addr: int) -> tuple[Callable[[], int], memoryview | None]:
    """A no-argument reader of the 16-bit word at ``addr`` and the view it holds (``None``:
    nothing to release). On a ``BufferWindow`` whose ``load16`` is not overridden, a bound
    item read of ``word16(addr)`` (one C call a read); else ``window.load16`` itself, so a
    window with its own accesses (an auditing one in the tests) still sees every load.
    A misaligned or outside word is refused when it is read, as ``load16`` refuses it."""
    if isinstance(window, BufferWindow) and type(window).load16 is BufferWindow.load16:
        try:
            word = window.word16(addr)
        except WindowError:
            pass  # refused by load16 at the first read, as before
        else:
            return functools.partial(word.__getitem__, 0), word
    return functools.partial(window.load16, addr), None


class BufferWindow:
    """A window over a writable buffer (an mmap, a memoryview of BAR2, a bytearray in tests).

    Args:
        buffer: the bytes of the window; kept as one ``"B"`` view for the window's life.
        base: the driver address of ``buffer[0]``.
        name: used in every error.
        fence: a full barrier (the compiled helper's ``full_fence()``), or ``None`` for the
            TSO fallback.
    """

    def __init__(
        self,
        buffer: memoryview | bytearray,
        base: int = 0,
        *,
        name: str = "memory window",
        fence: Callable[[], None] | None = None,
    ) -> None:
        if base < 0:
            raise ValueError(f"{name}: base address must not be negative, got {base}")
        mv = memoryview(buffer)
        if mv.readonly:
            raise ValueError(f"{name}: the buffer is read-only")
        self._mv = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
        self._h = self._mv[: len(self._mv) & ~1].cast("H")
        self._base = base
        self._name = name
        self.fence: Callable[[], None] = fence or _no_fence

    @property
    def name(self) -> str:
        return self._name

    @property
    def base(self) -> int:
        return self._base

    @property
    def size(self) -> int:
        return len(self._mv)

    @property
    def buffer(self) -> memoryview:
        """The window's bytes as one ``"B"`` view (buffer offset = address - ``base``): for
        the virtqueue core's data path, which slices it itself after the same range check
        as ``view``."""
        return self._mv

    def offset(self, addr: int, length: int) -> int:
        """The buffer offset of a checked range (for windows built on this one)."""
        off = addr - self._base
        if length < 0 or off < 0 or off + length > len(self._mv):
            raise WindowError(self._name, addr, length)
        return off

    def view(self, addr: int, length: int) -> memoryview:
        # offset() inlined: this is once per descriptor on the data path
        off = addr - self._base
        end = off + length
        if length < 0 or off < 0 or end > len(self._mv):
            raise WindowError(self._name, addr, length)
        return self._mv[off:end]

    def load16(self, addr: int) -> int:
        off = self.offset(addr, 2)
        if off & 1:
            raise WindowError(self._name, addr, 2, "are not 2-byte aligned")
        return int(self._h[off >> 1])

    def store16(self, addr: int, value: int) -> None:
        off = self.offset(addr, 2)
        if off & 1:
            raise WindowError(self._name, addr, 2, "are not 2-byte aligned")
        self._h[off >> 1] = value & 0xFFFF

    def word16(self, addr: int) -> memoryview:
        """A one-item ``"H"`` view of the aligned 16-bit word at ``addr``, checked as
        ``load16`` checks it: reading or writing item 0 is the same single 16-bit access as
        ``load16`` / ``store16``, without their Python call (for an index polled in a loop).
        The caller releases it before the window is released."""
        off = self.offset(addr, 2)
        if off & 1:
            raise WindowError(self._name, addr, 2, "are not 2-byte aligned")
        return self._h[off >> 1 : (off >> 1) + 1]

    def release(self) -> None:
        """Drop the views (before the owner closes its mmap). Idempotent."""
        self._h.release()
        self._mv.release()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name} base=0x{self._base:x} size={self.size}>"

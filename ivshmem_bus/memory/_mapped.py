"""A BufferWindow that owns an mmap (and whatever the mmap came from) until ``close``.

The order on close is fixed by the buffer protocol: an mmap with exported views cannot be
unmapped, so the window's own views go first, then the mapping, then the owners (a VFIO
device fd, its group, its container). Python's ``mmap`` holds a dup of the fd it mapped, so
the file windows close their own fd right after mapping and the dup goes with the mapping.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from typing import Self

from ..backends.base import unmap
from ..core.window import BufferWindow
from ..native.ffi import full_fence

__all__ = ["MappedWindow", "check_span"]

_ADDRESS_SPACE = 1 << 64
PAGE = 0x1000


def check_span(name: str, base: int, size: int) -> None:
    """Refuse a window that starts below 0 or off a page, or ends past the 64-bit address
    space, before anything is mapped. Guest RAM starts on a page; an offset off a page would
    make the driver's aligned ring indexes unaligned in the mapping. A descriptor address is a
    u64, so no byte past 2**64 is nameable."""
    if base < 0:
        raise ValueError(f"{name}: mem_offset must not be negative ({base})")
    if base % PAGE:
        raise ValueError(
            f"{name}: mem_offset 0x{base:x} is not a multiple of 0x{PAGE:x} (guest RAM starts "
            f"on a page: 0 on x86 q35, 0x40000000 on Arm virt)"
        )
    if base + size > _ADDRESS_SPACE:
        raise ValueError(
            f"{name}: {size} bytes at mem_offset 0x{base:x} end past the 64-bit address space"
        )


class MappedWindow(BufferWindow):
    """A window over a whole mmap, at driver address ``base``.

    Args:
        mapping: the mapping; unmapped by ``close``.
        base: the driver address of ``mapping[0]`` (mem-offset).
        name: names the window in every error.
        on_close: called once, after the unmap (closes the objects the mapping came from).
    """

    def __init__(
        self,
        mapping: mmap.mmap,
        base: int,
        *,
        name: str,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._mapping: mmap.mmap | None = mapping
        self._on_close = on_close
        with memoryview(mapping) as whole:  # BufferWindow keeps its own view
            super().__init__(whole, base, name=name, fence=full_fence())

    def close(self) -> None:
        """Release the views, unmap, then close what the mapping came from. Idempotent.

        A view a caller still holds keeps the mapping alive (logged): the memory stays valid
        for that view and goes with it.
        """
        mapping, self._mapping = self._mapping, None
        if mapping is None:
            return
        on_close, self._on_close = self._on_close, None
        try:
            self.release()
            unmap(mapping, self.name)
        finally:
            if on_close is not None:
                on_close()

    @property
    def closed(self) -> bool:
        return self._mapping is None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""BufferWindow: every range checked before a byte is touched; 16-bit accesses aligned."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ivshmem_bus.core.window import BufferWindow, MemoryWindow
from ivshmem_bus.errors import WindowError

BASE = 0x4000_0000


def test_view_maps_driver_addresses_to_offsets() -> None:
    buf = bytearray(64)
    w = BufferWindow(buf, BASE, name="test window")
    w.view(BASE + 8, 4)[:] = b"\x01\x02\x03\x04"
    assert buf[8:12] == b"\x01\x02\x03\x04"
    w.store16(BASE + 2, 0xBEEF)
    assert buf[2:4] == b"\xef\xbe"
    assert w.load16(BASE + 2) == 0xBEEF
    assert isinstance(w, MemoryWindow)


@pytest.mark.parametrize(
    ("addr", "length"),
    [(BASE - 1, 1), (BASE + 60, 5), (BASE + 64, 1), (BASE, -1), (0, 4), (BASE + 2**64, 1)],
)
def test_out_of_window_ranges_are_refused(addr: int, length: int) -> None:
    w = BufferWindow(bytearray(64), BASE, name="test window")
    with pytest.raises(WindowError, match=r"test window: .* at address 0x"):
        w.view(addr, length)


def test_unaligned_16bit_access_is_refused() -> None:
    w = BufferWindow(bytearray(64), BASE, name="w")
    with pytest.raises(WindowError, match="aligned"):
        w.load16(BASE + 1)
    with pytest.raises(WindowError):
        w.store16(BASE + 63, 1)


def test_read_only_buffer_is_refused() -> None:
    with pytest.raises(ValueError, match="read-only"):
        BufferWindow(memoryview(bytes(8)))


@given(st.integers(-(2**65), 2**65), st.integers(-(2**20), 2**20))
def test_any_range_is_inside_or_refused(addr: int, length: int) -> None:
    buf = bytearray(256)
    w = BufferWindow(buf, 0x1000)
    try:
        v = w.view(addr, length)
    except WindowError:
        assert length < 0 or addr < 0x1000 or addr - 0x1000 + length > 256
    else:
        assert addr >= 0x1000 and addr - 0x1000 + length <= 256 and len(v) == length

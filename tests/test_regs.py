"""BAR0 register access: names, values and exactly one 4-byte access per register op."""

from __future__ import annotations

import os

import pytest

from ivshmem_bus.core.regs import DOORBELL, IVPOSITION, Bar0, MmapWords, PreadWords, doorbell_value


def test_doorbell_word_is_peer_shifted_16_or_vector():
    assert doorbell_value(0x2E, 1) == 0x002E0001
    assert doorbell_value(0xFFFF, 0xFF) == 0xFFFF00FF


@pytest.mark.parametrize(("peer", "vector"), [(-1, 0), (0x10000, 0), (1, 256), (1, -1)])
def test_doorbell_out_of_range_is_refused(peer, vector):
    with pytest.raises(ValueError, match="out of range"):
        doorbell_value(peer, vector)


def test_mmap_words_are_little_endian_registers_at_spec_offsets():
    bar = bytearray(256)
    regs = Bar0(MmapWords(bar))
    bar[8:12] = (0x2E).to_bytes(4, "little")
    assert regs.ivposition == 0x2E
    regs.ring(7, 1)
    assert bar[DOORBELL : DOORBELL + 4] == bytes([1, 0, 7, 0])
    regs.intr_mask = 0xFFFFFFFF
    assert bar[0:4] == b"\xff" * 4


@pytest.mark.parametrize("offset", [2, 253, 256, -4])
def test_unaligned_or_outside_offsets_are_refused(offset):
    with pytest.raises(ValueError, match="not an aligned word"):
        MmapWords(bytearray(256)).read32(offset)


def test_pread_words_do_one_4_byte_access_at_region_offset(tmp_path, monkeypatch):
    path = tmp_path / "vfio-device"
    path.write_bytes(bytes(0x10000 + 256))
    fd = os.open(path, os.O_RDWR)
    calls = []
    real_pwrite, real_pread = os.pwrite, os.pread
    monkeypatch.setattr(
        os, "pwrite", lambda f, d, o: calls.append(("w", bytes(d), o)) or real_pwrite(f, d, o)
    )
    monkeypatch.setattr(
        os, "pread", lambda f, n, o: calls.append(("r", n, o)) or real_pread(f, n, o)
    )
    try:
        regs = Bar0(PreadWords(fd, base=0x10000))
        regs.ring(3, 2)
        assert calls == [("w", bytes([2, 0, 3, 0]), 0x10000 + DOORBELL)]
        calls.clear()
        assert regs.ivposition == 0
        assert calls == [("r", 4, 0x10000 + IVPOSITION)]
    finally:
        os.close(fd)
    assert path.read_bytes()[0x10000 + DOORBELL : 0x10000 + DOORBELL + 4] == bytes([2, 0, 3, 0])


class _Recorder:
    """An exact-width accessor that records each access (a stand-in for ffi.MmioWords)."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.log: list[tuple[str, int, int]] = []
        self.released = False

    def read32(self, offset: int) -> int:
        self.log.append(("r", offset, 0))
        return int.from_bytes(self.view.cast("B")[offset : offset + 4], "little")

    def write32(self, offset: int, value: int) -> None:
        self.log.append(("w", offset, value))

    def release(self) -> None:
        self.released = True


def test_mmap_words_hand_every_access_to_the_exact_accessor():
    made: list[_Recorder] = []

    def exact(view: memoryview) -> _Recorder:
        made.append(_Recorder(view))
        return made[-1]

    bar = bytearray(256)
    bar[IVPOSITION : IVPOSITION + 4] = (0x2E).to_bytes(4, "little")
    words = MmapWords(bar, exact=exact)
    regs = Bar0(words)
    assert words.exact and regs.ivposition == 0x2E
    regs.ring(7, 1)
    assert made[0].log == [("r", IVPOSITION, 0), ("w", DOORBELL, 0x00070001)]
    assert bar[DOORBELL : DOORBELL + 4] == bytes(4)  # the accessor, not the cast view, stored
    with pytest.raises(ValueError, match="not an aligned word"):
        words.write32(254, 1)  # checked before the accessor sees it
    assert len(made[0].log) == 2
    words.release()
    assert made[0].released


def test_mmap_words_over_the_compiled_helper_store_once_in_the_mapping():
    import mmap

    from ivshmem_bus.native import ffi

    factory = ffi.mmio_words()
    if factory is None:
        pytest.skip("compiled helper not built")
    m = mmap.mmap(-1, 256)
    words = MmapWords(memoryview(m), exact=factory)
    Bar0(words).ring(0x2E, 3)
    assert m[DOORBELL : DOORBELL + 4] == bytes([3, 0, 0x2E, 0])
    words.release()
    m.close()  # no export left behind

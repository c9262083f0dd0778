"""FileWindow: driver address A is at file offset A - mem-offset; every bad file is one clear
error with no fd left behind; close releases the mapping (and mmap's dup of the fd)."""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ivshmem_bus.core.window import MemoryWindow
from ivshmem_bus.errors import MemoryFileError, WindowError
from ivshmem_bus.memory import open_window
from ivshmem_bus.memory.file import FileWindow
from ivshmem_bus.native import ffi

ARM_RAM = 0x4000_0000  # Arm virt RAM base, mem-offset (docs/virtqueues.md §4)


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def ram_file(tmp_path: Path, size: int = 0x4000) -> Path:
    path = tmp_path / "vm-ram"
    path.write_bytes(bytes(i * 7 & 0xFF for i in range(size)))
    return path


def file_bytes(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), size, offset)


def test_addresses_are_file_offsets_plus_mem_offset(tmp_path: Path) -> None:
    path = ram_file(tmp_path)
    before = open_fds()
    with FileWindow(path, ARM_RAM) as w:
        assert isinstance(w, MemoryWindow)
        assert (w.base, w.size) == (ARM_RAM, 0x4000)
        assert w.name == f"file {path} (mem-offset 0x40000000)"
        if ffi.HAVE_COMPILED:
            assert w.fence == ffi.full_fence()
        assert bytes(w.view(ARM_RAM + 0x10, 4)) == file_bytes(path, 0x10, 4)
        w.view(ARM_RAM + 0x3FFC, 4)[:] = b"tail"
        w.store16(ARM_RAM + 0x100, 0xBEEF)
        assert w.load16(ARM_RAM + 0x100) == 0xBEEF
        assert file_bytes(path, 0x3FFC, 4) == b"tail"  # MAP_SHARED: in the file at once
        assert file_bytes(path, 0x100, 2) == b"\xef\xbe"  # little-endian
        for addr, length in [(ARM_RAM - 1, 1), (ARM_RAM + 0x3FFD, 4), (0x100, 2)]:
            with pytest.raises(WindowError, match=rf"file {path} \(mem-offset 0x40000000\)"):
                w.view(addr, length)
    assert open_fds() == before


def test_two_windows_on_one_file_see_each_other(tmp_path: Path) -> None:
    path = ram_file(tmp_path)
    with FileWindow(path, 0) as a, FileWindow(path, ARM_RAM) as b:
        assert a.name == f"file {path}"
        a.view(0x200, 3)[:] = b"abc"
        assert bytes(b.view(ARM_RAM + 0x200, 3)) == b"abc"


def test_size_maps_a_prefix_and_create_makes_or_grows_never_shrinks(tmp_path: Path) -> None:
    path = ram_file(tmp_path, 0x4000)
    with FileWindow(path, 0, size=0x1000) as w:
        assert w.size == 0x1000
        with pytest.raises(WindowError):
            w.view(0x1000, 1)
    with FileWindow(path, 0, size=0x1000, create=True):
        pass
    assert path.stat().st_size == 0x4000  # not shrunk
    with FileWindow(path, 0, size=0x8000, create=True) as w:
        assert bytes(w.view(0x7FF0, 16)) == bytes(16)
    assert path.stat().st_size == 0x8000
    new = tmp_path / "new-ram"
    before = open_fds()
    with FileWindow(new, 0, size=0x2000, create=True) as w:
        assert w.size == 0x2000
    assert stat.S_IMODE(new.stat().st_mode) == 0o600 and new.stat().st_size == 0x2000
    assert open_fds() == before


@pytest.mark.parametrize(
    ("make", "size", "match", "code"),
    [
        (None, None, r"file .*/absent does not exist: .*truncate -s 16M", errno.ENOENT),
        ("dir", None, r".*/absent is a directory: name the RAM file itself", errno.EISDIR),
        ("empty", None, r"file .*/absent is empty \(0 bytes\): .*truncate -s 16M", None),
        ("short", 0x2000, r"is 4096 bytes, shorter than the 8192-byte window", None),
    ],
)
def test_unusable_files_are_one_clear_error_and_leak_nothing(
    tmp_path: Path, make: str | None, size: int | None, match: str, code: int | None
) -> None:
    path = tmp_path / "absent"
    if make == "dir":
        path.mkdir()
    elif make == "empty":
        path.touch()
    elif make == "short":
        path.write_bytes(bytes(0x1000))
    before = open_fds()
    with pytest.raises(MemoryFileError, match=match) as info:
        FileWindow(path, 0, size=size)
    assert info.value.path == str(path) and info.value.errno == code
    assert isinstance(info.value, OSError)
    assert open_fds() == before


def test_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    before = open_fds()
    with pytest.raises(MemoryFileError, match=r"/dev/null is not a regular file"):
        FileWindow("/dev/null", 0)
    assert open_fds() == before


def test_permission_denied_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = ram_file(tmp_path)
    if os.geteuid() != 0:  # a real mode-000 file where that can fail
        path.chmod(0)
        with pytest.raises(MemoryFileError, match="permission denied; run as the user"):
            FileWindow(path, 0)
        path.chmod(0o600)

    def denied(p: object, *args: object, **kwargs: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", p)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(MemoryFileError, match="read-write: permission denied; run as the user"):
        FileWindow(path, 0)


def test_bad_arguments_are_value_errors_before_any_io(tmp_path: Path) -> None:
    path = ram_file(tmp_path)
    with pytest.raises(ValueError, match="mem_offset must not be negative"):
        FileWindow(path, -1)
    with pytest.raises(ValueError, match=r"mem_offset 0x40000800 is not a multiple of 0x1000"):
        FileWindow(path, ARM_RAM + 0x800)
    with pytest.raises(ValueError, match="size must be positive"):
        FileWindow(path, 0, size=0)
    with pytest.raises(ValueError, match="create=True needs a size"):
        FileWindow(tmp_path / "x", 0, create=True)
    assert not (tmp_path / "x").exists()
    before = open_fds()
    with pytest.raises(ValueError, match="end past the 64-bit address space"):
        FileWindow(path, (1 << 64) - 0x1000)
    assert open_fds() == before


def test_close_is_idempotent_and_a_held_view_outlives_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = ram_file(tmp_path)
    before = open_fds()
    w = FileWindow(path, 0)
    assert len(open_fds() - before) == 1  # only mmap's dup: our own fd is already closed
    w.close()
    w.close()
    assert w.closed and open_fds() == before
    with pytest.raises(ValueError):
        w.view(0, 1)

    w = FileWindow(path, 0)
    held = w.view(0, 4)
    with caplog.at_level(logging.WARNING):
        w.close()
    assert "still in use by a view" in caplog.text
    assert bytes(held) == file_bytes(path, 0, 4)  # still mapped, still valid
    held.release()
    del w, held
    assert open_fds() == before


def test_open_window_takes_a_path_and_a_bdf_lookalike_with_a_directory(tmp_path: Path) -> None:
    path = ram_file(tmp_path)
    with open_window(str(path), mem_offset=ARM_RAM) as w:
        assert isinstance(w, FileWindow) and w.base == ARM_RAM
    odd = tmp_path / "00:11.0"
    odd.write_bytes(bytes(64))
    with open_window(str(odd)) as w:  # a path with a directory, not a PCI address
        assert isinstance(w, FileWindow)
    named_pool = tmp_path / "pool"
    named_pool.write_bytes(bytes(64))
    with open_window(str(named_pool)) as w:  # a path, not the word "pool"
        assert isinstance(w, FileWindow) and w.name == f"file {named_pool}"


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    base=st.integers(0, (1 << 52) - 1).map(lambda page: page * 0x1000),
    addr_delta=st.integers(-0x2000, 0x2000),
    length=st.integers(-4, 0x1100),
)
def test_any_range_reads_the_file_at_addr_minus_base_or_is_refused(
    tmp_path: Path, base: int, addr_delta: int, length: int
) -> None:
    path = tmp_path / "prop-ram"
    if not path.exists():
        path.write_bytes(bytes(i * 13 & 0xFF for i in range(0x1000)))
    addr = base + addr_delta
    with FileWindow(path, base) as w:
        try:
            v = w.view(addr, length)
        except WindowError:
            assert length < 0 or addr_delta < 0 or addr_delta + length > 0x1000
        else:
            assert addr_delta >= 0 and addr_delta + length <= 0x1000
            assert bytes(v) == file_bytes(path, addr_delta, length)
            v.release()


def test_open_and_close_200_times_leaves_the_fds_as_they_were(tmp_path: Path) -> None:
    path = ram_file(tmp_path)
    before = open_fds()
    for i in range(200):
        with FileWindow(path, ARM_RAM) as w:
            w.store16(ARM_RAM + 2 * (i % 16), i)
        with pytest.raises(MemoryFileError):
            FileWindow(tmp_path / "absent", 0)
    assert open_fds() == before

"""ivshmem_bus.native.ffi on both paths: the compiled helper and the pure-Python fallback.

Every behaviour test runs twice through the ``path`` fixture: ``compiled`` (skipped with a
reason when the helper is not built) and ``fallback`` (the helper hidden with monkeypatch, as
on a machine without a C compiler). Both must give the same results and the same errors.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import sys
import termios
import types
from collections.abc import Iterator

import pytest

from ivshmem_bus import __version__
from ivshmem_bus.errors import IvshmemBusError, VfioError
from ivshmem_bus.native import ffi as _ffi

ffi, lib = _ffi.ffi, _ffi.lib
ORDER = sys.byteorder


@pytest.fixture(params=["compiled", "fallback"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test on one path; the fallback's log-once flags start fresh."""
    monkeypatch.setattr(_ffi, "_logged_missing", False)
    monkeypatch.setattr(_ffi, "_logged_no_fence", False)
    if request.param == "compiled":
        if not _ffi.HAVE_COMPILED:
            pytest.skip(f"compiled helper not available: {_ffi._MISSING_REASON}")
    else:
        monkeypatch.setattr(_ffi, "_lib", None)
        monkeypatch.setattr(_ffi, "HAVE_COMPILED", False)
        monkeypatch.setattr(_ffi, "_MISSING_REASON", "hidden by the test")
    return str(request.param)


@pytest.fixture
def page() -> Iterator[mmap.mmap]:
    m = mmap.mmap(-1, mmap.PAGESIZE)
    yield m
    m.close()  # BufferError here would mean a test left the buffer exported


@pytest.fixture
def null_fd() -> Iterator[int]:
    fd = os.open(os.devnull, os.O_RDWR)
    yield fd
    os.close(fd)


# MmioWords: exact-width words bound to one mapping ------------------------------------------

VALUES = [0, 1, 0x12345678, 0xDEADBEEF, 0xFFFFFFFF]


@pytest.fixture
def compiled() -> None:
    if not _ffi.HAVE_COMPILED:
        pytest.skip(f"compiled helper not available: {_ffi._MISSING_REASON}")


@pytest.mark.parametrize("value", VALUES)
def test_mmio_round_trip(compiled: None, page: mmap.mmap, value: int) -> None:
    words = _ffi.MmioWords(page)
    words.write32(0x0C, value)
    assert words.read32(0x0C) == value
    assert int.from_bytes(page[0x0C:0x10], ORDER) == value  # native order, like the C helper
    words.release()  # else the page fixture's close raises BufferError


def test_mmio_write_touches_only_its_word(compiled: None) -> None:
    buf = bytearray(b"\xa5" * 16)
    words = _ffi.MmioWords(buf)
    words.write32(4, 0x01020304)
    assert buf == b"\xa5" * 4 + (0x01020304).to_bytes(4, ORDER) + b"\xa5" * 8
    assert words.read32(4) == 0x01020304
    words.release()
    words.release()  # idempotent


def test_mmio_offsets_count_bytes_whatever_the_format(compiled: None, page: mmap.mmap) -> None:
    with memoryview(page) as view, view.cast("I") as cast:
        words = _ffi.MmioWords(cast)
        words.write32(8, 77)
        assert cast[2] == 77
        words.release()


@pytest.mark.parametrize("off", [-4, -1, 1, 2, 3, 6, mmap.PAGESIZE - 3, mmap.PAGESIZE, 1 << 40])
def test_mmio_refuses_words_outside_or_misaligned(
    compiled: None, page: mmap.mmap, off: int
) -> None:
    words = _ffi.MmioWords(page)
    with pytest.raises(ValueError, match=f"offset {off} is not an aligned word of the 4096"):
        words.read32(off)
    with pytest.raises(ValueError, match=f"offset {off} is not an aligned word"):
        words.write32(off, 1)
    assert page[:] == bytes(mmap.PAGESIZE)
    words.release()


def test_mmio_refuses_a_misaligned_buffer_start(compiled: None, page: mmap.mmap) -> None:
    with memoryview(page) as view:  # the alignment that matters is the address, not off
        with pytest.raises(ValueError, match="not 4-byte aligned"):
            _ffi.MmioWords(view[1:])
        with pytest.raises(ValueError, match="not 4-byte aligned"):
            _ffi.MmioWords(view[2:])


def test_mmio_short_buffer_has_no_word(compiled: None) -> None:
    words = _ffi.MmioWords(bytearray(3))
    with pytest.raises(ValueError, match="offset 0 is not an aligned word of the 3-byte buffer"):
        words.read32(0)


@pytest.mark.parametrize("value", [-1, 1 << 32])
def test_mmio_value_must_fit_32_bits(compiled: None, value: int) -> None:
    buf = bytearray(4)
    words = _ffi.MmioWords(buf)
    with pytest.raises(ValueError, match="32 bits"):
        words.write32(0, value)
    assert buf == bytes(4)


def test_mmio_read_only_buffer_is_a_type_error(compiled: None) -> None:
    with pytest.raises(TypeError, match="read-only"):
        _ffi.MmioWords(bytes(8))


def test_mmio_after_release_is_refused(compiled: None) -> None:
    words = _ffi.MmioWords(bytearray(8))
    words.release()
    with pytest.raises(ValueError, match="released"):
        words.write32(0, 1)


def test_mmio_words_factory_is_none_without_the_helper(path: str) -> None:
    factory = _ffi.mmio_words()
    assert (factory is _ffi.MmioWords) == (path == "compiled")
    assert (factory is None) == (path == "fallback")


# ioctl -----------------------------------------------------------------------------------


def test_ioctl_errno_funnel_int_argument(path: str, null_fd: int) -> None:
    with pytest.raises(VfioError) as info:
        _ffi.ioctl(null_fd, lib.VFIO_GET_API_VERSION, 0, what="VFIO_GET_API_VERSION on /dev/null")
    err = info.value
    assert err.errno == errno.ENOTTY
    assert isinstance(err, OSError)
    assert isinstance(err, IvshmemBusError)
    assert str(err).startswith("VFIO_GET_API_VERSION on /dev/null: ENOTTY (")
    assert err.what == "VFIO_GET_API_VERSION on /dev/null"


def test_ioctl_errno_funnel_pointer_arguments(path: str) -> None:
    read_end, write_end = os.pipe()
    try:
        info = ffi.new(
            "struct vfio_region_info *", {"argsz": ffi.sizeof("struct vfio_region_info")}
        )
        for arg in (info, bytearray(32)):
            with pytest.raises(VfioError, match=r"^GET_REGION_INFO on a pipe: ENOTTY") as exc:
                _ffi.ioctl(
                    read_end, lib.VFIO_DEVICE_GET_REGION_INFO, arg, what="GET_REGION_INFO on a pipe"
                )
            assert exc.value.errno == errno.ENOTTY
    finally:
        os.close(read_end)
        os.close(write_end)


def test_ioctl_bad_fd_is_ebadf(path: str) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    with pytest.raises(VfioError) as exc:
        _ffi.ioctl(read_end, lib.VFIO_GET_API_VERSION, 0, what="closed fd")
    assert exc.value.errno == errno.EBADF


def test_ioctl_pointer_reaches_the_kernel(path: str) -> None:
    """FIONREAD writes an int through the pointer: the argument really is a pointer."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"hello")
        count = ffi.new("int *")
        assert _ffi.ioctl(read_end, termios.FIONREAD, count, what="FIONREAD") == 0
        assert count[0] == 5
        raw = bytearray(4)
        assert _ffi.ioctl(read_end, termios.FIONREAD, raw, what="FIONREAD") == 0
        assert int.from_bytes(raw, ORDER) == 5
    finally:
        os.close(read_end)
        os.close(write_end)


def test_ioctl_refuses_read_only_buffers(path: str, null_fd: int) -> None:
    # The kernel would write into an immutable bytes object (the fcntl.ioctl trap).
    with pytest.raises(TypeError, match="read-only"):
        _ffi.ioctl(null_fd, lib.VFIO_DEVICE_GET_INFO, b"\0" * 24, what="x")


@pytest.mark.parametrize(("request_", "arg"), [(-1, 0), (1 << 64, 0), (0x3B64, -1)])
def test_ioctl_range_checks(path: str, null_fd: int, request_: int, arg: int) -> None:
    with pytest.raises(ValueError, match="unsigned long"):
        _ffi.ioctl(null_fd, request_, arg, what="x")


# fence and logging ----------------------------------------------------------------------


def test_fence_is_callable(path: str) -> None:
    _ffi.fence()
    _ffi.fence()


def test_fallback_logs_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_ffi, "_lib", None)
    monkeypatch.setattr(_ffi, "_MISSING_REASON", "hidden by the test")
    monkeypatch.setattr(_ffi, "_logged_missing", False)
    monkeypatch.setattr(_ffi, "_TSO", True)
    caplog.set_level(logging.INFO, logger="ivshmem_bus")
    assert _ffi.mmio_words() is None
    _ffi.fence()
    fd = os.open(os.devnull, os.O_RDWR)
    try:
        with pytest.raises(VfioError):
            _ffi.ioctl(fd, lib.VFIO_GET_API_VERSION, 0, what="x")
    finally:
        os.close(fd)
    messages = [r.getMessage() for r in caplog.records if r.name == "ivshmem_bus"]
    assert len(messages) == 1
    assert "hidden by the test" in messages[0]


def test_compiled_path_does_not_log(caplog: pytest.LogCaptureFixture) -> None:
    if not _ffi.HAVE_COMPILED:
        pytest.skip(f"compiled helper not available: {_ffi._MISSING_REASON}")
    caplog.set_level(logging.DEBUG, logger="ivshmem_bus")
    words = _ffi.MmioWords(bytearray(4))
    words.write32(0, 1)
    words.release()
    _ffi.fence()
    assert not caplog.records


def test_fallback_fence_warns_once_on_weakly_ordered_cpus(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_ffi, "_lib", None)
    monkeypatch.setattr(_ffi, "_TSO", False)
    monkeypatch.setattr(_ffi, "_logged_no_fence", False)
    caplog.set_level(logging.WARNING, logger="ivshmem_bus")
    _ffi.fence()
    _ffi.fence()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "no memory barrier" in warnings[0].getMessage()


# loading the helper ---------------------------------------------------------------------


def _fake_helper(version: bytes) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        __file__="/somewhere/ivshmem_bus/_helper.abi3.so",
        ffi=types.SimpleNamespace(string=lambda c: c),
        lib=types.SimpleNamespace(IVB_HELPER_VERSION=version),
    )


def _importer(import_module: object) -> types.SimpleNamespace:
    """Stands in for the importlib module inside _ffi only (not for the whole process)."""
    return types.SimpleNamespace(import_module=import_module)


def test_stale_helper_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ffi, "importlib", _importer(lambda name: _fake_helper(b"0.0.0-old")))
    with pytest.raises(ImportError, match=r"stale compiled helper .*built for 0\.0\.0-old"):
        _ffi._import_helper()


def test_matching_helper_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_helper(__version__.encode())
    monkeypatch.setattr(_ffi, "importlib", _importer(lambda name: fake))
    assert _ffi._import_helper() is fake.lib


def test_missing_helper_says_not_built(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(_ffi, "importlib", _importer(missing))
    with pytest.raises(ImportError, match="not built"):
        _ffi._import_helper()


def test_built_helper_carries_the_package_version() -> None:
    if not _ffi.HAVE_COMPILED:
        pytest.skip(f"compiled helper not available: {_ffi._MISSING_REASON}")
    from ivshmem_bus.native import _helper  # type: ignore[attr-defined]

    assert ffi.string(_helper.lib.IVB_HELPER_VERSION).decode() == __version__

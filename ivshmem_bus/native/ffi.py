"""The one door to C: the VFIO declarations, ioctl with its errno funnel, MMIO words, fences.

The only module that imports the compiled helper ``ivshmem_bus.native._helper`` (cryptography's
``binding.py`` role). Everything else uses the names here and never cares which path runs:

========================  ==========================================  ===========================
                          compiled helper (``HAVE_COMPILED``)          fallback (no compiler)
========================  ==========================================  ===========================
``ioctl``                 ``ivb_ioctl_int`` / ``ivb_ioctl_ptr``       libc ``ioctl`` (ABI mode)
``mmio_words``            ``MmioWords``: ``ivb_read32`` /            None: ``regs.MmapWords``'
                          ``ivb_write32`` (volatile)                  ``memoryview.cast("I")``
``fence``                 ``__atomic_thread_fence(SEQ_CST)``          no-op on x86 (TSO), else
                                                                      a no-op and a warning
``queue_blocks``          ``ivb_q_put_block`` / ``ivb_q_get_block``   None: ``SpscQueue``'s own
                                                                      pure-Python block copies
========================  ==========================================  ===========================

Both paths make exactly one aligned 32-bit access per word, measured with watchpoints (see
docs/vfio.md §5): ``struct.pack_into``, slice assignment and cffi ABI-mode
``p[0] = v`` make two, which rings a doorbell twice. So the fallback is correct on x86-64,
where CPython was measured; the first time any fallback runs, the reason the helper is
absent is logged once on the ``ivshmem_bus`` logger (at run time, not import time, so it
reaches the application's logging configuration).

``ffi`` is always ABI mode, parsed from ``cdefs/vfio.h`` (package data) with no compiler, so
struct and constant names are the same with or without the helper; ``lib`` is libc opened
through it and carries the constants (``lib.VFIO_DEVICE_GET_INFO``). A helper built for
another package version is refused (an ``ImportError`` inside, then treated as absent).
"""

from __future__ import annotations

import importlib
import logging
import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cffi

from .. import __version__
from ..errors import VfioError

__all__ = [
    "HAVE_COMPILED",
    "MmioWords",
    "QueueBlocks",
    "fence",
    "ffi",
    "full_fence",
    "ioctl",
    "lib",
    "mmio_words",
    "queue_blocks",
    "queue_fence",
]

log = logging.getLogger("ivshmem_bus")

CDEFS = Path(__file__).resolve().parent / "cdefs"

ffi = cffi.FFI()
ffi.cdef((CDEFS / "vfio.h").read_text())
lib: Any = ffi.dlopen(None)  # libc and the process: ioctl, plus every #define of vfio.h

_U64_MAX = (1 << 64) - 1
_U32_MAX = (1 << 32) - 1

# CPUs whose plain loads and stores already give acquire/release ordering (TSO).
_TSO_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})
_TSO = platform.machine().lower() in _TSO_MACHINES


# Loading the compiled helper -------------------------------------------------------------


def _import_helper() -> Any:
    """The helper's ``lib``; ImportError if it is not built or was built for another version."""
    try:
        _helper = importlib.import_module(f"{__package__}._helper")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}._helper":
            raise
        raise ImportError(
            "ivshmem_bus.native._helper is not built (no C compiler at install time?): install gcc "
            "and reinstall ivshmem-bus to build it"
        ) from None

    try:
        built_for = _helper.ffi.string(_helper.lib.IVB_HELPER_VERSION).decode()
    except AttributeError:
        built_for = "an unknown version"
    if built_for != __version__:
        # A .so left in the tree by an older build: its C may not match this Python.
        raise ImportError(
            f"stale compiled helper {_helper.__file__}: built for {built_for}, the package is "
            f"{__version__}; rebuild it (pip install . or python tools/build_helper.py)"
        )
    return _helper.lib


try:
    _lib: Any = _import_helper()
    _hffi: Any = importlib.import_module(f"{__package__}._helper").ffi
    _MISSING_REASON: str | None = None
except ImportError as exc:
    _lib = _hffi = None
    _MISSING_REASON = str(exc)
# Not built is a supported configuration (info); a stale build is a mistake to fix (warning).
_MISSING_LEVEL = logging.WARNING if "stale" in (_MISSING_REASON or "") else logging.INFO

HAVE_COMPILED: bool = _lib is not None
"""True when the compiled helper is in use; False means the fallbacks (see the module doc)."""

_logged_missing = False
_logged_no_fence = False


def _note_fallback() -> None:
    """Log, once per process, that a fallback runs and why the helper is missing."""
    global _logged_missing
    if not _logged_missing:
        _logged_missing = True
        log.log(
            _MISSING_LEVEL,
            "compiled helper not in use, so ioctl, 32-bit register words and fences use the "
            "pure-Python fallbacks: %s",
            _MISSING_REASON or "disabled",
        )


# ioctl: the single errno funnel ---------------------------------------------------------


@contextmanager
def _pointer(arg: Any) -> Iterator[Any]:
    """``arg`` as a C pointer: cdata as is; a writable buffer as a pointer to its first byte.

    Read-only buffers (``bytes``) are refused with TypeError: the kernel writes into most VFIO
    arguments, and writing into an immutable ``bytes`` corrupts it (the fcntl.ioctl trap in
    docs/vfio.md §2). The buffer stays exported only for the ``with`` block, so an mmap can be
    closed afterwards.
    """
    if isinstance(arg, ffi.CData):
        yield arg
        return
    with _from_buffer(arg, writable=True, op="ioctl argument") as buf:
        yield buf


def _from_buffer(buf: Any, *, writable: bool, op: str) -> Any:
    """``ffi.from_buffer``, with a read-only buffer reported as the caller's TypeError."""
    try:
        return ffi.from_buffer(buf, require_writable=writable)
    except BufferError:
        raise TypeError(
            f"{op}: {type(buf).__name__} buffer is read-only; pass a writable one "
            f"(bytearray, writable mmap or memoryview)"
        ) from None


def ioctl(fd: int, request: int, arg: Any, *, what: str) -> int:
    """Call ioctl(2) and turn a failure into ``VfioError``, keeping errno.

    Every ioctl of the package goes through here, so every failure names its operation.

    Args:
        fd: an open file descriptor (container, group or device).
        request: the ioctl number, e.g. ``lib.VFIO_DEVICE_GET_REGION_INFO``.
        arg: an ``int`` passed by value (0 for "no argument"); or a pointer: a cdata (e.g.
            ``ffi.new("struct vfio_region_info *")``) or a writable buffer (``bytearray``,
            writable ``memoryview``, ``mmap``), passed as a pointer to its first byte.
        what: the operation and the object for the error message, e.g.
            ``"VFIO_DEVICE_GET_REGION_INFO on /dev/vfio/7"``.

    Returns:
        The ioctl's non-negative return value (the new fd for ``VFIO_GROUP_GET_DEVICE_FD``).

    Raises:
        VfioError: the ioctl returned -1; ``.errno`` is the kernel's errno.
        ValueError: an ``int`` ``request`` or ``arg`` outside 0 .. 2**64 - 1.
        TypeError: ``arg`` is neither an int, a cdata nor a writable buffer.
    """
    if not 0 <= request <= _U64_MAX:
        raise ValueError(f"ioctl request {request} is not an unsigned long")
    if isinstance(arg, int) and not 0 <= arg <= _U64_MAX:
        raise ValueError(f"ioctl integer argument {arg} is not an unsigned long")
    if _lib is not None:
        if isinstance(arg, int):
            rc = _lib.ivb_ioctl_int(fd, request, arg)
            err = ffi.errno  # cffi saved errno right after the call; read before any other
        else:
            with _pointer(arg) as ptr:
                rc = _lib.ivb_ioctl_ptr(fd, request, ptr)
                err = ffi.errno
    else:
        _note_fallback()
        # libc's ioctl is variadic: ABI mode needs every variadic argument as a typed cdata.
        if isinstance(arg, int):
            rc = lib.ioctl(fd, request, ffi.cast("unsigned long", arg))
            err = ffi.errno
        else:
            with _pointer(arg) as ptr:
                rc = lib.ioctl(fd, request, ffi.cast("void *", ptr))
                err = ffi.errno
    if rc < 0:
        raise VfioError(err, what)
    return int(rc)


# 32-bit words in mapped memory ----------------------------------------------------------


class MmioWords:
    """Exact-width 32-bit accesses to one mapped buffer (a BAR) through the compiled helper.

    ``ivb_read32``/``ivb_write32`` are one volatile aligned load/store each, whatever the
    Python build does with ``memoryview.cast("I")``. Made once per mapping (``mmio_words()``
    is the factory ``regs.MmapWords(exact=)`` takes): a pointer per call would cost a buffer
    export each time (~1 us, 5x the access). Holds a buffer export: ``release()`` it before the
    mapping is closed (``MmapWords.release()`` does).

    Raises:
        ValueError: (construction) the buffer does not start 4-byte aligned; (access) the word
            is not a whole, aligned word inside the buffer, or the value does not fit 32 bits.
        TypeError: the buffer is read-only or not a contiguous buffer.
    """

    __slots__ = ("_ptr", "_read", "_size", "_write")

    def __init__(self, buf: Any) -> None:
        if _lib is None:
            raise RuntimeError(f"MmioWords needs the compiled helper: {_MISSING_REASON}")
        try:
            ptr = _hffi.from_buffer(_U8_ARRAY, buf, True)
        except BufferError:  # cffi's word for a read-only buffer
            raise TypeError(
                f"MmioWords: {type(buf).__name__} buffer is read-only; pass a writable one"
            ) from None
        address = int(_hffi.cast("uintptr_t", ptr))
        if address % 4:
            _hffi.release(ptr)
            raise ValueError(f"MmioWords: buffer address 0x{address:x} is not 4-byte aligned")
        self._ptr = ptr
        self._size = len(ptr)
        self._read = _lib.ivb_read32
        self._write = _lib.ivb_write32

    def _refuse(self, off: int, op: str) -> ValueError:
        if self._ptr is None:
            return ValueError(f"{op} on released MmioWords")
        return ValueError(
            f"{op}: offset {off} is not an aligned word of the {self._size}-byte buffer"
        )

    def read32(self, off: int) -> int:
        """The native-endian word at byte ``off``: one aligned volatile load."""
        # one test for every refusal (a released pointer is None: cffi would pass NULL)
        if off & 3 or not 0 <= off <= self._size - 4 or self._ptr is None:
            raise self._refuse(off, "read32")
        return self._read(self._ptr, off)  # type: ignore[no-any-return]

    def write32(self, off: int, value: int) -> None:
        """Store ``value`` at byte ``off``: one aligned volatile store (a doorbell rings once)."""
        if off & 3 or not 0 <= off <= self._size - 4 or self._ptr is None:
            raise self._refuse(off, "write32")
        if not 0 <= value <= _U32_MAX:
            raise ValueError(f"write32: value {value} does not fit in 32 bits")
        self._write(self._ptr, off, value)

    def release(self) -> None:
        """Give the buffer export back. Idempotent."""
        if self._ptr is not None:
            _hffi.release(self._ptr)
            self._ptr = None


def mmio_words() -> Callable[[Any], MmioWords] | None:
    """The ``exact=`` factory for ``regs.MmapWords``: ``MmioWords``, or None without the helper
    (then ``MmapWords`` uses ``memoryview.cast("I")`` items, one access each, measured)."""
    if _lib is None:
        _note_fallback()
        return None
    return MmioWords


# Memory barriers ------------------------------------------------------------------------


def fence() -> None:
    """A full memory barrier (loads and stores on both sides stay on their side).

    For shared-memory queues on weakly ordered CPUs (aarch64); pass it as
    ``SpscQueue(region, fence=fence)``.

    Without the compiled helper: on x86 (TSO) the CPU keeps loads in order, stores in order
    and loads before later stores; only a store followed by a load of another address may
    pass it. The SPSC queues need acquire and release only, which TSO gives, and CPython
    performs each copy and index access in separate C calls the compiler cannot reorder; so
    the fallback is a no-op there, though not a StoreLoad fence. Elsewhere there is no safe
    pure-Python barrier: it is a no-op and a warning is logged once.
    """
    if _lib is not None:
        _lib.ivb_fence_full()
        return
    _note_fallback()
    if not _TSO:
        _warn_no_fence()


def queue_fence() -> Callable[[], None] | None:
    """The fence a shared-memory queue needs on this CPU: None on x86 (TSO gives acquire
    and release, and a call per slot would only cost time), ``fence`` elsewhere."""
    return None if _TSO else fence


def full_fence() -> Callable[[], None] | None:
    """A real full (StoreLoad) barrier, or None without the compiled helper.

    Unlike ``queue_fence`` this is needed on x86 too: doorbell coalescing is a Dekker pair
    (store one word, then load another), the one reordering TSO allows. Pure Python has no
    such barrier, so without the helper coalescing is refused rather than made racy.
    """
    return _lib.ivb_fence_full if _lib is not None else None


def _warn_no_fence() -> None:
    global _logged_no_fence
    if not _logged_no_fence:
        _logged_no_fence = True
        log.warning(
            "no memory barrier on %s without the compiled helper: shared-memory queues may "
            "see stale data; install a C compiler and reinstall ivshmem-bus",
            platform.machine(),
        )


# SPSC queue block copies -------------------------------------------------------------------


_U8_ARRAY = _hffi.typeof("uint8_t[]") if _hffi is not None else None


class QueueBlocks:
    """The compiled ``put_block``/``get_block`` for one queue region (``SpscQueue(blocks=)``).

    Holds a C pointer to the region (a buffer export: ``release()`` it before the region's
    mmap is closed; ``SpscQueue.release()`` does). The C side checks the peer's index against
    the capacity before it indexes with it, as ``SpscQueue`` does, and uses acquire/release
    atomics, so no separate fence is needed on any CPU. Return values: see ``cdefs/helper.h``.
    """

    __slots__ = ("_cap", "_get", "_ptr", "_put")

    def __init__(self, region: memoryview, capacity: int) -> None:
        if _lib is None:
            raise RuntimeError(f"QueueBlocks needs the compiled helper: {_MISSING_REASON}")
        if not 2 <= capacity <= (len(region) - 128) // 64:
            raise ValueError(f"capacity {capacity} does not fit a {len(region)}-byte region")
        self._ptr = _hffi.from_buffer(_U8_ARRAY, region, True)
        self._cap = capacity
        self._put = _lib.ivb_q_put_block
        self._get = _lib.ivb_q_get_block

    def put(self, mine: int, cached: int, src: Any, n: int) -> int:
        """Copy ``n`` slots from ``src`` (``bytes`` passes as is, other buffers by pointer)."""
        # Positional from_buffer with a ctype object: 100 ns a call against 250 ns for
        # from_buffer("uint8_t[]", ..., require_writable=...), on the block hot path.
        ptr = src if type(src) is bytes else _hffi.from_buffer(_U8_ARRAY, src, False)
        if n * 64 > len(ptr):
            raise ValueError(f"{n} slots are more than the {len(ptr)}-byte source holds")
        if self._ptr is None:  # cffi would pass None as NULL
            raise ValueError("operation on a released queue")
        return self._put(self._ptr, self._cap, mine, cached, ptr, n)  # type: ignore[no-any-return]

    def get(self, mine: int, cached: int, dst: Any, n: int) -> int:
        """Copy ``n`` slots into the writable buffer ``dst``."""
        ptr = _hffi.from_buffer(_U8_ARRAY, dst, True)
        if n * 64 > len(ptr):
            raise ValueError(f"{n} slots are more than the {len(ptr)}-byte destination holds")
        if self._ptr is None:
            raise ValueError("operation on a released queue")
        return self._get(self._ptr, self._cap, mine, cached, ptr, n)  # type: ignore[no-any-return]

    def release(self) -> None:
        """Give the region's buffer export back. Idempotent."""
        if self._ptr is not None:
            _hffi.release(self._ptr)
            self._ptr = None


def queue_blocks() -> Callable[[memoryview, int], QueueBlocks] | None:
    """The ``blocks=`` factory for ``SpscQueue``: ``QueueBlocks``, or None without the helper."""
    return QueueBlocks if _lib is not None else None

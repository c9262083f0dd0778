"""A shared file as a memory window: the driver machine's RAM file, at its mem-offset.

Three users: QEMU's ``memory-backend-file,share=on,mem-path=FILE`` (the driver machine's RAM,
which the linux-user bus maps at ``mem-offset``: driver address A is at file offset
A - mem-offset, docs/virtqueues.md §4), a RAM file two host programs share, and the fake device's
window in tests. The file is mapped MAP_SHARED and read-write, so stores reach the other side
through the page cache at once; nothing is copied.

Every way the file can be unusable (missing, a directory, not readable and writable, empty,
smaller than the window, not a regular file) is a ``MemoryFileError`` naming the file and
the fix, raised before anything is mapped, with no fd left open. The fd is closed as soon as
the mapping exists (Python's mmap keeps its own dup, released by ``close``).
"""

from __future__ import annotations

import errno
import mmap
import os
import stat

from ..errors import MemoryFileError
from ._mapped import MappedWindow, check_span

__all__ = ["FileWindow"]


class FileWindow(MappedWindow):
    """A file mapped MAP_SHARED at driver address ``mem_offset``.

    Args:
        path: the file (``/dev/shm/vm-ram``, QEMU's ``mem-path``).
        mem_offset: the driver address of the file's first byte (0x40000000 for Arm ``virt``
            RAM, 0 on x86 q35 with RAM <= 2 GiB).
        size: map the first ``size`` bytes; default: the whole file.
        create: create the file (mode 0600) if missing and grow it to ``size`` if shorter;
            needs ``size``. Never shrinks a file.

    Raises:
        ValueError: a negative offset, a non-positive size, ``create`` without a size, or a
            window that would end past 2**64.
        MemoryFileError: the file cannot be the window (the message says why and the fix).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        mem_offset: int = 0,
        *,
        size: int | None = None,
        create: bool = False,
    ) -> None:
        self.path = os.fspath(path)
        check_span(f"file {self.path}", mem_offset, 0)
        if size is not None and size <= 0:
            raise ValueError(f"file {self.path}: size must be positive, not {size}")
        if create and size is None:
            raise ValueError(f"file {self.path}: create=True needs a size to create it with")
        fd = _open(self.path, create)
        try:
            length = _length(fd, self.path, size, create)
            check_span(f"file {self.path}", mem_offset, length)
            try:
                mapping = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as exc:
                raise MemoryFileError(
                    self.path,
                    f"cannot mmap file {self.path} MAP_SHARED read-write: {exc.strerror}; "
                    f"use a file on tmpfs or hugetlbfs (/dev/shm), as QEMU's mem-path",
                    errno=exc.errno,
                ) from None
        finally:
            os.close(fd)
        name = f"file {self.path}" + (f" (mem-offset 0x{mem_offset:x})" if mem_offset else "")
        try:
            super().__init__(mapping, mem_offset, name=name)
        except BaseException:
            mapping.close()
            raise


def _open(path: str, create: bool) -> int:
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        return os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            fix = (
                "start the QEMU that creates it (memory-backend-file mem-path=), create it "
                "(truncate -s 16M FILE), or pass create=True with a size"
            )
            msg = f"file {path} does not exist: {fix}"
        elif exc.errno == errno.EISDIR:
            msg = f"{path} is a directory: name the RAM file itself (QEMU's mem-path=FILE)"
        elif exc.errno in (errno.EACCES, errno.EPERM):
            msg = (
                f"cannot open file {path} read-write: permission denied; run as the user that "
                f"owns it (QEMU's), or give this user read and write access (chmod/chown)"
            )
        elif exc.errno == errno.EROFS:
            msg = f"file {path} is on a read-only file system: put the RAM file on /dev/shm"
        else:
            msg = f"cannot open file {path} read-write: {exc.strerror}"
        raise MemoryFileError(path, msg, errno=exc.errno) from None


def _length(fd: int, path: str, size: int | None, create: bool) -> int:
    """The window's length: the file's, or ``size`` (growing the file when ``create``)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise MemoryFileError(
            path,
            f"{path} is not a regular file: name a RAM file (on /dev/shm or hugetlbfs), as "
            f"QEMU's memory-backend-file mem-path",
        )
    if size is None:
        if st.st_size == 0:
            raise MemoryFileError(
                path,
                f"file {path} is empty (0 bytes): start the QEMU that sizes it first, or size "
                f"it: truncate -s 16M {path}",
            )
        return st.st_size
    if st.st_size < size:
        if not create:
            raise MemoryFileError(
                path,
                f"file {path} is {st.st_size} bytes, shorter than the {size}-byte window: "
                f"grow it (truncate -s {size} {path}) or ask for a smaller size",
            )
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            raise MemoryFileError(
                path,
                f"cannot grow file {path} to {size} bytes: {exc.strerror}; free space on its "
                f"file system or ask for a smaller size",
                errno=exc.errno,
            ) from None
    return size

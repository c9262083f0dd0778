"""The rng device fills a buffer the kernel cannot write into directly (EFAULT from readinto,
as virtio-9p's zero-copy read gives for a VFIO BAR mapping): read and copy, same bytes."""

from __future__ import annotations

import errno
import io

import pytest

from ivshmem_bus.core.virtqueue import Chain
from ivshmem_bus.devices import RngDevice


class NoDirectWrites(io.FileIO):
    """A source whose readinto always fails as 9p's does on memory without pages."""

    def readinto(self, buffer):  # type: ignore[override]
        raise OSError(errno.EFAULT, "Bad address")


class OtherError(io.FileIO):
    def readinto(self, buffer):  # type: ignore[override]
        raise OSError(errno.EIO, "Input/output error")


def test_efault_falls_back_to_read_and_copy_in_order(tmp_path):
    data = bytes(range(256)) * 40
    path = tmp_path / "source"
    path.write_bytes(data)
    dev = RngDevice(source=path)
    dev._source.close()
    dev._source = NoDirectWrites(str(path), "rb")
    bufs = [memoryview(bytearray(1000)), memoryview(bytearray(24))]
    assert dev.handlers[0](Chain(0, [], bufs)) == 1024
    assert bytes(bufs[0]) + bytes(bufs[1]) == data[:1024]
    tail = memoryview(bytearray(10000))
    assert dev.handlers[0](Chain(1, [], [tail])) == len(data) - 1024  # then exhausted
    assert bytes(tail[: len(data) - 1024]) == data[1024:]
    dev.close()


def test_other_read_errors_are_not_swallowed(tmp_path):
    path = tmp_path / "source"
    path.write_bytes(b"x" * 64)
    dev = RngDevice(source=path)
    dev._source.close()
    dev._source = OtherError(str(path), "rb")
    with pytest.raises(OSError, match="Input/output error"):
        dev.handlers[0](Chain(0, [], [memoryview(bytearray(8))]))
    dev.close()

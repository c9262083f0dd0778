"""virtio-rng (entropy device, virtio id 4): one request queue, no config, no feature bits.

Virtio spec, "Entropy Device": the driver places device-writable buffers on ``requestq`` (0);
the device fills them with random bytes and returns the length written. A readable buffer in
a request is the driver's mistake: it is skipped (nothing of it is read).

The source is ``/dev/urandom``, or a file consumed in order (``--source FILE``): a driver that
reads N bytes gets the file's first N bytes, which is what lets a test check the bytes end to
end. Each writable view in the shared window is filled with one ``readinto`` (no copy in
Python). At the end of a file the last request gets what is left and later ones get 0 bytes:
the driver sees the source is exhausted instead of receiving anything else.
"""

from __future__ import annotations

import errno
import io
import os

from ..core.virtio import VIRTIO_F_VERSION_1
from ..core.virtqueue import Chain
from ..core.window import MemoryWindow
from .base import VirtioMsgDevice

__all__ = ["RngDevice"]

REQUESTQ = 0


def _read_into(src: io.FileIO, buf: memoryview) -> int:
    """``src.readinto(buf)``, or a read and one copy where the kernel refuses to write into
    ``buf`` directly: a file system that pins the reader's pages (virtio-9p's zero-copy
    path) fails with EFAULT on a BAR mapping (VFIO, resource2), which has no pages."""
    try:
        return src.readinto(buf) or 0
    except OSError as exc:
        if exc.errno != errno.EFAULT:
            raise
    data = src.read(len(buf)) or b""
    buf[: len(data)] = data
    return len(data)


class RngDevice(VirtioMsgDevice):
    """virtio-rng (entropy source, id 4): one request queue, no config, VERSION_1.

    Args:
        profile: the wire profile.
        source: a file to serve in order instead of ``/dev/urandom``.
        window: the memory window (``serve`` defaults to the pool).
        ring_features: EVENT_IDX / INDIRECT_DESC to offer (``VirtioMsgDevice``).
    """

    device_id = 4
    device_features = VIRTIO_F_VERSION_1
    num_queues = 1

    def __init__(
        self,
        profile: str = "qemu-v0",
        *,
        source: str | os.PathLike[str] | None = None,
        window: MemoryWindow | None = None,
        ring_features: int = 0,
    ) -> None:
        super().__init__(profile, window=window, ring_features=ring_features)
        self.source_path = os.fspath(source) if source is not None else "/dev/urandom"
        self._source: io.FileIO | None = None
        if source is not None:  # a missing file fails here, not at the first request
            self._source = io.FileIO(self.source_path, "rb")
        self._exhausted = False
        self.served = 0  # bytes written into requests
        self.handlers[REQUESTQ] = self._fill

    def _open(self) -> io.FileIO:
        if self._source is None:
            self._source = io.FileIO(self.source_path, "rb")
        return self._source

    def _fill(self, chain: Chain) -> int:
        written = 0
        if self._exhausted:
            return 0
        src = self._open()
        for buf in chain.writable:
            want = len(buf)
            got = 0
            while got < want:
                n = _read_into(src, buf[got:])
                if not n:
                    self._exhausted = True
                    break
                got += n
            written += got
            if self._exhausted:
                break
        self.served += written
        return written

    def close(self) -> None:
        super().close()
        if self._source is not None:
            self._source.close()
            self._source = None

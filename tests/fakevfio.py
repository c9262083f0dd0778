"""A fake VFIO kernel for tests: an injected ioctl layer plays the kernel.

FakeKernel answers each ioctl by writing raw bytes at the offsets given in the spec's struct
table (docs/vfio.md: region_info = argsz, flags, index, cap_offset, u64 size, u64 offset;
irq_set = argsz, flags, index, start, count, data @20 ...), independent of our cdefs; ioctl
numbers are the table's literals. A regular file stands in for the device fd, so pread,
pwrite and mmap at region offsets are real.
"""

from __future__ import annotations

import errno
import os
import struct

from ivshmem_bus.backends.vfio.device import open_device

from .fakesysfs import FakeSysfs

GET_API_VERSION, CHECK_EXTENSION, SET_IOMMU = 0x3B64, 0x3B65, 0x3B66
GROUP_GET_STATUS, GROUP_SET_CONTAINER, GROUP_GET_DEVICE_FD = 0x3B67, 0x3B68, 0x3B6A
DEVICE_GET_INFO, GET_REGION_INFO, GET_IRQ_INFO, SET_IRQS = 0x3B6B, 0x3B6C, 0x3B6D, 0x3B6E
READ, WRITE, MMAP, CAPS = 1, 2, 4, 8
BDF = "0000:00:04.0"
BAR0_OFF, BAR2_OFF, CONFIG_OFF, BAR1_OFF = 0x0, 0x10000, 0x20000, 0x30000
BAR2_SIZE = 0x4000


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


class FakeKernel:
    def __init__(self, tmp_path, *, msix=2, intx=1, viable=True, bar0_mmap=False, sparse=()):
        self.path = tmp_path / "device-fd"
        data = bytearray(0x31000)
        data[BAR0_OFF + 8 : BAR0_OFF + 12] = (46).to_bytes(4, "little")  # IVPosition
        data[CONFIG_OFF + 4 : CONFIG_OFF + 6] = (0x0002).to_bytes(2, "little")  # memory on
        self.path.write_bytes(bytes(data))
        self.msix, self.intx, self.viable, self.sparse = msix, intx, viable, sparse
        self.regions = {
            0: (READ | WRITE | (MMAP if bar0_mmap else 0), 256, BAR0_OFF),
            1: (READ | WRITE | (CAPS if sparse else 0), 0x1000, BAR1_OFF),
            2: (READ | WRITE | MMAP, BAR2_SIZE, BAR2_OFF),
            7: (READ | WRITE, 256, CONFIG_OFF),
        }
        self.calls: list[tuple[int, object]] = []
        self.irq_fds: dict[int, list[int]] = {}
        self.device_fds: list[int] = []

    def __call__(self, fd, request, arg, *, what):
        assert isinstance(what, str) and what
        self.calls.append((request, arg if isinstance(arg, int) else bytes(arg)))
        if request == GET_API_VERSION:
            return 0
        if request == CHECK_EXTENSION:
            return 1 if arg in (1, 3) else 0
        if request == SET_IOMMU:
            return 0
        if request == GROUP_GET_STATUS:
            struct.pack_into("<I", arg, 4, 1 if self.viable else 0)
            return 0
        if request == GROUP_SET_CONTAINER:
            return 0
        if request == GROUP_GET_DEVICE_FD:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            self.device_fds.append(fd)
            return fd
        if request == DEVICE_GET_INFO:
            struct.pack_into("<III", arg, 4, 0x3, 9, 5)  # flags RESET|PCI, regions, irqs
            return 0
        if request == GET_REGION_INFO:
            return self._region(arg)
        if request == GET_IRQ_INFO:
            index = struct.unpack_from("<I", arg, 8)[0]
            count = {2: self.msix, 0: self.intx}.get(index, 0)
            struct.pack_into("<II", arg, 4, 0x1 | (0x8 if index == 2 else 0x6), index)
            struct.pack_into("<I", arg, 12, count)
            return 0
        if request == SET_IRQS:
            _argsz, flags, index, _start, count = struct.unpack_from("<IIIII", arg)
            if flags & 0x4:  # DATA_EVENTFD
                self.irq_fds[index] = list(struct.unpack_from(f"<{count}i", arg, 20))
            return 0
        raise OSError(errno.ENOTTY, "unexpected ioctl")

    def _region(self, arg):
        argsz, _, index = struct.unpack_from("<III", arg)
        flags, size, offset = self.regions.get(index, (0, 0, 0))
        cap = b""
        if flags & CAPS:
            cap = struct.pack("<HHIII", 1, 1, 0, len(self.sparse), 0) + b"".join(
                struct.pack("<QQ", o, s) for o, s in self.sparse
            )
        if cap and argsz < 32 + len(cap):  # too small: raise argsz, cap_offset 0, success
            struct.pack_into("<IIIIQQ", arg, 0, 32 + len(cap), flags, index, 0, size, offset)
            return 0
        struct.pack_into("<IIIIQQ", arg, 0, argsz, flags, index, 32 if cap else 0, size, offset)
        arg[32 : 32 + len(cap)] = cap
        return 0

    def requests(self):
        return [r for r, _ in self.calls]

    def file(self, offset, size):
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(size)


def make_sysfs(tmp_path):
    """A fake sysfs with one ivshmem function, BDF, bound to vfio-pci in IOMMU group 7."""
    fake = FakeSysfs(tmp_path / "sys", tmp_path / "dev")
    fake.add_device(BDF, driver="vfio-pci", iommu_group=7)
    vfio = tmp_path / "dev" / "vfio"
    vfio.mkdir(exist_ok=True)
    (vfio / "vfio").touch()
    (vfio / "7").touch()
    return fake


def opened(tmp_path, kernel):
    return open_device(BDF, sysfs=str(tmp_path / "sys"), dev=str(tmp_path / "dev"), ioctl=kernel)

"""VFIO: Container, Group, Device, the legacy group/container flow (linux/vfio.h).

Theory of operation
-------------------
Userspace reaches a PCI function through three fds (Documentation/driver-api/vfio.rst):
the container ``/dev/vfio/vfio`` (an IOMMU context), the group ``/dev/vfio/N`` (or, in
no-IOMMU mode, ``/dev/vfio/noiommu-N``), and the device fd the group hands out for a BDF.
The sequence, step by step, is ``Container()`` (GET_API_VERSION), ``Group()``
(GET_STATUS must say VIABLE, SET_CONTAINER, then SET_IOMMU: TYPE1v2/TYPE1, or NOIOMMU for
a noiommu group), ``group.device(bdf)`` (GET_DEVICE_FD, GET_INFO). Closing goes in reverse:
IRQs off, munmap, device fd, group, container: each object's ``close`` does its part and a
``VfioDevice`` backend closes them in that order.

Every ioctl goes through one injectable function (``_ffi.ioctl`` by default) so tests can
play the kernel; every argument is a bytearray the kernel (or the test) writes into, read
through the verified cdefs structs (``ffi.from_buffer``). Region info with capabilities is
the kernel's grow-and-retry protocol: when argsz is too small it raises argsz, sets
cap_offset 0 and returns success; we grow the buffer and ask again.

Facts from docs/vfio.md (§1-§4, §6, §10) this module is built on: never compute region
offsets (use region_info.offset); mmap is MAP_SHARED at that offset; ivshmem BAR0 (256
bytes) often has no MMAP flag, so registers go through pread/pwrite; a group node opens once
(EBUSY); noiommu groups need CAP_SYS_RAWIO; MSI-X needs PCI bus mastering, which vfio-pci
leaves off.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import VfioError
from ...native import ffi as _ffi
from ...native.ffi import ffi, lib

__all__ = ["Container", "Device", "Group", "IrqInfo", "RegionInfo"]

Ioctl = Callable[..., int]

_MAX_INFO = 1 << 16  # the largest region-info buffer we grow to (a kernel bug guard)


def _struct(ctype: str, buf: bytearray) -> Any:
    return ffi.from_buffer(f"{ctype} *", buf)


def _new(ctype: str, extra: int = 0) -> tuple[bytearray, Any]:
    buf = bytearray(ffi.sizeof(ctype) + extra)
    view = _struct(ctype, buf)
    view.argsz = len(buf)
    return buf, view


def _open(path: str, what: str, fix: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            hint = fix
        elif exc.errno == errno.EBUSY:
            hint = f"another process holds {path} (a group opens once): stop it first"
        elif exc.errno in (errno.EPERM, errno.EACCES):
            hint = "needs root (noiommu groups also need CAP_SYS_RAWIO)"
        else:
            hint = exc.strerror or ""
        raise VfioError(exc.errno or errno.EIO, f"opening {what} {path}", fix=hint) from None


def _close_fd(holder: Any, attr: str = "fd") -> None:
    """trio's _FdHolder rule: set the field to -1 before os.close."""
    fd = getattr(holder, attr)
    if fd >= 0:
        setattr(holder, attr, -1)
        os.close(fd)


class Container:
    """``/dev/vfio/vfio``: the IOMMU context groups attach to."""

    def __init__(self, path: str = "/dev/vfio/vfio", *, ioctl: Ioctl = _ffi.ioctl) -> None:
        self.fd = -1
        self.path = path
        self._ioctl = ioctl
        self.fd = _open(path, "the VFIO container", "load vfio-pci: modprobe vfio-pci")
        try:
            version = ioctl(
                self.fd, lib.VFIO_GET_API_VERSION, 0, what=f"VFIO_GET_API_VERSION on {path}"
            )
            if version != lib.VFIO_API_VERSION:
                raise VfioError(errno.EINVAL, f"{path}: VFIO API version {version}, expected 0")
        except BaseException:
            self.close()
            raise

    def check_extension(self, extension: int) -> bool:
        """True when the container supports an IOMMU type (1 TYPE1, 3 TYPE1v2, 8 NOIOMMU)."""
        what = f"VFIO_CHECK_EXTENSION({extension}) on {self.path}"
        return self._ioctl(self.fd, lib.VFIO_CHECK_EXTENSION, extension, what=what) > 0

    def set_iommu(self, iommu_type: int) -> None:
        """Select the IOMMU model; only after a group joined (SET_CONTAINER)."""
        what = f"VFIO_SET_IOMMU({iommu_type}) on {self.path}"
        self._ioctl(self.fd, lib.VFIO_SET_IOMMU, iommu_type, what=what)

    def close(self) -> None:
        _close_fd(self)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Group:
    """``/dev/vfio/N`` or ``/dev/vfio/noiommu-N``, attached to a container.

    Args:
        path: the group node.
        container: joined with SET_CONTAINER; its IOMMU type is set here.
        sysfs: where to list the group's devices for a non-viable group's error message.
    """

    def __init__(
        self, path: str, container: Container, *, ioctl: Ioctl = _ffi.ioctl, sysfs: str = "/sys"
    ) -> None:
        self.fd = -1
        self.path = path
        self.container = container
        self.noiommu = Path(path).name.startswith("noiommu-")
        self._ioctl = ioctl
        self.fd = _open(path, "the VFIO group", "bind the device to vfio-pci: ivshmem-bus bind BDF")
        try:
            self._attach(sysfs)
        except BaseException:
            self.close()
            raise

    def _attach(self, sysfs: str) -> None:
        buf, status = _new("struct vfio_group_status")
        self._ioctl(
            self.fd, lib.VFIO_GROUP_GET_STATUS, buf, what=f"VFIO_GROUP_GET_STATUS on {self.path}"
        )
        if not status.flags & lib.VFIO_GROUP_FLAGS_VIABLE:
            raise VfioError(
                errno.EINVAL,
                f"group {self.path} is not viable: every device in it must be bound to vfio-pci "
                f"(or no driver): {_group_members(self.path, sysfs)}",
            )
        fd_arg = bytearray(self.container.fd.to_bytes(4, "little", signed=True))
        what = f"VFIO_GROUP_SET_CONTAINER on {self.path}"
        self._ioctl(self.fd, lib.VFIO_GROUP_SET_CONTAINER, fd_arg, what=what)
        if self.noiommu:
            self.container.set_iommu(lib.VFIO_NOIOMMU_IOMMU)
        elif self.container.check_extension(lib.VFIO_TYPE1v2_IOMMU):
            self.container.set_iommu(lib.VFIO_TYPE1v2_IOMMU)
        else:
            self.container.set_iommu(lib.VFIO_TYPE1_IOMMU)

    def device(self, bdf: str) -> Device:
        """The device fd for ``bdf`` (GROUP_GET_DEVICE_FD), wrapped in a ``Device``."""
        name = bytearray(bdf.encode("ascii") + b"\0")  # mutable: fcntl.ioctl's bytes trap
        what = f"VFIO_GROUP_GET_DEVICE_FD({bdf}) on {self.path}"
        fd = self._ioctl(self.fd, lib.VFIO_GROUP_GET_DEVICE_FD, name, what=what)
        return Device(fd, bdf, ioctl=self._ioctl)

    def close(self) -> None:
        _close_fd(self)

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _group_members(group_path: str, sysfs: str) -> str:
    number = Path(group_path).name.removeprefix("noiommu-")
    devices = Path(sysfs) / "kernel" / "iommu_groups" / number / "devices"
    try:
        members = []
        for dev in sorted(devices.iterdir()):
            driver = dev / "driver"
            members.append(
                f"{dev.name} ({driver.resolve().name if driver.exists() else 'no driver'})"
            )
        return ", ".join(members) or "no devices listed"
    except OSError:
        return f"cannot list {devices}"


@dataclass(frozen=True, slots=True)
class RegionInfo:
    """One region (BAR, ROM, config) of a device: where it is in the device fd."""

    index: int
    flags: int
    size: int
    offset: int
    sparse: tuple[tuple[int, int], ...] = ()  # (offset, size) mmap-able areas, if any

    @property
    def mappable(self) -> bool:
        return bool(self.flags & lib.VFIO_REGION_INFO_FLAG_MMAP)


@dataclass(frozen=True, slots=True)
class IrqInfo:
    index: int
    flags: int
    count: int


class Device:
    """A VFIO device fd: regions, IRQs, reset. Owns the fd (and the maps it made)."""

    def __init__(self, fd: int, bdf: str, *, ioctl: Ioctl = _ffi.ioctl) -> None:
        self.fd = fd
        self.bdf = bdf
        self._ioctl = ioctl
        self._maps: list[mmap.mmap] = []
        self._irqs_on: set[int] = set()
        try:
            buf, info = _new("struct vfio_device_info")
            ioctl(fd, lib.VFIO_DEVICE_GET_INFO, buf, what=self._what("VFIO_DEVICE_GET_INFO"))
            self.flags, self.num_regions, self.num_irqs = (
                info.flags,
                info.num_regions,
                info.num_irqs,
            )
        except BaseException:
            self.close()
            raise

    def _what(self, op: str) -> str:
        return f"{op} on {self.bdf}"

    # Regions ------------------------------------------------------------------------------------

    def region_info(self, index: int) -> RegionInfo:
        """GET_REGION_INFO with its capability chain (argsz grow-and-retry)."""
        extra = 0
        while True:
            buf, info = _new("struct vfio_region_info", extra)
            info.index = index
            what = self._what(f"VFIO_DEVICE_GET_REGION_INFO({index})")
            self._ioctl(self.fd, lib.VFIO_DEVICE_GET_REGION_INFO, buf, what=what)
            if info.argsz <= len(buf) or not info.flags & lib.VFIO_REGION_INFO_FLAG_CAPS:
                break
            if info.argsz > _MAX_INFO:
                raise VfioError(errno.EOVERFLOW, f"{what}: argsz {info.argsz} is implausible")
            extra = info.argsz - ffi.sizeof("struct vfio_region_info")
        sparse: tuple[tuple[int, int], ...] = ()
        if info.flags & lib.VFIO_REGION_INFO_FLAG_CAPS and info.cap_offset:
            sparse = _sparse_areas(buf, info.cap_offset, what)
        return RegionInfo(index, info.flags, info.size, info.offset, sparse)

    def map_region(self, region: RegionInfo, *, writable: bool = True) -> mmap.mmap:
        """mmap a whole region, MAP_SHARED at its offset; unmapped by ``close``."""
        if not region.mappable:
            raise VfioError(
                errno.EINVAL,
                f"{self.bdf}: region {region.index} cannot be mmap'd (no MMAP flag); "
                "use pread/pwrite",
            )
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            m = mmap.mmap(self.fd, region.size, mmap.MAP_SHARED, prot, offset=region.offset)
        except OSError as exc:
            what = f"mmap of region {region.index} of {self.bdf}"
            raise VfioError(exc.errno or errno.EIO, what) from None
        self._maps.append(m)
        return m

    def read(self, region: RegionInfo, offset: int, size: int) -> bytes:
        """pread inside a region (config space, unmappable BARs)."""
        if not 0 <= offset <= region.size - size:
            raise ValueError(f"{self.bdf}: {size} bytes at {offset} outside region {region.index}")
        return os.pread(self.fd, size, region.offset + offset)

    def write(self, region: RegionInfo, offset: int, data: bytes) -> None:
        if not 0 <= offset <= region.size - len(data):
            raise ValueError(
                f"{self.bdf}: {len(data)} bytes at {offset} outside region {region.index}"
            )
        if os.pwrite(self.fd, data, region.offset + offset) != len(data):
            raise VfioError(errno.EIO, f"short write to region {region.index} of {self.bdf}")

    def enable_bus_master(self) -> int:
        """Set PCI_COMMAND bus master (keeping memory space on): MSI-X needs it, vfio-pci
        leaves it off, and QEMU then drops every MSI (docs/vfio.md §6). Returns the new value."""
        config = self.region_info(lib.VFIO_PCI_CONFIG_REGION_INDEX)
        # PCI_COMMAND*: cdefs/vfio.h, checked against the kernel's pci_regs.h by test_cdefs
        command = int.from_bytes(self.read(config, lib.PCI_COMMAND, 2), "little")
        new: int = command | lib.PCI_COMMAND_MASTER | lib.PCI_COMMAND_MEMORY
        if new != command:
            self.write(config, lib.PCI_COMMAND, new.to_bytes(2, "little"))
        return new

    # IRQs ---------------------------------------------------------------------------------------

    def irq_info(self, index: int) -> IrqInfo:
        buf, info = _new("struct vfio_irq_info")
        info.index = index
        what = self._what(f"VFIO_DEVICE_GET_IRQ_INFO({index})")
        self._ioctl(self.fd, lib.VFIO_DEVICE_GET_IRQ_INFO, buf, what=what)
        return IrqInfo(index, info.flags, info.count)

    def _set_irqs(self, index: int, flags: int, start: int, count: int, data: bytes = b"") -> None:
        buf, irq = _new("struct vfio_irq_set", len(data))
        irq.flags, irq.index, irq.start, irq.count = flags, index, start, count
        buf[ffi.sizeof("struct vfio_irq_set") :] = data
        what = self._what(f"VFIO_DEVICE_SET_IRQS(index {index}, flags 0x{flags:x}, count {count})")
        self._ioctl(self.fd, lib.VFIO_DEVICE_SET_IRQS, buf, what=what)

    def set_eventfds(self, index: int, fds: Sequence[int], start: int = 0) -> None:
        """Route vectors ``start..`` of IRQ ``index`` to eventfds (-1 leaves one unassigned)."""
        data = b"".join(fd.to_bytes(4, "little", signed=True) for fd in fds)
        flags = lib.VFIO_IRQ_SET_DATA_EVENTFD | lib.VFIO_IRQ_SET_ACTION_TRIGGER
        self._set_irqs(index, flags, start, len(fds), data)
        self._irqs_on.add(index)

    def unmask(self, index: int = lib.VFIO_PCI_INTX_IRQ_INDEX) -> None:
        """Unmask INTx after handling one (it is automasked)."""
        flags = lib.VFIO_IRQ_SET_DATA_NONE | lib.VFIO_IRQ_SET_ACTION_UNMASK
        self._set_irqs(index, flags, 0, 1)

    def disable_irqs(self, index: int) -> None:
        flags = lib.VFIO_IRQ_SET_DATA_NONE | lib.VFIO_IRQ_SET_ACTION_TRIGGER
        self._set_irqs(index, flags, 0, 0)
        self._irqs_on.discard(index)

    def reset(self) -> None:
        self._ioctl(self.fd, lib.VFIO_DEVICE_RESET, 0, what=self._what("VFIO_DEVICE_RESET"))

    # Life cycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        """IRQs off, munmap, close the fd; best effort on each, in that order. Idempotent."""
        if self.fd >= 0:
            for index in sorted(self._irqs_on):
                # the fd is going anyway; the kernel tears the IRQs down with it
                with contextlib.suppress(VfioError):
                    self.disable_irqs(index)
        for m in self._maps:
            with contextlib.suppress(BufferError):  # a view is still out: unmapped with it
                m.close()
        self._maps = []
        _close_fd(self)

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sparse_areas(buf: bytearray, first: int, what: str) -> tuple[tuple[int, int], ...]:
    """Walk the capability chain; the sparse-mmap areas, every offset range-checked."""
    header_size = ffi.sizeof("struct vfio_info_cap_header")
    sparse_size = ffi.sizeof("struct vfio_region_info_cap_sparse_mmap")
    area_size = ffi.sizeof("struct vfio_region_sparse_mmap_area")
    areas: list[tuple[int, int]] = []
    offset, seen = first, set()
    while offset:
        if offset in seen or offset + header_size > len(buf):
            raise VfioError(errno.EINVAL, f"{what}: capability chain broken at {offset}")
        seen.add(offset)
        cap = ffi.from_buffer("struct vfio_info_cap_header *", memoryview(buf)[offset:])
        if cap.id == lib.VFIO_REGION_INFO_CAP_SPARSE_MMAP:
            if offset + sparse_size > len(buf):
                raise VfioError(errno.EINVAL, f"{what}: sparse-mmap capability truncated")
            sparse = ffi.from_buffer(
                "struct vfio_region_info_cap_sparse_mmap *", memoryview(buf)[offset:]
            )
            if offset + sparse_size + sparse.nr_areas * area_size > len(buf):
                raise VfioError(errno.EINVAL, f"{what}: {sparse.nr_areas} sparse areas overrun")
            areas.extend(
                (sparse.areas[i].offset, sparse.areas[i].size) for i in range(sparse.nr_areas)
            )
        offset = cap.next
    return tuple(areas)

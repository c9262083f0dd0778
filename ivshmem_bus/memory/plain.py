"""The peer's RAM through an ivshmem-plain function: BAR2 is the driver guest's RAM file.

The device-side guest gets a second 1af4:1110 function, ``ivshmem-plain`` (no BAR1, no
MSI-X, no interrupt), whose memdev is the driver guest's ``memory-backend-file``: driver
address A is at BAR2 offset A - mem-offset (0 on x86 q35 with RAM <= 2 GiB, 0x40000000 on Arm
``virt``; docs/virtqueues.md §4). Two ways reach BAR2, chosen by the function's *current* driver:

- bound to vfio-pci: VFIO (container, group, device fd, BAR2 region mmap at the region's
  offset), the project's ``vfio`` module;
- anything else (no driver, or a kernel driver): sysfs ``resource2``, mmap'd MAP_SHARED
  (needs root).

Never both on one function: once a VFIO user maps the BAR, the kernel revokes every sysfs
``resource2`` mapping of it and the next access is SIGBUS (measured, docs/vfio.md §11). So the
choice is made once, from sysfs, and ``name`` says which ("... BAR2 (vfio)" or
"... BAR2 (sysfs resource2)"). Binding the function to vfio-pci while a resource2 window is
open revokes it the same way: close the window first.

A doorbell function (MSI-X, BAR1) is refused: its BAR2 carries the bus queues, not the
driver's RAM, and a device walking descriptors there would read the wrong memory.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable
from pathlib import Path

from ..backends.vfio import pci
from ..backends.vfio.kernel import Container, Device, Group
from ..errors import PciError, VfioError
from ..native import ffi as _ffi
from ..native.ffi import lib
from ._mapped import MappedWindow, check_span

__all__ = ["PlainWindow"]


class PlainWindow(MappedWindow):
    """BAR2 of an ivshmem-plain function at driver address ``mem_offset``. Use ``open``.

    Attributes:
        bdf: the function.
        via: ``"vfio"`` or ``"resource2"``: how BAR2 was reached.
    """

    def __init__(
        self,
        mapping: mmap.mmap,
        mem_offset: int,
        *,
        bdf: str,
        via: str,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.bdf = bdf
        self.via = via
        how = "vfio" if via == "vfio" else "sysfs resource2"
        offset = f", mem-offset 0x{mem_offset:x}" if mem_offset else ""
        name = f"ivshmem-plain {bdf} BAR2 ({how}{offset})"
        super().__init__(mapping, mem_offset, name=name, on_close=on_close)

    @classmethod
    def open(
        cls,
        bdf: str,
        mem_offset: int = 0,
        *,
        sysfs: str = "/sys",
        dev: str = "/dev",
        ioctl: Callable[..., int] = _ffi.ioctl,
    ) -> PlainWindow:
        """Map BAR2 of the ivshmem-plain function ``bdf`` (``dddd:bb:dd.f`` or ``bb:dd.f``).

        Raises:
            ValueError: ``bdf`` is not a PCI address; ``mem_offset`` out of range.
            DeviceNotFound: no such function.
            PciError: not ivshmem; a doorbell function; no BAR2; resource2 unusable.
            VfioError: a VFIO step failed (the message names the ioctl or node and the fix).
        """
        bdf = pci.normalize_bdf(bdf)
        check_span(f"ivshmem-plain {bdf}", mem_offset, 0)
        fn = pci.get_function(bdf, root=sysfs)
        _check_plain(fn)
        if fn.driver == pci.VFIO_PCI:
            return _open_vfio(cls, fn, mem_offset, sysfs, dev, ioctl)
        return _open_resource2(cls, fn, mem_offset, sysfs)


def _doorbell_refusal(bdf: str, why: str) -> PciError:
    return PciError(
        f"{bdf} is an ivshmem-doorbell function ({why}): its BAR2 carries the bus queues, not "
        f"the driver's RAM; open the ivshmem-plain function whose memdev is the driver's RAM "
        f"file (TYPE plain in `ivshmem-bus list`), or use --mem pool for this device's BAR2"
    )


def _check_plain(fn: pci.PciFunction) -> None:
    if not fn.is_ivshmem:
        raise PciError(
            f"{fn.bdf} is {fn.vendor:04x}:{fn.device:04x}, not ivshmem-plain (1af4:1110): "
            f"pick the plain function from `ivshmem-bus list`"
        )
    if fn.is_doorbell:
        why = f"{fn.msix_vectors} MSI-X vectors" if fn.msix_vectors else "it has BAR1 (MSI-X)"
        raise _doorbell_refusal(fn.bdf, why)
    if not fn.shmem_size:
        raise PciError(
            f"{fn.bdf}: BAR2 is empty: give the ivshmem-plain device a memdev (QEMU "
            f"-device ivshmem-plain,memdev=ID)"
        )


def _open_vfio(
    cls: type[PlainWindow],
    fn: pci.PciFunction,
    mem_offset: int,
    sysfs: str,
    dev: str,
    ioctl: Callable[..., int],
) -> PlainWindow:
    """Container, group, device fd, BAR2 region mmap; closed in reverse by the window."""
    node = pci.group_node_of(fn, dev)
    owned: list[Container | Group | Device] = []

    def close_all() -> None:
        while owned:
            owned.pop().close()  # device (munmaps its regions), group, container

    try:
        container = Container(str(Path(dev) / "vfio" / "vfio"), ioctl=ioctl)
        owned.append(container)
        group = Group(node, container, ioctl=ioctl, sysfs=sysfs)
        owned.append(group)
        device = group.device(fn.bdf)
        owned.append(device)
        msix = device.irq_info(lib.VFIO_PCI_MSIX_IRQ_INDEX)
        if msix.count:  # sysfs may not show MSI-X to a non-root reader; VFIO does
            raise _doorbell_refusal(fn.bdf, f"VFIO reports {msix.count} MSI-X vectors")
        bar2 = device.region_info(lib.VFIO_PCI_BAR2_REGION_INDEX)
        if not bar2.size:
            raise PciError(f"{fn.bdf}: VFIO reports an empty BAR2: give the device a memdev")
        if not bar2.mappable:
            raise VfioError(
                errno.EINVAL,
                f"{fn.bdf}: VFIO does not allow mmap of BAR2 (no MMAP flag)",
                fix="a memory window needs a mapping: see `dmesg` for vfio-pci's reason, or "
                "unbind it from vfio-pci to use sysfs resource2",
            )
        check_span(f"ivshmem-plain {fn.bdf}", mem_offset, bar2.size)
        mapping = device.map_region(bar2)  # MAP_SHARED at region_info.offset
        return cls(mapping, mem_offset, bdf=fn.bdf, via="vfio", on_close=close_all)
    except BaseException:
        close_all()
        raise


def _open_resource(fn: pci.PciFunction, path: Path, owner: str) -> int:
    """Open sysfs ``resource2`` read-write; a refusal names what would make it work."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            fix = f"run as root, or bind it to vfio-pci (ivshmem-bus bind {fn.bdf})"
        elif exc.errno == errno.ENOENT:
            fix = "the kernel shows no BAR2 for it: check `lspci -vs` " + fn.bdf
        else:
            fix = "see `dmesg`"
        raise PciError(
            f"{fn.bdf} ({owner}): opening {path}: {exc.strerror}; {fix}",
            errno=exc.errno,
            path=str(path),
        ) from None


def _open_resource2(
    cls: type[PlainWindow], fn: pci.PciFunction, mem_offset: int, sysfs: str
) -> PlainWindow:
    """mmap of sysfs ``resource2``; the fd is closed once mapped (mmap keeps a dup)."""
    dev_dir = Path(sysfs) / "bus/pci/devices" / fn.bdf
    path = dev_dir / "resource2"
    size = fn.shmem_size
    check_span(f"ivshmem-plain {fn.bdf}", mem_offset, size)
    owner = f"bound to {fn.driver}" if fn.driver else "on no driver"
    if pci.memory_decoding(fn.bdf, sysfs) is False:
        raise PciError(
            f"{fn.bdf}: memory decoding is off, BAR2 would read as 0xff: enable it "
            f"(echo 1 > {dev_dir / 'enable'}, root)",
            path=str(dev_dir / "enable"),
        )
    fd = _open_resource(fn, path, owner)
    try:
        actual = os.fstat(fd).st_size
        if actual < size:
            raise PciError(
                f"{fn.bdf}: {path} is {actual} bytes but BAR2 is {size}: the BAR changed; "
                f"read `ivshmem-bus list` again",
                path=str(path),
            )
        try:
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            fix = (
                f"{fn.driver} owns BAR2: bind the function to vfio-pci "
                f"(ivshmem-bus bind {fn.bdf}) to map it through VFIO"
                if fn.driver
                else "run as root (CAP_SYS_ADMIN); see `dmesg`"
            )
            raise PciError(
                f"{fn.bdf} ({owner}): mmap of {path}: {exc.strerror}; {fix}",
                errno=exc.errno,
                path=str(path),
            ) from None
    finally:
        os.close(fd)
    try:
        return cls(mapping, mem_offset, bdf=fn.bdf, via="resource2")
    except BaseException:
        mapping.close()
        raise

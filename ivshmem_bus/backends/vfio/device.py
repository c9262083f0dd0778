"""The VFIO backend of the device interface: a real ivshmem function inside a guest.

``open_device(bdf)`` does it all in one call, in this order (each step's reason beside it):

1. sysfs: the function exists, is ivshmem (1af4:1110), and vfio-pci owns it; otherwise the
   error names the command that fixes it (``ivshmem-bus bind BDF [--noiommu]``);
2. VFIO: container, group (``/dev/vfio/N``, else ``/dev/vfio/noiommu-N``), device fd;
3. BAR0: mmap'd when the region allows it, else 4-byte pread/pwrite (ivshmem's 256-byte BAR0
   usually has no MMAP flag): every register access stays one 32-bit access either way;
4. BAR2: mmap'd MAP_SHARED: the shared memory;
5. doorbells in: MSI-X (index 2) when the device has vectors: bus mastering on first
   (vfio-pci leaves it off and QEMU would drop every MSI), then one eventfd per vector, all in
   one SET_IRQS; without MSI-X, INTx (index 0) with IntrMask set, IntrStatus read to clear it
   and an unmask after each interrupt; with neither (ivshmem-plain), no doorbells at all.

Doorbells rung before step 5 are lost (QEMU under TCG, docs/vfio.md §8): the bus looks at its
queue periodically, so nothing waits on one. Closing goes in reverse: IRQs off, eventfds,
munmap, device fd, group, container.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ...core.regs import Bar0, MmapWords, PreadWords
from ...errors import PciError
from ...native import ffi as _ffi
from ...native.ffi import lib
from ..base import IvshmemDevice
from . import pci
from .kernel import Container, Device, Group, Ioctl

__all__ = ["VfioIvshmemDevice", "open_device"]

log = logging.getLogger(__name__)


class VfioIvshmemDevice(IvshmemDevice):
    """An ivshmem PCI function opened through VFIO. Use ``open_device``."""

    def __init__(
        self,
        bdf: str,
        group_path: str,
        *,
        container_path: str = "/dev/vfio/vfio",
        sysfs: str = "/sys",
        ioctl: Ioctl = _ffi.ioctl,
    ) -> None:
        self._bdf = bdf
        self._container: Container | None = None
        self._group: Group | None = None
        self._device: Device | None = None
        self._eventfds: list[int] = []
        self._intx = False
        self._shm_view: memoryview | None = None
        self._bar0_words: MmapWords | None = None
        try:
            self._open(group_path, container_path, sysfs, ioctl)
            self._poller()  # made now, so the fds of an open device stay constant
        except BaseException:
            self.close()
            raise

    def _open(self, group_path: str, container_path: str, sysfs: str, ioctl: Ioctl) -> None:
        self._container = Container(container_path, ioctl=ioctl)
        self._group = Group(group_path, self._container, ioctl=ioctl, sysfs=sysfs)
        dev = self._device = self._group.device(self._bdf)
        bar0 = dev.region_info(lib.VFIO_PCI_BAR0_REGION_INDEX)
        if bar0.mappable:
            # a mapped BAR0: every access through the compiled exact-width helper when built
            self._bar0_words = MmapWords(memoryview(dev.map_region(bar0)), _ffi.mmio_words())
            self.regs = Bar0(self._bar0_words)
        else:
            self.regs = Bar0(PreadWords(dev.fd, bar0.offset, bar0.size))
        bar2 = dev.region_info(lib.VFIO_PCI_BAR2_REGION_INDEX)
        if not bar2.size:
            raise PciError(f"{self._bdf}: BAR2 is empty: is this ivshmem with a memory backend?")
        self._shm_view = memoryview(dev.map_region(bar2))
        msix = dev.irq_info(lib.VFIO_PCI_MSIX_IRQ_INDEX)
        if msix.count:
            dev.enable_bus_master()  # before MSI-X, or QEMU drops every MSI
            self._eventfds = [_eventfd() for _ in range(msix.count)]
            dev.set_eventfds(lib.VFIO_PCI_MSIX_IRQ_INDEX, self._eventfds)  # one call
        else:
            intx = dev.irq_info(lib.VFIO_PCI_INTX_IRQ_INDEX)
            if not intx.count:
                # ivshmem-plain: no interrupt at all (no MSI-X, INTx pin 0). Shared memory
                # still works; nothing rings us, so wait() only sleeps and the bus finds
                # messages by looking at its queue every poll interval.
                log.info("%s has no interrupt (ivshmem-plain?): no doorbells", self._bdf)
                return
            self._intx = True
            self._eventfds = [_eventfd()]
            dev.set_eventfds(lib.VFIO_PCI_INTX_IRQ_INDEX, self._eventfds)
            self.regs.intr_mask = 0xFFFFFFFF  # as QEMU's ivshmem bus does

    # Device interface -----------------------------------------------------------------------------

    def _ring(self, peer: int, vector: int, value: int) -> None:
        self.regs.write_doorbell(value)  # the one 32-bit store is the doorbell

    def vector_fds(self) -> Sequence[int]:
        return self._eventfds

    def _after_doorbells(self, fired: set[int]) -> None:
        if self._intx:
            self.regs.read_intr_status()  # read-to-clear lowers INTx
            if self._device is not None:
                self._device.unmask()  # INTx is automasked after each interrupt

    def close(self) -> None:
        """IRQs off, eventfds, munmap, device fd, group, container. Idempotent."""
        self.close_poller()
        if self._shm_view is not None:
            self._shm_view.release()
            self._shm_view = None
        if self._bar0_words is not None:
            self._bar0_words.release()
            self._bar0_words = None
        if self._device is not None:
            self._device.close()  # disables the IRQs it set, munmaps, closes the fd
            self._device = None
        fds, self._eventfds = self._eventfds, []
        for fd in fds:
            os.close(fd)
        for attr in ("_group", "_container"):
            obj = getattr(self, attr)
            setattr(self, attr, None)
            if obj is not None:
                obj.close()

    @property
    def shmem(self) -> memoryview:
        if self._shm_view is None:
            raise ValueError(f"{self._bdf} is closed")
        return self._shm_view

    @property
    def name(self) -> str:
        return self._bdf

    @property
    def uses_intx(self) -> bool:
        return self._intx


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def open_device(
    bdf: str,
    *,
    sysfs: str = "/sys",
    dev: str = "/dev",
    ioctl: Ioctl = _ffi.ioctl,
) -> VfioIvshmemDevice:
    """Find, check and open the ivshmem function ``bdf`` through VFIO, IRQs wired.

    Raises:
        ValueError: ``bdf`` is not a PCI address.
        DeviceNotFound: no such function.
        PciError: not ivshmem, or not bound to vfio-pci (the message names the bind command).
        VfioError: a VFIO step failed (the message names the ioctl or node and the fix).
    """
    bdf = pci.normalize_bdf(bdf)
    fn = pci.get_function(bdf, root=sysfs)
    if not fn.is_ivshmem:
        raise PciError(
            f"{bdf} is {fn.vendor:04x}:{fn.device:04x}, not an ivshmem device (1af4:1110)"
        )
    if fn.driver != pci.VFIO_PCI:
        owner = f"bound to {fn.driver}" if fn.driver else "not bound to any driver"
        flag = "" if fn.iommu_group is not None else " --noiommu"
        raise PciError(
            f"{bdf} is {owner}, not vfio-pci: run 'ivshmem-bus bind {bdf}{flag}' first (root)"
        )
    node = pci.group_node_of(fn, dev)
    container = str(Path(dev) / "vfio" / "vfio")
    return VfioIvshmemDevice(bdf, node, container_path=container, sysfs=sysfs, ioctl=ioctl)

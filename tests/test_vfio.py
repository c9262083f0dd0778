"""VFIO without hardware: an injected ioctl layer plays the kernel.

FakeKernel answers each ioctl by writing raw bytes at the offsets given in the spec's struct
table (vfio-notes.md: region_info = argsz, flags, index, cap_offset, u64 size, u64 offset;
irq_set = argsz, flags, index, start, count, data @20 ...), independent of our cdefs; ioctl
numbers are the table's literals. A regular file stands in for the device fd, so pread,
pwrite and mmap at region offsets are real.
"""

from __future__ import annotations

import errno
import os
import struct

import pytest

from ivshmem_bus.backends.vfio.device import open_device
from ivshmem_bus.backends.vfio.kernel import Container, Group
from ivshmem_bus.errors import DeviceNotFound, IvshmemBusError, PciError, VfioError

from .fakevfio import (
    BAR0_OFF,
    BAR2_OFF,
    BAR2_SIZE,
    BDF,
    CHECK_EXTENSION,
    CONFIG_OFF,
    GET_API_VERSION,
    GET_REGION_INFO,
    GROUP_GET_DEVICE_FD,
    GROUP_GET_STATUS,
    GROUP_SET_CONTAINER,
    SET_IOMMU,
    SET_IRQS,
    FakeKernel,
    make_sysfs,
    open_fds,
    opened,
)


@pytest.fixture
def sysfs(tmp_path):
    return make_sysfs(tmp_path)


def test_open_sequence_bus_master_before_msix_and_one_set_irqs(tmp_path, sysfs):
    kernel = FakeKernel(tmp_path)
    with opened(tmp_path, kernel) as dev:
        reqs = kernel.requests()
        assert reqs[:6] == [
            GET_API_VERSION, GROUP_GET_STATUS, GROUP_SET_CONTAINER, CHECK_EXTENSION, SET_IOMMU,
            GROUP_GET_DEVICE_FD,
        ]  # fmt: skip
        assert kernel.calls[4] == (SET_IOMMU, 3)  # TYPE1v2 where the container has it
        assert kernel.calls[5][1] == BDF.encode() + b"\0"
        # bus mastering is set (config region read) before MSI-X is enabled
        assert reqs.index(SET_IRQS) > max(
            i for i, (r, a) in enumerate(kernel.calls) if r == GET_REGION_INFO and a[8] == 7
        )
        assert int.from_bytes(kernel.file(CONFIG_OFF + 4, 2), "little") == 0x0006
        set_irqs = [a for r, a in kernel.calls if r == SET_IRQS]
        assert len(set_irqs) == 1  # every vector in one call
        argsz, flags, index, start, count = struct.unpack_from("<IIIII", set_irqs[0])
        assert (argsz, flags, index, start, count) == (28, 0x24, 2, 0, 2)
        assert kernel.irq_fds[2] == list(dev.vector_fds())
        assert dev.vectors == 2


def test_registers_are_single_4_byte_accesses_and_bar2_is_shared(tmp_path, sysfs, monkeypatch):
    kernel = FakeKernel(tmp_path)
    with opened(tmp_path, kernel) as dev:
        writes = []
        real = os.pwrite
        monkeypatch.setattr(
            os, "pwrite", lambda f, d, o: writes.append((bytes(d), o)) or real(f, d, o)
        )
        assert dev.vmid == 46
        dev.ring(0x2E, 1)
        assert writes == [(bytes([1, 0, 0x2E, 0]), BAR0_OFF + 0x0C)]
        dev.shmem[0:4] = b"ping"
        assert len(dev.shmem) == BAR2_SIZE
        monkeypatch.undo()
    assert kernel.file(BAR2_OFF, 4) == b"ping"


def test_wait_reports_the_vector_whose_eventfd_fired(tmp_path, sysfs):
    kernel = FakeKernel(tmp_path)
    with opened(tmp_path, kernel) as dev:
        os.eventfd_write(kernel.irq_fds[2][1], 1)  # the "kernel" signals MSI-X vector 1
        assert dev.wait(1.0) == {1}
        assert dev.wait(0) == set()


def test_close_disables_irqs_and_closes_everything(tmp_path, sysfs):
    before = open_fds()
    kernel = FakeKernel(tmp_path)
    dev = opened(tmp_path, kernel)
    dev.close()
    dev.close()
    assert struct.unpack_from("<IIIII", kernel.calls[-1][1]) == (20, 0x21, 2, 0, 0)
    assert open_fds() == before


def test_noiommu_group_uses_the_noiommu_iommu_type(tmp_path, sysfs):
    (tmp_path / "dev/vfio/7").rename(tmp_path / "dev/vfio/noiommu-7")
    kernel = FakeKernel(tmp_path)
    with opened(tmp_path, kernel):
        assert (SET_IOMMU, 8) in kernel.calls
        assert CHECK_EXTENSION not in kernel.requests()


def test_intx_fallback_masks_clears_and_unmasks(tmp_path, sysfs):
    kernel = FakeKernel(tmp_path, msix=0)
    with opened(tmp_path, kernel) as dev:
        assert dev.uses_intx
        assert kernel.file(BAR0_OFF, 4) == b"\xff" * 4  # IntrMask, as QEMU's bus writes
        os.eventfd_write(kernel.irq_fds[0][0], 1)
        assert dev.wait(1.0) == {0}
        last = struct.unpack_from("<IIIII", kernel.calls[-1][1])
        assert last == (20, 0x11, 0, 0, 1)  # DATA_NONE | ACTION_UNMASK on INTx


def test_region_info_grows_argsz_and_reads_sparse_areas(tmp_path):
    kernel = FakeKernel(tmp_path, sparse=((0, 0x800), (0xC00, 0x400)))
    (tmp_path / "c").touch()
    (tmp_path / "g").touch()
    with (
        Container(str(tmp_path / "c"), ioctl=kernel) as c,
        Group(str(tmp_path / "g"), c, ioctl=kernel) as g,
        g.device(BDF) as dev,
    ):
        info = dev.region_info(1)
    assert info.sparse == ((0, 0x800), (0xC00, 0x400))
    sizes = [struct.unpack_from("<I", a)[0] for r, a in kernel.calls if r == GET_REGION_INFO]
    assert sizes == [32, 32 + 16 + 32]  # asked again with the argsz the kernel wanted


def test_broken_capability_chain_is_an_error_not_a_wild_read(tmp_path):
    kernel = FakeKernel(tmp_path, sparse=((0, 0x800),))
    original = kernel._region

    def looping(arg):
        original(arg)
        if len(arg) > 32:
            struct.pack_into("<I", arg, 36, 32)  # next -> itself
        return 0

    kernel._region = looping
    (tmp_path / "c").touch()
    (tmp_path / "g").touch()
    with (
        Container(str(tmp_path / "c"), ioctl=kernel) as c,
        Group(str(tmp_path / "g"), c, ioctl=kernel) as g,
        g.device(BDF) as dev,
        pytest.raises(VfioError, match="capability chain broken"),
    ):
        dev.region_info(1)


def test_non_viable_group_lists_its_devices_and_leaks_nothing(tmp_path, sysfs):
    sysfs.add_device("0000:00:05.0", ids=(0x8086, 0x100E), driver="e1000", iommu_group=7)
    before = open_fds()
    with pytest.raises(VfioError, match=r"not viable.*0000:00:05.0 \(e1000\)"):
        opened(tmp_path, FakeKernel(tmp_path, viable=False))
    assert open_fds() == before


def test_unbound_device_names_the_bind_command(tmp_path, sysfs):
    sysfs.add_device("0000:00:06.0", driver=None, iommu_group=None)
    with pytest.raises(
        PciError, match=r"not bound to any driver.*ivshmem-bus bind 0000:00:06.0 --noiommu"
    ):
        open_device("0000:00:06.0", sysfs=str(tmp_path / "sys"), dev=str(tmp_path / "dev"))


def test_non_ivshmem_and_missing_devices(tmp_path, sysfs):
    sysfs.add_device("0000:00:05.0", ids=(0x8086, 0x100E), driver="vfio-pci")
    with pytest.raises(PciError, match="8086:100e, not an ivshmem device"):
        open_device("0000:00:05.0", sysfs=str(tmp_path / "sys"), dev=str(tmp_path / "dev"))
    with pytest.raises(DeviceNotFound):
        open_device("0000:00:09.0", sysfs=str(tmp_path / "sys"), dev=str(tmp_path / "dev"))
    with pytest.raises(ValueError):
        open_device("../../etc", sysfs=str(tmp_path / "sys"), dev=str(tmp_path / "dev"))


def test_missing_container_says_to_load_vfio_pci(tmp_path, sysfs):
    (tmp_path / "dev/vfio/vfio").unlink()
    before = open_fds()
    with pytest.raises(VfioError, match="modprobe vfio-pci") as info:
        opened(tmp_path, FakeKernel(tmp_path))
    assert info.value.errno == errno.ENOENT
    assert open_fds() == before


def test_busy_group_names_the_holder_problem(tmp_path, sysfs, monkeypatch):
    real_open = os.open

    def busy(path, *a, **k):
        if str(path).endswith("/vfio/7"):
            raise OSError(errno.EBUSY, "Device or resource busy")
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", busy)
    before = open_fds()
    with pytest.raises(VfioError, match=r"another process holds .*vfio/7"):
        opened(tmp_path, FakeKernel(tmp_path))
    monkeypatch.undo()
    assert open_fds() == before


def test_on_this_machine_open_device_fails_clearly_and_leaks_nothing():
    """The issue's check: no VFIO here; 0000:00:02.0 is not a bound ivshmem device."""
    before = open_fds()
    with pytest.raises(IvshmemBusError) as info:
        open_device("0000:00:02.0")
    text = str(info.value)
    assert "0000:00:02.0" in text
    assert any(hint in text for hint in ("not an ivshmem device", "ivshmem-bus bind", "No PCI"))
    assert open_fds() == before


def test_ivshmem_plain_opens_with_no_doorbells_and_the_bus_polls(tmp_path, sysfs):
    """QEMU's ivshmem-plain has no interrupt at all (found by the QEMU e2e run)."""
    from ivshmem_bus.bus import VirtioMsgBus
    from ivshmem_bus.core import protocol

    kernel = FakeKernel(tmp_path, msix=0, intx=0)
    with opened(tmp_path, kernel) as dev:
        assert dev.vectors == 0 and not dev.uses_intx
        assert SET_IRQS not in kernel.requests()
        assert dev.wait(0.01) == set()
        with pytest.raises(ValueError, match="no doorbell vectors: wait\\(\\) needs a timeout"):
            dev.wait(None)
        with VirtioMsgBus(dev, "driver", 1, reset_queues=True, poll_interval=0.005) as bus:
            bus.send(protocol.EventUsed(index=1))  # the register write is harmless on plain
            assert bus.receive(0.02) is None

"""PlainWindow: ivshmem-plain BAR2 via sysfs resource2 or VFIO, chosen by the current driver,
never both; doorbell functions refused; no fd left after close or after any error.

The sysfs tree is tests/fakesysfs.py; the VFIO kernel is test_vfio's FakeKernel (a regular
file stands in for the device fd: BAR2 is its bytes at 0x10000, 0x4000 long).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ivshmem_bus.core.window import MemoryWindow
from ivshmem_bus.errors import DeviceNotFound, PciError, VfioError, WindowError
from ivshmem_bus.memory import open_window
from ivshmem_bus.memory.plain import PlainWindow
from ivshmem_bus.native import ffi

from .fakesysfs import DOORBELL_BARS, PLAIN_BARS, FakeSysfs
from .test_vfio import BAR2_OFF, BAR2_SIZE, FakeKernel

PLAIN = "0000:00:11.0"
DOORBELL = "0000:00:10.0"
PLAIN_SIZE = PLAIN_BARS[2]  # 1 MiB in the fake tree
ARM_RAM = 0x4000_0000


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def no_ioctl(*args: object, **kwargs: object) -> int:
    raise AssertionError("the resource2 path must not touch VFIO")


class Tree:
    def __init__(self, tmp_path: Path) -> None:
        self.sys = tmp_path / "sys"
        self.dev = tmp_path / "dev"
        self.fake = FakeSysfs(self.sys, self.dev)

    def plain(self, bdf: str = PLAIN, *, driver: str | None = None, **kw: Any) -> Path:
        d = self.fake.add_device(bdf, bars=PLAIN_BARS, msix_vectors=0, driver=driver, **kw)
        (d / "resource2").write_bytes(bytes(i * 3 & 0xFF for i in range(PLAIN_SIZE)))
        return d / "resource2"

    def vfio_nodes(self, group: int = 7) -> None:
        vfio = self.dev / "vfio"
        vfio.mkdir(exist_ok=True)
        (vfio / "vfio").touch()
        (vfio / str(group)).touch()

    def open(self, bdf: str = PLAIN, mem_offset: int = 0, ioctl: Any = no_ioctl) -> PlainWindow:
        return PlainWindow.open(
            bdf, mem_offset, sysfs=str(self.sys), dev=str(self.dev), ioctl=ioctl
        )


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Tree]:
    yield Tree(tmp_path)


def read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), size, offset)


# sysfs resource2 ----------------------------------------------------------------------------


@pytest.mark.parametrize("driver", [None, "uio_pci_generic"])
def test_resource2_when_not_on_vfio_pci(tree: Tree, driver: str | None) -> None:
    res = tree.plain(driver=driver, iommu_group=None)
    before = open_fds()
    with tree.open(mem_offset=ARM_RAM) as w:
        assert isinstance(w, MemoryWindow)
        assert (w.via, w.bdf) == ("resource2", PLAIN)
        assert w.name == f"ivshmem-plain {PLAIN} BAR2 (sysfs resource2, mem-offset 0x40000000)"
        assert (w.base, w.size) == (ARM_RAM, PLAIN_SIZE)
        assert bytes(w.view(ARM_RAM + 0x1234, 4)) == read_at(res, 0x1234, 4)
        w.view(ARM_RAM + PLAIN_SIZE - 4, 4)[:] = b"ring"
        w.store16(ARM_RAM + 2, 7)
        assert read_at(res, PLAIN_SIZE - 4, 4) == b"ring"
        assert read_at(res, 2, 2) == b"\x07\x00"
        with pytest.raises(WindowError, match=rf"ivshmem-plain {PLAIN} BAR2"):
            w.view(ARM_RAM - 2, 2)
    assert open_fds() == before


def test_short_bdf_and_open_window(tree: Tree) -> None:
    tree.plain()
    with open_window("00:11.0", sysfs=str(tree.sys), dev=str(tree.dev)) as w:
        assert isinstance(w, PlainWindow) and w.bdf == PLAIN and w.base == 0
        assert w.name == f"ivshmem-plain {PLAIN} BAR2 (sysfs resource2)"


@pytest.mark.parametrize(
    ("spoil", "match"),
    [
        ("command", r"memory decoding is off.*echo 1 > .*/enable"),
        ("missing", r"opening .*/resource2: No such file"),
        ("short", r"resource2 is 4096 bytes but BAR2 is 1048576"),
    ],
)
def test_unusable_resource2_is_one_error_and_leaks_nothing(
    tree: Tree, spoil: str, match: str
) -> None:
    if spoil == "command":
        res = tree.plain(command=0x0000)
    else:
        res = tree.plain()
        if spoil == "missing":
            res.unlink()
        else:
            res.write_bytes(bytes(4096))
    before = open_fds()
    with pytest.raises(PciError, match=match):
        tree.open()
    assert open_fds() == before


def test_resource2_permission_error_names_root_or_vfio(
    tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree.plain()
    real = os.open

    def denied(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith("resource2"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(PciError, match=r"run as root, or bind it to vfio-pci") as info:
        tree.open()
    assert info.value.errno == errno.EACCES


# VFIO -------------------------------------------------------------------------------------------


def test_vfio_when_bound_to_vfio_pci_and_resource2_untouched(
    tree: Tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree.plain(driver="vfio-pci", iommu_group=7)
    tree.vfio_nodes()
    kernel = FakeKernel(tmp_path, msix=0, intx=0)
    opened: list[str] = []
    real = os.open

    def recording(path: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording)
    before = open_fds()
    w = tree.open(ioctl=kernel)
    assert any(p.endswith("vfio/vfio") for p in opened)  # the recorder sees the opens
    assert not [p for p in opened if p.endswith("resource2")]  # never both on one function
    assert (w.via, w.size, w.base) == ("vfio", BAR2_SIZE, 0)
    assert w.name == f"ivshmem-plain {PLAIN} BAR2 (vfio)"
    if ffi.HAVE_COMPILED:
        assert w.fence == ffi.full_fence()
    w.view(0x10, 5)[:] = b"hello"
    w.store16(BAR2_SIZE - 2, 0xA55A)
    assert kernel.file(BAR2_OFF + 0x10, 5) == b"hello"  # the region, at region_info.offset
    assert kernel.file(BAR2_OFF + BAR2_SIZE - 2, 2) == b"\x5a\xa5"
    w.close()
    w.close()
    assert open_fds() == before


def test_vfio_reporting_msix_is_a_doorbell_and_refused(tree: Tree, tmp_path: Path) -> None:
    """sysfs shows a non-root reader only 64 bytes of config (no MSI-X count); VFIO knows."""
    tree.plain(driver="vfio-pci", iommu_group=7)
    tree.vfio_nodes()
    before = open_fds()
    with pytest.raises(PciError, match=r"ivshmem-doorbell function \(VFIO reports 2 MSI-X"):
        tree.open(ioctl=FakeKernel(tmp_path, msix=2))
    assert open_fds() == before


def test_vfio_missing_group_node_or_container(tree: Tree, tmp_path: Path) -> None:
    tree.plain(driver="vfio-pci", iommu_group=7)
    before = open_fds()
    with pytest.raises(VfioError, match=r"no node for IOMMU group 7.*ivshmem-bus bind"):
        tree.open(ioctl=FakeKernel(tmp_path, msix=0, intx=0))
    tree.vfio_nodes()
    (tree.dev / "vfio" / "vfio").unlink()
    with pytest.raises(VfioError, match="modprobe vfio-pci"):
        tree.open(ioctl=FakeKernel(tmp_path, msix=0, intx=0))
    assert open_fds() == before


def test_vfio_failure_after_the_device_fd_closes_everything(tree: Tree, tmp_path: Path) -> None:
    tree.plain(driver="vfio-pci", iommu_group=7)
    tree.vfio_nodes()
    kernel = FakeKernel(tmp_path, msix=0, intx=0)
    del kernel.regions[2]  # BAR2 reads back empty
    before = open_fds()
    with pytest.raises(PciError, match="VFIO reports an empty BAR2"):
        tree.open(ioctl=kernel)
    assert kernel.device_fds  # the device fd was opened, and is closed again
    assert open_fds() == before


def test_vfio_bar2_without_mmap_is_refused_with_the_fix(tree: Tree, tmp_path: Path) -> None:
    tree.plain(driver="vfio-pci", iommu_group=7)
    tree.vfio_nodes()
    kernel = FakeKernel(tmp_path, msix=0, intx=0)
    kernel.regions[2] = (1 | 2, BAR2_SIZE, BAR2_OFF)  # READ | WRITE, no MMAP
    before = open_fds()
    with pytest.raises(VfioError, match=r"does not allow mmap of BAR2.*resource2") as info:
        tree.open(ioctl=kernel)
    assert info.value.errno == errno.EINVAL
    assert open_fds() == before


# Refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", [None, "vfio-pci"])
def test_a_doorbell_function_is_refused_with_the_fix(tree: Tree, driver: str | None) -> None:
    tree.fake.add_device(DOORBELL, bars=DOORBELL_BARS, msix_vectors=2, driver=driver)
    with pytest.raises(
        PciError,
        match=r"0000:00:10.0 is an ivshmem-doorbell function \(2 MSI-X vectors\): .*open the "
        r"ivshmem-plain function whose memdev is the driver's RAM",
    ):
        tree.open(DOORBELL)  # no_ioctl: refused before any VFIO call


def test_bar1_alone_marks_a_doorbell(tree: Tree) -> None:
    """Non-root readers see 64 bytes of config: no MSI-X count, but BAR1 is in `resource`."""
    d = tree.fake.add_device(DOORBELL, bars=DOORBELL_BARS, msix_vectors=2)
    (d / "config").write_bytes((d / "config").read_bytes()[:64])
    with pytest.raises(PciError, match=r"ivshmem-doorbell function \(it has BAR1"):
        tree.open(DOORBELL)


def test_not_ivshmem_missing_and_malformed(tree: Tree) -> None:
    tree.fake.add_device("0000:00:05.0", ids=(0x8086, 0x100E), bars=PLAIN_BARS, msix_vectors=0)
    with pytest.raises(PciError, match="8086:100e, not ivshmem-plain"):
        tree.open("0000:00:05.0")
    with pytest.raises(DeviceNotFound):
        tree.open("0000:00:09.0")
    with pytest.raises(ValueError, match="not a PCI address"):
        tree.open("../../etc")
    tree.plain()
    with pytest.raises(ValueError, match="mem_offset must not be negative"):
        tree.open(mem_offset=-1)
    with pytest.raises(ValueError, match="end past the 64-bit address space"):
        tree.open(mem_offset=(1 << 64) - 0x1000)


def test_no_bar2_is_refused(tree: Tree) -> None:
    tree.fake.add_device(PLAIN, bars=(256, 0, 0, 0, 0, 0), msix_vectors=0)
    with pytest.raises(PciError, match="BAR2 is empty: give the ivshmem-plain device a memdev"):
        tree.open()


def test_open_and_close_both_paths_100_times_leaves_the_fds_as_they_were(
    tree: Tree, tmp_path: Path
) -> None:
    tree.plain()
    tree.plain("0000:00:12.0", driver="vfio-pci", iommu_group=7)
    tree.vfio_nodes()
    kernel = FakeKernel(tmp_path, msix=0, intx=0)
    before = open_fds()
    for _ in range(100):
        with tree.open() as a, tree.open("0000:00:12.0", ioctl=kernel) as b:
            assert (a.via, b.via) == ("resource2", "vfio")
    assert open_fds() == before

"""A fake sysfs (and /dev) tree for backends/vfio/pci.py,: a tiny model of the kernel.

The layout mirrors the real one: ``devices/pci0000:00/BDF`` directories, ``bus/pci/devices/BDF``
symlinks to them, ``driver`` -> ``../../../bus/pci/drivers/NAME`` and ``iommu_group`` ->
``../../../kernel/iommu_groups/N`` links, regular files for attributes.

Writes to regular files cannot make anything happen, so ``FakeSysfs.write`` stands in for
``pci._write`` (tests monkeypatch it): it records every ``(path relative to root, text)`` in
``writes``, writes the file as the real ``_write`` would (no O_CREAT), then does what the
kernel would: a driver's ``unbind`` removes the ``driver`` link, ``drivers_probe`` binds the
device to its ``driver_override`` (or, with none, to its native driver), and a vfio-pci bind
of a device without an IOMMU group succeeds only with the noiommu parameter set, creating a
noiommu group. Group nodes appear under ``dev_root/vfio`` unless ``create_nodes`` is False.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

IVSHMEM = (0x1AF4, 0x1110)
NOIOMMU_PARAM = "module/vfio/parameters/enable_unsafe_noiommu_mode"

# QEMU's ivshmem-doorbell: BAR0 registers, BAR1 MSI-X, BAR2 64-bit prefetchable shared memory.
DOORBELL_BARS = (256, 4096, 1 << 22, 0, 0, 0)
PLAIN_BARS = (256, 0, 1 << 20, 0, 0, 0)
_BAR_BASES = (0xFEA00000, 0xFEA01000, 0x7000000000, 0, 0, 0)
_BAR_FLAGS = (0x40200, 0x40200, 0x14220C, 0, 0, 0)


def config_space(
    vendor: int,
    device: int,
    *,
    revision: int = 1,
    class_code: int = 0x050000,
    subsystem: tuple[int, int] = (0x1AF4, 0x1100),
    msix_vectors: int = 0,
    command: int = 0x0003,
) -> bytes:
    """256 bytes of type-0 config space with a capability list: PM at 0x40, then MSI-X at 0x50
    when ``msix_vectors`` > 0 (table in BAR1 at 0, PBA at 0x800, as QEMU lays it out)."""
    cfg = bytearray(256)
    cfg[0:4] = vendor.to_bytes(2, "little") + device.to_bytes(2, "little")
    cfg[4:6] = command.to_bytes(2, "little")
    cfg[6:8] = (0x0010).to_bytes(2, "little")  # status: capabilities list present
    cfg[8] = revision
    cfg[9:12] = class_code.to_bytes(3, "little")
    cfg[0x2C:0x30] = subsystem[0].to_bytes(2, "little") + subsystem[1].to_bytes(2, "little")
    cfg[0x34] = 0x40
    cfg[0x40:0x44] = bytes([0x01, 0x50 if msix_vectors else 0x00, 0x03, 0x00])  # PM
    if msix_vectors:
        cfg[0x50:0x52] = bytes([0x11, 0x00])  # MSI-X, end of list
        cfg[0x52:0x54] = ((msix_vectors - 1) & 0x7FF).to_bytes(2, "little")
        cfg[0x54:0x58] = (0x00000001).to_bytes(4, "little")  # table: BIR 1, offset 0
        cfg[0x58:0x5C] = (0x00000801).to_bytes(4, "little")  # PBA: BIR 1, offset 0x800
    return bytes(cfg)


def resource_text(bars: tuple[int, ...]) -> str:
    """A sysfs ``resource`` file: BAR0-5 then the ROM, "start end flags" per line."""
    lines = []
    for size, base, flags in zip(bars, _BAR_BASES, _BAR_FLAGS, strict=True):
        start, end = (base, base + size - 1) if size else (0, 0)
        lines.append(f"0x{start:016x} 0x{end:016x} 0x{flags if size else 0:016x}")
    lines.append(f"0x{0:016x} 0x{0:016x} 0x{0:016x}")
    return "\n".join(lines) + "\n"


@dataclass
class FakeDevice:
    bdf: str
    native_driver: str | None  # what drivers_probe binds when driver_override is clear


class FakeSysfs:
    """A fake ``/sys`` at ``root`` and ``/dev`` at ``dev_root``; see the module docstring."""

    def __init__(self, root: Path, dev_root: Path, *, vfio_pci: bool = True) -> None:
        self.root = root
        self.dev_root = dev_root
        self.writes: list[tuple[str, str]] = []
        self.fail: dict[str, int] = {}  # relative path -> errno to raise on write
        self.create_nodes = True
        self.devices: dict[str, FakeDevice] = {}
        self._next_group = 100  # noiommu groups get fresh numbers, as iommu_group_alloc does
        (root / "bus/pci/devices").mkdir(parents=True)
        (root / "bus/pci/drivers").mkdir(parents=True)
        (root / "kernel/iommu_groups").mkdir(parents=True)
        (root / "bus/pci/drivers_probe").write_text("")
        dev_root.mkdir(parents=True, exist_ok=True)
        if vfio_pci:
            self.add_driver("vfio-pci")

    # Building

    def add_driver(self, name: str) -> Path:
        d = self.root / "bus/pci/drivers" / name
        d.mkdir(parents=True, exist_ok=True)
        for f in ("bind", "unbind", "new_id"):
            (d / f).touch()
        return d

    def add_noiommu_param(self, value: str = "N") -> Path:
        p = self.root / NOIOMMU_PARAM
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(value + "\n")
        return p

    def add_device(
        self,
        bdf: str,
        *,
        ids: tuple[int, int] = IVSHMEM,
        bars: tuple[int, ...] = DOORBELL_BARS,
        msix_vectors: int = 2,
        driver: str | None = None,
        iommu_group: int | None = 7,
        ivposition: int = 0,
        revision: int = 1,
        class_code: int = 0x050000,
        subsystem: tuple[int, int] = (0x1AF4, 0x1100),
        command: int = 0x0003,
    ) -> Path:
        """Create a PCI function; ``driver`` is also its native driver. Returns its directory."""
        real = self.root / "devices/pci0000:00" / bdf
        real.mkdir(parents=True)
        os.symlink(f"../../../devices/pci0000:00/{bdf}", self.root / "bus/pci/devices" / bdf)
        attrs = {
            "vendor": f"0x{ids[0]:04x}",
            "device": f"0x{ids[1]:04x}",
            "revision": f"0x{revision:02x}",
            "class": f"0x{class_code:06x}",
            "subsystem_vendor": f"0x{subsystem[0]:04x}",
            "subsystem_device": f"0x{subsystem[1]:04x}",
            "driver_override": "(null)",
        }
        for name, value in attrs.items():
            (real / name).write_text(value + "\n")
        (real / "resource").write_text(resource_text(bars))
        (real / "config").write_bytes(
            config_space(
                *ids,
                revision=revision,
                class_code=class_code,
                subsystem=subsystem,
                msix_vectors=msix_vectors,
                command=command,
            )
        )
        (real / "enable").write_text("1\n")
        if bars[0]:
            bar0 = bytearray(bars[0])
            bar0[8:12] = ivposition.to_bytes(4, "little")
            (real / "resource0").write_bytes(bytes(bar0))
        if iommu_group is not None:
            self._set_group(bdf, iommu_group)
        if driver is not None:
            self.add_driver(driver)
            self._link_driver(bdf, driver)
        self.devices[bdf] = FakeDevice(bdf, driver)
        return real

    # Inspecting

    def dev_dir(self, bdf: str) -> Path:
        return self.root / "bus/pci/devices" / bdf

    def driver_of(self, bdf: str) -> str | None:
        link = self.dev_dir(bdf) / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def override_of(self, bdf: str) -> str:
        return (self.dev_dir(bdf) / "driver_override").read_text().strip()

    # The kernel model: stands in for ivshmem_bus.backends.vfio.pci._write

    def write(self, path: str, text: str) -> None:
        rel = os.path.relpath(path, self.root)
        self.writes.append((rel, text))
        if rel in self.fail:
            code = self.fail[rel]
            raise OSError(code, os.strerror(code), path)
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)  # like the real _write: never creates
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        parts = rel.split("/")
        if parts[-1] == "driver_override":
            value = text.strip() or "(null)"  # "\n" clears, as driver_set_override does
            Path(path).write_text(value + "\n")
        elif parts[:3] == ["bus", "pci", "drivers"] and parts[-1] == "unbind":
            if self.driver_of(text) != parts[3]:
                raise OSError(errno.ENODEV, os.strerror(errno.ENODEV), path)
            os.unlink(self.dev_dir(text) / "driver")
        elif rel == "bus/pci/drivers_probe":
            self._probe(text)

    def _probe(self, bdf: str) -> None:
        if self.driver_of(bdf) is not None:
            return
        override = self.override_of(bdf)
        target = self.devices[bdf].native_driver if override == "(null)" else override
        if target is None or not (self.root / "bus/pci/drivers" / target).is_dir():
            return
        if target == "vfio-pci":
            group_link = self.dev_dir(bdf) / "iommu_group"
            noiommu = not group_link.is_symlink()
            if noiommu:
                param = self.root / NOIOMMU_PARAM
                if not param.exists() or param.read_text().strip() not in ("1", "Y"):
                    return  # vfio-pci's probe fails: -EINVAL, and drivers_probe still succeeds
                self._set_group(bdf, self._next_group)
                self._next_group += 1
            group = os.path.basename(os.readlink(group_link))
            if self.create_nodes:
                (self.dev_root / "vfio").mkdir(exist_ok=True)
                (self.dev_root / "vfio" / (f"noiommu-{group}" if noiommu else group)).touch()
        self._link_driver(bdf, target)

    def _link_driver(self, bdf: str, name: str) -> None:
        os.symlink(f"../../../bus/pci/drivers/{name}", self.dev_dir(bdf) / "driver")

    def _set_group(self, bdf: str, group: int) -> None:
        members = self.root / "kernel/iommu_groups" / str(group) / "devices"
        members.mkdir(parents=True, exist_ok=True)
        # as in real sysfs: the group lists its members as links to the devices
        os.symlink(f"../../../../devices/pci0000:00/{bdf}", members / bdf)
        os.symlink(f"../../../kernel/iommu_groups/{group}", self.dev_dir(bdf) / "iommu_group")

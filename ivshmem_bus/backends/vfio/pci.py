"""The PCI side of the VFIO backend: find ivshmem functions, bind them to vfio-pci and back.

QEMU's ivshmem is 1af4:1110 (docs/wire-format.md §1): BAR0 registers, BAR1 MSI-X
(ivshmem-doorbell only), BAR2 shared memory. Every sysfs path is built under ``root`` (default
``/sys``), so tests run on a fake tree (tests/fakesysfs.py). On the real ``/sys`` pyudev lists
the candidates; a directory walk is the fallback and the only way into a fake tree, which
pyudev cannot read (docs/vfio.md §9). Both feed the same record reader.

Binding (docs/vfio.md §9) is per device; ``new_id`` would claim every 1af4:1110, so never:

    1. devices/BDF/driver_override <- "vfio-pci"  from now on only vfio-pci may claim it
    2. drivers/OLD/unbind          <- BDF         release it from its current driver, if any
    3. drivers_probe               <- BDF         the core matches again; the override wins

Undo: driver_override <- "\\n" (a zero-length write(2) never reaches a sysfs store), unbind
from vfio-pci, drivers_probe: the old driver returns if it still matches. Every write goes
through ``_write``, one write(2) per attribute, so tests can record order and bytes.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...core.regs import IVPOSITION
from ...errors import DeviceNotFound, PciError, VfioError

__all__ = [
    "IVSHMEM_DEVICE",
    "IVSHMEM_VENDOR",
    "VFIO_PCI",
    "Binding",
    "PciFunction",
    "bind",
    "get_function",
    "list_ivshmem",
    "normalize_bdf",
    "parse_msix_vectors",
    "parse_resource",
    "read_vmid_from_resource0",
    "unbind",
    "wait_for_group_node",
]

IVSHMEM_VENDOR = 0x1AF4
IVSHMEM_DEVICE = 0x1110
VFIO_PCI = "vfio-pci"

_BDF = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
_SHORT_BDF = re.compile(r"[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
_NOIOMMU_PARAM = "module/vfio/parameters/enable_unsafe_noiommu_mode"

# PCI 3.0 configuration header and capability list (PCI Local Bus spec 6.7, 6.8.2)
_PCI_STATUS = 0x06
_PCI_STATUS_CAP_LIST = 0x10
_PCI_CAPABILITY_LIST = 0x34
_PCI_HEADER_END = 0x40  # capabilities live after the 64-byte header
_PCI_CAP_ID_MSIX = 0x11
_PCI_MSIX_FLAGS_QSIZE = 0x7FF  # Message Control bits 10..0: table size - 1

Modprobe = Callable[[str], None]


def normalize_bdf(bdf: str) -> str:
    """Return ``bdf`` as ``dddd:bb:dd.f`` (``bb:dd.f`` gets domain 0000; hex is lowered).

    The result goes into sysfs paths and files, so anything but a strict address (``..``,
    ``/``, a trailing newline) raises ``ValueError`` here, before any I/O (``TypeError`` if
    not a str).
    """
    if not isinstance(bdf, str):
        raise TypeError(f"PCI address must be a str, not {type(bdf).__name__}")
    low = bdf.lower()
    if _SHORT_BDF.fullmatch(low):  # fullmatch: re's "$" would also accept a trailing "\n"
        low = "0000:" + low
    if not _BDF.fullmatch(low):
        raise ValueError(f"{bdf!r} is not a PCI address: expected dddd:bb:dd.f, e.g. 0000:00:04.0")
    return low


@dataclass(frozen=True, slots=True)
class PciFunction:
    """One PCI function as sysfs showed it when read: a snapshot, not a live view.

    ``driver`` and ``iommu_group`` are ``None`` when absent. ``bar_sizes`` holds BAR0..BAR5 in
    bytes (0: absent). ``msix_vectors`` is the MSI-X table size, 0 without MSI-X, ``None`` when
    only the first 64 bytes of config space were readable (all the kernel shows non-root).
    """

    bdf: str
    vendor: int
    device: int
    revision: int
    class_code: int
    subsystem_vendor: int
    subsystem_device: int
    driver: str | None
    iommu_group: int | None
    bar_sizes: tuple[int, ...]
    msix_vectors: int | None

    def __post_init__(self) -> None:
        if not isinstance(self.bdf, str) or not _BDF.fullmatch(self.bdf):
            raise ValueError(f"PciFunction.bdf {self.bdf!r} is not a full dddd:bb:dd.f address")
        if len(self.bar_sizes) != 6:
            raise ValueError(f"PciFunction.bar_sizes needs 6 entries, got {self.bar_sizes!r}")

    @property
    def is_ivshmem(self) -> bool:
        """QEMU's ivshmem, doorbell or plain (they share 1af4:1110)."""
        return self.vendor == IVSHMEM_VENDOR and self.device == IVSHMEM_DEVICE

    @property
    def is_doorbell(self) -> bool:
        """ivshmem-doorbell has MSI-X, its table in BAR1; ivshmem-plain has neither.

        IVPosition cannot tell (0 is "first peer" and "plain" alike), and non-root users may
        not see the MSI-X count, so BAR1's presence counts too.
        """
        return bool(self.msix_vectors) or self.bar_sizes[1] > 0

    @property
    def shmem_size(self) -> int:
        """Size of BAR2, the shared memory."""
        return self.bar_sizes[2]


@dataclass(frozen=True, slots=True)
class Binding:
    """What ``bind`` did: the driver it took the device from (``None``: none; ``"vfio-pci"``:
    it was bound already and nothing was written), and the group's number and node
    (``/dev/vfio/N``, or ``/dev/vfio/noiommu-N`` in no-IOMMU mode)."""

    bdf: str
    previous_driver: str | None
    group: int
    node: str

    @property
    def noiommu(self) -> bool:
        """The group is a no-IOMMU group: DMA is unrestricted and opening it taints the kernel."""
        return os.path.basename(self.node).startswith("noiommu-")


def parse_resource(text: str) -> tuple[int, ...]:
    """BAR0..BAR5 sizes from a sysfs ``resource`` file ("start end flags" in hex per line).

    A size is ``end - start + 1``; an unused BAR reads as all zeros, so ``end == 0`` means 0.
    """
    sizes = []
    for line in text.splitlines()[:6]:
        start, end, _flags = (int(field, 16) for field in line.split())
        sizes.append(end - start + 1 if end else 0)
    return tuple(sizes + [0] * (6 - len(sizes)))


def parse_msix_vectors(config: bytes) -> int | None:
    """MSI-X table size from raw config space: 0 without MSI-X, ``None`` if unknowable.

    ``msi_irqs/`` lists only vectors a driver enabled; the capability says what the device
    has, bound or not. The walk from 0x34 ends at a pointer into the header or one already
    seen (a loop), and gives ``None`` past the end of ``config`` (non-root reads get 64 bytes).
    """
    if len(config) < _PCI_HEADER_END:
        return None
    if not int.from_bytes(config[_PCI_STATUS : _PCI_STATUS + 2], "little") & _PCI_STATUS_CAP_LIST:
        return 0
    seen: set[int] = set()
    ptr = config[_PCI_CAPABILITY_LIST] & 0xFC
    while ptr:
        if ptr < _PCI_HEADER_END or ptr in seen:
            return 0
        if ptr + 4 > len(config):
            return None
        seen.add(ptr)
        if config[ptr] == _PCI_CAP_ID_MSIX:
            control = int.from_bytes(config[ptr + 2 : ptr + 4], "little")
            return (control & _PCI_MSIX_FLAGS_QSIZE) + 1
        ptr = config[ptr + 1] & 0xFC
    return 0


# Reading sysfs


def _pci(root: str | os.PathLike[str]) -> Path:
    return Path(root) / "bus/pci"


def _dev_dir(root: str | os.PathLike[str], bdf: str) -> Path:
    return _pci(root) / "devices" / bdf


def _link_name(path: Path) -> str | None:
    """Basename of a symlink's target (``driver``, ``iommu_group``), or ``None`` if absent."""
    try:
        return os.path.basename(os.readlink(path))
    except FileNotFoundError:
        return None


def _read_function(root: str | os.PathLike[str], bdf: str) -> PciFunction:
    d = _dev_dir(root, bdf)
    if not d.is_dir():
        raise DeviceNotFound(bdf, str(_pci(root) / "devices"))

    def hex_attr(name: str) -> int:
        return int((d / name).read_text().strip(), 16)

    try:
        group = _link_name(d / "iommu_group")  # its basename is the group number
        return PciFunction(
            bdf=bdf,
            vendor=hex_attr("vendor"),
            device=hex_attr("device"),
            revision=hex_attr("revision"),
            class_code=hex_attr("class"),
            subsystem_vendor=hex_attr("subsystem_vendor"),
            subsystem_device=hex_attr("subsystem_device"),
            driver=_link_name(d / "driver"),
            iommu_group=None if group is None else int(group),
            bar_sizes=parse_resource((d / "resource").read_text()),
            msix_vectors=parse_msix_vectors((d / "config").read_bytes()),
        )
    except (OSError, ValueError) as exc:
        code = getattr(exc, "errno", None)
        raise PciError(f"reading PCI device {d}: {exc}", errno=code, path=str(d)) from exc


def _udev_bdfs() -> list[str] | None:
    """ivshmem BDFs from udev's view of the real /sys, or ``None`` when pyudev is unusable."""
    try:
        import pyudev

        ctx = pyudev.Context()
        pci_id = f"{IVSHMEM_VENDOR:04X}:{IVSHMEM_DEVICE:04X}"  # the kernel's uevent PCI_ID
        return sorted(dev.sys_name for dev in ctx.list_devices(subsystem="pci", PCI_ID=pci_id))
    except (ImportError, OSError):  # no pyudev, or no libudev.so.1
        return None


def _walk_bdfs(root: str | os.PathLike[str]) -> list[str]:
    """Every PCI address under ``root`` (a fake tree, or /sys without pyudev)."""
    try:
        names = os.listdir(_pci(root) / "devices")
    except FileNotFoundError:
        return []  # no PCI bus at all
    return sorted(n for n in names if _BDF.fullmatch(n))


def list_ivshmem(root: str | os.PathLike[str] = "/sys") -> list[PciFunction]:
    """All ivshmem functions (doorbell and plain) under ``root``, sorted by address.

    pyudev is asked only when ``root`` is the real ``/sys``. Other devices are skipped, and so
    is one that vanishes mid-walk (hot unplug).

    Raises:
        PciError: a device's sysfs attributes could not be read or parsed.
    """
    bdfs = _udev_bdfs() if os.path.normpath(os.fspath(root)) == "/sys" else None
    found = []
    for bdf in _walk_bdfs(root) if bdfs is None else bdfs:
        try:
            fn = _read_function(root, bdf)
        except PciError as exc:
            if isinstance(exc, DeviceNotFound) or exc.errno == errno.ENOENT:
                continue
            raise
        if fn.is_ivshmem:
            found.append(fn)
    return found


def get_function(bdf: str, root: str | os.PathLike[str] = "/sys") -> PciFunction:
    """Read one PCI function of any kind (``is_ivshmem`` tells); ``DeviceNotFound`` if absent."""
    return _read_function(root, normalize_bdf(bdf))


# Writing sysfs


def _write(path: str, text: str) -> None:
    """The one place that writes sysfs: one write(2) of the whole text, as a store expects.

    No O_CREAT, so a missing attribute is an error, not a new file. Tests replace this.
    """
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _fix(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "root (CAP_SYS_ADMIN) is needed for this sysfs file: run as root"
    return "see `dmesg` for the kernel's reason"


def _sysfs_write(path: Path, text: str, why: str) -> None:
    """``_write``, with an OSError turned into a PciError naming the file, value and fix."""
    try:
        _write(str(path), text)
    except OSError as exc:
        raise PciError(
            f"writing {text.strip()!r} to {path} ({why}) failed: {exc.strerror}; {_fix(exc)}",
            errno=exc.errno,
            path=str(path),
        ) from exc


def _ivshmem(bdf: str, root: str | os.PathLike[str], action: str) -> PciFunction:
    """The device at ``bdf``, which must be ivshmem: nothing else is ever bound or unbound."""
    fn = get_function(bdf, root)
    if not fn.is_ivshmem:
        raise PciError(
            f"{bdf} is {fn.vendor:04x}:{fn.device:04x}, not ivshmem (1af4:1110): refusing to "
            f"{action}; pick a device from `lspci -D -d 1af4:1110`"
        )
    return fn


def _run_modprobe(module: str) -> None:
    """Load a kernel module with the system's modprobe."""
    try:
        proc = subprocess.run(["modprobe", module], capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise PciError(f"loading {module}: modprobe not found; install kmod") from exc
    if proc.returncode:
        raise PciError(
            f"loading {module}: modprobe exited {proc.returncode}: {proc.stderr.strip()}; "
            f"install the kernel's modules package or build {module} in"
        )


def _ensure_vfio_pci(root: str | os.PathLike[str], modprobe: Modprobe) -> None:
    drv = _pci(root) / "drivers" / VFIO_PCI
    if not drv.is_dir():
        modprobe(VFIO_PCI)
    if not drv.is_dir():
        raise PciError(f"{drv} is missing after `modprobe {VFIO_PCI}`: the driver did not load")


def _enable_noiommu(root: str | os.PathLike[str]) -> None:
    param = Path(root) / _NOIOMMU_PARAM
    try:
        current = param.read_text().strip()
    except FileNotFoundError:
        raise PciError(
            f"no-IOMMU mode: {param} does not exist: this kernel was built without "
            "CONFIG_VFIO_NOIOMMU (Debian's kernel is); rebuild vfio.ko with it, or give the "
            "guest a vIOMMU (QEMU q35 -device intel-iommu,intremap=on, kernel intel_iommu=on)",
            path=str(param),
        ) from None
    if current not in ("Y", "1"):
        _sysfs_write(param, "1", "no-IOMMU mode: unrestricted DMA, taints the kernel")


def group_nodes(group: int, dev_root: str | os.PathLike[str] = "/dev") -> tuple[Path, Path]:
    """The two names a VFIO group's node can have: ``vfio/N`` (an IOMMU group) and
    ``vfio/noiommu-N`` (no-IOMMU mode). The one place that knows them."""
    vfio = Path(dev_root) / "vfio"
    return vfio / str(group), vfio / f"noiommu-{group}"


def find_group_node(group: int, dev_root: str | os.PathLike[str] = "/dev") -> Path | None:
    """The group's node that exists now (``vfio/N`` first), or ``None``."""
    return next((n for n in group_nodes(group, dev_root) if n.exists()), None)


def group_node_of(fn: PciFunction, dev_root: str | os.PathLike[str] = "/dev") -> str:
    """The VFIO node of ``fn``'s group, to open now: a bound function's, not waited for.

    Raises:
        VfioError: (ENOENT) the function has no IOMMU group, or neither node exists; the
            message names the bind command that fixes it.
    """
    if fn.iommu_group is None:
        raise VfioError(
            errno.ENOENT,
            f"{fn.bdf}: no IOMMU group",
            fix=f"run 'ivshmem-bus bind {fn.bdf} --noiommu'",
        )
    node = find_group_node(fn.iommu_group, dev_root)
    if node is None:
        raise VfioError(
            errno.ENOENT,
            f"{fn.bdf}: no node for IOMMU group {fn.iommu_group} under {Path(dev_root) / 'vfio'}",
            fix=f"bind it again with 'ivshmem-bus bind {fn.bdf}'",
        )
    return str(node)


def wait_for_group_node(
    group: int, *, dev_root: str | os.PathLike[str] = "/dev", timeout: float = 5.0
) -> str:
    """Wait for the group's node, ``vfio/N`` or ``vfio/noiommu-N``, and return its path.

    devtmpfs creates it after vfio-pci's probe, so it may lag the bind; ``PciError`` if
    neither appears within ``timeout`` seconds.
    """
    real, noiommu = group_nodes(group, dev_root)
    deadline = time.monotonic() + timeout
    while not (node := find_group_node(group, dev_root)):
        if time.monotonic() >= deadline:
            raise PciError(
                f"IOMMU group {group}: neither {real} nor {noiommu} appeared within {timeout:g} s "
                f"of binding to vfio-pci; is devtmpfs mounted on {dev_root}? See `dmesg`"
            )
        time.sleep(0.01)
    return str(node)


def bind(
    bdf: str,
    *,
    root: str | os.PathLike[str] = "/sys",
    dev_root: str | os.PathLike[str] = "/dev",
    noiommu: bool = False,
    timeout: float = 5.0,
    modprobe: Modprobe = _run_modprobe,
) -> Binding:
    """Bind one ivshmem function to vfio-pci and wait for its VFIO group node.

    Args:
        noiommu: allow no-IOMMU mode for a device without an IOMMU group. It gives unrestricted
            DMA and taints the kernel, so it is never chosen silently, nor used when a group
            exists.
        timeout: seconds to wait for the group node under ``dev_root``.
        modprobe: loads a module by name; called with ``"vfio-pci"`` if it is not loaded.

    Returns:
        A ``Binding``: the previous driver and the group node.

    Raises:
        ValueError: ``bdf`` is malformed (nothing was written).
        PciError: no such device (``DeviceNotFound``); not ivshmem; no group and no
            ``noiommu``; no kernel support; a write failed; vfio-pci did not claim it; no node.
    """
    bdf = normalize_bdf(bdf)
    fn, dev, pci = _ivshmem(bdf, root, "bind it to vfio-pci"), _dev_dir(root, bdf), _pci(root)
    if fn.driver == VFIO_PCI and fn.iommu_group is not None:
        node = wait_for_group_node(fn.iommu_group, dev_root=dev_root, timeout=timeout)
        return Binding(bdf, VFIO_PCI, fn.iommu_group, node)
    if fn.iommu_group is None and not noiommu:
        raise PciError(
            f"{bdf} has no IOMMU group ({dev / 'iommu_group'} is missing): binding it needs "
            "no-IOMMU mode, which gives unrestricted DMA and taints the kernel; pass --noiommu "
            "(noiommu=True) to accept that, or give the guest a vIOMMU"
        )
    _ensure_vfio_pci(root, modprobe)
    if fn.iommu_group is None:
        _enable_noiommu(root)  # before the probe: vfio-pci creates noiommu groups only then
    _sysfs_write(dev / "driver_override", VFIO_PCI, "only vfio-pci may claim the device")
    if fn.driver is not None:
        _sysfs_write(pci / "drivers" / fn.driver / "unbind", bdf, f"release it from {fn.driver}")
    _sysfs_write(pci / "drivers_probe", bdf, "let vfio-pci claim it")
    after = get_function(bdf, root)
    if after.driver != VFIO_PCI or after.iommu_group is None:
        try:  # put the old driver back rather than leave the device orphaned
            unbind(bdf, root=root)
            undo = "the override was cleared again"
        except PciError as exc:
            undo = f"clearing the override failed too ({exc})"
        raise PciError(
            f"{bdf}: vfio-pci did not claim the device after drivers_probe (driver now "
            f"{after.driver}); {undo}; see `dmesg` for vfio-pci's reason"
        )
    node = wait_for_group_node(after.iommu_group, dev_root=dev_root, timeout=timeout)
    return Binding(bdf, fn.driver, after.iommu_group, node)


def unbind(bdf: str, *, root: str | os.PathLike[str] = "/sys") -> str | None:
    """Undo ``bind``: clear driver_override, release from vfio-pci, let the kernel re-probe.

    The kernel picks the driver that returns: the previous one, if it still matches (ivshmem
    has no in-tree driver, so often none). Returns the driver owning the device afterwards.

    Raises:
        ValueError: ``bdf`` is malformed (nothing was written).
        PciError: no such device (``DeviceNotFound``); not ivshmem; a sysfs write failed.
    """
    bdf = normalize_bdf(bdf)
    fn, pci = _ivshmem(bdf, root, "unbind it"), _pci(root)
    _sysfs_write(_dev_dir(root, bdf) / "driver_override", "\n", "clear the override")
    if fn.driver == VFIO_PCI:
        _sysfs_write(pci / "drivers" / VFIO_PCI / "unbind", bdf, "release it from vfio-pci")
    _sysfs_write(pci / "drivers_probe", bdf, "let its own driver claim it again")
    return get_function(bdf, root).driver


def memory_decoding(bdf: str, root: str | os.PathLike[str] = "/sys") -> bool | None:
    """Whether the function decodes memory accesses (PCI_COMMAND bit 1, from sysfs
    ``config``): with it off a BAR reads as all ones and writes go nowhere. ``None`` when
    ``config`` is too short to say.

    Raises:
        PciError: ``config`` cannot be read (errno kept).
    """
    from ...native.ffi import lib  # PCI_COMMAND*: cdefs/vfio.h, checked against pci_regs.h

    path = _dev_dir(root, bdf) / "config"
    try:
        config = path.read_bytes()
    except OSError as exc:
        raise PciError(
            f"{bdf}: reading {path}: {exc.strerror}", errno=exc.errno, path=str(path)
        ) from None
    if len(config) <= lib.PCI_COMMAND:
        return None
    return bool(config[lib.PCI_COMMAND] & lib.PCI_COMMAND_MEMORY)


def read_vmid_from_resource0(fn: PciFunction, root: str | os.PathLike[str] = "/sys") -> int:
    """Read IVPosition (BAR0 + 8, unsigned) through ``resource0`` of a device with no driver.

    python-periphery's MMIO maps a path (not a VFIO fd, but a resource file is a path).
    ``read32`` is ctypes' c_uint32 getter, a fixed 4-byte memcpy: one 32-bit load (CPython
    cfield.c ``I_get``; not measured with watchpoints). ``PciError`` if a driver owns BAR0,
    there is none, memory decoding is off (QEMU would read 0: a wrong VMID), or mapping fails.
    """
    from periphery import MMIO, MMIOError

    bdf = normalize_bdf(fn.bdf)
    now, dev = get_function(bdf, root), _dev_dir(root, bdf)  # the record may be stale
    if now.driver is not None:
        raise PciError(f"{bdf}: BAR0 is owned by {now.driver}; read IVPosition through it")
    if now.bar_sizes[0] < IVPOSITION + 4:
        raise PciError(f"{bdf}: BAR0 is {now.bar_sizes[0]} bytes, too small for IVPosition")
    if not memory_decoding(bdf, root):
        raise PciError(f"{bdf}: memory decoding is off; enable it: echo 1 > {dev / 'enable'}")
    path = str(dev / "resource0")
    try:
        mmio = MMIO(0, min(now.bar_sizes[0], 4096), path=path)
    except MMIOError as exc:
        msg = f"{bdf}: mapping {path} to read IVPosition: {exc}; {_fix(exc)}"
        raise PciError(msg, errno=exc.errno, path=path) from exc
    try:
        return mmio.read32(IVPOSITION)
    finally:
        mmio.close()

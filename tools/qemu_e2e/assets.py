"""What the guests need, fetched with apt and cached under ``.cache/qemu-e2e/`` (git-ignored).

Layout of the cache (``IVSHMEM_E2E_CACHE`` moves it)::

    debs/                      the .deb files apt-get download fetched
    kernel/KVER/               linux-image-KVER unpacked with dpkg-deb -x (boot/, lib/modules/)
    kernel/current             the KVER that ``setup`` picked last
    noiommu/KVER/*.ko          drivers/vfio rebuilt with CONFIG_VFIO_NOIOMMU=y (optional)
    initramfs/NAME-HASH.cpio.gz  built from busybox-static, the init script and the modules;
                               HASH covers every input, so a changed input builds a new one

``find_assets`` only looks (it is what the tests call to decide whether to skip);
``setup`` installs and builds what is missing (root, network for apt).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import stat
import struct
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("IVSHMEM_E2E_CACHE", REPO / ".cache" / "qemu-e2e"))
PACKAGE_DIR = Path(__file__).resolve().parent
INIT_SCRIPT = PACKAGE_DIR / "init.sh"

HOST_PACKAGES = ("qemu-system-x86", "busybox-static")
KERNEL_META = "linux-image-amd64"

# What the init loads, in this order (their dependencies first, found from .modinfo):
# virtio-pci + 9p for the root and results shares, overlay for the tmpfs upper layer, and the
# VFIO stack the project drives.
GUEST_MODULES = (
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "overlay",
    "vfio",
    "vfio_iommu_type1",
    "vfio_pci",
)
# Modules rebuilt for no-IOMMU mode: everything under drivers/vfio that the guest loads.
VFIO_MODULES = ("vfio", "vfio_iommu_type1", "vfio_virqfd", "vfio_pci_core", "vfio_pci")


class AssetsMissing(RuntimeError):
    """Something the guests need is not installed or not cached; the message says how to fix."""


def log(msg: str) -> None:
    print(f"qemu-e2e: {msg}", flush=True)


# Host tools --------------------------------------------------------------------------------------


def qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")


def busybox_binary() -> str | None:
    """busybox-static's binary: a static one is needed, the initramfs has no libc."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.is_file() and b"ld-linux" not in path.read_bytes()[: 4096 * 4]:
            return str(path)
    return None


def kvm_usable() -> bool:
    """True when a hardware KVM module is loaded and /dev/kvm opens.

    /dev/kvm alone is not enough: on these CI machines it is a nested software hypervisor
    (kvm_pvm) on which a stock kernel hangs. ``IVSHMEM_E2E_ACCEL=kvm|tcg`` overrides.
    """
    forced = os.environ.get("IVSHMEM_E2E_ACCEL")
    if forced:
        return forced == "kvm"
    if not any(Path("/sys/module", m).exists() for m in ("kvm_intel", "kvm_amd")):
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _run(cmd: Sequence[str], *, cwd: Path | None = None, timeout: float = 900) -> str:
    log("$ " + " ".join(cmd))
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )  # fmt: skip
    if proc.returncode:
        raise AssetsMissing(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    return proc.stdout


def installed(package: str) -> bool:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
    )
    return proc.returncode == 0 and proc.stdout.endswith(" installed")


_apt_updated = False


def apt_install(packages: Iterable[str]) -> None:
    """Install the packages that are missing (root), with one apt-get update first."""
    global _apt_updated
    missing = [p for p in packages if not installed(p)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise AssetsMissing(f"missing Debian packages {missing}: run as root or apt-get install")
    if not _apt_updated:
        _run(["apt-get", "update", "-qq"])
        _apt_updated = True
    _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing])


def apt_download(package: str, dest: Path) -> Path:
    """The .deb of ``package`` (apt's candidate version) in ``dest``, downloaded once."""
    version = _run(["apt-cache", "policy", package]).split("Candidate:")[1].split()[0]
    if version == "(none)":
        raise AssetsMissing(f"apt knows no candidate for {package}: apt-get update?")
    existing = list(dest.glob(f"{package}_*.deb"))
    for deb in existing:
        if _deb_field(deb, "Version") == version:
            return deb
    dest.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", "download", f"{package}={version}"], cwd=dest)
    for deb in dest.glob(f"{package}_*.deb"):
        if _deb_field(deb, "Version") == version:
            return deb
    raise AssetsMissing(f"apt-get download {package}={version} left no .deb in {dest}")


def _deb_field(deb: Path, field: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), field], capture_output=True, text=True, check=True
    ).stdout.strip()


def kernel_package() -> str:
    """The versioned image package the running release's linux-image-amd64 depends on."""
    out = _run(["apt-cache", "depends", KERNEL_META])
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\d\S*)", line)
        if m:
            return m.group(1)
    raise AssetsMissing(f"apt-cache depends {KERNEL_META} names no linux-image-*: {out!r}")


# Kernel modules ----------------------------------------------------------------------------------


def modinfo(ko: Path) -> dict[str, list[str]]:
    """The ``.modinfo`` section of a module: key -> values (no kmod/modinfo needed)."""
    data = ko.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError(f"{ko} is not a 64-bit ELF module")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, off, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize
        )
        return name, off, size

    _, stroff, _ = section(shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name, off, size = section(i)
        end = data.index(b"\0", stroff + name)
        if data[stroff + name : end] == b".modinfo":
            for entry in data[off : off + size].split(b"\0"):
                if b"=" in entry:
                    key, _, value = entry.decode(errors="replace").partition("=")
                    info.setdefault(key, []).append(value)
    return info


def _modname(path_or_name: str) -> str:
    base = os.path.basename(path_or_name)
    return base.split(".ko")[0].replace("-", "_")


def module_order(modules_dir: Path, wanted: Sequence[str]) -> list[Path]:
    """``wanted`` and their dependencies as .ko paths, each after everything it depends on.

    Modules built into the kernel (``modules.builtin``) are left out.
    """
    index = {_modname(str(p)): p for p in modules_dir.rglob("*.ko")}
    builtin = {
        _modname(line) for line in (modules_dir / "modules.builtin").read_text().splitlines()
    }
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = _modname(name)
        if name in seen or name in builtin:
            return
        if name in chain:
            raise AssetsMissing(f"module dependency loop: {' -> '.join((*chain, name))}")
        if name not in index:
            raise AssetsMissing(f"module {name} is neither built in nor under {modules_dir}")
        for dep in modinfo(index[name]).get("depends", [""])[0].split(","):
            if dep:
                visit(dep, (*chain, name))
        seen.add(name)
        order.append(index[name])

    for name in wanted:
        visit(name, ())
    return order


# initramfs ---------------------------------------------------------------------------------------


class Cpio:
    """A newc cpio archive (the initramfs format), written in memory; no root needed for nodes."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)):
        namez = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0,
        )  # fmt: skip
        self._ino += 1
        self._buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + namez)
        self._pad()
        self._buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._buf.getvalue()


def build_initramfs(
    out_dir: Path, busybox: Path, modules: Sequence[Path], overrides: dict[str, Path], name: str
) -> Path:
    """The initramfs: busybox, /init, and /modules/NN-name.ko with /modules/order.

    ``overrides`` maps a module name to a replacement .ko (the no-IOMMU vfio build).
    """
    files = [(m, overrides.get(_modname(str(m)), m)) for m in modules]
    digest = hashlib.sha256()
    for path in (busybox, INIT_SCRIPT, *(src for _, src in files)):
        digest.update(str(path).encode() + b"\0" + path.read_bytes())
    target = out_dir / f"{name}-{digest.hexdigest()[:16]}.cpio.gz"
    if target.exists():
        return target
    archive = Cpio()
    for d in ("bin", "dev", "proc", "sys", "modules", "lower", "rw", "newroot", "results"):
        archive.dir(d)
    archive.chardev("dev/console", 5, 1)
    archive.chardev("dev/null", 1, 3)
    archive.file("bin/busybox", busybox.read_bytes(), 0o755)
    archive.symlink("bin/sh", "busybox")
    archive.file("init", INIT_SCRIPT.read_bytes(), 0o755)
    order = []
    for i, (orig, src) in enumerate(files):
        ko = f"{i:02d}-{_modname(str(orig))}.ko"
        archive.file(f"modules/{ko}", src.read_bytes())
        order.append(ko)
    archive.file("modules/order", ("\n".join(order) + "\n").encode())
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(archive.finish(), compresslevel=6, mtime=0))
    tmp.rename(target)
    for old in out_dir.glob(f"{name}-*.cpio.gz"):  # earlier inputs' builds
        if old != target:
            old.unlink()
    log(f"built {target} ({target.stat().st_size // 1024} KiB, {len(order)} modules)")
    return target


# The assets --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assets:
    """Everything a guest boot needs, all paths present."""

    qemu: str
    kver: str
    kernel: Path  # vmlinuz
    modules_dir: Path  # lib/modules/KVER of the unpacked image
    initramfs: Path  # the standard one (Debian's modules)
    initramfs_noiommu: Path | None  # with the rebuilt vfio modules, if they were built
    kvm: bool

    @property
    def accel(self) -> str:
        return "kvm" if self.kvm else "tcg"


def _current_kver(cache: Path) -> str | None:
    current = cache / "kernel" / "current"
    if current.is_file():
        return current.read_text().strip() or None
    return None


def noiommu_modules(cache: Path, kver: str) -> dict[str, Path] | None:
    d = cache / "noiommu" / kver
    found = {_modname(str(p)): p for p in d.glob("*.ko")} if d.is_dir() else {}
    return found if all(m in found for m in VFIO_MODULES) else None


def find_assets(cache: Path = CACHE, *, build: bool = True) -> Assets:
    """The cached assets, without apt or network; ``AssetsMissing`` says what to run.

    ``build`` allows (re)building the initramfs from cached inputs (cheap, offline).
    """
    qemu = qemu_binary()
    if qemu is None:
        raise AssetsMissing(
            "qemu-system-x86_64 is not installed: run 'python -m tools.qemu_e2e setup' (root) "
            "or apt-get install qemu-system-x86"
        )
    kver = _current_kver(cache)
    kdir = cache / "kernel" / (kver or "?")
    vmlinuz = kdir / "boot" / f"vmlinuz-{kver}"
    modules_dir = kdir / "lib" / "modules" / (kver or "?")
    if kver is None or not vmlinuz.is_file() or not modules_dir.is_dir():
        raise AssetsMissing(
            f"no cached guest kernel under {cache / 'kernel'}: run 'python -m tools.qemu_e2e "
            "setup' (root; downloads linux-image-amd64's .deb with apt-get download)"
        )
    busybox = busybox_binary()
    if busybox is None:
        raise AssetsMissing("busybox-static is not installed: apt-get install busybox-static")
    order = module_order(modules_dir, GUEST_MODULES)
    out = cache / "initramfs"
    if not build:
        raise AssetsMissing("initramfs not built")
    initramfs = build_initramfs(out, Path(busybox), order, {}, f"initramfs-{kver}")
    rebuilt = noiommu_modules(cache, kver)
    initramfs_noiommu = None
    if rebuilt is not None:
        order_n = module_order(modules_dir, (*GUEST_MODULES, "vfio_virqfd"))
        initramfs_noiommu = build_initramfs(
            out, Path(busybox), order_n, rebuilt, f"initramfs-noiommu-{kver}"
        )
    return Assets(qemu, kver, vmlinuz, modules_dir, initramfs, initramfs_noiommu, kvm_usable())


def fetch_kernel(cache: Path = CACHE) -> str:
    """Download the running release's kernel image .deb and unpack it into the cache."""
    package = kernel_package()
    kver = package.removeprefix("linux-image-")
    kdir = cache / "kernel" / kver
    if not (kdir / "boot" / f"vmlinuz-{kver}").is_file():
        deb = apt_download(package, cache / "debs")
        tmp = kdir.with_name(kver + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(deb), str(tmp)])
        shutil.rmtree(kdir, ignore_errors=True)
        tmp.rename(kdir)
    (cache / "kernel" / "current").write_text(kver + "\n")
    return kver

"""No-IOMMU mode: rebuild drivers/vfio with CONFIG_VFIO_NOIOMMU=y for the cached kernel.

Debian bookworm's kernel is built without ``CONFIG_VFIO_NOIOMMU`` (docs/vfio.md §10), so
``/sys/module/vfio/parameters/enable_unsafe_noiommu_mode`` does not exist and a guest without
a vIOMMU cannot use VFIO. The fix without rebuilding the kernel: build the five modules of
drivers/vfio out of tree (``make -C headers M=...``) from Debian's own ``linux-source-6.1``,
against ``linux-headers-KVER`` of exactly the unpacked image's version, with the option on.
Everything else in the guest stays Debian's. The modules are unsigned (the kernel loads them
and taints itself, as no-IOMMU mode does anyway).

Cost here: ``linux-source-6.1`` is a 139 MB .deb; only ``drivers/vfio`` is taken out of its
tarball. The headers pull ``linux-kbuild-6.1`` and gcc-12 through apt.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .assets import VFIO_MODULES, AssetsMissing, _modname, _run, apt_download, apt_install, log

_SKIPPED_TOP = ("VFIO_MDEV", "VFIO_PLATFORM", "VFIO_FSL_MC", "VFIO_CDX", "VFIO_SPAPR_EEH",
                "VFIO_IOMMU_SPAPR_TCE")  # fmt: skip
_SKIPPED_PCI = ("MLX5_VFIO_PCI", "HISI_ACC_VFIO_PCI", "PDS_VFIO_PCI", "VIRTIO_VFIO_PCI")


def _drop_objs(makefile: Path, options: tuple[str, ...]) -> None:
    """Remove the ``obj-$(CONFIG_X) += ...`` lines of the options the guest does not load."""
    pattern = r"^obj-\$\(CONFIG_(" + "|".join(options) + r")\).*$"
    makefile.write_text(re.sub(pattern, "", makefile.read_text(), flags=re.M))


def _image_version(cache: Path, kver: str) -> str:
    for deb in (cache / "debs").glob(f"linux-image-{kver}_*.deb"):
        return subprocess.run(
            ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
        ).stdout.strip()
    raise AssetsMissing(f"the linux-image-{kver} .deb is not in {cache / 'debs'}: run setup")


def build_noiommu_vfio(cache: Path, kver: str, jobs: int | None = None) -> Path:
    """Build and cache ``noiommu/KVER/*.ko``; returns that directory."""
    t0 = time.monotonic()
    version = _image_version(cache, kver)
    series = re.match(r"(\d+\.\d+)", kver)
    if series is None:
        raise AssetsMissing(f"cannot tell the kernel series of {kver}")
    headers_pkg, source_pkg = f"linux-headers-{kver}", f"linux-source-{series.group(1)}"
    apt_install([headers_pkg, "make", "gcc", "libc6-dev", "xz-utils"])
    headers = Path("/usr/src") / headers_pkg
    if not (headers / "Makefile").is_file():
        raise AssetsMissing(f"{headers_pkg} is installed but {headers}/Makefile is missing")
    src_deb = apt_download(source_pkg, cache / "debs")
    src_version = subprocess.run(
        ["dpkg-deb", "-f", str(src_deb), "Version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if src_version != version:
        raise AssetsMissing(
            f"{source_pkg} is {src_version} but the guest kernel {kver} is {version}: the "
            f"modules would not match; run setup again after apt-get update"
        )
    out = cache / "noiommu" / kver
    with tempfile.TemporaryDirectory(prefix="qemu-e2e-vfio-") as tmp:
        work = Path(tmp)
        tarball = f"./usr/src/{source_pkg}.tar.xz"
        log(f"extracting drivers/vfio from {src_deb.name}")
        deb = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(src_deb)], stdout=subprocess.PIPE)
        try:
            subprocess.run(["tar", "-x", "-C", tmp, tarball], stdin=deb.stdout, check=True)
        finally:
            if deb.stdout is not None:
                deb.stdout.close()
            deb.wait()
        _run([
            "tar", "-xJf", str(work / tarball), "-C", tmp, "--wildcards",
            f"{source_pkg}/drivers/vfio/*",
        ])  # fmt: skip
        src = work / source_pkg / "drivers" / "vfio"
        # only what the guest loads: the core, type1, virqfd and vfio-pci
        for sub in ("mdev", "platform", "fsl-mc", "cdx"):
            shutil.rmtree(src / sub, ignore_errors=True)
        _drop_objs(src / "Makefile", _SKIPPED_TOP)
        _drop_objs(src / "pci" / "Makefile", _SKIPPED_PCI)
        cmd = [
            "make", "-C", str(headers), f"M={src}", f"-j{jobs or os.cpu_count() or 1}",
            "CONFIG_VFIO_NOIOMMU=y", "KCFLAGS=-DCONFIG_VFIO_NOIOMMU=1", "modules",
        ]  # fmt: skip
        _run(cmd, timeout=1800)
        built = {_modname(str(p)): p for p in src.rglob("*.ko")}
        missing = [m for m in VFIO_MODULES if m not in built]
        if missing:
            raise AssetsMissing(f"the vfio build made no {missing}: {sorted(built)}")
        tmp_out = out.with_name(kver + ".tmp")
        shutil.rmtree(tmp_out, ignore_errors=True)
        tmp_out.mkdir(parents=True)
        for name in VFIO_MODULES:
            dest = tmp_out / built[name].name
            shutil.copy2(built[name], dest)
            if shutil.which("strip"):  # as Debian ships them: no debug info
                _run(["strip", "--strip-debug", str(dest)])
        shutil.rmtree(out, ignore_errors=True)
        tmp_out.rename(out)
    log(f"no-IOMMU vfio modules built in {time.monotonic() - t0:.0f} s: {out}")
    return out

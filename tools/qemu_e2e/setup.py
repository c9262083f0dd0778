"""``python -m tools.qemu_e2e setup``: install and build whatever the guests need.

The one module that knows both the assets (kernel, initramfs, host packages) and the
no-IOMMU vfio.ko rebuild, so neither of those imports the other.
"""

from __future__ import annotations

import time
from pathlib import Path

from .assets import (
    CACHE,
    HOST_PACKAGES,
    Assets,
    AssetsMissing,
    _current_kver,
    apt_install,
    fetch_kernel,
    find_assets,
    log,
    noiommu_modules,
)
from .noiommu import build_noiommu_vfio


def setup(cache: Path = CACHE, *, noiommu: bool = False) -> Assets:
    """Install and build whatever is missing; return the assets. Needs root for apt."""
    t0 = time.monotonic()
    apt_install(HOST_PACKAGES)
    kver = _current_kver(cache)
    try:
        find_assets(cache)
    except AssetsMissing:
        kver = fetch_kernel(cache)
    if noiommu and kver and noiommu_modules(cache, kver) is None:
        build_noiommu_vfio(cache, kver)
    assets = find_assets(cache)
    log(f"assets ready in {time.monotonic() - t0:.1f} s: kernel {assets.kver}, {assets.accel}")
    return assets

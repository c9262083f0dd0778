"""Boot real QEMU guests with an ivshmem device and run the project inside them (issue 7).

    python -m tools.qemu_e2e setup            # apt packages, kernel .deb, initramfs (cached)
    python -m tools.qemu_e2e smoke            # one guest: import ivshmem_bus over the 9p root
    python -m tools.qemu_e2e run -- CMD_A -- CMD_B   # two guests + the project's server

Layers, one file each:

``assets``   what the guests need, fetched with apt and cached under ``.cache/qemu-e2e/``:
             the Debian kernel (``dpkg-deb -x``), the modules the init loads, the initramfs,
             and for no-IOMMU mode a rebuilt ``vfio.ko``;
``machine``  QEMU processes: a ``Guest`` boots the initramfs, mounts the host's root read-only
             over virtio-9p under a tmpfs overlay (the host's Python and this checkout, at the
             same paths), and runs commands it finds in its writable results share;
             ``Cluster`` starts the project's ``ivshmem-bus server`` and the guests, in order,
             and stops everything it started.

Nothing here imports ``ivshmem_bus``: the harness drives it only from the outside (its CLI on
the host, its code inside the guests), so a broken library cannot break the harness.
"""

from .assets import Assets, AssetsMissing, find_assets
from .machine import Cluster, Guest, GuestError, GuestTimeout, Job, Result, ServerProcess
from .setup import setup

__all__ = [
    "Assets",
    "AssetsMissing",
    "Cluster",
    "Guest",
    "GuestError",
    "GuestTimeout",
    "Job",
    "Result",
    "ServerProcess",
    "find_assets",
    "setup",
]

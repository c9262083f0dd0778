"""Opening an ivshmem device: ``open_backend()`` is the one place a backend is chosen.

``server=PATH`` joins an ivshmem server as QEMU's ivshmem-doorbell device does; ``device=BDF``
opens a VFIO-bound PCI function inside a guest; ``fake=DIR`` joins a private fake fabric
(``fabric.py``: a server it starts if needed), which is also the command line's default where no
ivshmem hardware is present; ``linux_user=SOCKET`` is one end of QEMU's linux-user bus (queue
files and a socket doorbell, ``linux_user.py``), listening with ``listen=True``. Every backend
is an ``IvshmemDevice`` (``base.py``); the layers above know only that class.
"""

from __future__ import annotations

from typing import Any

from .base import IvshmemDevice

__all__ = ["IvshmemDevice", "open_backend"]


def open_backend(
    *,
    server: str | None = None,
    device: str | None = None,
    fake: str | None = None,
    linux_user: str | None = None,
    vectors: int = 1,
    timeout: float = 5.0,
    listen: bool = False,
    bus_name: str | None = None,
    queue_dir: str | None = None,
    mem: str | None = None,
    mem_offset: int | None = None,
    **vfio_options: Any,
) -> IvshmemDevice:
    """Open the device named by exactly one of ``server``, ``device``, ``fake`` or
    ``linux_user``.

    ``listen``, ``bus_name``, ``queue_dir``, ``mem`` and ``mem_offset`` are the linux-user
    bus's (``LinuxUserDevice``; None: its defaults). ``vfio_options`` go to the VFIO backend
    (``sysfs=``, ``dev=`` roots, ``ioctl=`` for tests).
    """
    if sum(x is not None for x in (server, device, fake, linux_user)) != 1:
        raise ValueError(
            "name exactly one backend: --server PATH, --device BDF, --fake DIR or "
            "--linux-user SOCKET"
        )
    if linux_user is not None:
        from .linux_user import DEFAULT_BUS_NAME, DEFAULT_MEM_OFFSET, LinuxUserDevice

        return LinuxUserDevice(
            linux_user,
            listen=listen,
            bus_name=DEFAULT_BUS_NAME if bus_name is None else bus_name,
            queue_dir="." if queue_dir is None else queue_dir,
            mem=mem,
            mem_offset=DEFAULT_MEM_OFFSET if mem_offset is None else mem_offset,
            timeout=timeout,
        )
    if fake is not None:
        from .fabric import FAKE_VECTORS, fake_socket
        from .server_client import ServerClientDevice

        return ServerClientDevice(fake_socket(fake), vectors=FAKE_VECTORS, timeout=timeout)
    if server is not None:
        from .server_client import ServerClientDevice

        return ServerClientDevice(server, vectors=vectors, timeout=timeout)
    # Imported only when asked for: the fake and server backends never load the VFIO edge.
    from .vfio.device import open_device

    assert device is not None
    return open_device(device, **vfio_options)

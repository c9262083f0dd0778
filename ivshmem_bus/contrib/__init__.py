"""Drop-ins for QEMU's contrib tools: ``ivshmem-server`` and ``ivshmem-client``.

QEMU builds ``contrib/ivshmem-server`` and ``contrib/ivshmem-client`` but does not install
them, so most distributions do not ship them, yet tutorials and scripts call them by name.
These console scripts take the same options, defaults and commands (QEMU 10.0), built on
``ivshmem_bus.server.IvshmemServer`` and ``ServerClientDevice``; where they differ from
QEMU's the README's "Drop-in for QEMU's contrib tools" section says so.
"""

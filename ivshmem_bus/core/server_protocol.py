"""The ivshmem server protocol's fixed numbers, shared by the server and its clients.

Both ends of the socket (``server.py`` and ``backends/server_client.py``) take them from
here, so they cannot drift apart. Every server-to-client message is one little-endian int64,
optionally with one fd (SCM_RIGHTS); peer ids are the Doorbell's (``regs.MAX_PEER``).
"""

from __future__ import annotations

from typing import Final

__all__ = ["MAX_VECTORS", "PROTOCOL_VERSION"]

PROTOCOL_VERSION: Final = 0  # the first message of every connection (QEMU IVSHMEM_PROTOCOL_VERSION)
MAX_VECTORS: Final = 64  # eventfds per peer: QEMU's IVSHMEM_SERVER_MAX_VECTORS

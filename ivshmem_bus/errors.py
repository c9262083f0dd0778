"""The whole exception tree of ivshmem_bus, in one place.

Two families, after h11 and trio: the peer's fault (bad bytes in shared memory, a message
that cannot be decoded) and the system's fault (VFIO, sysfs, the server socket). A caller's
own mistake (a bad argument) is a plain ``ValueError`` or ``TypeError`` raised at once, so
a program can always tell its own bug from the peer's.

Every message names the object, what was being done, and, where there is one, the fix.
"""

from __future__ import annotations

__all__ = ["IvshmemBusError", "ProtocolError", "QueueCorrupt"]


class IvshmemBusError(Exception):
    """Base class of every error this package raises on purpose."""


class QueueCorrupt(IvshmemBusError):
    """A queue index read from shared memory is out of range.

    The peer (another VM) owns the other index; it may be buggy or hostile. The queue never
    indexes with such a value. Resetting both queues (the side that owns reset) clears it.

    Attributes:
        index: ``"head"`` or ``"tail"``.
        value: the value read from shared memory.
        capacity: the queue's capacity (valid values are ``0 .. capacity - 1``).
    """

    def __init__(self, index: str, value: int, capacity: int) -> None:
        self.index = index
        self.value = value
        self.capacity = capacity
        super().__init__(
            f"queue {index} index {value} read from shared memory is out of range "
            f"(capacity {capacity}, valid 0..{capacity - 1}): the peer wrote a corrupt index; "
            f"reset the queues to recover"
        )


class ProtocolError(IvshmemBusError):
    """Bytes received from the peer are not a well-formed virtio-msg message.

    Attributes:
        msg_id: the message id from the header, or ``None`` when not even a header was there.
        reason: one sentence saying what was wrong.
    """

    def __init__(self, msg_id: int | None, reason: str) -> None:
        self.msg_id = msg_id
        self.reason = reason
        where = "message" if msg_id is None else f"message 0x{msg_id:02x}"
        super().__init__(f"malformed virtio-msg {where}: {reason}")


class BusError(IvshmemBusError):
    """The virtio-msg bus could not do what was asked (the link, not the bytes, failed)."""


class BusTimeout(BusError, TimeoutError):
    """A request got no response, or the peer did not drain a full queue, in time."""


class BusClosed(BusError):
    """The bus was used after ``close()``."""


class ServerClientError(IvshmemBusError):
    """The ivshmem server could not be reached, or spoke something other than its protocol."""

"""The whole exception tree of ivshmem_bus, in one place.

Two families, after h11 and trio: the peer's fault (bad bytes in shared memory, a message
that cannot be decoded) and the system's fault (VFIO, sysfs, the server socket). A caller's
own mistake (a bad argument) is a plain ``ValueError`` or ``TypeError`` raised at once, so
a program can always tell its own bug from the peer's.

Every message names the object, what was being done, and, where there is one, the fix.
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "BarTooSmall",
    "BusClosed",
    "BusError",
    "BusTimeout",
    "DeviceNotFound",
    "DriverError",
    "HubDeviceError",
    "IvshmemBusError",
    "LinuxUserError",
    "MemoryFileError",
    "MonitorError",
    "PciError",
    "PoolExhausted",
    "ProtocolError",
    "QueueClaimed",
    "QueueCorrupt",
    "QueueFull",
    "RemoteVmidError",
    "ServerClientError",
    "ServerClosedError",
    "ServerError",
    "VfioError",
    "VirtqueueError",
    "WindowError",
]


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


class DriverError(IvshmemBusError, RuntimeError):
    """The remote virtio device refused a step of the driver's setup (a queue, features) or
    stopped delivering (no used buffers in time, an exhausted entropy source)."""


class HubDeviceError(IvshmemBusError, ValueError):
    """A device the hub cannot put on its bus (``devices.hub.DeviceHub``): a dev_id outside
    0..31, a dev_id served already, or a device whose DEVICE_INFO device_id is 0, which the
    Linux driver reads as "no device". A ``ValueError`` too: it is the caller's argument.

    Attributes:
        dev_id: the dev_id asked for.
    """

    def __init__(self, dev_id: object, message: str) -> None:
        self.dev_id = dev_id
        super().__init__(message)

    def __reduce__(self) -> tuple[type[HubDeviceError], tuple[object, str]]:
        return (type(self), (self.dev_id, str(self)))


class RemoteVmidError(IvshmemBusError):
    """``--remote-vmid auto`` found no peer, or several (the message lists them)."""


class DeviceVmidError(IvshmemBusError):
    """The device side is not VMID 0, which the Linux virtio-msg driver hard-codes as the
    device (``serve --profile linux-v0``)."""


class QueueClaimed(IvshmemBusError):
    """Another live peer already produces on the queue this end would (``ownership``): one
    fabric carries one driver and one device. The message names that peer."""


class BarTooSmall(IvshmemBusError):
    """BAR2 cannot hold the bus's two 4 KiB queues (a failed operation, not bad usage)."""


class MonitorError(IvshmemBusError):
    """``monitor`` cannot tap the link: the shared memory or the pcap file (named, with the fix)."""


class LinuxUserError(IvshmemBusError):
    """A linux-user bus end could not open: its queue files (missing, stale, wrong size) or
    its chardev socket (missing, nobody listening, in use). The message names the fix.

    Attributes:
        path: the file or socket concerned.
    """

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(message)


class ServerClientError(IvshmemBusError):
    """The ivshmem server could not be reached, or spoke something other than its protocol."""


class ServerClosedError(ServerClientError):
    """The ivshmem server closed the connection (EOF): the fabric is gone."""


class VfioError(IvshmemBusError, OSError):
    """A VFIO system call (ioctl, open, mmap of a device node) failed; ``errno`` is kept.

    Also an ``OSError``, so code that already handles ``OSError`` keeps working and
    ``errno``/``strerror`` are where callers look for them (python-periphery's rule).
    ``str()`` is one sentence: what was being done on which object, the errno's name, and the
    fix when one is known, e.g. ``"VFIO_DEVICE_GET_REGION_INFO on /dev/vfio/7: EINVAL
    (Invalid argument)"``.

    Attributes:
        errno: the errno value.
        strerror: ``os.strerror(errno)``.
        what: the operation and the object, as given by the caller.
        fix: what to do about it, or ``None``.
    """

    errno: int  # always set: a VFIO failure has an errno (OSError allows None)

    def __init__(self, errno: int, what: str, fix: str | None = None) -> None:
        strerror = os.strerror(errno)
        OSError.__init__(self, errno, strerror)
        self.what = what
        self.fix = fix
        name = _errno.errorcode.get(errno, f"errno {errno}")
        self._message = f"{what}: {name} ({strerror})" + (f"; {fix}" if fix else "")

    def __str__(self) -> str:
        return self._message

    def __reduce__(self) -> tuple[type[VfioError], tuple[int, str, str | None]]:
        # OSError pickles as (errno, strerror), which would lose ``what``; keep all three.
        return (type(self), (self.errno, self.what, self.fix))


class PciError(IvshmemBusError, OSError):
    """A PCI function could not be read, bound or unbound through sysfs.

    Also an ``OSError``, as ``VfioError`` is: both keep ``errno`` (and ``strerror``) where
    callers look for them, and code that handles ``OSError`` around device access keeps
    working. ``str()`` is the message alone, never ``[Errno n]``.

    Attributes:
        errno: the OS errno when a system call failed, else ``None``.
        strerror: ``os.strerror(errno)``, or ``None``.
        path: the sysfs (or /dev) file involved, else ``None``.
    """

    def __init__(self, message: str, *, errno: int | None = None, path: str | None = None) -> None:
        OSError.__init__(self, message)  # one argument: OSError leaves errno unset, args as given
        self.errno = errno
        self.strerror = None if errno is None else os.strerror(errno)
        self.path = path

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self) -> tuple[object, ...]:
        # OSError pickles args and __dict__, not its errno/strerror slots; keep them too.
        state = {**self.__dict__, "errno": self.errno, "strerror": self.strerror}
        return (_rebuild, (type(self), self.args, state))


def _rebuild(cls: type[PciError], args: tuple[object, ...], state: dict[str, object]) -> PciError:
    """Unpickle a ``PciError`` (or a subclass, whose ``__init__`` takes other arguments)."""
    exc = cls.__new__(cls)
    exc.args = args
    for name, value in state.items():
        setattr(exc, name, value)
    return exc


class DeviceNotFound(PciError):
    """No PCI function at that address (pyudev's DeviceNotFoundAtPathError, for PCI).

    Attributes:
        bdf: the address that was looked up.
    """

    def __init__(self, bdf: str, devices_dir: str = "/sys/bus/pci/devices") -> None:
        self.bdf = bdf
        super().__init__(
            f"no PCI device {bdf} in {devices_dir}: check the address with `lspci -D`",
            path=f"{devices_dir}/{bdf}",
        )


class ServerError(IvshmemBusError):
    """The ivshmem server could not start or keep running (socket path, shared memory, OS).

    Attributes:
        path: the socket or shared-memory path concerned, or ``None``.
        errno: the OS error number, or ``None`` when the OS did not fail.
    """

    def __init__(self, message: str, *, path: str | None = None, errno: int | None = None):
        self.path = path
        self.errno = errno
        super().__init__(message)


class WindowError(IvshmemBusError, IndexError):
    """An address range the peer named lies (partly) outside a memory window.

    The peer (another VM) writes every address and length of a virtqueue: they are never
    clamped into other memory, only refused. Also an ``IndexError`` (the range is out of
    bounds).

    Attributes:
        window: the window's name.
        addr: the first driver address of the range.
        length: its length in bytes.
    """

    def __init__(self, window: str, addr: int, length: int, reason: str = "") -> None:
        self.window = window
        self.addr = addr
        self.length = length
        super().__init__(
            f"{window}: {length} byte(s) at address 0x{addr:x} "
            + (reason or "lie outside the window")
        )


class VirtqueueError(IvshmemBusError):
    """A virtqueue's shared rings or descriptors are malformed (the peer's fault).

    The queue that raised it is broken: a device marks itself DEVICE_NEEDS_RESET and keeps
    serving its other queues and the bus.

    Attributes:
        queue: the virtqueue index, or ``None`` when not known.
        reason: one sentence saying what was wrong.
    """

    def __init__(self, queue: int | None, reason: str) -> None:
        self.queue = queue
        self.reason = reason
        where = "virtqueue" if queue is None else f"virtqueue {queue}"
        super().__init__(f"{where}: {reason}")


class MemoryFileError(IvshmemBusError, OSError):
    """A shared memory file (QEMU's memory-backend-file, a RAM file) cannot be a window.

    Also an ``OSError`` with ``errno`` (``None`` when the OS did not fail: an empty file).
    ``str()`` is one sentence naming the file, what is wrong and the fix.

    Attributes:
        path: the file.
    """

    def __init__(self, path: str, message: str, *, errno: int | None = None) -> None:
        self.path = path
        OSError.__init__(self, errno, message)
        self._message = message

    def __str__(self) -> str:
        return self._message

    def __reduce__(self) -> tuple[type[MemoryFileError], tuple[str, str], dict[str, object]]:
        return (type(self), (self.path, self._message), {"errno": self.errno})


class PoolExhausted(IvshmemBusError, MemoryError):
    """The driver's pool in BAR2 has no free range that fits an allocation.

    The pool is this driver's own memory (no peer involved): free buffers or queues, or give
    the ivshmem device a larger BAR2.

    Attributes:
        size: the bytes asked for.
        align: the alignment asked for.
        largest: the largest free extent at the time, in bytes.
    """

    def __init__(self, pool: str, size: int, align: int, largest: int) -> None:
        self.size = size
        self.align = align
        self.largest = largest
        super().__init__(
            f"{pool}: no room for {size} byte(s) aligned to {align} (largest free extent "
            f"{largest} bytes): free buffers or queues, or give ivshmem a larger BAR2 "
            f"(QEMU size=, ivshmem-bus server -l)"
        )


class QueueFull(VirtqueueError):
    """A driver's virtqueue has too few free descriptors for the chain asked for.

    Not the peer's fault and the queue is *not* broken (a ``VirtqueueError`` subclass only so
    that one ``except VirtqueueError`` covers every refusal of ``DriverQueue.add``): reap used
    buffers, then add again.

    Attributes:
        needed: descriptors the chain needs.
        free: descriptors free now.
    """

    def __init__(self, queue: int | None, needed: int, free: int) -> None:
        self.needed = needed
        self.free = free
        super().__init__(
            queue,
            f"queue full: the chain needs {needed} descriptor(s), {free} free; "
            f"reap used buffers (or use an indirect table) and add again",
        )

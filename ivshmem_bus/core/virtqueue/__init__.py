"""Split virtqueues (virtio 1.x, section 2.7), both roles, over a ``MemoryWindow``; sans-I/O.

- ``layout``: the areas, their offsets and sizes, the spec's constants, ``vring_need_event``;
- ``chain``: ``Chain``, one popped chain's buffers as views into the window;
- ``device``: ``DeviceQueue`` pops hostile chains as zero-copy views, pushes and publishes;
- ``driver``: ``DriverQueue`` adds chains, publishes, reaps a hostile used ring.

Nothing here does I/O: the transport turns ``publish()``'s "notify" answers into EVENT_AVAIL /
EVENT_USED messages, and the window's ``fence()`` is the only barrier used.
"""

from .chain import Chain
from .device import MAX_INDIRECT, DeviceQueue
from .driver import DriverQueue
from .layout import (
    MAX_QUEUE_SIZE,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    VirtqLayout,
    vring_need_event,
)

__all__ = [
    "MAX_INDIRECT",
    "MAX_QUEUE_SIZE",
    "VIRTIO_F_EVENT_IDX",
    "VIRTIO_F_INDIRECT_DESC",
    "VIRTIO_F_VERSION_1",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_USED_F_NO_NOTIFY",
    "Chain",
    "DeviceQueue",
    "DriverQueue",
    "VirtqLayout",
    "vring_need_event",
]

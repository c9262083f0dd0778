"""Issue 15 (6b): the device in guest a walks virtqueues that live in guest b's RAM.

Guest b's RAM is a shared ``memory-backend-file``; guest a gets an ivshmem-plain function
over that file (``PEER_RAM_BDF``), so the Python console device in a serves with
``--mem PEER_RAM_BDF --mem-offset 0`` (x86 q35 with RAM <= 2 GiB: guest-physical address =
file offset), as it would for a Linux or QEMU driver in b. The bus (requests, EVENT_AVAIL,
EVENT_USED) stays on the ivshmem-doorbell functions over VFIO and MSI-X.

The driver in b is the project's Python ``ConsoleDriver``, and a userspace program has no
way to learn guest-physical addresses of memory it allocates (no pagemap PFNs without
CAP_SYS_ADMIN games, no pinned DMA memory without a device). So b gets a second
ivshmem-plain function over *its own* RAM file: BAR2 offset A of that function is b's
guest-physical address A. b's kernel is booted with ``mem=768M``, so RAM from 768 MiB up is
never the kernel's; the driver allocates its queues and buffers there (``PEER_RAM_REGION``)
and sends those addresses, which are real guest-physical addresses of b: the layout a
Linux driver in b would produce, read by the device through the peer-RAM window.

One pair of guests for the file (module fixture), booted in vIOMMU mode, when the modes asked
for (``IVSHMEM_E2E_MODES``) include viommu.
"""

from __future__ import annotations

import mmap
import secrets
import time

import pytest

from tests.e2e import guest_tool
from tests.e2e.conftest import TIMINGS, peer_ram_cluster
from tests.e2e.test_qemu import BDF, CLI, TOOL, run_json, spawned
from tools.qemu_e2e.machine import PEER_RAM_BDF, PEER_RAM_REGION, Cluster

MODE = "viommu+peer-ram"
CONSOLE_BYTES = 64 << 10


@pytest.fixture(scope="module")
def peer_cluster():
    with peer_ram_cluster(MODE) as c:
        yield c


def test_console_bytes_both_ways_through_queues_in_b_ram(peer_cluster: Cluster):
    c = peer_cluster
    t0 = time.monotonic()
    va, vb = c.vmids["a"], c.vmids["b"]
    token = secrets.token_hex(8)
    a2b = guest_tool.payload(token, "a2b", CONSOLE_BYTES)
    b2a = guest_tool.payload(token, "b2a", CONSOLE_BYTES)
    console_in = c["a"].results / "console.in"
    console_out = c["a"].results / "console.out"
    console_in.write_bytes(a2b)
    start, length = PEER_RAM_REGION
    serve = (
        f"{CLI} serve --device {BDF} --remote-vmid {vb} --device-type console "
        f"--mem {PEER_RAM_BDF} --mem-offset 0 < {console_in} > {console_out}"
    )
    with spawned(c["a"], serve, "serving virtio", stream=1) as job:
        t1 = time.monotonic()
        driver = run_json(
            c["b"],
            f"{TOOL} console-own-ram {BDF} --remote {va} --ram {PEER_RAM_BDF} "
            f"--region 0x{start:x} --region-len 0x{length:x} --token {token} "
            f"--size {CONSOLE_BYTES}",
            300,
        )
        driver_s = time.monotonic() - t1
    served = job.wait(60).check()
    assert driver["addresses_in_region"], driver  # queues and buffers: b's RAM, above mem=
    assert driver["window"].startswith(f"ivshmem-plain {PEER_RAM_BDF} BAR2 (vfio"), driver
    assert driver["sent"] == CONSOLE_BYTES and driver["received"] == CONSOLE_BYTES, driver
    assert driver["received_ok"], driver  # a's stdin, in order, in b
    assert console_out.read_bytes() == b2a, served.stderr[-2000:]  # b's bytes on a's stdout
    # The bytes really went through b's RAM: the last transmit chunk is still in a buffer
    # there (offset = guest-physical address), seen from the host in the RAM file.
    with open(c.peer_ram_path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as ram:
        assert ram.find(b2a[-4096:], start, start + length) >= start
    rec = TIMINGS.setdefault(MODE, {})
    rec["console_64KiB_each_way_driver_s"] = round(driver_s, 2)
    rec["console_driver_reported_s"] = driver["total_s"]
    rec[test_console_bytes_both_ways_through_queues_in_b_ram.__name__] = round(
        time.monotonic() - t0, 2
    )

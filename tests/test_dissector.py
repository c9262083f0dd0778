"""tools/virtio-msg.lua in real tshark, on a capture written by the monitor's PcapWriter."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ivshmem_bus.backends.fake import fake_pair
from ivshmem_bus.bus import VirtioMsgBus
from ivshmem_bus.core import protocol as p
from ivshmem_bus.monitor import LinkTap, PcapWriter

LUA = Path(__file__).resolve().parent.parent / "tools" / "virtio-msg.lua"

pytestmark = pytest.mark.skipif(
    shutil.which("tshark") is None, reason="tshark not installed (Debian package tshark)"
)


@pytest.mark.parametrize("profile", p.PROFILES)
def test_tshark_decodes_the_monitor_capture(tmp_path, profile):
    a, b = fake_pair(shm_size=16384)
    drv = VirtioMsgBus(a, "driver", 2, profile, reset_queues=True)
    dev = VirtioMsgBus(b, "device", 1, profile)
    tap = LinkTap(a.shmem.toreadonly(), profile)
    token = 3 if profile == "spec-v1" else 0
    drv.send(p.GetVqueue(index=1, token=token))
    dev.send(p.GetVqueueResponse(1, 1024, token=token))
    dev.send(p.EventUsed(index=2))
    capture = tmp_path / "cap.pcap"
    with capture.open("wb") as f:
        writer = PcapWriter(f)
        for seen in tap.poll():
            writer.write(seen, profile)
    for obj in (tap, drv, dev, a, b):
        (obj.release if hasattr(obj, "release") else obj.close)()
    out = subprocess.run(
        ["tshark", "-r", str(capture), "-X", f"lua_script:{LUA}", "-T", "fields",
         "-e", "virtio_msg.direction", "-e", "virtio_msg.msg_id", "-e", "virtio_msg.token",
         "-e", "virtio_msg.msg_size", "-e", "_ws.col.Info"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    rows = [line.split("\t") for line in out.stdout.splitlines()]
    spec = profile == "spec-v1"  # 8-byte header with a token; qemu-v0 and linux-v0 have 6
    vq_resp_size = 48 if spec else 42
    expected_token = "3" if spec else ""
    assert rows == [
        ["0", "0x09", expected_token, "12" if spec else "10", "driver->device GET_VQUEUE"],
        ["1", "0x09", expected_token, str(vq_resp_size), "device->driver GET_VQUEUE response"],
        ["1", "0x42", "0" if spec else "", "12" if spec else "10", "device->driver EVENT_USED"],
    ]  # fmt: skip

"""The linux-user backend against real QEMU: its ``x-virtio-msg`` machine with its own C
virtio-rng device, on the command line of linux-user-bus.md.

Debian ships no QEMU with the virtio-msg devices, so these run only when
``VIRTIO_MSG_QEMU`` names such a binary (a build of QEMU's edgar/virtio-msg branch, e.g.
``VIRTIO_MSG_QEMU=~/qemu/build/qemu-system-x86_64``); otherwise they are skipped with that
reason. The QEMU-like peer (``linux_user_peer.py``) covers the same paths in every run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QEMU = os.environ.get("VIRTIO_MSG_QEMU")

pytestmark = pytest.mark.skipif(
    not QEMU,
    reason="VIRTIO_MSG_QEMU is unset: name a QEMU built with the virtio-msg devices "
    "(edgar/virtio-msg branch) to run these against real QEMU",
)


def qemu_command(qemu: str, workdir: Path, ram: Path) -> list[str]:
    """The contract's backend machine: QEMU's virtio-rng behind a linux-user bus."""
    return [
        qemu, "-M", "x-virtio-msg", "-display", "none", "-monitor", "none", "-serial", "none",
        "-object", f"memory-backend-file,id=mem,size=16M,mem-path={ram},share=on",
        "-chardev", f"socket,id=chr0,path={workdir / 'vmsg.sock'},server=on,wait=off",
        "-device", "virtio-msg-bus-linux-user,name=linux-user,chardev=chr0,memdev=mem,"
        "mem-offset=0x40000000",
        "-device", "virtio-rng-device,iommu_platform=on",
    ]  # fmt: skip


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ivshmem_bus", *args],
        capture_output=True, text=True, timeout=60, cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


@pytest.fixture
def qemu_rng(tmp_path: Path) -> Iterator[Path]:
    """QEMU's backend machine running in tmp_path (its queue files and socket there)."""
    assert QEMU is not None
    ram = tmp_path / "vm-ram"
    with ram.open("wb") as f:
        f.truncate(16 << 20)
    log = (tmp_path / "qemu.log").open("w")
    proc = subprocess.Popen(
        qemu_command(QEMU, tmp_path, ram), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 20
        needed = [tmp_path / n for n in ("vmsg.sock", "queue-linux-user-driver",
                                         "queue-linux-user-device")]  # fmt: skip
        while not all(p.exists() for p in needed):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.close()
                pytest.fail(f"QEMU did not start: {(tmp_path / 'qemu.log').read_text()}")
            time.sleep(0.05)
        yield tmp_path
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_probe_describes_qemus_virtio_rng(qemu_rng: Path) -> None:
    out = cli("probe", "--linux-user", "vmsg.sock", "--mem", "vm-ram", "--json", cwd=qemu_rng)
    assert out.returncode == 0, out.stderr + (qemu_rng / "qemu.log").read_text()
    got = json.loads(out.stdout)
    # the answers measured of that device (linux-user-bus.md)
    assert got["device_id"] == 4
    assert got["vendor_id"] == 0x554D4551
    assert got["num_feature_bits"] == 64
    assert got["config_size"] == 0
    assert [q["max_size"] for q in got["queues"]] == [1024]


def test_ping_round_trips_against_qemu(qemu_rng: Path) -> None:
    out = cli("ping", "-c", "5", "-i", "0.01", "--linux-user", "vmsg.sock", cwd=qemu_rng)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "5 requests sent, 5 replies received, 0% loss" in out.stdout


def test_rng_reads_a_mebibyte_of_qemus_entropy(qemu_rng: Path) -> None:
    if importlib.util.find_spec("ivshmem_bus.drivers") is None:
        pytest.skip("this tree has no rng command yet (the virtqueue data path)")
    out = subprocess.run(
        [sys.executable, "-m", "ivshmem_bus", "rng", "-n", "1M", "--linux-user", "vmsg.sock",
         "--mem", "vm-ram"],
        capture_output=True, timeout=120, cwd=qemu_rng,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr.decode() + (qemu_rng / "qemu.log").read_text()
    assert len(out.stdout) == 1 << 20
    # QEMU's virtio-rng reads the host's entropy: in a MiB every byte value shows up, and no
    # 4 KiB page of it is zeros (a buffer the device never filled)
    assert len(set(out.stdout)) == 256
    assert all(any(out.stdout[i : i + 4096]) for i in range(0, 1 << 20, 4096))

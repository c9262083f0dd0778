"""Entropy over the linux-user bus: the Python rng driver reads the QEMU-like device's known
byte stream through the RAM file, and ``serve --linux-user`` feeds the driver a file's bytes.

Every byte is checked: the QEMU-like peer fills buffers from ``entropy_stream`` (SHA-256 of
a seed and a counter), which the test recomputes independently of the project.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ivshmem_bus.backends.linux_user import LinuxUserDevice
from ivshmem_bus.bus import VirtioMsgBus
from ivshmem_bus.drivers import RngDriver, VirtioMsgDriver
from ivshmem_bus.memory import FileWindow

from .linux_user_peer import entropy_stream
from .test_linux_user import ROOT, Peer, cli, open_fds

RAM = 16 << 20


@pytest.fixture
def qemu_rng(tmp_path: Path) -> Iterator[Peer]:
    """The QEMU-like device with the driver's RAM file (16 MiB, mem-offset 0x40000000)."""
    with (tmp_path / "vm-ram").open("wb") as f:
        f.truncate(RAM)
    peer = Peer(tmp_path, "device", "--mem", "vm-ram")
    peer.wait_for("listening on")
    yield peer
    peer.stop()


def test_rng_command_reads_the_devices_stream_byte_for_byte(tmp_path: Path, qemu_rng: Peer) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ivshmem_bus", "rng", "-n", "1M", "--linux-user", "vmsg.sock",
         "--mem", "vm-ram"],
        capture_output=True, timeout=60, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert len(out.stdout) == 1 << 20
    assert out.stdout == entropy_stream(0, 1 << 20)


def test_rng_as_a_library_through_a_file_window(tmp_path: Path, qemu_rng: Peer) -> None:
    before = open_fds()
    with (
        LinuxUserDevice(str(tmp_path / "vmsg.sock"), queue_dir=tmp_path) as dev,
        VirtioMsgBus(dev, "driver", 0) as bus,
        FileWindow(tmp_path / "vm-ram", 0x40000000) as window,
    ):
        rng = RngDriver(VirtioMsgDriver(bus, timeout=5.0), window)
        try:
            first = rng.read_entropy(100_000)
            second = rng.read_entropy(5)
        finally:
            rng.close()
    assert first + second == entropy_stream(0, 100_005)
    # the device offers ACCESS_PLATFORM (iommu_platform=on) and refuses FEATURES_OK without it
    assert rng.driver.features == (1 << 32) | (1 << 33)
    assert open_fds() == before


def test_a_driver_that_leaves_out_access_platform_is_refused_features_ok(
    tmp_path: Path, qemu_rng: Peer
) -> None:
    from ivshmem_bus.core.virtio import FAILED, VIRTIO_F_VERSION_1
    from ivshmem_bus.errors import DriverError

    with (
        LinuxUserDevice(str(tmp_path / "vmsg.sock"), queue_dir=tmp_path) as dev,
        VirtioMsgBus(dev, "driver", 0) as bus,
    ):
        driver = VirtioMsgDriver(bus, timeout=5.0)
        with pytest.raises(DriverError) as err:
            driver.negotiate(VIRTIO_F_VERSION_1)
        assert str(err.value) == (
            "device refused features 0x100000000 of 0x300000000 offered (status "
            "ACKNOWLEDGE|DRIVER): it needs one the driver left out, or got one it does not offer"
        )
        assert driver.get_status() & FAILED  # the driver gave up on the device, as it must


def test_rng_on_the_linux_user_bus_needs_the_ram_file(tmp_path: Path, qemu_rng: Peer) -> None:
    out = cli("rng", "-n", "16", "--linux-user", "vmsg.sock", cwd=tmp_path)
    assert out.returncode == 2
    assert "name the RAM file the device maps with --mem FILE" in out.stderr
    assert out.stderr.count("\n") == 1


def test_serve_feeds_a_file_to_the_rng_driver_over_the_ram_file(tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(entropy_stream(0, 300_000, b"serve"))
    with (tmp_path / "vm-ram").open("wb") as f:
        f.truncate(RAM)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    serve = subprocess.Popen(
        [sys.executable, "-m", "ivshmem_bus", "serve", "--linux-user", "vmsg.sock",
         "--mem", "vm-ram", "--source", str(source)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    try:
        assert serve.stdout is not None
        line = serve.stdout.readline()
        while line and "serving virtio" not in line:
            line = serve.stdout.readline()
        assert "serving virtio rng" in line, line
        out = subprocess.run(
            [sys.executable, "-m", "ivshmem_bus", "rng", "-n", "300000", "--linux-user",
             "vmsg.sock", "--mem", "vm-ram"],
            capture_output=True, timeout=60, cwd=tmp_path, env=env,
        )  # fmt: skip
    finally:
        serve.send_signal(2)
        log, _ = serve.communicate(timeout=10)
    assert out.returncode == 0, out.stderr
    assert out.stdout == source.read_bytes()
    assert serve.returncode == 0, log

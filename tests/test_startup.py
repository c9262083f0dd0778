"""Issue 14, item 1: a driver that sends the instant it joins gets its first response within
QEMU's deadline, however the driver and ``serve`` start: device first, driver first, driver
replaced. ``serve`` has no settle delay (it used to wait 0.2 s: a QEMU guest aborted)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from .clitools import Background
from .qemu_like import QEMU_DEADLINE, QemuLikeDriver, first_response

TRIES = 5  # every one must make it: QEMU aborts on the first miss


def _bound(serve: Background) -> float:
    """QEMU's 1 ms when serve got SCHED_FIFO (root, as in CI); without it a busy machine
    can delay any wake-up by milliseconds, and the test checks only that nothing settles
    (the old 0.2 s delay) rather than claim a deadline the machine cannot give."""
    return QEMU_DEADLINE if "SCHED_FIFO" in serve.out.read_text() else 0.05


@pytest.fixture
def server(tmp_path: Path):
    sock = tmp_path / "s.sock"
    srv = Background(tmp_path, "server", "server", "-S", str(sock), "-l", "1M", "-n", "2")
    srv.wait_for("ivshmem server on")
    yield sock
    assert srv.stop() == 0


def _serve(tmp_path: Path, sock: Path, name: str = "serve") -> Background:
    serve = Background(tmp_path, name, "serve", "--server", str(sock), "--vectors", "2")
    serve.wait_for("waiting for the driver's peer")  # printed once it can answer
    return serve


def test_device_first_then_replaced_drivers(tmp_path, server):
    serve = _serve(tmp_path, server)
    try:
        times = [first_response(server, 0) for _ in range(TRIES)]  # each a new guest
        bound = _bound(serve)
    finally:
        assert serve.stop(signal.SIGINT) == 0
    assert max(times) < bound, f"first responses {[f'{t * 1e6:.0f} us' for t in times]}"
    log = serve.out.read_text()
    assert "peers seen: 1; serving vmid 1 (the only other peer)" in log
    assert f"serving vmid {TRIES} (" in log.splitlines()[-2], log  # the last driver


def test_driver_first(tmp_path, server):
    times = []
    for i in range(TRIES):
        with QemuLikeDriver(server) as driver:  # joined before the device exists
            serve = _serve(tmp_path, server, f"serve{i}")
            try:
                times.append(driver.first_response(serve_vmid(serve)))
                bound = _bound(serve)
            finally:
                assert serve.stop(signal.SIGINT) == 0
    assert max(times) < bound, f"first responses {[f'{t * 1e6:.0f} us' for t in times]}"


def serve_vmid(serve: Background) -> int:
    line = next(line for line in serve.out.read_text().splitlines() if "serving virtio" in line)
    return int(line.split(": vmid ", 1)[1].split(";", 1)[0])

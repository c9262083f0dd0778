"""Issue 14, item 1: a driver that sends the instant it joins gets its first response within
QEMU's deadline, however the driver and ``serve`` start: device first, driver first, driver
replaced. ``serve`` has no settle delay (it used to wait 0.2 s: a QEMU guest aborted)."""

from __future__ import annotations

import signal
import statistics
from pathlib import Path

import pytest

from .clitools import Background
from .qemu_like import QEMU_DEADLINE, QemuLikeDriver, first_response

TRIES = 5  # every one must make it: QEMU aborts on the first miss


def _check(times: list[float], serve: Background) -> None:
    """With SCHED_FIFO (root, as in CI): the typical first response (the median of the
    tries) inside twice QEMU's nominal 1 ms. Every try, whatever the scheduling, inside 50 ms: no
    settle (the old 0.2 s delay). The worst case is the benchmark's (``startup`` case, max
    and >1 ms columns), not a test's: on this 2-core VM a wake-up now and then takes
    milliseconds whatever the code (measured: 5 of 40 first responses over 3.6 ms, the least
    QEMU's polls last by the contract's figures (128 spins, then 128 polls after each usleep
    of 1..7 us), one minute, 0 of 40 the next, for the same commit; the C eventfd
    ping-pong's max is 2.9 ms in the README's run)."""
    shown = [f"{t * 1e6:.0f} us" for t in times]
    if "scheduling: SCHED_FIFO priority" in serve.out.read_text():  # not "... not permitted"
        # twice the nominal 1 ms: half the 3.6 ms QEMU's polls last by the contract's
        # figures, the margin a busy 2-core VM needs (one CI run's median: 1.14 ms)
        assert statistics.median(times) < 2 * QEMU_DEADLINE, f"first responses {shown}"
    assert max(times) < 0.05, f"first responses {shown}"


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
        _check(times, serve)
    finally:
        assert serve.stop(signal.SIGINT) == 0
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
            finally:
                assert serve.stop(signal.SIGINT) == 0
    _check(times, serve)


def serve_vmid(serve: Background) -> int:
    line = next(line for line in serve.out.read_text().splitlines() if "serving virtio" in line)
    return int(line.split(": vmid ", 1)[1].split(";", 1)[0])

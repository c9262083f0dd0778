"""The server-backed commands as a user runs them: one process per shell, real entry point.

server, serve, probe, ping and monitor each run as ``python -m ivshmem_bus`` subprocesses
around one server socket in tmp_path; every background process is stopped by the fixture.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .clitools import ROOT, Background, cli, run


@contextlib.contextmanager
def running_fabric(tmp_path: Path, vectors: int = 2, *serve_args: str):
    """A running server and a serving rng device: (socket path, server, serve)."""
    sock = tmp_path / "ivshmem.sock"
    n = str(vectors)
    server = Background(tmp_path, "server", "server", "-S", str(sock), "-l", "1M", "-n", n)
    serve = None
    try:
        server.wait_for("ivshmem server on")
        serve = Background(
            tmp_path, "serve", "serve", "--server", str(sock), "--vectors", n, *serve_args
        )
        serve.wait_for("waiting for the driver's peer")
        yield sock, server, serve
    except BaseException:
        if serve is not None:
            serve.stop(signal.SIGINT)
        server.stop()
        raise
    # the test passed: both must also stop cleanly on a signal, exit 0
    assert serve is not None and serve.stop(signal.SIGINT) == 0, serve.out.read_text()
    assert server.stop() == 0, server.out.read_text()


@pytest.fixture
def fabric(tmp_path):
    with running_fabric(tmp_path) as fab:
        yield fab


def test_probe_json_through_a_server(fabric):
    sock, _, serve = fabric
    out = run("probe", "--server", str(sock), "--vectors", "2", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["remote_vmid"] == 0 and doc["vmid"] == 1
    assert (doc["device_id"], doc["device_name"]) == (4, "entropy")
    assert doc["feature_names"] == ["VERSION_1"]
    assert doc["queues"] == [{"index": 0, "max_size": 1024}]
    serve.wait_for("peers seen: 1; serving vmid 1 (it claims the driver queue)")


def test_ping_statistics_and_exit_code(fabric):
    sock, _, _ = fabric
    out = run("ping", "--server", str(sock), "--vectors", "2", "-c", "3", "-i", "0.01")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("PING vmid 0 from vmid 1 over ivshmem server")
    assert [line.split(" time=")[0] for line in lines[1:4]] == [
        f"reply from vmid 0: seq={i}" for i in (1, 2, 3)
    ]
    assert "3 requests sent, 3 replies received, 0% loss" in lines


def test_serve_prints_status_changes_and_stops_cleanly(fabric, tmp_path):
    sock, server, serve = fabric
    from ivshmem_bus.backends.server_client import ServerClientDevice
    from ivshmem_bus.bus import VirtioMsgBus
    from ivshmem_bus.drivers import VirtioMsgDriver

    with ServerClientDevice(sock, vectors=2) as dev, VirtioMsgBus(dev, "driver", 0) as bus:
        VirtioMsgDriver(bus, timeout=5).initialize()
    serve.wait_for("driver status ACKNOWLEDGE|DRIVER|FEATURES_OK -> ACKNOWLEDGE|DRIVER|DRIVER_OK")
    assert serve.stop(signal.SIGINT) == 0
    assert "stopped after" in serve.out.read_text()
    assert server.stop() == 0
    log = server.out.read_text()
    assert "peer 0 connected" in log and "peer 1 connected" in log
    assert not sock.exists()  # the server removed its socket


def test_monitor_sees_the_traffic_and_leaves_it_unchanged(fabric, tmp_path):
    sock, _, _ = fabric
    pcap = tmp_path / "cap.pcap"
    mon = Background(
        tmp_path, "monitor", "monitor", "--server", str(sock), "--count", "6",
        "--pcap", str(pcap),
    )  # fmt: skip
    try:
        time.sleep(0.5)  # the monitor has taken BAR2 and hung up
        out = run("ping", "--server", str(sock), "--vectors", "2", "-c", "3", "-i", "0.01")
        assert out.returncode == 0, out.stdout + out.stderr  # the link works as without it
        assert mon.proc.wait(10) == 0
    finally:
        mon.stop()
    lines = mon.out.read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "driver->device GetDeviceStatus",
        "device->driver GetDeviceStatusResponse status=0",
    ] * 3
    assert pcap.stat().st_size == 24 + 3 * (16 + 4 + 6) + 3 * (16 + 4 + 10)


def test_auto_remote_with_no_other_peer_is_an_error(tmp_path):
    sock = tmp_path / "s.sock"
    server = Background(tmp_path, "server", "server", "-S", str(sock), "-l", "1M")
    try:
        server.wait_for("ivshmem server on")
        out = run("probe", "--server", str(sock))
        assert out.returncode == 1
        assert "no other peer is connected" in out.stderr
    finally:
        server.stop()


def test_errors_name_the_fix_and_bad_usage_exits_2(tmp_path):
    out = run("probe", "--server", str(tmp_path / "none.sock"))
    assert out.returncode == 1
    assert "start one with 'ivshmem-bus server -S" in out.stderr
    out = run("probe", "--server", str(tmp_path / "none.sock"), "--remote-vmid", "70000")
    assert out.returncode == 2 and "not a VMID" in out.stderr
    out = run("server", "-S", str(tmp_path / "x.sock"), "-l", "3M")
    assert out.returncode == 2 and "not a power of two" in out.stderr
    out = run("probe", "--server", "a", "--fake", "b")
    assert out.returncode == 2 and "not allowed with argument" in out.stderr
    assert not os.path.exists(tmp_path / "x.sock")


def test_fake_fabric_across_processes_and_as_the_default(tmp_path):
    """--fake DIR: unrelated processes meet on a private server the first one starts."""
    fabric = tmp_path / "fabric"
    serve = Background(tmp_path, "serve", "serve", "--fake", str(fabric))
    try:
        serve.wait_for("waiting for the driver's peer")
        out = run("probe", "--fake", str(fabric), "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["device_name"] == "entropy"
        assert oct((fabric).stat().st_mode & 0o777) == "0o700"
        assert (fabric / "ivshmem.sock").exists()
    finally:
        serve.stop(signal.SIGINT)
        pid = int((fabric / "server.pid").read_text())
        os.kill(pid, signal.SIGTERM)  # the fabric's server would exit after 60 s idle
    # no backend named and no ivshmem hardware here: the fake, and it says so
    env_dir = tmp_path / "xdg"
    env_dir.mkdir(mode=0o700)
    out = subprocess.run(
        cli("ping", "-c", "1"), capture_output=True, text=True, timeout=30, cwd=ROOT,
        env={**os.environ, "XDG_RUNTIME_DIR": str(env_dir)},
    )  # fmt: skip
    assert "no ivshmem hardware: using the fake device" in out.stderr
    assert out.returncode == 1  # nobody serves on the fresh fabric
    assert "no other peer is connected" in out.stderr
    os.kill(int((env_dir / "ivshmem-bus-fake" / "server.pid").read_text()), signal.SIGTERM)


def test_fake_fabric_server_exits_when_idle(tmp_path):
    sock = tmp_path / "s.sock"
    out = run("server", "-S", str(sock), "-l", "1M", "--idle-exit", "0.3", timeout=20)
    assert out.returncode == 0
    assert "no peer for 0.3 s: exiting" in out.stdout
    assert not sock.exists()


@pytest.mark.skipif(
    not __import__("ivshmem_bus.native.ffi", fromlist=["HAVE_COMPILED"]).HAVE_COMPILED,
    reason="coalescing needs the compiled helper (no C compiler at install)",
)
def test_serve_and_ping_with_coalesce_skip_doorbells_and_lose_nothing(tmp_path):
    with running_fabric(tmp_path, 1, "--coalesce") as (sock, _, serve):
        out = run("ping", "--server", str(sock), "--coalesce", "-c", "200", "-i", "0")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "200 requests sent, 200 replies received, 0% loss" in out.stdout
        assert serve.stop(signal.SIGINT) == 0
        stats = serve.out.read_text().split("stopped after ", 1)[1]
    suppressed = int(stats.split("doorbells_suppressed=", 1)[1].split(",", 1)[0])
    rung = int(stats.split("doorbells_rung=", 1)[1].split(",", 1)[0])
    assert rung + suppressed == 200  # one response each: rung, or not needed
    assert suppressed > 0  # the driver polled for its response


def test_spec_v1_ping_gets_bus_ping_replies(tmp_path):
    """PING is a bus message (spec-v1 section 5.3): serve's bus end answers it."""
    with running_fabric(tmp_path, 2, "--profile", "spec-v1") as (sock, _, _):
        out = run("ping", "--server", str(sock), "--vectors", "2", "--profile", "spec-v1",
                  "-c", "2", "-i", "0")  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        assert "2 requests sent, 2 replies received, 0% loss" in out.stdout

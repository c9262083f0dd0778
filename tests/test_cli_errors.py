"""Issue 14, item 3: every error a new user meets is one line naming the thing and the fix;
exit 1 for an operation that failed, 2 only for bad usage; nothing is left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading

import pytest

from ivshmem_bus.server import IvshmemServer

from .clitools import ROOT, Background, cli, run


def one_error(out: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line (a traceback or a second line fails the test)."""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ivshmem-bus: error: "), out.stderr
    return lines[0].removeprefix("ivshmem-bus: error: ")


@pytest.fixture
def small(tmp_path):
    """A server whose BAR2 (4 KiB) cannot hold the two queues (a QEMU-style server could)."""
    with IvshmemServer(tmp_path / "small.sock", shm_size=4096, vectors=2).start():
        yield tmp_path / "small.sock"


@pytest.fixture
def server(tmp_path):
    with IvshmemServer(tmp_path / "s.sock", shm_size="1M", vectors=2).start():
        yield tmp_path / "s.sock"


def test_monitor_errors_are_one_line_and_leave_no_pcap(tmp_path, server, small):
    cases = {
        ("--server", str(server), "--pcap", str(tmp_path / "no" / "x.pcap")):
            "cannot write the pcap",
        ("--server", str(server), "--pcap", str(tmp_path)): "cannot write the pcap",
        ("--shm", "/etc/passwd"): "a link needs 8192 (two 4 KiB queues)",
        ("--server", str(small)): "is 4096 bytes; a link needs 8192",
        ("--server", str(tmp_path / "none.sock")): "start one with 'ivshmem-bus server -S",
    }  # fmt: skip
    for args, expected in cases.items():
        out = run("monitor", *args, "--duration", "0.1")
        assert out.returncode == 1, args
        assert expected in one_error(out), args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.sock", "small.sock"]


@pytest.mark.parametrize("command", ["serve", "probe"])
def test_a_bar2_under_8k_fails_with_the_fix(small, command):
    out = run(command, "--server", str(small), "--vectors", "2", "--remote-vmid", "0")
    assert out.returncode == 1
    assert one_error(out).endswith(
        f"shared memory is 4096 bytes; the bus needs 8192 (two 4 KiB queues): restart the "
        f"server {small} with -l 8K or more"
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("server", "-l", "1"), "1 is 1 bytes: the bus needs at least 8K"),
        (("server", "-l", "64"), "64 is 64 bytes: the bus needs at least 8K"),
        (("server", "-l", "4k"), "4k is 4096 bytes: the bus needs at least 8K"),
        (
            ("server", "--idle-exit", "-1"),
            "-1 is out of range: a time in seconds must be at least 0",
        ),
        (("ping", "-c", "0"), "0 is out of range: a count must be at least 1"),
        (("ping", "-c", "-1"), "-1 is out of range: a count must be at least 1"),
        (("probe", "--timeout", "-1"), "-1 is out of range: a timeout in seconds must be more"),
        (("probe", "--timeout", "nan"), "nan is out of range"),
        (("serve", "--wait", "-1"), "-1 is out of range: a time in seconds must be at least 0"),
        (("demo", "--round-trips", "-1"), "-1 is out of range"),
        (("bench", "--scale", "0"), "0 is not a positive factor"),
        (("bench", "--json", "/nonexistent-dir/x.json"), "the directory /nonexistent-dir does not"),
    ],
)
def test_bad_values_are_usage_errors(tmp_path, args, expected):
    where = {"server": ["-S", str(tmp_path / "u.sock")], "demo": [], "bench": []}
    sock = where.get(args[0], ["--server", str(tmp_path / "none.sock")])  # never the fake
    out = run(*args, *sock, timeout=30)
    assert out.returncode == 2, out.stderr
    assert expected in out.stderr.splitlines()[-1]
    assert not (tmp_path / "u.sock").exists()


def test_nothing_serving_on_the_fake_fabric_says_start_serve(tmp_path):
    fabric = tmp_path / "fab"
    try:
        for command in ("probe", "ping"):
            out = run(command, "--fake", str(fabric))
            assert out.returncode == 1
            assert one_error(out).endswith(
                f"no other peer is connected: start the device first (ivshmem-bus serve "
                f"--fake {fabric})"
            )
        # liveness is read from the pid file: no probing connection shows in the log
        log = (fabric / "server.log").read_text()
        assert log.count("connected to") == 2 and "Broken pipe" not in log, log
    finally:
        os.kill(int((fabric / "server.pid").read_text()), signal.SIGTERM)


def test_fake_fabric_that_is_a_file_or_unwritable(tmp_path):
    (tmp_path / "file").write_text("x")
    out = run("probe", "--fake", str(tmp_path / "file"))
    assert out.returncode == 1
    assert one_error(out) == (
        f"fake fabric {tmp_path / 'file'} is not a directory: give --fake a directory (it is "
        f"created if missing)"
    )
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    argv = cli("probe", "--fake", str(ro))
    if os.geteuid() == 0:  # root writes anywhere: ask as nobody
        if shutil.which("setpriv") is None:
            pytest.skip("root without setpriv: cannot make a directory unwritable")
        tmp_path.chmod(0o755)
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 1
    assert one_error(out) == (
        f"fake fabric {ro}: Permission denied: give --fake a directory you can write (or set "
        f"XDG_RUNTIME_DIR)"
    )
    assert list(ro.iterdir()) == []


def test_sockets_that_are_not_ivshmem_servers(tmp_path):
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(tmp_path / "silent.sock"))
    silent.listen(4)
    garbage = socket.socket(socket.AF_UNIX)
    garbage.bind(str(tmp_path / "garbage.sock"))
    garbage.listen(4)

    def speak() -> None:
        for _ in range(2):
            conn, _ = garbage.accept()
            conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
            conn.close()

    threading.Thread(target=speak, daemon=True).start()
    try:
        out = run("probe", "--server", str(tmp_path / "silent.sock"))
        assert out.returncode == 1
        assert "no greeting from the server within 5 s: is it an ivshmem server" in one_error(out)
        for command in ("probe", "monitor"):
            out = run(command, "--server", str(tmp_path / "garbage.sock"))
            assert out.returncode == 1
            assert one_error(out) == (
                f"{tmp_path / 'garbage.sock'} does not speak the ivshmem server protocol (its "
                f"first message is 0x302e312f50545448, not version 0): give the socket of an "
                f"ivshmem server"
            )
    finally:
        silent.close()
        garbage.close()


def test_server_file_and_directory_errors(tmp_path):
    odd = tmp_path / "odd"  # the user's own file (a system file is writable only by root)
    odd.write_bytes(bytes(1221))
    out = run("server", "-S", str(tmp_path / "m.sock"), "-m", str(odd))
    assert out.returncode == 1
    assert one_error(out) == (
        f"shared memory {odd} is 1221 bytes, not 4194304: its size is not a power of "
        f"two, or choose another file"
    )
    out = run("server", "-S", str(tmp_path / "m.sock"), "-m", str(tmp_path))
    assert out.returncode == 1  # a directory cannot be opened read-write, by root either
    assert one_error(out) == f"shared memory {tmp_path}: cannot open it read-write: Is a directory"
    out = run("server", "-S", str(tmp_path))
    assert out.returncode == 1
    assert one_error(out) == (
        f"{tmp_path} is a directory: name a socket in it, e.g. {tmp_path / 'ivshmem.sock'}"
    )


def test_a_profile_mismatch_is_said_on_both_sides(tmp_path, server):
    serve = Background(tmp_path, "serve", "serve", "--server", str(server), "--vectors", "2")
    try:
        serve.wait_for("waiting for the driver's peer")
        out = run("probe", "--server", str(server), "--vectors", "2", "--profile", "spec-v1")
        assert out.returncode == 1
        assert one_error(out).endswith("within 1.0 s: is the peer serving, with spec-v1?")
        serve.wait_for("that do not decode as qemu-v0: does the driver use another --profile?")
    finally:
        assert serve.stop(signal.SIGINT) == 0


def test_small_things(tmp_path):
    out = run("demo", "--json", "--round-trips", "3")
    rt = json.loads(out.stdout)["round_trips_us"]
    assert rt["count"] == 3 and 0 < rt["p50"] <= rt["p99"] <= rt["max"]
    code = "import sys; from ivshmem_bus.cli import vmid_main; sys.exit(vmid_main(['--bogus']))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and out.stderr.startswith("usage: ivshmem-vmid ")
    out = run("probe", "--server", str(tmp_path / "none.sock"), "-v")  # -v after the command
    assert out.returncode == 1 and "start one with" in out.stderr
    # the fabric's idle exit removes its pid file
    sock, pid = tmp_path / "i.sock", tmp_path / "i.pid"
    out = run("server", "-S", str(sock), "--idle-exit", "0.2", "-p", str(pid))
    assert out.returncode == 0 and "no peer for 0.2 s: exiting" in out.stdout
    assert not pid.exists() and not sock.exists()


def test_serve_wait_gives_up_when_no_driver_joins(server):
    out = run("serve", "--server", str(server), "--vectors", "2", "--wait", "0.5")
    assert out.returncode == 1
    assert one_error(out).endswith(
        "no driver's peer joined within 0.5 s (--wait): start the driver on the same fabric, "
        "or wait longer"
    )

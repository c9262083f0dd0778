"""``ivshmem-server``, the drop-in for QEMU's contrib server, as a user's shell runs it.

The defaults and messages expected here are QEMU 10.0's (contrib/ivshmem-server/main.c, as
issue 17 lists them), written out, never read from the module under test. Daemons are
adopted through PR_SET_CHILD_SUBREAPER so their exit status is asserted and none survives.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ivshmem_bus.backends.server_client import ServerClientDevice
from ivshmem_bus.contrib import ivshmem_server
from ivshmem_bus.contrib._cli import parse_uint
from ivshmem_bus.contrib.ivshmem_server import ServerOptions, parse_args
from ivshmem_bus.server import IvshmemServer

from .contrib_helpers import Expect, script, shm_name, subreaper, wait_exit

__all__ = ["shm_name", "subreaper"]  # fixtures, used by name

SEED_LINE = ["-S", "shmpath", "-p", "pidfile", "-l", "1M", "-n", "1"]
READY = r"^ivshmem-server: pid (\d+) serving (\S+): (\d+) bytes of shared memory"


def run_server(*args: str, cwd: Path, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    argv = [script("ivshmem-server"), *args]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess[str], text: str) -> None:
    assert result.returncode == 1, result
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("ivshmem-server: ") and text in result.stderr, result.stderr


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def stop_daemon(pid: int, cwd: Path) -> int:
    """``kill $(cat pidfile)`` in ``cwd``, as the seed does; the daemon's exit status."""
    kill = subprocess.run(["sh", "-c", "kill $(cat pidfile)"], cwd=cwd, timeout=10)
    assert kill.returncode == 0
    return wait_exit(pid)


# The seed's line, daemonized ------------------------------------------------------------------


def test_seed_line_verbatim_daemonizes_and_kill_stops_it(
    tmp_path: Path, subreaper: list[int]
) -> None:
    """The literal line, so -M's default: /dev/shm/ivshmem, which must then be free."""
    default_shm = Path("/dev/shm/ivshmem")
    if default_shm.exists():
        pytest.skip("/dev/shm/ivshmem exists (someone's server): the literal line would use it")
    try:
        result = run_server(*SEED_LINE, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        pid = int((tmp_path / "pidfile").read_text())
        subreaper.append(pid)
        check_daemon(pid, result, tmp_path)
        assert default_shm.stat().st_size == 1 << 20
        assert stop_daemon(pid, tmp_path) == 0
        assert not default_shm.exists()  # QEMU's server shm_unlinks -M's object at exit
        assert not (tmp_path / "shmpath").exists()
        assert not (tmp_path / "pidfile").exists()
    finally:
        default_shm.unlink(missing_ok=True)


def check_daemon(pid: int, result: subprocess.CompletedProcess[str], cwd: Path) -> None:
    """The pid file names a live daemon, detached as a daemon is, serving the socket."""
    assert Path(f"/proc/{pid}").is_dir()
    status = proc_status(pid)
    assert status["State"][0] in "SR"  # alive, not a zombie
    assert int(status["PPid"]) == os.getpid()  # adopted by us: its parents have exited
    # A session of its own (setsid), which it does not lead (the second fork): it can
    # never get a controlling terminal.
    assert os.getsid(pid) not in (pid, os.getsid(0))
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
    assert int(status["SigIgn"], 16) & 1 << (signal.SIGPIPE - 1)
    match = result.stdout.splitlines()[0]
    assert match.startswith(f"ivshmem-server: pid {pid} serving {cwd / 'shmpath'}: 1048576 bytes")
    assert stat.S_ISSOCK(os.lstat(cwd / "shmpath").st_mode)
    with ServerClientDevice(cwd / "shmpath", vectors=1) as dev:  # listening when it returned
        assert len(dev.shmem) == 1 << 20 and dev.vmid == 0 and len(dev.vector_fds()) == 1


def test_seed_line_with_own_shm_name(tmp_path: Path, subreaper: list[int], shm_name: str) -> None:
    result = run_server(*SEED_LINE, "-M", shm_name, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    pid = int((tmp_path / "pidfile").read_text())
    subreaper.append(pid)
    check_daemon(pid, result, tmp_path)
    assert Path("/dev/shm", shm_name).stat().st_size == 1 << 20
    assert stop_daemon(pid, tmp_path) == 0
    assert not Path("/dev/shm", shm_name).exists()
    assert sorted(os.listdir(tmp_path)) == []


def test_daemon_pid_file_error_is_the_parents_exit_1(
    tmp_path: Path, subreaper: list[int], shm_name: str
) -> None:
    missing = tmp_path / "no" / "pidfile"
    result = run_server("-S", "sock", "-p", str(missing), "-M", shm_name, cwd=tmp_path)
    one_line_error(result, f"cannot write pid file {missing}: No such file or directory")
    status = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG)  # the daemon, adopted and gone
    while status is None:
        status = os.waitid(os.P_ALL, 0, os.WEXITED)
    assert status.si_status == 1
    assert not (tmp_path / "sock").exists() and not Path("/dev/shm", shm_name).exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_foreground_signal_stops_cleanly(tmp_path: Path, shm_name: str, sig: int) -> None:
    sock = tmp_path / "sock"
    server = Expect([script("ivshmem-server"), "-F", "-S", str(sock), "-M", shm_name, "-n", "2"])
    try:
        ready = server.expect(READY)
        assert int(ready[1]) == server.proc.pid and ready[2] == str(sock)
        assert int(ready[3]) == 4 << 20  # -l's default
        with ServerClientDevice(sock, vectors=2) as dev:
            assert len(dev.vector_fds()) == 2
        server.proc.send_signal(sig)
        assert server.wait() == 0
        assert server.out.endswith("server disconnected\n")
        assert not sock.exists() and not Path("/dev/shm", shm_name).exists()
    finally:
        server.kill()


def test_verbose_foreground_logs_peers(tmp_path: Path, shm_name: str) -> None:
    sock = tmp_path / "sock"
    server = Expect([script("ivshmem-server"), "-v", "-F", "-S", str(sock), "-M", shm_name])
    try:
        server.expect(READY)
        with ServerClientDevice(sock):
            server.expect(r"^peer 0 connected")
        server.expect(r"^peer 0 disconnected .*: it hung up")
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait() == 0
    finally:
        server.kill()


# Shared memory as QEMU's server makes it --------------------------------------------------------


def test_m_dir_leaves_nothing_and_size_rounds_up(tmp_path: Path) -> None:
    """-m: an unnamed file in the directory; -l 1000 is rounded up to 1024 (QEMU pow2ceil)."""
    memdir = tmp_path / "mem"
    memdir.mkdir()
    sock = tmp_path / "sock"
    server = Expect([script("ivshmem-server"), "-F", "-S", str(sock), "-m", str(memdir),
                     "-l", "1000"])  # fmt: skip
    try:
        server.expect(READY)
        assert os.listdir(memdir) == []
        with ServerClientDevice(sock) as dev:
            assert len(dev.shmem) == 1024
            dev.shmem[:4] = b"abcd"
            with ServerClientDevice(sock) as other:  # the same memory for every peer
                assert bytes(other.shmem[:4]) == b"abcd"
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait() == 0
    finally:
        server.kill()


def test_existing_object_is_resized_and_removed_at_exit(tmp_path: Path, shm_name: str) -> None:
    """As QEMU's: an existing object of another size is truncated to -l, and shm_unlinked."""
    path = Path("/dev/shm", shm_name)
    path.write_bytes(b"x" * 5000)
    sock = tmp_path / "sock"
    server = Expect([script("ivshmem-server"), "-F", "-S", str(sock), "-M", f"/{shm_name}",
                     "-l", "8K"])  # fmt: skip
    try:
        server.expect(READY)
        assert path.stat().st_size == 8192
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait() == 0
        assert not path.exists()
    finally:
        server.kill()


def test_a_live_server_on_the_socket_is_refused(tmp_path: Path, shm_name: str) -> None:
    with IvshmemServer(tmp_path / "sock"):
        result = run_server("-F", "-S", "sock", "-M", shm_name, cwd=tmp_path)
    one_line_error(result, "another server is listening on")
    assert not Path("/dev/shm", shm_name).exists()  # released on the error path too


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["-F", "-S", "nodir/sock"], "socket directory"),
        (["-F", "-M", "a/b"], "cannot open shm file a/b: a -M name is one path component"),
        (["-F", "-M", "/"], "cannot open shm file /"),
        (["-F", "-m", "/nonexistent-dir"], "cannot create shm file in /nonexistent-dir"),
    ],
)
def test_setup_errors_are_one_line(tmp_path: Path, args: list[str], text: str) -> None:
    if "-M" not in args and "-m" not in args:
        args = [*args, "-M", f"ivshmem-test-never-{os.getpid()}"]
    one_line_error(run_server(*args, cwd=tmp_path), text)


# Options: defaults, values, errors -------------------------------------------------------------


def test_defaults_are_qemus() -> None:
    assert parse_args([]) == ServerOptions(
        verbose=False, foreground=False, pid_file="/var/run/ivshmem-server.pid",
        socket_path="/tmp/ivshmem_socket", shm_path="ivshmem", use_shm_open=True,
        shm_size=4194304, vectors=1,
    )  # fmt: skip


def test_help_shows_every_option_and_default(tmp_path: Path) -> None:
    result = run_server("-h", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == ""
    text = " ".join(result.stdout.split())  # argparse wraps lines
    options = ["-v", "-F", "-p PID_FILE", "-S UNIX_SOCKET_PATH", "-M SHM_NAME", "-m DIR"]
    options += ["-l SIZE", "-n NVECTORS"]
    defaults = ["/var/run/ivshmem-server.pid", "/tmp/ivshmem_socket", "(default: ivshmem)"]
    defaults += ["(default: 4194304)", "(default: 1)"]
    for needle in options + defaults:
        assert needle in text, needle


@pytest.mark.parametrize(
    ("argv", "field", "value"),
    [
        (["-l", "1M"], "shm_size", 1 << 20),
        (["-l", "64k"], "shm_size", 64 << 10),
        (["-l", "2G"], "shm_size", 2 << 30),
        (["-l", "4096"], "shm_size", 4096),
        (["-n", "64"], "vectors", 64),
        (["-n", "0x10"], "vectors", 16),
        (["-n", "010"], "vectors", 8),  # strtoull base 0: octal
        (["-p", "x.pid"], "pid_file", "x.pid"),
        (["-Ssock"], "socket_path", "sock"),  # getopt's attached argument
        (["-F"], "foreground", True),
        (["-v", "-F"], "verbose", True),
        (["-M", "a"], "shm_path", "a"),
        (["-M", "a", "-m", "/d"], "use_shm_open", False),  # the last of -M/-m wins
        (["-m", "/d", "-M", "a"], "use_shm_open", True),
    ],
)
def test_option_values(argv: list[str], field: str, value: object) -> None:
    assert getattr(parse_args(argv), field) == value


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["-l", "big"], "cannot parse shm size 'big'"),
        (["-l", "1Q"], "cannot parse shm size '1Q'"),
        (["-l", "-1"], "cannot parse shm size '-1'"),
        (["-l", "0"], "shm size 0"),
        (["-n", "65"], "too many requested vectors: 65 (max is 64)"),
        (["-n", "-1"], "cannot parse n_vectors '-1'"),
        (["-n", "two"], "cannot parse n_vectors 'two'"),
        (["-n", "1 "], "cannot parse n_vectors '1 '"),
        (["-n", "0"], "0 vectors"),
        (["-v"], "cannot use verbose in daemon mode"),
        (["-x"], "unrecognized arguments: -x"),
        (["extra"], "unrecognized arguments: extra"),
        (["-S"], "argument -S: expected one argument"),
    ],
)
def test_bad_values_exit_1_with_one_line(
    argv: list[str], text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        ivshmem_server.main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ivshmem-server: ") and text in err, err


def test_bad_value_through_the_script(tmp_path: Path) -> None:
    one_line_error(run_server("-n", "65", cwd=tmp_path), "too many requested vectors")


@given(st.integers(min_value=0, max_value=1 << 64))
def test_parse_uint_reads_c_literals(n: int) -> None:
    assert parse_uint(str(n)) == n
    assert parse_uint(hex(n)) == parse_uint(hex(n).upper().replace("0X", "0x")) == n
    assert parse_uint("0" + format(n, "o")) == n


@given(st.text(max_size=8))
def test_parse_uint_takes_only_unsigned_literals(text: str) -> None:
    try:
        value = parse_uint(text)
    except ValueError:
        plain_decimal = text.isascii() and text.isdecimal() and (text == "0" or text[0] != "0")
        assert not plain_decimal
        return
    assert value >= 0 and text.isascii() and text == text.strip() and text[:1].isdigit()


def test_socket_is_connectable_immediately(tmp_path: Path, subreaper: list[int],
                                           shm_name: str) -> None:  # fmt: skip
    """No sleep between the command and the first connect: it returned once listening."""
    result = run_server("-S", "sock", "-p", "pid", "-M", shm_name, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    pid = int((tmp_path / "pid").read_text())
    subreaper.append(pid)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.connect(str(tmp_path / "sock"))
        assert int.from_bytes(probe.recv(8), "little", signed=True) == 0  # version 0
    os.kill(pid, signal.SIGTERM)
    assert wait_exit(pid) == 0


def test_ivshmem_bus_server_takes_the_seed_line_in_the_foreground(
    tmp_path: Path, shm_name: str
) -> None:
    """``ivshmem-bus server`` gains -p and -M: the seed's line runs there too (foreground)."""
    argv = [script("ivshmem-bus"), "server", *SEED_LINE, "-M", shm_name]
    server = Expect(argv, cwd=tmp_path)
    try:
        server.expect(r"ivshmem server on shmpath: 1048576 bytes of shared memory, 1 vector")
        assert (tmp_path / "pidfile").read_text() == f"{server.proc.pid}\n"
        with ServerClientDevice(tmp_path / "shmpath") as dev:
            assert len(dev.shmem) == 1 << 20
        assert Path("/dev/shm", shm_name).stat().st_size == 1 << 20
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait() == 0
        assert not (tmp_path / "pidfile").exists() and not (tmp_path / "shmpath").exists()
        assert Path("/dev/shm", shm_name).exists()  # -M there is a -m file: kept
    finally:
        server.kill()


def test_ivshmem_bus_server_refuses_a_bad_m_name(tmp_path: Path) -> None:
    result = subprocess.run([script("ivshmem-bus"), "server", "-S", "s", "-M", "a/b"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=20)  # fmt: skip
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result
    assert "a -M name is one path component" in result.stderr

"""``ivshmem-client``, the drop-in for QEMU's contrib client, driven through its stdin.

The other peers are ``ServerClientDevice``s in this process, around an ``IvshmemServer``
thread; the client is the installed script in a subprocess, killed at teardown. The help
text and the output formats are QEMU's (contrib/ivshmem-client/main.c), written out here.
"""

from __future__ import annotations

import io
import logging
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ivshmem_bus.backends.server_client import ServerClientDevice
from ivshmem_bus.contrib import ivshmem_client
from ivshmem_bus.contrib.ivshmem_client import ClientSession
from ivshmem_bus.server import IvshmemServer

from .contrib_helpers import Expect, script

QEMU_HELP = (
    "dump: dump peers (including us)\n"
    "int <peer> <vector>: notify one vector on a peer\n"
    "int <peer> all: notify all vectors of a peer\n"
    "int all: notify all vectors of all peers (excepting us)\n"
)
VECTOR_LINE = r"  vector {} is enabled \(fd=\d+\)\n"
LISTEN = r"listen on server socket \d+\n"


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[Path]:
    """A two-vector server in a thread, like ``ivshmem-server -n 2``."""
    path = tmp_path / "sock"
    with IvshmemServer(path, shm_size="64K", vectors=2) as server:
        server.start()
        yield path


@pytest.fixture
def peer(sock: Path) -> Iterator[ServerClientDevice]:
    """The other peer, id 0: it joins before the client."""
    with ServerClientDevice(sock, vectors=2) as dev:
        yield dev


def start_client(sock: Path, *options: str) -> Expect:
    return Expect([script("ivshmem-client"), "-S", str(sock), *options])


@pytest.fixture
def client(sock: Path, peer: ServerClientDevice) -> Iterator[Expect]:
    """The client, id 1, connected."""
    proc = start_client(sock)
    try:
        proc.expect(LISTEN)
        yield proc
    finally:
        proc.kill()


def fired(dev: ServerClientDevice, timeout: float = 5.0) -> set[int]:
    """The vectors of ``dev`` rung within ``timeout`` (after the first, 0.2 s more)."""
    got = dev.wait(timeout)
    return got | dev.wait(0.2)


def test_start_prints_qemus_help_prompt_and_socket(sock: Path) -> None:
    proc = start_client(sock)
    try:
        proc.expect(LISTEN)
        assert re.fullmatch(re.escape(QEMU_HELP + "cmd> ") + LISTEN, proc.out)
    finally:
        proc.kill()


def dump_until(client: Expect, done: Callable[[str], bool], timeout: float = 10.0) -> str:
    """Send ``dump`` until its output satisfies ``done``: announcements travel on their own."""
    deadline = time.monotonic() + timeout
    while True:
        client.send("dump\n")
        dump = client.expect(r"our_id = \d+\n(?:.*\n)*?cmd> ")[0]
        if done(dump):
            return dump
        assert time.monotonic() < deadline, dump
        time.sleep(0.05)


def test_dump_lists_itself_then_peers_in_join_order(
    sock: Path, peer: ServerClientDevice, client: Expect
) -> None:
    client.send("dump\n")
    client.expect(
        r"our_id = 1\n" + VECTOR_LINE.format(0) + VECTOR_LINE.format(1)
        + r"peer_id = 0\n" + VECTOR_LINE.format(0) + VECTOR_LINE.format(1) + r"cmd> "
    )  # fmt: skip
    both = r"peer_id = 0\n(.*\n){2}peer_id = 2\n" + VECTOR_LINE.format(0) + VECTOR_LINE.format(1)
    with ServerClientDevice(sock, vectors=2):
        dump_until(client, lambda text: re.search(both, text) is not None)  # in join order
    dump = dump_until(client, lambda text: "peer_id = 2" not in text)
    assert "our_id = 1\n" in dump and "peer_id = 0\n" in dump


def test_int_peer_vector_rings_that_vector_only(peer: ServerClientDevice, client: Expect) -> None:
    client.send("int 0 1\n")
    assert fired(peer) == {1}
    client.send("int 0 0\n")
    assert fired(peer) == {0}


def test_int_peer_all_rings_every_vector(peer: ServerClientDevice, client: Expect) -> None:
    client.send("int 0 all\n")
    assert fired(peer) == {0, 1}


def test_int_all_rings_every_other_peer_not_itself(
    sock: Path, peer: ServerClientDevice, client: Expect
) -> None:
    with ServerClientDevice(sock, vectors=2) as second:  # id 2, after the client
        dump_until(client, lambda text: "peer_id = 2" in text)
        client.send("int all\n")
        assert fired(peer) == {0, 1} and fired(second) == {0, 1}
    assert "receive notification" not in client.rest()


def test_semicolons_separate_commands(peer: ServerClientDevice, client: Expect) -> None:
    client.send("int 0 0; int 0 1;dump\n")
    client.expect(r"our_id = 1\n")
    assert fired(peer) == {0, 1}


def test_a_peer_ringing_the_client_is_printed(peer: ServerClientDevice, client: Expect) -> None:
    """QEMU's line names the client's own id: an eventfd does not say who rang."""
    peer.ring(1, 1)
    client.expect(r"^receive notification from peer_id=1 vector=1\n")
    peer.ring(1, 0)
    client.expect(r"^receive notification from peer_id=1 vector=0\n")
    assert "receive notification" not in client.rest()  # one line per doorbell


def test_the_client_may_ring_itself(client: Expect) -> None:
    client.send("int 1 1\n")
    client.expect(r"receive notification from peer_id=1 vector=1\n")


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        ("int 7 0", "cannot find peer_id = 7\n"),
        ("int 7 all", "cannot find peer_id = 7\n"),
        ("int 0 2", "invalid vector 2 on peer 0 (it has 2)\n"),
        ("int 0 x", "invalid command, type help\n"),
        ("int", "invalid command, type help\n"),
        ("frob", "invalid command, type help\n"),
        ("help", QEMU_HELP),
        ("?", QEMU_HELP),
    ],
)
def test_command_replies(client: Expect, command: str, reply: str) -> None:
    client.rest(0.1)
    client.send(command + "\n")
    client.expect(re.escape(reply + "cmd> "))


def test_end_of_input_exits_0(client: Expect) -> None:
    client.close_stdin()
    assert client.wait() == 0


def test_a_piped_script_runs_and_exits(sock: Path, peer: ServerClientDevice) -> None:
    result = subprocess.run(
        [script("ivshmem-client"), "-S", str(sock)], input="int 0 0\nint 0 1\ndump",
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert fired(peer) == {0, 1}
    assert "our_id = 1\n" in result.stdout  # the last line had no newline: run at EOF


def test_stdin_from_a_regular_file(sock: Path, peer: ServerClientDevice, tmp_path: Path) -> None:
    """epoll refuses regular files; the client reads them anyway."""
    commands = tmp_path / "commands"
    commands.write_text("int 0 1\n")
    with commands.open() as stdin:
        result = subprocess.run(
            [script("ivshmem-client"), "-S", str(sock)], stdin=stdin,
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert fired(peer) == {1}


def test_reconnects_every_second_after_a_server_restart(tmp_path: Path) -> None:
    path = tmp_path / "sock"
    first = IvshmemServer(path, vectors=1).start()
    proc = start_client(path)
    try:
        proc.expect(LISTEN)
        with ServerClientDevice(path):  # id 1 on the first server
            first.close()
            proc.expect(r"disconnected from server\n")
        started = time.monotonic()
        time.sleep(2.5)
        with IvshmemServer(path, vectors=1) as second:
            second.start()
            proc.expect(LISTEN)
            waited = time.monotonic() - started
            retries = proc.err.count("cannot connect to server, retry in 1 second\n")
            assert 2 <= retries <= int(waited) + 1, proc.err
            proc.send("dump\n")
            proc.expect(r"our_id = 0\n" + VECTOR_LINE.format(0) + "cmd> ")  # a fresh id
            proc.close_stdin()
            assert proc.wait() == 0
    finally:
        proc.kill()
        first.close()


def test_verbose_reports_peers(sock: Path, peer: ServerClientDevice) -> None:
    proc = start_client(sock, "-v")
    try:
        proc.expect(r"our_id=1\n")
        with ServerClientDevice(sock, vectors=2):
            proc.expect(r"new peer id = 2\n")
        proc.expect(r"delete peer id = 2\n")
        proc.send("int 0 0\n")
        proc.expect(r"notify peer 0 on vector 0, fd \d+\n")
    finally:
        proc.kill()


def test_help_option_and_bad_options(tmp_path: Path) -> None:
    client = script("ivshmem-client")
    shown = subprocess.run([client, "-h"], capture_output=True, text=True, timeout=20)
    assert shown.returncode == 0
    assert "(default: /tmp/ivshmem_socket)" in " ".join(shown.stdout.split())  # unwrapped
    for bad, text in [(["-x"], "unrecognized arguments: -x"), (["-S"], "expected one argument")]:
        result = subprocess.run([client, *bad], capture_output=True, text=True, timeout=20)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result
        assert result.stderr.startswith("ivshmem-client: ") and text in result.stderr


def test_default_socket_is_qemus(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def fake_run(path: str, **_: object) -> int:
        seen.append(path)
        return 0

    monkeypatch.setattr(ivshmem_client, "run", fake_run)
    package_log = logging.getLogger("ivshmem_bus")
    level = package_log.level
    try:
        assert ivshmem_client.main([]) == 0
    finally:
        package_log.setLevel(level)  # main() sets it; setLevel also clears the loggers' caches
    assert seen == ["/tmp/ivshmem_socket"]


_REPLIES = re.compile(
    r"(cannot find peer_id = -?\d+|invalid command, type help|our_id = \d+|peer_id = \d+"
    r"|  vector \d+ is enabled \(fd=\d+\)|invalid vector \d+ on peer \d+ \(it has 2\)"
    r"|receive notification from peer_id=1 vector=[01]|"
    + "|".join(re.escape(line) for line in QEMU_HELP.splitlines())
    + ")"
)


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClientSession]:
    """One in-process client (id 1) beside a peer (id 0), for many inputs."""
    path = tmp_path_factory.mktemp("session") / "sock"
    with IvshmemServer(path, shm_size="4K", vectors=2) as server:
        server.start()
        with ServerClientDevice(path, vectors=2):
            client = ClientSession(str(path), io.StringIO())
            try:
                assert client.connect() is None
                yield client
            finally:
                client.disconnect()


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("int all dump help?;01279x-+\r\n\t")), max_size=40))
def test_any_input_gets_only_known_replies(session: ClientSession, text: str) -> None:
    """Commands are parsed from whatever a user types: nothing raises, nothing unexpected."""
    session.out = out = io.StringIO()
    session.execute(text)
    for vector in range(2):
        session.on_vector(vector)  # rung by "int 1 ..." in the text, or not
    for line in out.getvalue().splitlines():
        assert _REPLIES.fullmatch(line), line

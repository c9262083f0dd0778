"""``ivshmem-client``: QEMU's contrib ivshmem-client, the interactive doorbell tool.

The same options (``-S`` socket, default ``/tmp/ivshmem_socket``; ``-v``), help text,
``cmd> `` prompt and commands as QEMU 10.0's ``contrib/ivshmem-client``: ``help`` / ``?``,
``dump``, ``int <peer> <vector>``, ``int <peer> all``, ``int all``, several per line
separated by ``;``. Each doorbell it gets prints ``receive notification from peer_id=N
vector=V``, where N is this client's own id, as in QEMU's (an eventfd does not say who rang).

The connection is a ``ServerClientDevice``: the greeting and the announcements are read by
the project's one reader. It is made for one vector and picks up the others the server
announces (the client cannot know the server's ``-n``), so ``vector_fds()`` may grow after
each ``update()``; the selector follows it.

One selector watches stdin, the server socket and our eventfds; nothing polls. When the
server goes away the client says so and reconnects once a second (stdin waits meanwhile, as
in QEMU's, whose reconnect loop does not read it). Unlike QEMU's, which spins once its input
ends, this one exits 0 at end of input, so ``echo 'int all' | ivshmem-client`` is a script.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import sys
from collections.abc import Sequence
from typing import TextIO

from ..backends.server_client import ServerClientDevice
from ..errors import IvshmemBusError
from ._cli import OneLineParser

__all__ = ["HELP", "ClientSession", "main", "run"]

PROG = "ivshmem-client"
DEFAULT_SOCKET = "/tmp/ivshmem_socket"
HELP = (
    "dump: dump peers (including us)\n"
    "int <peer> <vector>: notify one vector on a peer\n"
    "int <peer> all: notify all vectors of a peer\n"
    "int all: notify all vectors of all peers (excepting us)\n"
)
PROMPT = "cmd> "
RETRY_SECONDS = 1.0
_CONNECT_TIMEOUT = 2.0  # for the greeting of a server that accepted us
_SEPARATORS = str.maketrans({"\r": "\n", ";": "\n"})
_STDIN, _SOCKET = "stdin", "socket"  # selector tags; our eventfds are tagged with the vector


class ClientSession:
    """What one ``ivshmem-client`` knows and does; ``connect`` again after ``disconnect``.

    Args:
        path: the server socket.
        out: where command output and notifications go.
        verbose: also print peers coming and going and every doorbell written.
    """

    def __init__(self, path: str, out: TextIO, verbose: bool = False) -> None:
        self.path = path
        self.out = out
        self.verbose = verbose
        self.device: ServerClientDevice | None = None
        self._known: set[int] = set()

    @property
    def connected(self) -> bool:
        return self.device is not None

    def connect(self) -> str | None:
        """Join the server; None on success, else why not (for the retry message)."""
        try:
            self.device = ServerClientDevice(self.path, vectors=1, timeout=_CONNECT_TIMEOUT)
        except (IvshmemBusError, OSError) as exc:
            return str(exc)
        self._known = set()
        self.say(f"listen on server socket {self.device.fileno()}")
        self.refresh()
        if self.verbose:
            self.say(f"our_id={self.device.vmid}")
        return None

    def disconnect(self) -> None:
        device, self.device = self.device, None
        if device is not None:
            device.close()

    def refresh(self) -> bool:
        """Read the server's pending announcements; False once it has gone away."""
        device = self.device
        if device is None:
            return False
        try:
            peers = device.peer_vectors()
        except IvshmemBusError as exc:  # a malformed message: start over, as after EOF
            self.say(f"bad message from the server: {exc}")
            return False
        if self.verbose:
            for gone in sorted(self._known - peers.keys()):
                self.say(f"delete peer id = {gone}")
            for new in (peer for peer in peers if peer not in self._known):
                self.say(f"new peer id = {new}")
        self._known = set(peers)
        return not device.server_gone

    def own_vectors(self) -> Sequence[int]:
        return () if self.device is None else self.device.vector_fds()

    def on_vector(self, vector: int) -> None:
        """Our eventfd for ``vector`` is readable: drain it and say so (once per wake-up)."""
        assert self.device is not None
        fd = self.device.vector_fds()[vector]
        try:
            count = os.eventfd_read(fd)
        except BlockingIOError:
            return
        if self.verbose:
            self.say(f"received event on fd {fd} vector {vector}: {count}")
        self.say(f"receive notification from peer_id={self.device.vmid} vector={vector}")

    def execute(self, line: str) -> None:
        """Run every ``;``-separated command of ``line``, printing their output."""
        for token in line.translate(_SEPARATORS).split("\n"):
            words = token.split()
            if not words:
                continue
            if words in (["help"], ["?"]):
                self.out.write(HELP)
            elif words == ["dump"]:
                self.dump()
            elif words == ["int", "all"]:
                self.ring_all()
            elif len(words) == 3 and words[0] == "int":
                self._ring_command(words[1], words[2])
            else:
                self.say("invalid command, type help")

    def dump(self) -> None:
        """QEMU's dump: our id and vectors, then each peer's, in announcement order."""
        assert self.device is not None
        self.say(f"our_id = {self.device.vmid}")
        self._dump_vectors(self.device.vector_fds())
        for peer, fds in self.device.peer_vectors().items():
            self.say(f"peer_id = {peer}")
            self._dump_vectors(fds)

    def ring_all(self) -> None:
        """Every vector of every other peer (never our own)."""
        assert self.device is not None
        for peer, fds in self.device.peer_vectors().items():
            for vector in range(len(fds)):
                self._ring(peer, vector, fds[vector])

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _dump_vectors(self, fds: Sequence[int]) -> None:
        for vector, fd in enumerate(fds):
            self.say(f"  vector {vector} is enabled (fd={fd})")

    def _ring_command(self, peer_text: str, vector_text: str) -> None:
        assert self.device is not None
        try:
            peer = int(peer_text)
            vector = None if vector_text == "all" else int(vector_text)
        except ValueError:
            self.say("invalid command, type help")
            return
        if peer == self.device.vmid:  # QEMU's lets a client ring itself
            fds = tuple(self.device.vector_fds())
        else:
            found = self.device.peer_vectors().get(peer)
            if found is None:
                self.say(f"cannot find peer_id = {peer}")
                return
            fds = found
        if vector is None:
            for each in range(len(fds)):
                self._ring(peer, each, fds[each])
        elif 0 <= vector < len(fds):
            self._ring(peer, vector, fds[vector])
        else:
            self.say(f"invalid vector {vector} on peer {peer} (it has {len(fds)})")

    def _ring(self, peer: int, vector: int, fd: int) -> None:
        if self.verbose:
            self.say(f"notify peer {peer} on vector {vector}, fd {fd}")
        try:
            os.eventfd_write(fd, 1)
        except OSError as exc:
            self.say(f"could not write to {fd}: {exc.strerror}")


def run(path: str, *, verbose: bool = False, stdin_fd: int = 0, out: TextIO | None = None,
        err: TextIO | None = None) -> int:  # fmt: skip
    """The client's loop until end of input; the exit status (0)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    session = ClientSession(path, out, verbose)
    out.write(HELP + PROMPT)
    out.flush()
    selector = selectors.DefaultSelector()
    try:
        return _loop(session, selector, stdin_fd, err)
    finally:
        session.disconnect()
        selector.close()


def _loop(
    session: ClientSession, selector: selectors.BaseSelector, stdin_fd: int, err: TextIO
) -> int:
    watched: dict[int, object] = {}  # fd -> tag, what the selector has now
    stdin_always_ready = False  # a regular file or /dev/null: epoll refuses them
    pending = ""  # a partial line from stdin
    while True:
        if not session.connected:
            reason = session.connect()
            if reason is not None:
                detail = f": {reason}" if session.verbose else ""
                err.write(f"cannot connect to server, retry in 1 second{detail}\n")
                err.flush()
                _watch(selector, watched, {})
                selector.select(RETRY_SECONDS)  # nothing registered: a plain wait
                continue
        assert session.device is not None
        wanted: dict[int, object] = {session.device.fileno(): _SOCKET}
        wanted.update((fd, vector) for vector, fd in enumerate(session.own_vectors()))
        if not stdin_always_ready:
            wanted[stdin_fd] = _STDIN
        try:
            _watch(selector, watched, wanted)
        except PermissionError:  # only stdin can be unpollable
            stdin_always_ready = True
            continue
        events = selector.select(0 if stdin_always_ready else None)
        tags = [key.data for key, _mask in events]
        if stdin_always_ready:
            tags.append(_STDIN)
        for tag in sorted(tags, key=lambda t: (t == _STDIN, t == _SOCKET)):  # doorbells first
            if tag == _SOCKET:
                if not session.refresh():
                    session.say("disconnected from server")
                    _watch(selector, watched, {})  # before the fds close: numbers get reused
                    session.disconnect()
                    break
            elif tag == _STDIN:
                data = os.read(stdin_fd, 4096)
                if not data:
                    if pending:
                        session.execute(pending)
                    return 0
                pending += data.decode(errors="replace")
                *lines, pending = pending.translate(_SEPARATORS).split("\n")
                if lines:
                    session.refresh()
                    for line in lines:
                        session.execute(line)
                    session.out.write(PROMPT)
                    session.out.flush()
            elif isinstance(tag, int) and session.connected:
                session.on_vector(tag)


def _watch(
    selector: selectors.BaseSelector, watched: dict[int, object], wanted: dict[int, object]
) -> None:
    """Make the selector watch exactly ``wanted`` (fd -> tag) for reading."""
    for fd in [fd for fd in watched if fd not in wanted or watched[fd] != wanted[fd]]:
        selector.unregister(fd)
        del watched[fd]
    for fd, tag in wanted.items():
        if fd not in watched:
            selector.register(fd, selectors.EVENT_READ, tag)
            watched[fd] = tag


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ivshmem-client`` console script."""
    parser = OneLineParser(
        prog=PROG,
        description="Ring and watch ivshmem doorbells through an ivshmem server: a drop-in "
        "for QEMU's contrib/ivshmem-client. Commands (also from a pipe, several per line "
        "separated by ';'): " + HELP.replace("\n", "; ").rstrip("; "),
        epilog="It exits at end of input (QEMU's keeps running).",
    )
    parser.add_argument("-v", dest="verbose", action="store_true", help="verbose mode")
    parser.add_argument(
        "-S", dest="socket_path", metavar="UNIX_SOCK_PATH", default=DEFAULT_SOCKET,
        help="the UNIX socket to connect to (default: %(default)s)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # The device's own warnings (the server hung up) are the loop's lines to print here.
    logging.getLogger("ivshmem_bus").setLevel(logging.DEBUG if args.verbose else logging.ERROR)
    try:
        return run(args.socket_path, verbose=args.verbose)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # our stdout went away: nobody to tell, and Python's final
        null = os.open(os.devnull, os.O_WRONLY)  # flush must not fail again
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
        return 1

"""The fake fabric: a private ivshmem server that fake peers (shells, tests) join.

The fake device on the command line is a fabric, not a pair: unrelated shells must ring each
other, which takes eventfds handed out by one process. So a fake fabric is a private ivshmem
server in a 0700 directory that exits after ``FAKE_IDLE_EXIT`` seconds with no peer; every fake
peer is a client of it, as QEMU guests would be.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

from ..errors import ServerClientError

__all__ = [
    "FAKE_IDLE_EXIT",
    "FAKE_VECTORS",
    "default_fake_dir",
    "fake_socket",
    "listening",
]


FAKE_VECTORS = 2
FAKE_IDLE_EXIT = 60.0  # seconds a fake fabric's server lives on with no peer


def default_fake_dir() -> str:
    """Where the fake fabric lives by default: private to the user."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return os.path.join(base, "ivshmem-bus-fake")
    return os.path.join(tempfile.gettempdir(), f"ivshmem-bus-fake-{os.geteuid()}")


def fake_socket(directory: str) -> str:
    """The fabric's server socket, starting a detached server there if none is live.

    A live server is told by its pid file (written once it listens, removed when it exits),
    not by connecting: every connection to an ivshmem server is a peer that the others see
    come and go (and the server logs as one that broke its pipe).

    Raises:
        ServerClientError: ``directory`` is not a usable directory (named, with the fix), or
            the server did not start (its log is named).
    """
    _make_private_dir(directory)
    sock = os.path.join(directory, "ivshmem.sock")
    pid_path = os.path.join(directory, "server.pid")
    if _live_pid(pid_path) is None and not listening(sock):  # (a server started by hand)
        log_path = os.path.join(directory, "server.log")
        try:
            log_file = open(log_path, "ab")  # noqa: SIM115 (closed right below)
        except OSError as exc:
            raise _dir_error(directory, exc) from exc
        with log_file:
            subprocess.Popen(
                [sys.executable, "-m", "ivshmem_bus", "server", "-S", sock, "-l", "4M",
                 "-n", str(FAKE_VECTORS), "--idle-exit", str(FAKE_IDLE_EXIT),
                 "-p", pid_path],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                start_new_session=True, close_fds=True,
            )  # fmt: skip
        deadline = time.monotonic() + 10
        while _live_pid(pid_path) is None:  # a concurrent start may win: either will do
            if time.monotonic() > deadline:
                raise ServerClientError(f"the fake fabric's server did not start: see {log_path}")
            time.sleep(0.02)
    return sock


def _make_private_dir(directory: str) -> None:
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except FileExistsError as exc:
        raise ServerClientError(
            f"fake fabric {directory} is not a directory: give --fake a directory (it is "
            f"created if missing)"
        ) from exc
    except OSError as exc:
        raise _dir_error(directory, exc) from exc
    if not os.access(directory, os.W_OK | os.X_OK):
        raise _dir_error(directory, PermissionError(13, "Permission denied"))


def _dir_error(directory: str, exc: OSError) -> ServerClientError:
    return ServerClientError(
        f"fake fabric {directory}: {exc.strerror}: give --fake a directory you can write "
        f"(or set XDG_RUNTIME_DIR)"
    )


def _live_pid(path: str) -> int | None:
    """The pid in ``path`` if that process is alive (a server that listens), else None."""
    try:
        with open(path) as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True

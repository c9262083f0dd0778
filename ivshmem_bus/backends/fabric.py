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

__all__ = ["FAKE_IDLE_EXIT", "FAKE_VECTORS", "default_fake_dir", "fake_socket", "listening"]


FAKE_VECTORS = 2
FAKE_IDLE_EXIT = 60.0  # seconds a fake fabric's server lives on with no peer


def default_fake_dir() -> str:
    """Where the fake fabric lives by default: private to the user."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return os.path.join(base, "ivshmem-bus-fake")
    return os.path.join(tempfile.gettempdir(), f"ivshmem-bus-fake-{os.geteuid()}")


def fake_socket(directory: str) -> str:
    """The fabric's server socket, starting a detached server there if none is live."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    sock = os.path.join(directory, "ivshmem.sock")
    if listening(sock):
        return sock
    log_path = os.path.join(directory, "server.log")
    with open(log_path, "ab") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "ivshmem_bus", "server", "-S", sock, "-l", "4M",
             "-n", str(FAKE_VECTORS), "--idle-exit", str(FAKE_IDLE_EXIT)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
    with open(os.path.join(directory, "server.pid"), "w") as pid_file:
        pid_file.write(f"{server.pid}\n")  # to stop it before its idle exit: kill $(cat ...)
    deadline = time.monotonic() + 10
    while not listening(sock):  # a concurrent start may win: either server will do
        if time.monotonic() > deadline:
            raise ServerClientError(f"the fake fabric's server did not start: see {log_path}")
        time.sleep(0.02)
    return sock


def listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True

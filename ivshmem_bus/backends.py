"""Choosing a device backend and the remote peer, for the command line and scripts.

The backend choice lives here, in one small place (ixy's device.c): ``--server PATH`` joins
an ivshmem server as QEMU's ivshmem-doorbell device does; ``--device BDF`` opens a VFIO-bound
PCI function inside a guest; ``--fake DIR`` joins a private fake fabric (a server it starts
if needed), which is also the default where no ivshmem hardware is present.
``--remote-vmid auto`` means "the one other peer the server announced": a server client can
list peers, a VFIO device cannot (the guest sees only its
own IVPosition), so there the id must be given.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

from .client import ServerClientDevice
from .device import IvshmemDevice
from .errors import IvshmemBusError, ServerClientError

__all__ = [
    "RemoteVmidError",
    "default_fake_dir",
    "fake_socket",
    "follow_single_peer",
    "open_backend",
    "resolve_remote_vmid",
]


class RemoteVmidError(IvshmemBusError):
    """``--remote-vmid auto`` found no peer, or several."""


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

    The fake device on the command line is a fabric, not a pair: unrelated shells must ring
    each other, which takes eventfds handed out by one process. So a fake fabric is a
    private ivshmem server in ``directory`` (0700) that exits after ``FAKE_IDLE_EXIT``
    seconds with no peer; every fake peer is a client of it, as QEMU guests would be.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    sock = os.path.join(directory, "ivshmem.sock")
    if _listening(sock):
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
    while not _listening(sock):  # a concurrent start may win: either server will do
        if time.monotonic() > deadline:
            raise ServerClientError(f"the fake fabric's server did not start: see {log_path}")
        time.sleep(0.02)
    return sock


def _listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def open_backend(
    *,
    server: str | None = None,
    device: str | None = None,
    fake: str | None = None,
    vectors: int = 1,
    timeout: float = 5.0,
) -> IvshmemDevice:
    """Open the device named by exactly one of ``server``, ``device`` or ``fake``."""
    if sum(x is not None for x in (server, device, fake)) != 1:
        raise ValueError("name exactly one backend: --server PATH, --device BDF or --fake DIR")
    if fake is not None:
        return ServerClientDevice(fake_socket(fake), vectors=FAKE_VECTORS, timeout=timeout)
    if server is not None:
        return ServerClientDevice(server, vectors=vectors, timeout=timeout)
    from .device import open_device

    return open_device(device)


def resolve_remote_vmid(
    dev: IvshmemDevice, spec: str, *, wait: float = 0.0, settle: float = 0.0, poll: float = 0.05
) -> int:
    """A peer id from ``spec``: a number (``46``, ``0x2e``) or ``auto``.

    Args:
        wait: for ``auto``, how long to wait for exactly one other peer to be announced
            (``serve`` waits; ``probe`` and ``ping`` look once).
        settle: for ``auto``, how long that one peer must stay: a monitor joins only to take
            the shared memory and leaves at once, and must not be taken for the driver.

    Raises:
        RemoteVmidError: ``auto`` with no peer or several (they are listed), or on a backend
            that cannot list peers (the message says how to find the value).
        ValueError: ``spec`` is neither a number in 0..65535 nor ``auto``.
    """
    if spec != "auto":
        value = int(spec, 0)
        if not 0 <= value <= 0xFFFF:
            raise ValueError(f"remote vmid {spec} is not a peer id (0..65535)")
        return value
    deadline = time.monotonic() + wait
    candidate, since = -1, 0.0
    while True:
        peers = dev.peers()
        if peers is None:
            raise RemoteVmidError(
                f"{dev.name} cannot list peers: give --remote-vmid N; run 'ivshmem-bus vmid' "
                f"on the other machine to get N"
            )
        now = time.monotonic()
        if len(peers) == 1:
            (peer,) = peers
            if peer != candidate:
                candidate, since = peer, now
            if now - since >= settle:
                return peer
        else:
            candidate = -1
        if now >= deadline and candidate == -1:
            if not peers:
                raise RemoteVmidError(f"{dev.name}: no other peer is connected")
            listed = ", ".join(str(p) for p in sorted(peers))
            raise RemoteVmidError(
                f"{dev.name}: several peers ({listed}): choose one with --remote-vmid N"
            )
        time.sleep(poll)  # peers() reads the server's announcements


def follow_single_peer(dev: IvshmemDevice, current: int) -> int:
    """For a device-role ``auto`` link: the peer to answer now.

    When the driver's peer left and exactly one other peer is there, that is the new driver
    (a restarted guest gets a new id from the server); otherwise keep ``current``.
    """
    peers = dev.peers()
    if peers is None or current in peers or len(peers) != 1:
        return current
    return next(iter(peers))

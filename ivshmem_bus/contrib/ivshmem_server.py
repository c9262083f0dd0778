"""``ivshmem-server``: QEMU's contrib ivshmem-server, same options, same defaults.

The protocol is ``ivshmem_bus.server.IvshmemServer``'s; this module adds what QEMU's
command line means around it (QEMU 10.0 ``contrib/ivshmem-server/main.c``):

- ``-M NAME`` (the default, ``ivshmem``) is a POSIX shared-memory object, i.e.
  ``/dev/shm/NAME`` (glibc's ``shm_open``), opened or created and sized, and removed at
  exit as QEMU's ``shm_unlink`` does, even if it existed before;
- ``-m DIR`` makes an unnamed file in DIR (hugetlbfs, say): created and unlinked at once, so
  nothing is left behind;
- the size is rounded up to a power of two, and if the filesystem refuses it (hugetlbfs
  wants whole huge pages) doubled until 1 GiB, as QEMU does;
- without ``-F`` it daemonizes and writes the daemon's pid to ``-p`` (``daemon.Daemon``);
  ``-v`` needs ``-F``.

SIGTERM and SIGINT stop it: clients dropped, socket, memory object and pid file removed,
exit 0. SIGPIPE is ignored. Every error is one line on stderr, exit 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..core.server_protocol import MAX_VECTORS
from ..errors import IvshmemBusError, ServerError
from ..server import ID_LIMIT, IvshmemServer, parse_size
from ._cli import OneLineParser, fail, parse_uint
from .daemon import Daemon

__all__ = ["ServerOptions", "SharedMemory", "main", "parse_args", "shm_object_path"]

PROG = "ivshmem-server"
DEFAULT_PID_FILE = "/var/run/ivshmem-server.pid"
DEFAULT_SOCKET = "/tmp/ivshmem_socket"
DEFAULT_SHM_NAME = "ivshmem"
DEFAULT_SIZE = 4 << 20
DEFAULT_VECTORS = 1
SHM_DIR = "/dev/shm"  # where glibc's shm_open puts POSIX shared-memory objects
_MAX_HUGEPAGE = 1 << 30  # QEMU's IVSHMEM_SERVER_MAX_HUGEPAGE_SIZE: where doubling stops


@dataclass(frozen=True)
class ServerOptions:
    """QEMU's IvshmemServerArgs, after validation."""

    verbose: bool = False
    foreground: bool = False
    pid_file: str = DEFAULT_PID_FILE
    socket_path: str = DEFAULT_SOCKET
    shm_path: str = DEFAULT_SHM_NAME  # a -M name or a -m directory
    use_shm_open: bool = True  # True: -M (the default); False: -m
    shm_size: int = DEFAULT_SIZE
    vectors: int = DEFAULT_VECTORS


class _Shm(argparse.Action):
    """-M and -m share one setting, the last one given wins (QEMU's getopt loop)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        namespace.shm = (option_string == "-M", values)


def _size(text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"cannot parse shm size {text!r}: write bytes with an optional K, M or G suffix"
        ) from None
    if size == 0:
        raise argparse.ArgumentTypeError("shm size 0: the shared memory needs at least 1 byte")
    return size


def _vectors(text: str) -> int:
    try:
        vectors = parse_uint(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot parse n_vectors {text!r}") from None
    if vectors > MAX_VECTORS:
        raise argparse.ArgumentTypeError(
            f"too many requested vectors: {vectors} (max is {MAX_VECTORS})"
        )
    if vectors == 0:  # QEMU's takes 0; a peer with no doorbell needs no server: ivshmem-plain
        raise argparse.ArgumentTypeError("0 vectors: use 1..64, or ivshmem-plain without a server")
    return vectors


def _parser() -> OneLineParser:
    p = OneLineParser(
        prog=PROG,
        description="Serve shared memory and doorbell eventfds to QEMU ivshmem-doorbell "
        "devices and host peers over a UNIX socket: a drop-in for QEMU's "
        "contrib/ivshmem-server (same options and defaults).",
        epilog="SIGTERM or SIGINT stop it, removing the socket, the -M object and the pid file.",
    )
    p.add_argument("-v", dest="verbose", action="store_true", help="verbose mode (needs -F)")
    p.add_argument(
        "-F", dest="foreground", action="store_true", help="foreground mode (default: daemonize)"
    )
    p.add_argument(
        "-p", dest="pid_file", metavar="PID_FILE", default=DEFAULT_PID_FILE,
        help="the daemon's pid file, daemon mode only (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "-S", dest="socket_path", metavar="UNIX_SOCKET_PATH", default=DEFAULT_SOCKET,
        help="the UNIX socket to listen on (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "-M", dest="shm", metavar="SHM_NAME", action=_Shm, default=(True, DEFAULT_SHM_NAME),
        help=f"POSIX shared-memory object, {SHM_DIR}/SHM_NAME (default: {DEFAULT_SHM_NAME})",
    )  # fmt: skip
    p.add_argument(
        "-m", dest="shm", metavar="DIR", action=_Shm,
        help="create the shared memory in DIR instead (hugetlbfs, for example)",
    )  # fmt: skip
    p.add_argument(
        "-l", dest="shm_size", metavar="SIZE", type=_size, default=DEFAULT_SIZE,
        help="shared-memory size in bytes, suffixes K, M and G (1K = 1024), rounded up to a "
        "power of two (default: %(default)d)",
    )  # fmt: skip
    p.add_argument(
        "-n", dest="vectors", metavar="NVECTORS", type=_vectors, default=DEFAULT_VECTORS,
        help=f"interrupt vectors per peer, 1..{MAX_VECTORS} (default: %(default)d)",
    )  # fmt: skip
    return p


def parse_args(argv: Sequence[str] | None = None) -> ServerOptions:
    """QEMU's ``ivshmem_server_parse_args``: options, or exit (0 for -h, 1 with one line)."""
    args = _parser().parse_args(argv)
    if args.verbose and not args.foreground:
        fail(PROG, "cannot use verbose in daemon mode: add -F")
    use_shm_open, shm_path = args.shm
    return ServerOptions(
        verbose=args.verbose,
        foreground=args.foreground,
        pid_file=args.pid_file,
        socket_path=args.socket_path,
        shm_path=shm_path,
        use_shm_open=use_shm_open,
        shm_size=args.shm_size,
        vectors=args.vectors,
    )


class SharedMemory:
    """The file the server shares, made as QEMU's server makes it.

    ``path`` is what ``IvshmemServer(shm_path=)`` opens; call ``opened()`` once it has (a
    ``-m`` file is unlinked then) and ``release()`` at exit (a ``-M`` object is unlinked,
    if it is still the one we opened).

    Raises:
        ServerError: the object or file cannot be opened, created or sized.
    """

    def __init__(self, options: ServerOptions) -> None:
        self.temporary = not options.use_shm_open
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) once opened
        if options.use_shm_open:
            self.path = shm_object_path(options.shm_path)
            self.name = os.path.basename(self.path)
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
            try:
                fd = os.open(self.path, flags, 0o600)
            except OSError as exc:
                msg = f"cannot open shm file {self.name}: {exc.strerror}"
                raise ServerError(msg, path=self.path, errno=exc.errno) from None
        else:
            self.name = options.shm_path
            try:
                fd, self.path = tempfile.mkstemp(prefix="ivshmem.", dir=options.shm_path)
            except OSError as exc:
                msg = f"cannot create shm file in {options.shm_path}: {exc.strerror}"
                raise ServerError(msg, path=options.shm_path, errno=exc.errno) from None
        try:
            st = os.fstat(fd)
            self._identity = (st.st_dev, st.st_ino)
            if not stat.S_ISREG(st.st_mode):
                raise ServerError(f"shm file {self.path} is not a regular file", path=self.path)
            self.size = _truncate(fd, options.shm_size, self.path)
        except (OSError, ServerError):
            self.release()
            raise
        finally:
            os.close(fd)

    def opened(self) -> None:
        """The server holds its own fd now: an unnamed ``-m`` file loses its name."""
        if self.temporary:
            self.release()

    def release(self) -> None:
        """Unlink the file if it is still ours (QEMU's shm_unlink at exit). Idempotent."""
        identity, self._identity = self._identity, None
        if identity is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == identity:
                os.unlink(self.path)
        except OSError:
            pass  # gone already, or replaced by someone else's: not ours to remove


def _shm_name(name: str) -> str:
    """glibc's shm_open name rules: leading slashes dropped, then one path component."""
    stripped = name.lstrip("/")
    if not stripped or "/" in stripped or stripped in (".", ".."):
        msg = f"cannot open shm file {name}: a -M name is one path component, e.g. ivshmem"
        raise ServerError(msg, path=name)
    return stripped


def shm_object_path(name: str) -> str:
    """Where glibc's ``shm_open(name)`` puts a POSIX shared-memory object: /dev/shm/NAME.

    Raises:
        ServerError: ``name`` is not one path component (after leading slashes).
    """
    return os.path.join(SHM_DIR, _shm_name(name))


def _truncate(fd: int, size: int, path: str) -> int:
    """Size ``fd`` to ``size`` rounded up to a power of two; on refusal keep doubling up to
    1 GiB (hugetlbfs takes only whole huge pages). Returns the size it got."""
    want = 1 << (size - 1).bit_length()
    if os.fstat(fd).st_size == want:
        return want
    while True:
        try:
            os.ftruncate(fd, want)
            return want
        except OSError as exc:
            if want >= _MAX_HUGEPAGE:
                msg = f"ftruncate({path}) failed: {exc.strerror}"
                raise ServerError(msg, path=path, errno=exc.errno) from None
            want *= 2


def _ready_line(server: IvshmemServer, shm: SharedMemory, pid: int) -> str:
    where = f"(an unnamed file in {shm.name})" if shm.temporary else shm.path
    return (
        f"{PROG}: pid {pid} serving {server.socket_path}: {server.shm_size} bytes of shared "
        f"memory {where}, {server.vectors} vector(s)"
    )


def serve(options: ServerOptions, stop: threading.Event) -> int:
    """Run the server the options describe until ``stop`` is set; the exit status.

    Raises:
        OSError, IvshmemBusError, ValueError: setup failed (one line each).
    """
    shm = SharedMemory(options)
    daemon = None if options.foreground else Daemon(options.pid_file)
    try:
        server = IvshmemServer(
            os.path.abspath(options.socket_path),  # the daemon chdirs to /
            shm_size=shm.size, shm_path=shm.path, vectors=options.vectors, max_peers=ID_LIMIT,
        )  # fmt: skip
    except BaseException:
        shm.release()
        raise
    shm.opened()
    with server:
        try:
            if daemon is None:
                print(_ready_line(server, shm, os.getpid()), flush=True)
            else:
                daemon.detach()  # the parent process exits in here, once we report
                try:
                    daemon.write_pid_file()
                except OSError as exc:
                    where = daemon.pid_file
                    daemon.failed(f"{PROG}: cannot write pid file {where}: {exc.strerror}")
                    return 1
                daemon.ready(_ready_line(server, shm, os.getpid()))
            server.serve_forever(stop)
        finally:
            shm.release()
            if daemon is not None:
                daemon.remove_pid_file()
                daemon.close()
    if daemon is None:
        print("server disconnected", flush=True)  # QEMU's last words
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ivshmem-server`` console script."""
    options = parse_args(argv)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if options.verbose:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        server_log = logging.getLogger("ivshmem_bus.server")
        server_log.addHandler(handler)
        server_log.setLevel(logging.DEBUG)
    try:
        return serve(options, stop)
    except (IvshmemBusError, OSError, ValueError) as exc:
        fail(PROG, str(exc))

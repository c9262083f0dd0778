"""Daemonizing so that a script may use the server the moment the command returns.

QEMU's ivshmem-server listens before it calls ``daemon()``, so ``ivshmem-server ...; qemu
...`` never races the socket. We go one step further: the parent waits on a pipe until the
daemon has written its pid file, and only then exits, 0 with the daemon's pid or 1 with the
daemon's one-line error. So ``kill $(cat pidfile)`` right after the command always works.

The classic sequence: fork (the parent waits), setsid (a new session: no controlling
terminal, no SIGHUP from the shell), fork again (the session leader exits, so the daemon can
never acquire a terminal), chdir / (no directory kept busy), stdin/out/err to /dev/null.
"""

from __future__ import annotations

import contextlib
import os
import sys

__all__ = ["Daemon", "PidFile"]

_OK, _ERROR = b"ok ", b"error "


class PidFile:
    """A pid file: ``"<pid>\\n"`` (QEMU's format), removed only while it still names us.
    As a context manager: written on entry, removed on exit.

    Args:
        path: made absolute now, so a later chdir does not move it.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._written = False

    def write(self) -> None:
        """Write this process's pid. Raises OSError."""
        with open(self.path, "w", encoding="ascii") as out:
            out.write(f"{os.getpid()}\n")
        self._written = True

    def __enter__(self) -> PidFile:
        self.write()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove the file if we wrote it and it still names us (not a successor's)."""
        if not self._written:
            return
        self._written = False
        with contextlib.suppress(OSError):
            with open(self.path, encoding="ascii") as pid_in:
                if pid_in.read().strip() != str(os.getpid()):
                    return
            os.unlink(self.path)


class Daemon:
    """The two halves of a daemonized process, joined by a pipe until the daemon is ready.

    Args:
        pid_file: where the daemon writes its pid; made absolute now, before the chdir.
    """

    def __init__(self, pid_file: str) -> None:
        self.pid = PidFile(pid_file)
        self.pid_file = self.pid.path
        self._report_fd = -1

    def detach(self) -> None:
        """Fork twice; return only in the daemon. The calling process exits in here.

        The caller's parent process exits with 0 once ``ready`` is called (printing its
        message on stdout), with 1 once ``failed`` is (printing its message on stderr), and
        with 1 if the daemon dies before either.
        """
        sys.stdout.flush()  # else the children inherit, and print again, unflushed output
        sys.stderr.flush()
        read_fd, write_fd = os.pipe()
        if os.fork():
            os.close(write_fd)
            os._exit(_wait_for_daemon(read_fd))  # not exit(): the with-blocks are the daemon's
        os.close(read_fd)
        os.setsid()
        if os.fork():
            os._exit(0)
        self._report_fd = write_fd
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        if null > 2:
            os.close(null)

    def write_pid_file(self) -> None:
        """Write the daemon's pid (``PidFile.write``). Raises OSError."""
        self.pid.write()

    def ready(self, message: str) -> None:
        """Let the waiting parent exit 0, printing ``message`` on its stdout."""
        self._report(_OK + message.encode())

    def failed(self, message: str) -> None:
        """Let the waiting parent exit 1, printing ``message`` on its stderr."""
        self._report(_ERROR + message.encode())

    def remove_pid_file(self) -> None:
        self.pid.remove()

    def close(self) -> None:
        """Close the pipe to the parent if it is still open (the parent then exits 1)."""
        fd, self._report_fd = self._report_fd, -1
        if fd >= 0:
            os.close(fd)

    def _report(self, data: bytes) -> None:
        if self._report_fd < 0:
            return
        with contextlib.suppress(OSError):  # the parent was killed: nobody to tell
            os.write(self._report_fd, data)  # well under PIPE_BUF: one atomic write
        self.close()


def _wait_for_daemon(read_fd: int) -> int:
    """In the original process: relay the daemon's one message; the exit status."""
    chunks = []
    try:
        while chunk := os.read(read_fd, 4096):
            chunks.append(chunk)
    finally:
        os.close(read_fd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(-1, 0)  # reap the session leader, which exits at once
    report = b"".join(chunks)
    if report.startswith(_OK):
        print(report[len(_OK) :].decode(errors="replace"), flush=True)
        return 0
    if report.startswith(_ERROR):
        text = report[len(_ERROR) :].decode(errors="replace")
    else:
        text = "the daemon exited before it was ready"
    print(text, file=sys.stderr, flush=True)
    return 1

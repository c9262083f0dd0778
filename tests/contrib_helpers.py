"""What the drop-in tests share: the installed scripts, unique shm names, an expect-like pipe.

The scripts run as a user runs them, through the console-script wrappers pip installed next
to this interpreter (not ``python -m``), so the ``[project.scripts]`` entries are tested too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def script(name: str) -> str:
    """The installed console script ``name``; a failure (not a skip) if it is missing."""
    found = shutil.which(name, path=os.path.dirname(sys.executable))
    assert found is not None, f"{name} is not installed next to {sys.executable}: pip install -e ."
    return found


@pytest.fixture
def shm_name() -> Iterator[str]:
    """A POSIX shared-memory name no other test uses; its /dev/shm object removed after."""
    name = f"ivshmem-test-{uuid.uuid4().hex[:12]}"
    yield name
    Path("/dev/shm", name).unlink(missing_ok=True)


@contextlib.contextmanager
def adopting_orphans() -> Iterator[list[int]]:
    """Make this process the subreaper of its orphans, so a daemon that double-forked is
    our child again: we can read its exit status. Yields a list; every pid put in it is
    killed (if still alive) and reaped on the way out."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, os.strerror(ctypes.get_errno())
    pids: list[int] = []
    try:
        yield pids
    finally:
        for pid in pids:
            try:  # only a child not yet reaped: its pid cannot have been reused
                if os.waitpid(pid, os.WNOHANG) == (0, 0):
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
            except ChildProcessError:
                pass  # reaped already (wait_exit) or never adopted
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@pytest.fixture
def subreaper() -> Iterator[list[int]]:
    """``adopting_orphans`` for one test."""
    with adopting_orphans() as pids:
        yield pids


def wait_exit(pid: int, timeout: float = 10.0) -> int:
    """Reap our (adopted) child ``pid``; its exit status. Fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        assert time.monotonic() < deadline, f"pid {pid} did not exit in {timeout} s"
        time.sleep(0.02)


class Expect:
    """A process with piped stdin/stdout; ``expect`` waits for a regex in its output.

    Output is kept whole; ``expect`` searches from where the last match ended, so each
    call consumes what it matched (and everything before it).
    """

    def __init__(self, argv: list[str], **popen: object) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            **popen,  # type: ignore[call-overload]
        )  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for pipe in (self.proc.stdout, self.proc.stderr):
            os.set_blocking(pipe.fileno(), False)
        self.out = self.err = ""
        self._pos = 0

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def expect(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.out, self._pos)
            if match is not None:
                self._pos = match.end()
                return match
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                raise AssertionError(
                    f"{pattern!r} not seen in {timeout} s; stdout after the last match:\n"
                    f"{self.out[self._pos :]}\nstderr:\n{self.err}"
                )

    def rest(self, settle: float = 0.3) -> str:
        """What it printed since the last match, after ``settle`` seconds of reading."""
        deadline = time.monotonic() + settle
        while (left := deadline - time.monotonic()) > 0 and self._read(left):
            pass
        text, self._pos = self.out[self._pos :], len(self.out)
        return text

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def wait(self, timeout: float = 10.0) -> int:
        """The exit status once it ended by itself, its output all read."""
        rc = self.proc.wait(timeout)
        while self._read(0.05):
            pass
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def _read(self, timeout: float) -> bool:
        """Read whatever arrives within ``timeout``; False if nothing can arrive anymore
        (both pipes at EOF) or nothing came."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        got = False
        with selectors.DefaultSelector() as sel:
            for pipe in (self.proc.stdout, self.proc.stderr):
                if not pipe.closed:
                    sel.register(pipe, selectors.EVENT_READ)
            if not sel.get_map():
                return False
            for key, _ in sel.select(timeout):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                got = True
                if key.fileobj is self.proc.stdout:
                    self.out += data.decode()
                else:
                    self.err += data.decode()
        return got

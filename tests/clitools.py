"""Running ``ivshmem-bus`` as a user does: one subprocess per shell, real entry point.

``Background.stop`` is strict on purpose: a command that does not stop within
``STOP_WITHIN`` seconds of SIGINT/SIGTERM fails the test (it is SIGKILLed first, so nothing
outlives the test), and the exit code is returned for the caller to check.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STOP_WITHIN = 2.0  # a signal stops any command within a second; the rest is a busy VM's margin


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ivshmem_bus", *args]


def run(
    *args: str, timeout: float = 30, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )


class Background:
    """A command left running, with its output collected into a file."""

    def __init__(
        self, tmp_path: Path, name: str, *args: str, env: dict[str, str] | None = None
    ) -> None:
        self.out = tmp_path / f"{name}.log"
        self._file = self.out.open("w")
        self.proc = subprocess.Popen(
            cli(*args), stdout=self._file, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
            env=env,
        )  # fmt: skip

    def wait_for(self, text: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.out.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not seen; output:\n{self.out.read_text()}")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM, within: float = STOP_WITHIN) -> int:
        """Signal the command and return its exit code; a command still running ``within``
        seconds later fails the test (it is SIGKILLed first, so nothing outlives the test)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(within)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self._file.close()
            raise AssertionError(
                f"{self.proc.args[3:]} did not stop within {within} s of signal {sig}; "
                f"output:\n{self.out.read_text()}"
            ) from None
        self._file.close()
        return rc

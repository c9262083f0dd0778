"""SIGINT and SIGTERM: every command stops within a second, at every stage, leaving nothing.

Two modes, one handler:

* Until a command enters the loop it is meant to be stopped in, a signal raises ``Stopped``
  (a ``KeyboardInterrupt``) wherever the program is: connecting, waiting for a server's
  greeting, starting the fake fabric, probing. Every ``with`` and ``finally`` on the way out
  releases what it holds, and ``main`` exits 128 + the signal number (130, 143), as a shell
  reports a command ended by that signal.
* ``stop_event()`` switches to the loop's mode: a signal sets the event and the loop ends
  within its poll interval, then the command says what it did and exits as it documents
  (0 for ``server``, ``serve`` and ``monitor``: a signal is how they are stopped).

A command still running ``GRACE`` seconds after the first signal (a close that blocks, a
write to a full pipe) is ended with ``os._exit`` after one line on stderr, and so is one that
gets a second signal: a process never outlives its stop by more than that.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

__all__ = ["GRACE", "Stopped", "install", "stop_event"]

GRACE = 2.0  # seconds from the first signal to a forced exit


class Stopped(KeyboardInterrupt):
    """A stop signal arrived before the command's loop; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _State:
    event: threading.Event | None = None
    signalled = 0


def _force_exit(signum: int, why: str) -> None:
    try:
        os.write(2, f"ivshmem-bus: {why}: exiting now\n".encode())
    finally:
        os._exit(128 + signum)


def _watchdog(signum: int) -> None:
    threading.Event().wait(GRACE)
    _force_exit(signum, f"still running {GRACE:g} s after {signal.Signals(signum).name}")


def _handler(signum: int, frame: FrameType | None) -> None:
    _State.signalled += 1
    if _State.signalled > 1:
        _force_exit(signum, f"second signal ({signal.Signals(signum).name})")
    threading.Thread(target=_watchdog, args=(signum,), daemon=True).start()
    if _State.event is not None:
        _State.event.set()
        return
    raise Stopped(signum)


def install() -> Callable[[], None]:
    """Make SIGINT and SIGTERM raise ``Stopped`` (``main``, before any work); returns what
    puts the previous handlers back (``main`` may run inside another program, a test).
    Off the main thread (where Python cannot set handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    _State.event, _State.signalled = None, 0
    before = {sig: signal.signal(sig, _handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        _State.event = None
        for sig, handler in before.items():
            signal.signal(sig, handler)

    return restore


def stop_event() -> threading.Event:
    """From now on a signal sets this event instead of raising (set already if one came)."""
    event = threading.Event()
    if _State.signalled:
        event.set()
    _State.event = event
    return event


def exit_code(exc: Stopped) -> int:
    print(f"ivshmem-bus: stopped by {signal.Signals(exc.signum).name}", file=sys.stderr)
    return 128 + exc.signum

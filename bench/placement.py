"""Where the two processes of a pair run, and a machine made busy on purpose.

Wake-ups on a VM are bimodal: a few us when the woken process runs on the waker's vCPU, ~20
us or more when its vCPU was halted. Left to the scheduler, a C pair and a Python pair can
land differently and their ratio then compares placements, not code. So the eventfd pairs
run pinned, both processes the same way, C and Python alike, as separate rows:

* ``same core``: both on CPU 0 (a wake-up is a context switch on one CPU);
* ``two cores``: the first process on CPU 0, the second on CPU 1 (a cross-CPU wake-up).

Pinning is inherited: ``placed`` pins this process (and so what it forks or spawns) and
names the second process's CPU in ``BENCH_CHILD_CPU``, which the C reference's children
read; a Python child is pinned by pid (``pin``) before its warm-up.

``CpuHogs`` is the "busy machine" of issue 14: one CPU-bound process per CPU at normal
priority, for the serve loop's "with load" rows.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import resource
from collections.abc import Iterator

__all__ = [
    "PLACEMENTS",
    "CpuHogs",
    "fifo",
    "fifo_permitted",
    "pin",
    "placed",
    "placements",
]

PLACEMENTS = {"same core": (0, 0), "two cores": (0, 1)}  # (first, second) process's CPU


def placements() -> list[str]:
    """The placements this machine can give (two cores need two CPUs we may use)."""
    cpus = os.sched_getaffinity(0)
    return [name for name, pair in PLACEMENTS.items() if set(pair) <= cpus]


@contextlib.contextmanager
def placed(name: str) -> Iterator[int]:
    """Pin this process to the placement's first CPU for the block; yields the second's."""
    first, second = PLACEMENTS[name]
    before = os.sched_getaffinity(0)
    old_env = os.environ.get("BENCH_CHILD_CPU")
    os.sched_setaffinity(0, {first})
    os.environ["BENCH_CHILD_CPU"] = str(second)
    try:
        yield second
    finally:
        os.sched_setaffinity(0, before)
        if old_env is None:
            os.environ.pop("BENCH_CHILD_CPU", None)
        else:
            os.environ["BENCH_CHILD_CPU"] = old_env


def pin(pid: int, cpu: int) -> None:
    os.sched_setaffinity(pid, {cpu})


def fifo_permitted(priority: int = 10) -> bool:
    """Whether ``fifo`` can work here: root, or an RLIMIT_RTPRIO of at least ``priority``."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_RTPRIO)
    return os.geteuid() == 0 or soft == resource.RLIM_INFINITY or soft >= priority


def fifo(pid: int, priority: int = 10) -> bool:
    """SCHED_FIFO for ``pid`` (``serve --sched``'s policy); False if not permitted."""
    try:
        os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(priority))
    except PermissionError:
        return False
    return True


def _hog(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})
    while True:
        pass


class CpuHogs:
    """One busy-looping process per CPU we may use, for the block (killed at its end)."""

    def __init__(self) -> None:
        self.cpus = sorted(os.sched_getaffinity(0))
        self._procs: list[multiprocessing.process.BaseProcess] = []

    def __enter__(self) -> CpuHogs:
        ctx = multiprocessing.get_context("fork")
        for cpu in self.cpus:
            proc = ctx.Process(target=_hog, args=(cpu,), name=f"cpu-hog-{cpu}", daemon=True)
            proc.start()
            self._procs.append(proc)
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self._procs:
            proc.kill()
        for proc in self._procs:
            proc.join()
        self._procs.clear()

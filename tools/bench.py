"""Throughput and latency of ivshmem_bus against a C reference measured in the same run.

    python tools/bench.py [--quick] [--json OUT] [--runs N] [--only CASE,...]

Every case runs in two processes (the second forked with multiprocessing's "fork" context),
over the fake ivshmem device (``fake_pair``) or, for the raw-queue cases, a shared file on
tmpfs mapped MAP_SHARED by each process, as two VMs map BAR2. Each figure is the median of
``--runs`` independent runs (fresh processes and queues), with the min and max beside it.
Time is ``time.perf_counter_ns`` (CLOCK_MONOTONIC, the clock the C side reads too, so a
timestamp taken in one process can be compared with one taken in the other). Nothing is
pinned: on a 2-core machine two busy-polling processes own both cores, and the table says so.

Cases (``--only`` takes these names):

raw       64-byte slots one way through a 62-slot (4 KiB) and a 4096-slot queue: the C
          reference (``bench_ref.c``, same layout, acquire/release atomics, built here with
          ``cc`` into ``.cache/bench/``), ``SpscQueue.put``/``get`` per call, and the batch
          API (``put_many``/``get_many``, and ``put_many``/``drain`` with a no-op callback)
          moving half a queue (at most 256 slots) per call. The producer's clock starts
          before its first put and the consumer's stops after its last get: rate = slots /
          (end - start). The consumers also report their RSS growth over their second half.
encoded   virtio-msg one way: ``protocol.encode`` + ``put`` / ``get`` + ``protocol.decode``
          on the bus's 4 KiB driver queue, and the whole bus (``send``, a doorbell per
          message, / ``receive``, busy-polling).
rtt       request/response round trip (GET_DEVICE_STATUS to RngDevice served in a forked
          child by ``demo.served_device``): busy-poll (spin 1 s on both sides) and eventfd
          wake-up (spin 0), beside a C ping-pong over two SPSC queues (the spin floor) and a
          C eventfd ping-pong (the wake-up floor).
flood     the device-role serve loop under a flood of GET_DEVICE_STATUS: the driver sends
          back to back with 1 request in flight (as QEMU does) and with the queue kept full
          (61 in flight), a doorbell each; response time = request enqueued to response
          dequeued, against QEMU's ~1 ms deadline.
doorbell  one doorbell from ring to wake-up in the other process (C eventfd, Python
          ``os.write``/``poll``, ``FakeDevice.ring``/``wait``), the cost of the ``ring`` call,
          and what a burst of 32 ``bus.send`` costs in doorbells and receiver wake-ups.

Results go to ``bench-results.json`` (``--json``) so that runs can be compared; the smoke
test (tests/test_bench_smoke.py) checks its shape, never its figures. Other processes skew
everything here: each case records the largest share of the CPUs that processes other than
the benchmark used during one of its runs (``foreign_cpu``), and the table warns above 15%.
``--wait-quiet S`` waits up to S seconds before each run for the machine to go quiet and
does a disturbed run again (at most ``--runs`` extra runs per figure).
"""

from __future__ import annotations

import argparse
import array
import datetime
import hashlib
import itertools
import json
import mmap
import multiprocessing
import os
import platform
import resource
import select
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import ivshmem_bus
except ModuleNotFoundError:  # run as ``python tools/bench.py`` from a source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import ivshmem_bus

from ivshmem_bus import protocol as p
from ivshmem_bus.bus import (
    DEVICE_QUEUE_OFFSET,
    DRIVER_QUEUE_OFFSET,
    QUEUE_SIZE,
    VirtioMsgBus,
    reset_queues_of,
)
from ivshmem_bus.demo import served_device
from ivshmem_bus.fake import fake_pair
from ivshmem_bus.queue import QUEUE_HEADER_SIZE, SLOT_SIZE, SpscQueue, queue_capacity
from ivshmem_bus.transport import RngDevice

__all__ = ["CASES", "SCHEMA", "main"]

SCHEMA = "ivshmem-bus-bench/1"
CASES = ("raw", "encoded", "rtt", "flood", "doorbell")
DEFAULT_JSON = "bench-results.json"
PROFILE = "qemu-v0"
SMALL_REGION = 4096  # the bus's queue: 62 slots
LARGE_REGION = QUEUE_HEADER_SIZE + SLOT_SIZE * 4096  # 4096 slots
CHILD_TIMEOUT = 120.0  # s: a child silent for this long has hung
DEADLINE_US = 1000.0  # QEMU's driver side gives up after about 1 ms
BURST = 32
NOTE = (
    "2 cores, 2 processes: a busy-polling case keeps both cores busy (producer and consumer, "
    "or driver and device); nothing is pinned"
)

# Full-run counts per run; --quick divides them by 10 and runs 3 times instead of 5.
COUNTS: dict[str, int] = {
    "raw.c": 50_000_000,
    "raw.per-call": 3_000_000,
    "raw.batch": 5_000_000,
    "encoded.codec": 1_000_000,
    "encoded.bus": 1_000_000,
    "rtt.python": 50_000,
    "rtt.c": 50_000,
    "flood": 50_000,
    "doorbell.wake": 20_000,
    "doorbell.bursts": 2_000,
}
BUSY_WARN = 0.15  # other processes using more of the CPUs than this before the run: warn
MIN_COUNT = 64  # percentiles need samples, even at --scale 0.0001


# C reference ---------------------------------------------------------------------------------

C_SOURCE = r"""/* bench_ref.c: the C reference of tools/bench.py, which builds it. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* The queue layout of ivshmem_bus.queue / QEMU's spsc_queue.h. */
#define HEADER 128u
#define SLOT 64u
#define HEAD_OFF 0x00u
#define TAIL_OFF 0x40u
#define WARMUP 1000u

typedef struct { uint8_t *base; uint32_t cap, mine, cached; } queue_t;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) { perror(what); exit(2); }

static uint32_t load_index(const queue_t *q, uint32_t off) {
    uint32_t v = __atomic_load_n((uint32_t *)(q->base + off), __ATOMIC_ACQUIRE);
    if (v >= q->cap) { fprintf(stderr, "corrupt queue index %u\n", v); exit(3); }
    return v;
}

static void store_index(queue_t *q, uint32_t off, uint32_t v) {
    __atomic_store_n((uint32_t *)(q->base + off), v, __ATOMIC_RELEASE);
}

/* Producer: mine = head, cached = the peer's tail. Consumer: mine = tail, cached = head. */
static void q_open(queue_t *q, uint8_t *base, size_t len, int producer) {
    q->base = base;
    q->cap = (uint32_t)((len - HEADER) / SLOT);
    q->mine = load_index(q, producer ? HEAD_OFF : TAIL_OFF);
    q->cached = load_index(q, producer ? TAIL_OFF : HEAD_OFF);
}

static int q_put(queue_t *q, const void *src) {
    uint32_t next = q->mine + 1 == q->cap ? 0 : q->mine + 1;
    if (next == q->cached) {  /* full by the cache: look at the consumer's tail */
        q->cached = load_index(q, TAIL_OFF);
        if (next == q->cached) return 0;
    }
    memcpy(q->base + HEADER + (size_t)q->mine * SLOT, src, SLOT);
    store_index(q, HEAD_OFF, next);
    q->mine = next;
    return 1;
}

static int q_get(queue_t *q, void *dst) {
    if (q->mine == q->cached) {  /* empty by the cache: look at the producer's head */
        q->cached = load_index(q, HEAD_OFF);
        if (q->mine == q->cached) return 0;
    }
    memcpy(dst, q->base + HEADER + (size_t)q->mine * SLOT, SLOT);
    uint32_t next = q->mine + 1 == q->cap ? 0 : q->mine + 1;
    store_index(q, TAIL_OFF, next);
    q->mine = next;
    return 1;
}

static uint8_t *map_file(const char *path, size_t len) {
    int fd = open(path, O_RDWR);
    if (fd < 0) die(path);
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) die("mmap");
    close(fd);
    return p;
}

static void xfer(int fd, void *buf, size_t n, int out) {
    uint8_t *b = buf;
    while (n) {
        ssize_t r = out ? write(fd, b, n) : read(fd, b, n);
        if (r <= 0) die(out ? "write" : "read");
        b += r;
        n -= (size_t)r;
    }
}

static pid_t fork_child(void) {
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) prctl(PR_SET_PDEATHSIG, SIGKILL);  /* never outlive the benchmark */
    return pid;
}

static void dump(const char *path, const uint64_t *a, size_t n, const uint64_t *b) {
    FILE *f = fopen(path, "wb");
    if (!f) die(path);
    if (fwrite(a, 8, n, f) != n || (b && fwrite(b, 8, n, f) != n)) die("fwrite");
    fclose(f);
}

/* spsc FILE LEN COUNT: one way; prints "count ns errors". */
static int run_spsc(const char *path, size_t len, uint64_t count) {
    int ready[2], done[2];
    if (pipe(ready) || pipe(done)) die("pipe");
    if (fork_child() == 0) {
        queue_t q;
        q_open(&q, map_file(path, len), len, 0);
        uint8_t slot[SLOT];
        uint64_t bad = 0, seq;
        xfer(ready[1], "r", 1, 1);
        for (uint64_t i = 0; i < count; i++) {
            while (!q_get(&q, slot)) {}
            memcpy(&seq, slot, 8);
            bad += seq != i;
        }
        uint64_t out[2] = {now_ns(), bad};
        xfer(done[1], out, sizeof out, 1);
        _exit(0);
    }
    queue_t q;
    q_open(&q, map_file(path, len), len, 1);
    uint8_t slot[SLOT], c;
    memset(slot, 0xa5, SLOT);
    xfer(ready[0], &c, 1, 0);
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < count; i++) {
        memcpy(slot, &i, 8);
        while (!q_put(&q, slot)) {}
    }
    uint64_t out[2];
    xfer(done[0], out, sizeof out, 0);
    wait(NULL);
    printf("%llu %llu %llu\n", (unsigned long long)count, (unsigned long long)(out[0] - t0),
           (unsigned long long)out[1]);
    return out[1] != 0;
}

/* spin-rtt FILE COUNT OUT: ping-pong over two 4 KiB queues (request at 0, response at 4096),
   both sides busy-polling; COUNT round trips in ns to OUT. */
static int run_spin_rtt(const char *path, uint64_t count, const char *out) {
    uint64_t total = count + WARMUP;
    if (fork_child() == 0) {
        uint8_t *m = map_file(path, 8192), slot[SLOT];
        queue_t req, resp;
        q_open(&req, m, 4096, 0);
        q_open(&resp, m + 4096, 4096, 1);
        for (uint64_t i = 0; i < total; i++) {
            while (!q_get(&req, slot)) {}
            slot[0] |= 0x01;  /* the response bit */
            while (!q_put(&resp, slot)) {}
        }
        _exit(0);
    }
    uint8_t *m = map_file(path, 8192), slot[SLOT];
    queue_t req, resp;
    q_open(&req, m, 4096, 1);
    q_open(&resp, m + 4096, 4096, 0);
    uint64_t *rtt = calloc(count, 8);
    memset(slot, 0, SLOT);
    for (uint64_t i = 0; i < total; i++) {
        uint64_t t0 = now_ns();
        while (!q_put(&req, slot)) {}
        while (!q_get(&resp, slot)) {}
        if (i >= WARMUP) rtt[i - WARMUP] = now_ns() - t0;
    }
    wait(NULL);
    dump(out, rtt, count, NULL);
    return 0;
}

/* efd COUNT OUT: eventfd ping-pong, both sides blocked in read(2); COUNT round trips, then
   COUNT one-way wake-ups (write in the parent to return from read in the child), ns, to OUT. */
static int run_efd(uint64_t count, const char *out) {
    int ping = eventfd(0, 0), pong = eventfd(0, 0);
    if (ping < 0 || pong < 0) die("eventfd");
    volatile uint64_t *woke = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                                   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (woke == MAP_FAILED) die("mmap");
    uint64_t total = count + WARMUP, one = 1, v;
    if (fork_child() == 0) {
        for (uint64_t i = 0; i < total; i++) {
            xfer(ping, &v, 8, 0);
            __atomic_store_n(woke, now_ns(), __ATOMIC_RELEASE);
            xfer(pong, &one, 8, 1);
        }
        _exit(0);
    }
    uint64_t *rtt = calloc(count, 8), *oneway = calloc(count, 8);
    for (uint64_t i = 0; i < total; i++) {
        uint64_t t0 = now_ns();
        xfer(ping, &one, 8, 1);
        xfer(pong, &v, 8, 0);
        uint64_t t1 = now_ns();
        if (i >= WARMUP) {
            rtt[i - WARMUP] = t1 - t0;
            oneway[i - WARMUP] = __atomic_load_n(woke, __ATOMIC_ACQUIRE) - t0;
        }
    }
    wait(NULL);
    dump(out, rtt, count, oneway);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 5 && !strcmp(argv[1], "spsc"))
        return run_spsc(argv[2], strtoull(argv[3], 0, 0), strtoull(argv[4], 0, 0));
    if (argc == 5 && !strcmp(argv[1], "spin-rtt"))
        return run_spin_rtt(argv[2], strtoull(argv[3], 0, 0), argv[4]);
    if (argc == 4 && !strcmp(argv[1], "efd"))
        return run_efd(strtoull(argv[2], 0, 0), argv[3]);
    fprintf(stderr, "usage: %s spsc FILE LEN COUNT | spin-rtt FILE COUNT OUT | efd COUNT OUT\n",
            argv[0]);
    return 64;
}
"""


def default_cache_dir() -> Path:
    """``.cache/bench`` of the source tree when run from one, else the user's cache."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and os.access(root, os.W_OK):
        return root / ".cache" / "bench"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ivshmem-bus" / "bench"


def _compiler() -> list[str] | None:
    """The C compiler command: $CC (may carry arguments), else cc or gcc on PATH."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def _cc_version(cc: list[str]) -> str:
    try:
        out = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.splitlines()[0].strip() if out.stdout else "unknown"


def build_reference(cache_dir: Path) -> tuple[Path | None, str]:
    """Compile ``C_SOURCE`` (once per source and compiler); (binary, "") or (None, why not)."""
    cc = _compiler()
    if cc is None:
        return None, "no C compiler (cc) on PATH: C reference cases skipped"
    flags = ["-O2", "-std=gnu11", "-Wall", "-Wextra"]
    identity = "\0".join([C_SOURCE, *cc, _cc_version(cc), *flags])
    binary = cache_dir / f"bench_ref-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary, ""
    cache_dir.mkdir(parents=True, exist_ok=True)
    source = binary.with_suffix(".c")  # same name for the same text: no race between runs
    source.write_text(C_SOURCE)
    tmp = binary.with_suffix(f".tmp{os.getpid()}")
    try:
        proc = subprocess.run(
            [*cc, *flags, "-o", str(tmp), str(source)], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{' '.join(cc)} could not build the C reference: {exc}"
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        return None, f"{' '.join(cc)} failed to build the C reference:\n{proc.stderr.strip()}"
    os.replace(tmp, binary)
    return binary, ""


# Statistics and records ----------------------------------------------------------------------


def summarize(values: Sequence[float], unit: str) -> dict[str, Any]:
    """One figure over runs: median, min, max and every run's value."""
    return {
        "unit": unit,
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": list(values),
    }


def percentiles_us(samples_ns: Sequence[int]) -> dict[str, float]:
    """p50, p99, p99.9, max (us) and how many samples exceed 1 ms, for one run."""
    data = sorted(samples_ns)
    n = len(data)

    def at(q: float) -> float:
        return data[min(n - 1, int(q * n))] / 1000  # nearest rank

    return {
        "p50_us": at(0.50),
        "p99_us": at(0.99),
        "p99_9_us": at(0.999),
        "max_us": data[-1] / 1000,
        "over_1ms": float(sum(1 for v in data if v > DEADLINE_US * 1000)),
    }


LATENCY_UNITS = {
    "p50_us": "us",
    "p99_us": "us",
    "p99_9_us": "us",
    "max_us": "us",
    "over_1ms": "count",
}


def combine(runs: list[dict[str, float]], units: dict[str, str]) -> dict[str, Any]:
    """Per-run dicts of figures -> {figure: summarize(...)} over the runs."""
    return {key: summarize([r[key] for r in runs], unit) for key, unit in units.items()}


def record(
    rid: str, group: str, label: str, impl: str, params: dict[str, Any], metrics: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": rid,
        "group": group,
        "label": label,
        "impl": impl,
        "params": params,
        "metrics": metrics,
    }


# Processes -----------------------------------------------------------------------------------


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _half(count: int) -> int:
    """Messages a consumer takes before its first RSS sample (one-time allocations settle)."""
    return max(1, count // 2)


def _rss_metrics(growth_kib: int, count: int) -> dict[str, float]:
    """RSS growth of a consumer over the second half of its messages, and per message."""
    measured = count - _half(count)
    return {
        "rss_growth_kib": float(growth_kib),
        "rss_bytes_per_msg": growth_kib * 1024 / max(1, measured),
    }


RSS_SLACK_KIB = 128  # one-time growth (allocator arenas, 16-page steps); a leak is per message
RSS_UNITS = {"rss_growth_kib": "KiB", "rss_bytes_per_msg": "B/msg"}


def _child_entry(conn: Any, target: Callable[..., Any], args: tuple[Any, ...]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    try:
        conn.send(("ok", target(conn, *args)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class Child:
    """A forked process running ``target(conn, *args)``; its return value is its last message."""

    def __init__(self, target: Callable[..., Any], *args: Any) -> None:
        ctx = multiprocessing.get_context("fork")
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_child_entry, args=(child_conn, target, args), daemon=True)
        self.proc.start()
        child_conn.close()

    def recv(self, timeout: float = CHILD_TIMEOUT) -> Any:
        if not self.conn.poll(timeout):
            raise RuntimeError(f"child {self.proc.pid} sent nothing for {timeout} s")
        try:
            kind, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"child {self.proc.pid} died (exit {self.proc.exitcode})") from None
        if kind == "error":
            raise RuntimeError(f"child {self.proc.pid} failed:\n{value}")
        return value

    def send(self, obj: Any) -> None:
        self.conn.send(obj)

    def close(self) -> None:
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ready(conn: Any) -> None:
    conn.send(("ok", "ready"))


class _Deadline:
    """Spin-wait helper for the slow path only (queue full or empty): never in the fast path."""

    def __init__(self, seconds: float = CHILD_TIMEOUT, peer: Child | None = None) -> None:
        self.end = time.monotonic() + seconds
        self.peer = peer
        self.spins = 0

    def check(self) -> None:
        self.spins += 1
        if self.spins & 0x3FFF:
            return
        if time.monotonic() > self.end:
            raise TimeoutError("benchmark peer made no progress")
        if self.peer is not None and not self.peer.proc.is_alive():
            raise RuntimeError(f"benchmark peer died (exit {self.peer.proc.exitcode})")


def _put_wait(put: Callable[[Any], bool], item: Any, dl: _Deadline) -> None:
    while not put(item):
        dl.check()


def _get_wait(get: Callable[..., Any], dl: _Deadline, *args: Any) -> Any:
    while (data := get(*args)) is None:
        dl.check()
    return data


@contextmanager
def shm_file(size: int) -> Iterator[str]:
    """A zeroed file of ``size`` bytes on tmpfs (shared memory, like a memfd BAR2)."""
    where = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    fd, path = tempfile.mkstemp(prefix="ivshmem-bench-", dir=where)
    try:
        os.ftruncate(fd, size)
        os.close(fd)
        yield path
    finally:
        os.unlink(path)


@contextmanager
def mapped_queue(path: str, size: int) -> Iterator[SpscQueue]:
    fd = os.open(path, os.O_RDWR)
    try:
        mem = mmap.mmap(fd, size, mmap.MAP_SHARED)
    finally:
        os.close(fd)
    q = SpscQueue(memoryview(mem))
    try:
        yield q
    finally:
        q.release()
        mem.close()


# Raw slots -----------------------------------------------------------------------------------

PAYLOAD = bytes(range(64))
LAST = bytes(range(64, 128))


def _produce(q: SpscQueue, api: str, count: int, peer: Child, batch: int = 1) -> None:
    """Put ``count`` slots: one per call (the last one ``LAST``), or ``batch`` per put_many."""
    dl = _Deadline(peer=peer)
    if api == "per-call":
        put = q.put
        for _ in range(count - 1):
            if not put(PAYLOAD):
                _put_wait(put, PAYLOAD, dl)
        _put_wait(put, LAST, dl)
        return
    put_many = q.put_many
    items = [PAYLOAD] * batch
    sent = 0
    while sent < count:
        left = count - sent
        done = put_many(items if left >= batch else items[:left])
        if not done:
            dl.check()
        sent += done


def _consume_child(
    conn: Any, path: str, size: int, api: str, count: int, batch: int
) -> dict[str, Any]:
    """The consumer process (at most ``batch`` slots per get_many/drain): returns its end
    timestamp, whether the last slot was the right one, and its RSS growth."""
    with mapped_queue(path, size) as q:
        dl = _Deadline()
        last: Any = None
        warm = _half(count)
        get, get_many, drain = q.get, q.get_many, q.drain

        def noop(view: memoryview) -> None:
            pass

        def run(n: int) -> Any:
            got = 0
            last = None
            if api == "per-call":
                for _ in range(n):
                    last = get()
                    if last is None:
                        last = _get_wait(get, dl)
                return last
            if api == "batch":
                while got < n:
                    out = get_many(min(batch, n - got))
                    if out:
                        got += len(out)
                        last = out[-1]
                    else:
                        dl.check()
                return last
            while got < n:  # zero-copy
                done = drain(noop, min(batch, n - got))
                if not done:
                    dl.check()
                got += done
            return None

        _ready(conn)
        run(warm)
        rss_warm = _rss_kib()
        last = run(count - warm)
        end = time.perf_counter_ns()
        rss_end = _rss_kib()
    ok = api != "per-call" or last == LAST
    return {"end_ns": end, "ok": ok, "rss_growth_kib": rss_end - rss_warm}


def raw_python_run(size: int, api: str, count: int, batch: int = 1) -> dict[str, float]:
    with (
        shm_file(size) as path,
        Child(_consume_child, path, size, api, count, batch) as child,
        mapped_queue(path, size) as q,
    ):
        child.recv()  # ready
        start = time.perf_counter_ns()
        _produce(q, "per-call" if api == "per-call" else "batch", count, child, batch)
        result = child.recv()
    if not result["ok"]:
        raise RuntimeError(f"raw {api}: the consumer saw the wrong last slot")
    return {
        "rate": count / ((result["end_ns"] - start) / 1e9),
        **_rss_metrics(result["rss_growth_kib"], count),
    }


def raw_c_run(binary: Path, size: int, count: int) -> dict[str, float]:
    with shm_file(size) as path:
        out = subprocess.run(
            [str(binary), "spsc", path, str(size), str(count)],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT,
        )
    if out.returncode != 0:
        raise RuntimeError(f"C spsc failed ({out.returncode}): {out.stderr.strip()}")
    n, ns, errors = (int(x) for x in out.stdout.split())
    if errors:
        raise RuntimeError(f"C spsc: {errors} slots out of sequence")
    return {"rate": n / (ns / 1e9)}


def batch_size(slots: int) -> int:
    """Slots per put_many / get_many / drain: half the queue (at most 256).

    A batch of the whole queue (capacity - 1) runs the two sides in lock step: the consumer
    sees nothing until the producer publishes a full queue, and the producer waits for the
    whole drain, so nothing overlaps (measured: ~25% slower on 62 slots, ~2x on 4096).
    """
    return min(256, slots // 2)


def case_raw(cfg: Config) -> list[dict[str, Any]]:
    out = []
    for size in (SMALL_REGION, LARGE_REGION):
        slots = queue_capacity(size)
        params = {"slots": slots, "region_bytes": size, "slot_bytes": SLOT_SIZE}
        qname = f"q{slots}"
        if cfg.binary is not None:
            n = cfg.count("raw.c")
            runs = cfg.repeat(lambda n=n, size=size: raw_c_run(cfg.binary, size, n))
            out.append(
                record(
                    f"raw.{qname}.c",
                    "raw",
                    "C reference (put/get, acquire/release)",
                    "c",
                    {**params, "count": n},
                    combine(runs, {"rate": "slots/s"}),
                )
            )
        for api, rid, label, key in (
            ("per-call", "per-call", "Python put / get (per call)", "raw.per-call"),
            ("batch", "batch", "Python put_many / get_many", "raw.batch"),
            ("zero-copy", "drain", "Python put_many / drain (no-op fn)", "raw.batch"),
        ):
            n = cfg.count(key)
            batch = batch_size(slots) if api != "per-call" else 1
            runs = cfg.repeat(
                lambda n=n, size=size, api=api, batch=batch: raw_python_run(size, api, n, batch)
            )
            out.append(
                record(
                    f"raw.{qname}.{rid}",
                    "raw",
                    label,
                    "python",
                    {**params, "count": n, "batch": batch},
                    combine(runs, {"rate": "slots/s", **RSS_UNITS}),
                )
            )
    return out


# Encoded virtio-msg --------------------------------------------------------------------------


def sample_messages() -> list[p.Message]:
    """64 real driver -> device messages: EVENT_AVAIL and SET_DEVICE_STATUS, alternating."""
    return [
        p.EventAvail(index=i % 4, next_offset_wrap=i * 16)
        if i % 2 == 0
        else p.SetDeviceStatus(status=0x0F)
        for i in range(64)
    ]


def _codec_consumer(conn: Any, dev: Any, other: Any, count: int) -> dict[str, Any]:
    other.close()
    q = SpscQueue(dev.shmem[DRIVER_QUEUE_OFFSET : DRIVER_QUEUE_OFFSET + QUEUE_SIZE])
    get, decode, size = q.get, p.decode, p.MESSAGE_SIZE[PROFILE]
    dl = _Deadline()
    warm = _half(count)

    def run(n: int) -> Any:
        msg = None
        for _ in range(n):
            raw = get(size)
            if raw is None:
                raw = _get_wait(get, dl, size)
            msg = decode(raw, PROFILE)
        return msg

    _ready(conn)
    run(warm)
    rss_warm = _rss_kib()
    last = run(count - warm)
    end = time.perf_counter_ns()
    rss_end = _rss_kib()
    q.release()
    return {"end_ns": end, "last": repr(last), "rss_growth_kib": rss_end - rss_warm}


def encoded_codec_run(count: int) -> dict[str, float]:
    msgs = sample_messages()
    a, b = fake_pair(shm_size=16384)
    try:
        reset_queues_of(a)
        with Child(_codec_consumer, b, a, count) as child:
            b.close()
            q = SpscQueue(a.shmem[DRIVER_QUEUE_OFFSET : DRIVER_QUEUE_OFFSET + QUEUE_SIZE])
            put, encode = q.put, p.encode
            dl = _Deadline(peer=child)
            child.recv()
            start = time.perf_counter_ns()
            for i in range(count):
                raw = encode(msgs[i & 63], PROFILE)
                if not put(raw):
                    _put_wait(put, raw, dl)
            result = child.recv()
            q.release()
    finally:
        a.close()
        b.close()
    if result["last"] != repr(msgs[(count - 1) & 63]):
        raise RuntimeError(f"encoded: last message decoded as {result['last']}")
    return {
        "rate": count / ((result["end_ns"] - start) / 1e9),
        **_rss_metrics(result["rss_growth_kib"], count),
    }


def _bus_consumer(conn: Any, dev: Any, other: Any, peer_vmid: int, count: int) -> dict[str, Any]:
    other.close()
    with VirtioMsgBus(dev, "device", peer_vmid, PROFILE, spin=3600.0) as bus:
        receive = bus.receive
        warm = _half(count)
        _ready(conn)
        msg = None
        for _ in range(warm):
            msg = receive(CHILD_TIMEOUT)
        rss_warm = _rss_kib()
        for _ in range(count - warm):
            msg = receive(CHILD_TIMEOUT)
        end = time.perf_counter_ns()
        rss_end = _rss_kib()
        stats = bus.stats
    return {
        "end_ns": end,
        "last": repr(msg),
        "rss_growth_kib": rss_end - rss_warm,
        "received": stats.received,
        "dropped": stats.dropped,
    }


def encoded_bus_run(count: int) -> dict[str, float]:
    msgs = sample_messages()
    a, b = fake_pair(shm_size=16384)
    peer = b.vmid
    try:
        reset_queues_of(a)
        with Child(_bus_consumer, b, a, a.vmid, count) as child:
            b.close()
            with VirtioMsgBus(a, "driver", peer, PROFILE) as bus:
                send = bus.send
                child.recv()
                start = time.perf_counter_ns()
                for i in range(count):
                    send(msgs[i & 63], CHILD_TIMEOUT)
                result = child.recv()
                rung = bus.stats.doorbells_rung
                waits = bus.stats.queue_full_waits
    finally:
        a.close()
        b.close()
    if result["received"] != count or result["last"] != repr(msgs[(count - 1) & 63]):
        raise RuntimeError(f"bus: received {result['received']} of {count}, last {result['last']}")
    return {
        "rate": count / ((result["end_ns"] - start) / 1e9),
        **_rss_metrics(result["rss_growth_kib"], count),
        "doorbells_per_msg": rung / count,
        "queue_full_waits": float(waits),
    }


def case_encoded(cfg: Config) -> list[dict[str, Any]]:
    size = p.MESSAGE_SIZE[PROFILE]
    params = {
        "profile": PROFILE,
        "message_bytes": size,
        "slots": queue_capacity(QUEUE_SIZE),
        "messages": "EventAvail / SetDeviceStatus",
    }
    n = cfg.count("encoded.codec")
    codec = cfg.repeat(lambda: encoded_codec_run(n))
    m = cfg.count("encoded.bus")
    bus = cfg.repeat(lambda: encoded_bus_run(m))
    return [
        record(
            "encoded.codec",
            "encoded",
            "encode+put / get+decode",
            "python",
            {**params, "count": n},
            combine(codec, {"rate": "msgs/s", **RSS_UNITS}),
        ),
        record(
            "encoded.bus",
            "encoded",
            "bus.send (doorbell each) / receive",
            "python",
            {**params, "count": m, "receiver_spin_s": 3600.0},
            combine(
                bus,
                {
                    "rate": "msgs/s",
                    **RSS_UNITS,
                    "doorbells_per_msg": "doorbells",
                    "queue_full_waits": "count",
                },
            ),
        ),
    ]


# Round trips ---------------------------------------------------------------------------------

RTT_MODES = {"busy-poll": 1.0, "eventfd": 0.0}  # spin seconds on both sides


def rtt_python_run(spin: float, count: int) -> dict[str, float]:
    a, b = fake_pair(shm_size=16384)
    peer = b.vmid
    try:
        reset_queues_of(a)
        with served_device(b, a.vmid, PROFILE, make=RngDevice, others=(a,), spin=spin):
            b.close()
            with VirtioMsgBus(a, "driver", peer, PROFILE, spin=spin) as bus:
                request, msg = bus.request, p.GetDeviceStatus()
                for _ in range(min(1000, count)):  # warm up both processes
                    request(msg, 5.0)
                clock = time.perf_counter_ns
                times = array.array("q", bytes(8 * count))
                for i in range(count):
                    t0 = clock()
                    request(msg, 5.0)
                    times[i] = clock() - t0
    finally:
        a.close()
        b.close()
    return percentiles_us(times)


def _read_u64(path: str, n: int, index: int = 0) -> array.array:
    data = array.array("Q")
    with open(path, "rb") as f:
        f.seek(8 * n * index)
        data.fromfile(f, n)
    return data


def c_pingpong_run(binary: Path, mode: str, count: int) -> tuple[dict[str, float], array.array]:
    """C ping-pong round trips (and, for eventfd, the one-way wake-ups as second value)."""
    with tempfile.TemporaryDirectory(prefix="ivshmem-bench-") as tmp:
        out = os.path.join(tmp, "samples")
        if mode == "spin":
            with shm_file(8192) as path:
                args = [str(binary), "spin-rtt", path, str(count), out]
                proc = subprocess.run(args, capture_output=True, text=True, timeout=CHILD_TIMEOUT)
        else:
            args = [str(binary), "efd", str(count), out]
            proc = subprocess.run(args, capture_output=True, text=True, timeout=CHILD_TIMEOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"C {mode} ping-pong failed: {proc.stderr.strip()}")
        rtt = _read_u64(out, count)
        oneway = _read_u64(out, count, 1) if mode == "efd" else array.array("Q")
    return percentiles_us(rtt), oneway


def case_rtt(cfg: Config) -> list[dict[str, Any]]:
    out = []
    n = cfg.count("rtt.python")
    nc = cfg.count("rtt.c")
    if cfg.binary is not None:
        runs = cfg.repeat(lambda: c_pingpong_run(cfg.binary, "spin", nc)[0])
        out.append(
            record(
                "rtt.c.spin",
                "rtt",
                "C ping-pong, 2 SPSC queues, busy-poll",
                "c",
                {"count": nc, "mode": "busy-poll"},
                combine(runs, LATENCY_UNITS),
            )
        )
    runs = cfg.repeat(lambda: rtt_python_run(RTT_MODES["busy-poll"], n))
    out.append(
        record(
            "rtt.python.busy-poll",
            "rtt",
            "Python request, busy-poll (spin 1 s)",
            "python",
            {
                "count": n,
                "mode": "busy-poll",
                "spin_s": 1.0,
                "request": "GetDeviceStatus",
                "device": "RngDevice",
            },
            combine(runs, LATENCY_UNITS),
        )
    )
    if cfg.binary is not None:

        def c_efd() -> dict[str, float]:
            rtt, oneway = c_pingpong_run(cfg.binary, "efd", nc)
            cfg.c_oneway.append(percentiles_us(oneway))
            return rtt

        runs = cfg.repeat(c_efd)
        out.append(
            record(
                "rtt.c.eventfd",
                "rtt",
                "C eventfd ping-pong (blocking read)",
                "c",
                {"count": nc, "mode": "eventfd"},
                combine(runs, LATENCY_UNITS),
            )
        )
    runs = cfg.repeat(lambda: rtt_python_run(RTT_MODES["eventfd"], n))
    out.append(
        record(
            "rtt.python.eventfd",
            "rtt",
            "Python request, eventfd wake (spin 0)",
            "python",
            {
                "count": n,
                "mode": "eventfd",
                "spin_s": 0.0,
                "request": "GetDeviceStatus",
                "device": "RngDevice",
            },
            combine(runs, LATENCY_UNITS),
        )
    )
    return out


# Serve loop under a flood --------------------------------------------------------------------


FLOOD_WINDOWS = (1, 61)  # requests in flight: QEMU's one at a time; the queue kept full


def flood_run(spin: float, window: int, count: int) -> dict[str, float]:
    """Requests back to back, ``window`` in flight; per request: put to its response's get."""
    raw_req = p.encode(p.GetDeviceStatus(), PROFILE)
    size = p.MESSAGE_SIZE[PROFILE]
    a, b = fake_pair(shm_size=16384)
    peer = b.vmid
    try:
        reset_queues_of(a)
        with served_device(b, a.vmid, PROFILE, make=RngDevice, others=(a,), spin=spin) as proc:
            b.close()
            tx = SpscQueue(a.shmem[DRIVER_QUEUE_OFFSET : DRIVER_QUEUE_OFFSET + QUEUE_SIZE])
            rx = SpscQueue(a.shmem[DEVICE_QUEUE_OFFSET : DEVICE_QUEUE_OFFSET + QUEUE_SIZE])
            put, get, ring, clock = tx.put, rx.get, a.ring, time.perf_counter_ns
            dl = _Deadline()
            for _ in range(min(1000, count)):  # warm up: the child is still starting
                _put_wait(put, raw_req, dl)
                ring(peer, 0)
                _get_wait(get, dl, size)
            sent_at = array.array("q", bytes(8 * count))
            times = array.array("q", bytes(8 * count))
            sent = received = spins = 0
            deadline = time.monotonic() + CHILD_TIMEOUT
            while received < count:
                while sent < count and sent - received < window:
                    t = clock()
                    if not put(raw_req):
                        break
                    sent_at[sent] = t
                    sent += 1
                    ring(peer, 0)
                data = get(size)
                if data is None:
                    spins += 1
                    if not spins & 0xFFFF and (time.monotonic() > deadline or not proc.is_alive()):
                        raise RuntimeError(f"flood: device stopped answering at {received}")
                    continue
                times[received] = clock() - sent_at[received]
                received += 1
            end = clock()
            last = p.decode(data, PROFILE)
            tx.release()
            rx.release()
    finally:
        a.close()
        b.close()
    if not isinstance(last, p.GetDeviceStatusResponse):
        raise RuntimeError(f"flood: unexpected response {last!r}")
    result = percentiles_us(times)
    result["rate"] = count / ((end - sent_at[0]) / 1e9)
    return result


FLOOD_UNITS = {**LATENCY_UNITS, "rate": "responses/s"}


def case_flood(cfg: Config) -> list[dict[str, Any]]:
    n = cfg.count("flood")
    out = []
    for window in FLOOD_WINDOWS:
        for mode, spin in RTT_MODES.items():
            runs = cfg.repeat(lambda spin=spin, window=window: flood_run(spin, window, n))
            out.append(
                record(
                    f"flood.{mode}.w{window}",
                    "flood",
                    f"{window} in flight, device {mode}",
                    "python",
                    {
                        "count": n,
                        "in_flight": window,
                        "device_spin_s": spin,
                        "driver": "raw queues, busy-poll, a doorbell per request",
                        "request": "GetDeviceStatus",
                        "device": "RngDevice",
                    },
                    combine(runs, FLOOD_UNITS),
                )
            )
    return out


# Doorbells -----------------------------------------------------------------------------------

_ONE = (1).to_bytes(8, "little")
_STAMP = struct.Struct("<q")
STAMP_OFFSET = 0x3000  # in BAR2, past both queues


def _wake_child(conn: Any, dev: Any, other: Any, peer_vmid: int, total: int) -> None:
    other.close()
    shm, wait, ring, clock = dev.shmem, dev.wait, dev.ring, time.perf_counter_ns
    _ready(conn)
    for _ in range(total):
        while not wait(CHILD_TIMEOUT):
            pass
        _STAMP.pack_into(shm, STAMP_OFFSET, clock())
        ring(peer_vmid, 0)


def wake_device_run(count: int) -> dict[str, float]:
    """FakeDevice.ring in one process to FakeDevice.wait returning in the other."""
    warm = min(500, count)
    a, b = fake_pair(shm_size=16384)
    peer = b.vmid
    try:
        with Child(_wake_child, b, a, a.vmid, warm + count) as child:
            b.close()
            shm, wait, ring, clock = a.shmem, a.wait, a.ring, time.perf_counter_ns
            oneway = array.array("q", bytes(8 * count))
            ring_ns = array.array("q", bytes(8 * count))
            child.recv()
            for i in range(warm + count):
                t0 = clock()
                ring(peer, 0)
                t1 = clock()
                while not wait(CHILD_TIMEOUT):
                    pass
                if i >= warm:
                    oneway[i - warm] = _STAMP.unpack_from(shm, STAMP_OFFSET)[0] - t0
                    ring_ns[i - warm] = t1 - t0
            child.recv()
    finally:
        a.close()
        b.close()
    result = percentiles_us(oneway)
    result["ring_call_us"] = statistics.median(ring_ns) / 1000
    return result


def _poll_child(conn: Any, ping: int, pong: int, stamp: mmap.mmap, total: int) -> None:
    poller = select.poll()
    poller.register(ping, select.POLLIN)
    clock, read, write = time.perf_counter_ns, os.read, os.write
    _ready(conn)
    for _ in range(total):
        poller.poll()
        read(ping, 8)
        _STAMP.pack_into(stamp, 0, clock())
        write(pong, _ONE)


def wake_minimal_run(count: int) -> dict[str, float]:
    """The least Python can do: os.write to an eventfd, poll + os.read in the other process."""
    warm = min(500, count)
    ping = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    pong = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    stamp = mmap.mmap(-1, 4096)  # MAP_SHARED | MAP_ANONYMOUS: shared across fork
    try:
        with Child(_poll_child, ping, pong, stamp, warm + count) as child:
            poller = select.poll()
            poller.register(pong, select.POLLIN)
            clock, read, write = time.perf_counter_ns, os.read, os.write
            oneway = array.array("q", bytes(8 * count))
            ring_ns = array.array("q", bytes(8 * count))
            child.recv()
            for i in range(warm + count):
                t0 = clock()
                write(ping, _ONE)
                t1 = clock()
                poller.poll()
                read(pong, 8)
                if i >= warm:
                    oneway[i - warm] = _STAMP.unpack_from(stamp, 0)[0] - t0
                    ring_ns[i - warm] = t1 - t0
            child.recv()
    finally:
        os.close(ping)
        os.close(pong)
        stamp.close()
    result = percentiles_us(oneway)
    result["ring_call_us"] = statistics.median(ring_ns) / 1000
    return result


def _burst_child(conn: Any, dev: Any, other: Any, peer_vmid: int, total: int) -> dict[str, Any]:
    other.close()
    with VirtioMsgBus(dev, "device", peer_vmid, PROFILE, spin=0.0) as bus:
        _ready(conn)
        for i in range(total):
            if bus.receive(CHILD_TIMEOUT) is None:
                raise TimeoutError(f"burst receiver: message {i} never came")
            if (i + 1) % BURST == 0:
                conn.send(("ok", i + 1))
        stats = bus.stats
        return {"received": stats.received, "wakeups": stats.doorbell_wakeups}


def burst_run(bursts: int) -> dict[str, float]:
    """``bursts`` times: BURST bus.send back to back, then wait until the receiver has them."""
    msgs = sample_messages()
    a, b = fake_pair(shm_size=16384)
    peer = b.vmid
    try:
        reset_queues_of(a)
        with Child(_burst_child, b, a, a.vmid, bursts * BURST) as child:
            b.close()
            with VirtioMsgBus(a, "driver", peer, PROFILE) as bus:
                send, clock = bus.send, time.perf_counter_ns
                per_msg = []
                child.recv()
                for _ in range(bursts):
                    time.sleep(0.0002)  # let the receiver fall asleep on its eventfd
                    t0 = clock()
                    for msg in msgs[:BURST]:
                        send(msg)
                    per_msg.append((clock() - t0) / BURST / 1000)
                    child.recv()
                result = child.recv()
                rung = bus.stats.doorbells_rung
    finally:
        a.close()
        b.close()
    if result["received"] != bursts * BURST:
        raise RuntimeError(f"burst: received {result['received']} of {bursts * BURST}")
    return {
        "doorbells_per_burst": rung / bursts,
        "wakeups_per_burst": result["wakeups"] / bursts,
        "send_us_per_msg": statistics.median(per_msg),
    }


def case_doorbell(cfg: Config) -> list[dict[str, Any]]:
    out = []
    n = cfg.count("doorbell.wake")
    units = {**LATENCY_UNITS, "ring_call_us": "us"}
    if cfg.binary is not None:
        nc = cfg.count("rtt.c")

        def c_oneway() -> dict[str, float]:
            _, oneway = c_pingpong_run(cfg.binary, "efd", nc)
            return percentiles_us(oneway)

        # The eventfd ping-pong of the rtt case measured these already, in the same processes.
        runs = cfg.c_oneway[: cfg.runs] if len(cfg.c_oneway) >= cfg.runs else cfg.repeat(c_oneway)
        out.append(
            record(
                "doorbell.wake.c",
                "doorbell",
                "C write(eventfd) -> read returns",
                "c",
                {"count": nc},
                combine(runs, LATENCY_UNITS),
            )
        )
    runs = cfg.repeat(lambda: wake_minimal_run(n))
    out.append(
        record(
            "doorbell.wake.os",
            "doorbell",
            "Python os.write -> poll+os.read",
            "python",
            {"count": n},
            combine(runs, units),
        )
    )
    runs = cfg.repeat(lambda: wake_device_run(n))
    out.append(
        record(
            "doorbell.wake.device",
            "doorbell",
            "FakeDevice.ring -> .wait returns",
            "python",
            {"count": n},
            combine(runs, units),
        )
    )
    nb = cfg.count("doorbell.bursts")
    runs = cfg.repeat(lambda: burst_run(nb))
    out.append(
        record(
            "doorbell.burst",
            "doorbell",
            f"burst of {BURST} bus.send, receiver asleep",
            "python",
            {"bursts": nb, "burst": BURST, "receiver_spin_s": 0.0},
            combine(
                runs,
                {
                    "doorbells_per_burst": "doorbells",
                    "wakeups_per_burst": "wake-ups",
                    "send_us_per_msg": "us",
                },
            ),
        )
    )
    return out


# Machine, ratios, targets --------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_busy(seconds: float = 0.5) -> float | None:
    """Fraction of all CPU time spent not idle over ``seconds`` (other processes' load)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


class ForeignCpu:
    """How much of the machine something else used while a run went on.

    All non-idle CPU time in /proc/stat (user, system, interrupts, and steal: the host running
    other guests) minus this benchmark's own (itself and every child it reaped: the forked
    peers, the C programs and their children), as a fraction of the machine's capacity
    (cores x wall time). Interrupt work for our own wake-ups counts here too, so a few
    percent is normal. None where /proc/stat is unreadable.
    """

    def __init__(self) -> None:
        self._t0, self._busy0, self._ours0 = time.monotonic(), self._busy(), self._ours()

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _ours() -> float:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def fraction(self) -> float | None:
        busy = self._busy()
        if busy is None or self._busy0 is None:
            return None
        wall = time.monotonic() - self._t0
        foreign = (busy - self._busy0) - (self._ours() - self._ours0)
        return min(1.0, max(0.0, foreign / max(1e-9, wall * (os.cpu_count() or 1))))


def wait_until_quiet(limit_s: float) -> float | None:
    """Wait (at most ``limit_s``) until other processes use < BUSY_WARN of the CPUs."""
    end = time.monotonic() + limit_s
    while True:
        busy = cpu_busy(0.2)
        if busy is None or busy < BUSY_WARN or time.monotonic() >= end:
            return busy
        time.sleep(1.0)


def machine_info(cc_note: str) -> dict[str, Any]:
    from ivshmem_bus import _ffi

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    cc = _compiler()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "machine": platform.machine(),
        "cc": _cc_version(cc) if cc else "",
        "c_reference": cc_note or "built",
        "ivshmem_bus": ivshmem_bus.__version__,
        "compiled_helper": bool(_ffi.HAVE_COMPILED),
        "commit": commit,
        "note": NOTE,
    }


def _median(results: dict[str, dict[str, Any]], rid: str, metric: str) -> float | None:
    rec = results.get(rid)
    if rec is None or metric not in rec["metrics"]:
        return None
    return rec["metrics"][metric]["median"]


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    out = {}
    for q in (f"q{queue_capacity(SMALL_REGION)}", f"q{queue_capacity(LARGE_REGION)}"):
        c = _median(results, f"raw.{q}.c", "rate")
        for api in ("per-call", "batch", "drain"):
            py = _median(results, f"raw.{q}.{api}", "rate")
            if c and py is not None:
                out[f"raw.{q}.{api}/c"] = py / c
    c = _median(results, "rtt.c.eventfd", "p50_us")
    py = _median(results, "rtt.python.eventfd", "p50_us")
    if c and py is not None:
        out["rtt.eventfd.p50/c"] = py / c
    c = _median(results, "rtt.c.spin", "p50_us")
    py = _median(results, "rtt.python.busy-poll", "p50_us")
    if c and py is not None:
        out["rtt.busy-poll.p50/c"] = py / c
    return out


def c_floor_note(results: dict[str, dict[str, Any]]) -> str:
    """The C ping-pongs' own worst cases: what the machine does to any max, Python or not."""
    parts = []
    for rid, name in (("rtt.c.spin", "spin"), ("rtt.c.eventfd", "eventfd")):
        rec = results.get(rid)
        if rec is not None:
            mt = rec["metrics"]
            parts.append(
                f"C {name} ping-pong max {_us(mt['max_us']['median'])} us, "
                f"{mt['over_1ms']['median']:.0f} of {rec['params']['count']} over 1 ms"
            )
    if not parts:
        return ""
    return "worst cases bound by the machine, medians: " + "; ".join(parts)


def targets(results: dict[str, dict[str, Any]], rat: dict[str, float]) -> list[dict[str, Any]]:
    """The issue's targets, evaluated on this run's medians (met: None when not measured)."""
    small, large = f"q{queue_capacity(SMALL_REGION)}", f"q{queue_capacity(LARGE_REGION)}"
    rows: list[dict[str, Any]] = []

    def add(
        name: str, goal: str, value: float | None, ok: Callable[[float], bool], unit: str
    ) -> None:
        rows.append(
            {
                "name": name,
                "goal": goal,
                "value": value,
                "unit": unit,
                "met": None if value is None else bool(ok(value)),
            }
        )

    for q in (small, large):
        add(
            f"batch raw slots, {q[1:]}-slot queue, vs C",
            ">= 50%",
            rat.get(f"raw.{q}.batch/c"),
            lambda v: v >= 0.5,
            "ratio",
        )
    for q in (small, large):
        add(
            f"per-call put/get, {q[1:]}-slot queue",
            ">= 1,000,000 slots/s",
            _median(results, f"raw.{q}.per-call", "rate"),
            lambda v: v >= 1e6,
            "slots/s",
        )
    add(
        "encoded encode+put / get+decode",
        ">= 300,000 msgs/s",
        _median(results, "encoded.codec", "rate"),
        lambda v: v >= 3e5,
        "msgs/s",
    )
    add(
        "round trip p50, eventfd, vs C eventfd ping-pong",
        "<= 2x",
        rat.get("rtt.eventfd.p50/c"),
        lambda v: v <= 2.0,
        "ratio",
    )
    add(
        "round trip p50, busy-poll",
        "<= 10 us",
        _median(results, "rtt.python.busy-poll", "p50_us"),
        lambda v: v <= 10.0,
        "us",
    )
    for mode in RTT_MODES:
        add(
            f"round trip p99.9, {mode}",
            "<= 1000 us",
            _median(results, f"rtt.python.{mode}", "p99_9_us"),
            lambda v: v <= 1000.0,
            "us",
        )
    for mode, window in itertools.product(RTT_MODES, FLOOD_WINDOWS):
        add(
            f"serve loop worst response, {window} in flight, {mode}",
            "<= 1000 us (QEMU)",
            _median(results, f"flood.{mode}.w{window}", "max_us"),
            lambda v: v <= 1000.0,
            "us",
        )
    growth = [
        (
            rec["metrics"]["rss_growth_kib"]["max"],
            rec["params"]["count"] - _half(rec["params"]["count"]),
        )
        for rec in results.values()
        if "rss_growth_kib" in rec["metrics"]
    ]
    fewest = min((n for _, n in growth), default=0)
    add(
        f"RSS growth over >= {_si(fewest)} msgs (2nd half of each Python run)",
        f"<= {RSS_SLACK_KIB} KiB (issue: 10^7 msgs)",
        max(g for g, _ in growth) if growth else None,
        lambda v: v <= RSS_SLACK_KIB,
        "KiB",
    )
    return rows


# Output --------------------------------------------------------------------------------------


def _si(v: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.2f}{suffix}"
    return f"{v:.0f}"


def _us(v: float) -> str:
    return f"{v:,.0f}" if v >= 1000 else f"{v:.1f}"


def _cell(stat: dict[str, Any], fmt: Callable[[float], str]) -> str:
    return f"{fmt(stat['median'])} [{fmt(stat['min'])}-{fmt(stat['max'])}]"


def format_table(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"ivshmem_bus {m['ivshmem_bus']} bench ({'quick' if report['quick'] else 'full'}"
        f"{'' if report['scale'] in (1.0, 0.1) else ', counts x' + format(report['scale'], 'g')}, "
        f"{report['runs']} runs per figure: median [min-max])",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['kernel']}, {m['python']}, "
        f"compiled helper {'yes' if m['compiled_helper'] else 'no'}, commit {m['commit'] or '?'}",
        f"note: {m['note']}",
    ]
    if (m["cpu_busy_before"] or 0.0) > BUSY_WARN:
        lines.append(
            f"WARNING: CPUs {m['cpu_busy_before']:.0%} busy before the run (load average "
            f"{m['loadavg_after']:.2f} after it): other processes skewed these figures"
        )
    results = report["results"]
    by_group: dict[str, list[dict[str, Any]]] = {}
    for rec in results:
        by_group.setdefault(rec["group"], []).append(rec)
    rat = report["ratios"]
    w = 40
    head = [
        f"{api} {rat[f'raw.q{q}.{api}/c']:.1%} ({q} slots)"
        for api in ("per-call", "batch")
        for q in (queue_capacity(SMALL_REGION), queue_capacity(LARGE_REGION))
        if f"raw.q{q}.{api}/c" in rat
    ]
    if head:
        lines.append("headline, Python/C raw slot throughput: " + ", ".join(head))

    if "raw" in by_group:
        lines += ["", f"{'raw 64-byte slots, one way':<{w}}{'slots/s':>24}{'vs C':>9}"]
        current = None
        for rec in by_group["raw"]:
            if rec["params"]["slots"] != current:
                current = rec["params"]["slots"]
                lines.append(f"  {current}-slot queue ({rec['params']['region_bytes']} bytes)")
            key = f"raw.q{current}.{rec['id'].rsplit('.', 1)[1]}/c"
            vs = f"{rat[key]:.1%}" if key in rat else ""
            lines.append(
                f"    {rec['label']:<{w - 4}}{_cell(rec['metrics']['rate'], _si):>24}{vs:>9}"
            )
    if "encoded" in by_group:
        lines += ["", f"{'virtio-msg ' + PROFILE + ', one way':<{w}}{'msgs/s':>24}"]
        for rec in by_group["encoded"]:
            lines.append(f"  {rec['label']:<{w - 2}}{_cell(rec['metrics']['rate'], _si):>24}")

    def lat_block(title: str, recs: list[dict[str, Any]], extra: list[tuple[str, str]]) -> None:
        cols = [
            ("p50_us", "p50"),
            ("p99_us", "p99"),
            ("p99_9_us", "p99.9"),
            ("max_us", "max"),
            *extra,
        ]
        lines.extend(["", f"{title:<{w}}" + "".join(f"{h:>22}" for _, h in cols)])
        for rec in recs:
            cells = []
            for key, _ in cols:
                stat = rec["metrics"].get(key)
                if stat is None:
                    cells.append("")
                elif key == "over_1ms":
                    cells.append(_cell(stat, lambda v: f"{v:.0f}"))
                elif key == "rate":
                    cells.append(_cell(stat, _si))
                else:
                    cells.append(_cell(stat, _us))
            lines.append(f"  {rec['label']:<{w - 2}}" + "".join(f"{c:>22}" for c in cells))

    if "rtt" in by_group:
        lat_block("round trip, us", by_group["rtt"], [("over_1ms", ">1 ms")])
    if "flood" in by_group:
        lat_block(
            "serve loop under a flood, put->get us",
            by_group["flood"],
            [("over_1ms", ">1 ms"), ("rate", "responses/s")],
        )
    if "doorbell" in by_group:
        lines += [
            "",
            "(a wake-up is bimodal on a VM: a few us when the woken process runs on the waker's "
            "vCPU, ~20 us when its vCPU was halted; min-max show which way the runs went)",
        ]
        wakes = [r for r in by_group["doorbell"] if r["id"].startswith("doorbell.wake")]
        lat_block("doorbell ring -> wake, us", wakes, [("ring_call_us", "ring call us")])
        for rec in by_group["doorbell"]:
            if rec["id"] == "doorbell.burst":
                mt = rec["metrics"]
                lines.append(
                    f"  {rec['label']}: doorbells/burst "
                    f"{_cell(mt['doorbells_per_burst'], lambda v: f'{v:.1f}')}, receiver "
                    f"wake-ups/burst {_cell(mt['wakeups_per_burst'], lambda v: f'{v:.1f}')}, "
                    f"send {_cell(mt['send_us_per_msg'], lambda v: f'{v:.2f}')} us/msg"
                )
    floor = c_floor_note({r["id"]: r for r in results})
    if report["targets"]:
        lines += ["", "targets (issue 8), on medians of this run"]
        if floor:
            lines.append(f"  ({floor})")
        for t in report["targets"]:
            if t["value"] is None:
                val, met = "not measured", "-"
            else:
                if t["unit"] == "ratio":
                    val = f"{t['value']:.2f}x" if "2x" in t["goal"] else f"{t['value']:.1%}"
                elif t["unit"] == "B/msg":
                    val = f"{t['value']:.3f} {t['unit']}"
                elif t["unit"] in ("us", "KiB"):
                    val = f"{_us(t['value'])} {t['unit']}"
                else:
                    val = f"{_si(t['value'])} {t['unit']}"
                met = "met" if t["met"] else "MISSED"
            lines.append(f"  {t['name']:<58}{t['goal']:>30}{val:>16}  {met}")
    noisy = {c: f for c, f in report["foreign_cpu"].items() if f is not None and f > BUSY_WARN}
    if noisy:
        lines += [
            "",
            "WARNING: other processes used "
            + ", ".join(f"{f:.0%} of the CPUs during {c}" for c, f in noisy.items())
            + ": those figures are skewed",
        ]
    for err in report["errors"]:
        lines += ["", f"ERROR in {err['case']}: {err['error'].strip().splitlines()[-1]}"]
    lines.append(f"\n({report['duration_s']:.0f} s)")
    return "\n".join(line.rstrip() for line in lines)


# Driver --------------------------------------------------------------------------------------


class Config:
    def __init__(
        self, runs: int, scale: float, binary: Path | None, progress: bool, wait_quiet: float
    ) -> None:
        self.runs = runs
        self.scale = scale
        self.binary = binary
        self.progress = progress
        self.wait_quiet = wait_quiet
        self.c_oneway: list[dict[str, float]] = []  # C eventfd one-way wake-ups, per run
        self.foreign: list[float] = []  # other processes' CPU share, per kept run
        self.retried = 0

    def count(self, key: str) -> int:
        return max(MIN_COUNT, int(COUNTS[key] * self.scale))

    def repeat(self, fn: Callable[[], Any]) -> list[Any]:
        """``runs`` results of ``fn()``. With ``wait_quiet``, each run first waits for a quiet
        machine, and a run that other processes disturbed is done again (up to ``runs`` more
        times in all)."""
        out = []
        retries = 0
        while len(out) < self.runs:
            if self.wait_quiet:
                wait_until_quiet(self.wait_quiet)
            meter = ForeignCpu()
            value = fn()
            foreign = meter.fraction()
            disturbed = foreign is not None and foreign > BUSY_WARN
            if disturbed and self.wait_quiet and retries < self.runs:
                retries += 1
                self.retried += 1
                if self.progress:
                    print("x", end="", file=sys.stderr, flush=True)
                continue
            out.append(value)
            if foreign is not None:
                self.foreign.append(foreign)
            if self.progress:
                print(".", end="", file=sys.stderr, flush=True)
        return out


CASE_FUNCS: dict[str, Callable[[Config], list[dict[str, Any]]]] = {
    "raw": case_raw,
    "encoded": case_encoded,
    "rtt": case_rtt,
    "flood": case_flood,
    "doorbell": case_doorbell,
}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="bench",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a tenth of the counts, 3 runs per figure (under a minute)",
    )
    ap.add_argument(
        "--json",
        metavar="OUT",
        default=DEFAULT_JSON,
        help=f"write the results here (default {DEFAULT_JSON}; '-' for stdout)",
    )
    ap.add_argument("--runs", type=int, help="runs per figure (default 5, --quick 3)")
    ap.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every count by this (tests use a tiny one)",
    )
    ap.add_argument("--only", metavar="CASES", help=f"comma-separated subset of {CASES}")
    ap.add_argument("--no-c", action="store_true", help="skip the C reference")
    ap.add_argument("--cache-dir", type=Path, help="where the C reference is built")
    ap.add_argument("--quiet", action="store_true", help="no progress dots on stderr")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each run wait up to S seconds for other processes to go quiet, and "
        "do a run they disturbed again",
    )
    return ap


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table, write the JSON. 0 when every case ran, else 1."""
    args = _parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C: shared-memory files are removed, children reaped.
        signal.signal(signal.SIGTERM, _terminate)
    cases = list(CASES)
    if args.only:
        cases = [c.strip() for c in args.only.split(",") if c.strip()]
        unknown = sorted(set(cases) - set(CASES))
        if unknown:
            _parser().error(f"unknown case(s) {', '.join(unknown)}; choose from {CASES}")
    runs = args.runs or (3 if args.quick else 5)
    if runs < 1:
        _parser().error("--runs must be at least 1")
    scale = args.scale * (0.1 if args.quick else 1.0)
    binary, cc_note = (
        (None, "skipped (--no-c)")
        if args.no_c
        else build_reference(args.cache_dir or default_cache_dir())
    )
    if cc_note and not args.no_c:
        print(f"warning: {cc_note}", file=sys.stderr)
    cfg = Config(runs, scale, binary, progress=not args.quiet, wait_quiet=args.wait_quiet)
    busy_before = cpu_busy()
    if busy_before is not None and busy_before > BUSY_WARN:
        print(
            f"warning: the CPUs are {busy_before:.0%} busy before the benchmark starts: "
            "other processes will skew the figures",
            file=sys.stderr,
        )
    started = time.time()
    t0 = time.monotonic()
    results: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    foreign: dict[str, float | None] = {}
    for case in cases:
        if cfg.progress:
            print(f"{case} ", end="", file=sys.stderr, flush=True)
        cfg.foreign = []
        try:
            recs = CASE_FUNCS[case](cfg)
        except Exception:
            recs = []
            errors.append({"case": case, "error": traceback.format_exc()})
        foreign[case] = max(cfg.foreign) if cfg.foreign else None
        for rec in recs:
            rec["foreign_cpu"] = foreign[case]
        results.extend(recs)
        if cfg.progress:
            print(file=sys.stderr, flush=True)
    by_id = {r["id"]: r for r in results}
    rat = ratios(by_id)
    report = {
        "schema": SCHEMA,
        "started": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(),
        "duration_s": time.monotonic() - t0,
        "argv": list(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "runs": runs,
        "scale": scale,
        "cases": cases,
        "machine": {
            **machine_info(cc_note),
            "cpu_busy_before": busy_before,
            "loadavg_after": os.getloadavg()[0],
        },
        "results": results,
        "foreign_cpu": foreign,
        "retried_runs": cfg.retried,
        "ratios": rat,
        "targets": targets(by_id, rat),
        "errors": errors,
    }
    text = json.dumps(report, indent=2) + "\n"
    if args.json == "-":  # JSON alone on stdout; the table goes to stderr
        print(format_table(report), file=sys.stderr)
        sys.stdout.write(text)
    else:
        print(format_table(report))
        Path(args.json).write_text(text)
        print(f"results written to {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

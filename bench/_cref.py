"""The C reference the benchmark measures Python against, and how it gets built.

The C side uses the same queue layout and the same clock (CLOCK_MONOTONIC) as the Python
side, so its figures are the floor the Python ones are compared with in one run, on one
machine. It is compiled on first use with the C compiler found here (``$CC``, else ``cc``),
once per source text, compiler and flags: the binary's name is a hash of all of them, so a
changed source or compiler never runs a stale binary.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
from pathlib import Path

__all__ = ["C_SOURCE", "build_reference", "default_cache_dir"]

C_SOURCE = r"""/* bench_ref.c: the C reference of bench, which builds it. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
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

/* The queue layout of ivshmem_bus.core.queue / QEMU's spsc_queue.h. */
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

/* Block copies, as ivshmem_bus's put_block/get_block: up to n slots, at most two memcpy
   (one at the wrap), one index store. The peer's index is reloaded only when the cache
   leaves fewer than n. */
static uint32_t q_used(const queue_t *q, uint32_t head, uint32_t tail) {
    return head >= tail ? head - tail : head + q->cap - tail;
}

static uint32_t q_copy_block(queue_t *q, uint8_t *buf, uint32_t n, int producer) {
    uint32_t have = producer ? q->cap - 1 - q_used(q, q->mine, q->cached)
                             : q_used(q, q->cached, q->mine);
    if (have < n) {
        q->cached = load_index(q, producer ? TAIL_OFF : HEAD_OFF);
        have = producer ? q->cap - 1 - q_used(q, q->mine, q->cached)
                        : q_used(q, q->cached, q->mine);
    }
    if (n > have) n = have;
    if (!n) return 0;
    uint32_t first = q->cap - q->mine < n ? q->cap - q->mine : n;
    uint8_t *ring = q->base + HEADER + (size_t)q->mine * SLOT;
    if (producer) {
        memcpy(ring, buf, (size_t)first * SLOT);
        memcpy(q->base + HEADER, buf + (size_t)first * SLOT, (size_t)(n - first) * SLOT);
    } else {
        memcpy(buf, ring, (size_t)first * SLOT);
        memcpy(buf + (size_t)first * SLOT, q->base + HEADER, (size_t)(n - first) * SLOT);
    }
    uint32_t next = q->mine + n >= q->cap ? q->mine + n - q->cap : q->mine + n;
    store_index(q, producer ? HEAD_OFF : TAIL_OFF, next);
    q->mine = next;
    return n;
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
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);  /* never outlive the benchmark */
        const char *cpu = getenv("BENCH_CHILD_CPU");  /* bench/placement.py */
        if (cpu) {
            cpu_set_t set;
            CPU_ZERO(&set);
            CPU_SET(atoi(cpu), &set);
            if (sched_setaffinity(0, sizeof set, &set) != 0) die("sched_setaffinity");
        }
    }
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

/* spsc-block FILE LEN COUNT BATCH: one way, up to BATCH slots per call on both sides, the
   same work as the Python block case (a constant block in, nothing looked at but the last
   slot out); prints "count ns errors" (errors: the last slot is not the producer's last). */
static int run_spsc_block(const char *path, size_t len, uint64_t count, uint32_t batch) {
    int ready[2], done[2];
    if (pipe(ready) || pipe(done)) die("pipe");
    uint8_t *buf = calloc(batch, SLOT);
    if (!buf) die("calloc");
    if (fork_child() == 0) {
        queue_t q;
        q_open(&q, map_file(path, len), len, 0);
        uint64_t got = 0, last = 0;
        uint32_t n = 0;
        xfer(ready[1], "r", 1, 1);
        while (got < count) {
            n = q_copy_block(&q, buf, batch, 0);
            got += n;
        }
        memcpy(&last, buf + (size_t)(n - 1) * SLOT, 8);
        uint64_t out[2] = {now_ns(), last != count - 1};
        xfer(done[1], out, sizeof out, 1);
        _exit(0);
    }
    queue_t q;
    q_open(&q, map_file(path, len), len, 1);
    uint8_t c;
    memset(buf, 0xa5, (size_t)batch * SLOT);
    xfer(ready[0], &c, 1, 0);
    uint64_t t0 = now_ns(), sent = 0;
    while (sent < count) {
        uint64_t left = count - sent;
        uint32_t want = left < batch ? (uint32_t)left : batch;
        if (left <= batch) {  /* the final block: its last slot carries count - 1 */
            uint64_t seq = count - 1;
            memcpy(buf + (size_t)(want - 1) * SLOT, &seq, 8);
        }
        sent += q_copy_block(&q, buf, want, 1);
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

/* memcpy BUF NBUF COUNT: COUNT copies of BUF bytes, buffer i from slot i % NBUF of a shared
   mapping (as a queue's buffers) into one private sink: the same bytes the vq case's device
   copies, one copy each. Prints "count ns checksum" (the checksum keeps the copies alive). */
static int run_memcpy(size_t buf, uint32_t nbuf, uint64_t count) {
    uint8_t *ring = mmap(NULL, buf * nbuf, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                         -1, 0);
    uint8_t *sink = malloc(buf);
    if (ring == MAP_FAILED || !sink) die("memcpy buffers");
    for (size_t i = 0; i < buf * nbuf; i++) ring[i] = (uint8_t)i;
    uint64_t sum = 0;
    for (uint32_t i = 0; i < nbuf; i++) memcpy(sink, ring + (size_t)i * buf, buf);  /* warm */
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < count; i++) {
        memcpy(sink, ring + (size_t)(i % nbuf) * buf, buf);
        __asm__ __volatile__("" : : "r"(sink) : "memory");  /* no copy is optimized away */
        sum += sink[i % buf];
    }
    uint64_t ns = now_ns() - t0;
    printf("%llu %llu %llu\n", (unsigned long long)count, (unsigned long long)ns,
           (unsigned long long)sum);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 5 && !strcmp(argv[1], "spsc"))
        return run_spsc(argv[2], strtoull(argv[3], 0, 0), strtoull(argv[4], 0, 0));
    if (argc == 6 && !strcmp(argv[1], "spsc-block"))
        return run_spsc_block(argv[2], strtoull(argv[3], 0, 0), strtoull(argv[4], 0, 0),
                              (uint32_t)strtoul(argv[5], 0, 0));
    if (argc == 5 && !strcmp(argv[1], "spin-rtt"))
        return run_spin_rtt(argv[2], strtoull(argv[3], 0, 0), argv[4]);
    if (argc == 4 && !strcmp(argv[1], "efd"))
        return run_efd(strtoull(argv[2], 0, 0), argv[3]);
    if (argc == 5 && !strcmp(argv[1], "memcpy"))
        return run_memcpy(strtoull(argv[2], 0, 0), (uint32_t)strtoul(argv[3], 0, 0),
                          strtoull(argv[4], 0, 0));
    fprintf(stderr,
            "usage: %s spsc FILE LEN COUNT | spsc-block FILE LEN COUNT BATCH"
            " | spin-rtt FILE COUNT OUT | efd COUNT OUT | memcpy BUF NBUF COUNT\n",
            argv[0]);
    return 64;
}
"""


def default_cache_dir() -> Path:
    """``.cache/bench`` of the source tree when the package is imported from one (an editable
    install or ``python -m bench``: the benchmark's parent holds pyproject.toml), else
    ``$XDG_CACHE_HOME/ivshmem-bus/bench``: an installed package's directory is no place to
    build in, and often not writable."""
    root = Path(__file__).resolve().parents[1]  # bench/_cref.py -> the tree
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

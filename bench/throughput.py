"""One-way throughput cases: ``raw`` (64-byte slots) and ``encoded`` (virtio-msg messages).

A producer in this process and a consumer in a forked one, over a queue both map shared: the
producer's clock starts before its first put and the consumer's stops after its last get,
so the rate covers both sides, as a link between two VMs would see it. The consumers also
sample their RSS over their second half: a leak shows as growth per message.
"""

from __future__ import annotations

import functools
import subprocess
import time
from pathlib import Path
from typing import Any

from ivshmem_bus.backends.fake import fake_pair
from ivshmem_bus.bus import DRIVER_QUEUE_OFFSET, QUEUE_SIZE, VirtioMsgBus, reset_queues_of
from ivshmem_bus.core import protocol as p
from ivshmem_bus.core.queue import SLOT_SIZE, SpscQueue, queue_capacity
from ivshmem_bus.native import ffi as _ffi

from .harness import (
    CHILD_TIMEOUT,
    LARGE_REGION,
    PROFILE,
    RSS_UNITS,
    SMALL_REGION,
    Child,
    Config,
    _Deadline,
    _get_wait,
    _half,
    _put_wait,
    _ready,
    _rss_kib,
    _rss_metrics,
    combine,
    mapped_queue,
    record,
    shm_file,
    timed_second_half,
)

__all__ = ["case_encoded", "case_raw", "sample_messages"]

# Raw slots ----------------------------------------------------------------------------------------

PAYLOAD = bytes(range(64))
LAST = bytes(range(64, 128))


def _produce(q: SpscQueue, api: str, count: int, peer: Child, batch: int = 1) -> None:
    """Put ``count`` slots: one per call (the last one ``LAST``), ``batch`` per put_many, or
    blocks of up to ``batch`` slots (the final block ends with ``LAST``)."""
    dl = _Deadline(peer=peer)
    if api == "per-call":
        put = q.put
        for _ in range(count - 1):
            if not put(PAYLOAD):
                _put_wait(put, PAYLOAD, dl)
        _put_wait(put, LAST, dl)
        return
    sent = 0
    if api in BLOCK_APIS:
        put_block = q.put_block
        block = PAYLOAD * batch
        final = PAYLOAD * (batch - 1) + LAST
        while sent < count:
            left = count - sent
            done = put_block(block if left > batch else final[(batch - left) * SLOT_SIZE :])
            if not done:
                dl.check()
            sent += done
        return
    put_many = q.put_many
    items = [PAYLOAD] * batch
    while sent < count:
        left = count - sent
        done = put_many(items if left >= batch else items[:left])
        if not done:
            dl.check()
        sent += done


def _consume_child(
    conn: Any, path: str, size: int, api: str, count: int, batch: int
) -> dict[str, Any]:
    """The consumer process (at most ``batch`` slots per call): returns its end timestamp,
    whether the last slot was the right one, and its RSS growth."""
    with mapped_queue(path, size, blocks=api == "batch") as q:
        dl = _Deadline()
        get, get_many, drain, get_block = q.get, q.get_many, q.drain, q.get_block
        out = memoryview(bytearray(SLOT_SIZE * batch))  # slices write into it, not a copy

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
            if api in BLOCK_APIS:
                done = 0
                while got < n:
                    done = get_block(out if n - got >= batch else out[: (n - got) * SLOT_SIZE])
                    if not done:
                        dl.check()
                    got += done
                return out[(done - 1) * SLOT_SIZE : done * SLOT_SIZE].tobytes()
            if api == "many":
                while got < n:
                    items = get_many(min(batch, n - got))
                    if items:
                        got += len(items)
                        last = items[-1]
                    else:
                        dl.check()
                return last
            while got < n:  # zero-copy
                done = drain(noop, min(batch, n - got))
                if not done:
                    dl.check()
                got += done
            return None

        last, end, growth = timed_second_half(conn, run, count)
    ok = api not in ("per-call", *BLOCK_APIS) or last == LAST
    return {"end_ns": end, "ok": ok, "rss_growth_kib": growth}


def raw_python_run(size: int, api: str, count: int, batch: int = 1) -> dict[str, float]:
    with (
        shm_file(size) as path,
        Child(_consume_child, path, size, api, count, batch) as child,
        mapped_queue(path, size, blocks=api == "batch") as q,
    ):
        child.recv()  # ready
        start = time.perf_counter_ns()
        _produce(q, api, count, child, batch)
        result = child.recv()
    if not result["ok"]:
        raise RuntimeError(f"raw {api}: the consumer saw the wrong last slot")
    return {
        "rate": count / ((result["end_ns"] - start) / 1e9),
        **_rss_metrics(result["rss_growth_kib"], count),
    }


def raw_c_run(binary: Path, size: int, count: int, batch: int = 0) -> dict[str, float]:
    """The C reference one way: per slot, or (``batch`` > 0) in blocks of up to ``batch``."""
    with shm_file(size) as path:
        mode = ["spsc", path, str(size), str(count)]
        if batch:
            mode = ["spsc-block", path, str(size), str(count), str(batch)]
        out = subprocess.run(
            [str(binary), *mode], capture_output=True, text=True, timeout=CHILD_TIMEOUT
        )
    if out.returncode != 0:
        raise RuntimeError(f"C {mode[0]} failed ({out.returncode}): {out.stderr.strip()}")
    n, ns, errors = (int(x) for x in out.stdout.split())
    if errors:
        raise RuntimeError(f"C {mode[0]}: {errors} slots out of sequence")
    return {"rate": n / (ns / 1e9)}


# put_block/get_block: "batch" through the compiled helper, "batch-py" the queue's own copies.
BLOCK_APIS = ("batch", "batch-py")


def batch_size(slots: int) -> int:
    """Slots per put_many / get_many / drain: half the queue (at most 256).

    A batch of the whole queue (capacity - 1) runs the two sides in lock step: the consumer
    sees nothing until the producer publishes a full queue, and the producer waits for the
    whole drain, so nothing overlaps (measured: ~25% slower on 62 slots, ~2x on 4096).
    """
    return min(256, slots // 2)


def block_size(slots: int) -> int:
    """Slots per put_block / get_block: the whole queue (capacity - 1).

    A block call takes what there is room for, so a large offer does not make the sides wait
    for each other as put_many's does; measured with the compiled helper, 62 slots: 16 ->
    22M, 31 -> 44M, 61 -> 73M slots/s; 4096 slots: 256 -> 209M, 4095 -> 593M slots/s.
    """
    return slots - 1


def case_raw(cfg: Config) -> list[dict[str, Any]]:
    out = []
    for size in (SMALL_REGION, LARGE_REGION):
        slots = queue_capacity(size)
        params = {"slots": slots, "region_bytes": size, "slot_bytes": SLOT_SIZE}
        qname = f"q{slots}"
        if cfg.binary is not None:
            n = cfg.count("raw.c")
            for rid, label, batch in (
                ("c", "C reference (put/get, acquire/release)", 0),
                ("c-block", "C reference, block copies", block_size(slots)),
            ):
                runs = cfg.repeat(functools.partial(raw_c_run, cfg.binary, size, n, batch))
                out.append(
                    record(
                        f"raw.{qname}.{rid}",
                        "raw",
                        label,
                        "c",
                        {**params, "count": n, **({"batch": batch} if batch else {})},
                        combine(runs, {"rate": "slots/s"}),
                    )
                )
        compiled = _ffi.HAVE_COMPILED
        for api, label, key in (
            ("per-call", "Python put / get (per call)", "raw.per-call"),
            (
                "batch",
                "Python put_block / get_block"
                + (" (compiled helper)" if compiled else " (no helper: pure Python)"),
                "raw.block",
            ),
            ("batch-py", "Python put_block / get_block (pure Python)", "raw.block"),
            ("many", "Python put_many / get_many", "raw.batch"),
            ("drain", "Python put_many / drain (no-op fn)", "raw.batch"),
        ):
            n = cfg.count(key)
            batch = {"per-call": 1, "batch": block_size(slots), "batch-py": block_size(slots)}.get(
                api, batch_size(slots)
            )
            runs = cfg.repeat(functools.partial(raw_python_run, size, api, n, batch))
            out.append(
                record(
                    f"raw.{qname}.{api}",
                    "raw",
                    label,
                    "python",
                    {**params, "count": n, "batch": batch},
                    combine(runs, {"rate": "slots/s", **RSS_UNITS}),
                )
            )
    return out


# Encoded virtio-msg -------------------------------------------------------------------------------


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

    def run(n: int) -> Any:
        msg = None
        for _ in range(n):
            raw = get(size)
            if raw is None:
                raw = _get_wait(get, dl, size)
            msg = decode(raw, PROFILE)
        return msg

    last, end, growth = timed_second_half(conn, run, count)
    q.release()
    return {"end_ns": end, "last": repr(last), "rss_growth_kib": growth}


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

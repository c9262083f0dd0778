"""A hostile peer against a live VirtioMsgBus (issue 9, part 1).

The peer is another VM: every byte it can write into BAR2 (queue indexes, slots, headers) is
untrusted, and it can ring as often as it likes. Whatever it does, the bus under test must:

- raise nothing but its documented errors (``QueueCorrupt``, ``BusTimeout``; ``ProtocolError``
  is never raised, it becomes a counter), and return within its timeout;
- write only its own index word of each queue (driver: the driver queue's head and the device
  queue's tail) and the slots of the queue it produces: never the peer's index word, never
  the header padding, never the slots it consumes, never BAR2 past the two queues
  (0x2000..1 MiB holds a guard pattern);
- count every slot it consumed as received, malformed or unknown, as ``protocol.decode``
  classifies it, and responses nobody asked for as strays;
- talk cleanly again once the queues are reset and both sides re-attach (docs/recovery.md).

The hypothesis test plays the peer from this process through the other fake device's mapping
(the same pages the peer VM would write), one step at a time, so every step can be checked
byte for byte. The live tests run the peer in a forked process, concurrently.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pwd
import random
import resource
import shutil
import signal
import socket
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ivshmem_bus.backends.fake import FakeDevice, fake_pair
from ivshmem_bus.backends.server_client import ServerClientDevice
from ivshmem_bus.bus import (
    DEVICE_QUEUE_OFFSET,
    DRIVER_QUEUE_OFFSET,
    QUEUE_SIZE,
    VirtioMsgBus,
    reset_queues_of,
)
from ivshmem_bus.core import protocol as p
from ivshmem_bus.core.queue import POLLING_OFFSET, QUEUE_HEADER_SIZE, SLOT_SIZE, queue_capacity
from ivshmem_bus.devices import RngDevice
from ivshmem_bus.errors import BusTimeout, ProtocolError, QueueCorrupt, ServerClientError
from ivshmem_bus.server import IvshmemServer

SHM_SIZE = 1 << 20  # the fake pair's default BAR2
QUEUES_END = DEVICE_QUEUE_OFFSET + QUEUE_SIZE  # 0x2000: nothing past here is the bus's
CAP = queue_capacity(QUEUE_SIZE)  # 62 slots per queue
HEAD, TAIL = 0x00, 0x40
SLACK = 0.25  # seconds a bounded call may overrun its timeout on a loaded CI machine
DOCUMENTED = (QueueCorrupt, BusTimeout)
# A guard pattern with a period (251) prime to every slot and word size, so a write at any
# offset or of any length changes it.
GUARD = (bytes(range(251)) * (SHM_SIZE // 251 + 1))[: SHM_SIZE - QUEUES_END]

# Queue offsets per role of the bus under test: the queue it produces (tx), the one it consumes.
QUEUES = {
    "driver": (DRIVER_QUEUE_OFFSET, DEVICE_QUEUE_OFFSET),
    "device": (DEVICE_QUEUE_OFFSET, DRIVER_QUEUE_OFFSET),
}
OTHER_ROLE = {"driver": "device", "device": "driver"}

# One sample of every wire type (requests, responses, events, bus messages); a profile that
# cannot carry one gets random bytes instead.
SAMPLES: list[p.Message] = [
    p.DeviceInfo(),
    p.DeviceInfoResponse(4, 0x554D4551, 64, 0),
    p.GetFeatures(0, 2),
    p.GetFeaturesResponse(0, 2, 1 << 32),
    p.SetFeatures(0, 2, 1 << 32),
    p.SetFeaturesResponse(),
    p.GetConfig(0, 4),
    p.GetConfigResponse(0, 0, 4, b"abcd"),
    p.SetConfig(0, 0, 1, b"x"),
    p.SetConfigResponse(0, 0, 1, b"x"),
    p.GetDeviceStatus(),
    p.GetDeviceStatusResponse(7),
    p.SetDeviceStatus(15),
    p.SetDeviceStatusResponse(15),
    p.GetVqueue(0),
    p.GetVqueueResponse(0, 1024),
    p.SetVqueue(0, 8, 1, 2, 3),
    p.SetVqueueResponse(),
    p.ResetVqueue(0),
    p.ResetVqueueResponse(),
    p.GetShm(0),
    p.GetShmResponse(0, 4096, 0),
    p.EventConfig(1, 2, 0, 0),
    p.EventAvail(0, 5),
    p.EventUsed(3),
    p.IommuEnable(1),
    p.IommuTranslate(0x1000, 1),
    p.IommuTranslateResponse(0x1000, 0x2000, 1),
    p.BusGetDevices(0, 8),
    p.BusGetDevicesResponse(0, 8, 8, b"\x01"),
    p.BusPing(7),
    p.BusPingResponse(7),
    p.BusEventDevice(1, 1),
]


def word(shm: memoryview, offset: int) -> int:
    return int.from_bytes(shm[offset : offset + 4], "little")


def set_word(shm: memoryview, offset: int, value: int) -> None:
    shm[offset : offset + 4] = value.to_bytes(4, "little")


def set_size(raw: bytearray, profile: str, size: int) -> None:
    """Overwrite the msg_size field of an encoded message."""
    struct.pack_into("<H", raw, 4 if profile == "qemu-v0" else 6, size)


def encodable(profile: str) -> list[bytes]:
    """The SAMPLES ``profile`` can carry, encoded."""
    out = []
    for msg in SAMPLES:
        with contextlib.suppress(ValueError):  # a message this profile does not have
            out.append(p.encode(msg, profile))
    return out


def slot_offset(queue: int, index: int) -> int:
    return queue + QUEUE_HEADER_SIZE + index * SLOT_SIZE


def classify(slot: bytes, profile: str) -> str:
    """What the bus must count a slot as: malformed, unknown, response or message."""
    try:
        msg = p.decode(slot, profile)
    except ProtocolError:
        return "malformed"
    if isinstance(msg, p.UnknownMessage):
        return "unknown"
    return "response" if p.is_response(msg) else "message"


def peer_put(shm: memoryview, queue: int, data: bytes) -> None:
    """Enqueue as a peer that trusts only its own head word (reduced modulo capacity)."""
    head = word(shm, queue + HEAD) % CAP
    start = slot_offset(queue, head)
    shm[start : start + len(data)] = data
    set_word(shm, queue + HEAD, (head + 1) % CAP)


def fill_guard(shm: memoryview) -> None:
    shm[QUEUES_END:] = GUARD


def guard_intact(shm: memoryview) -> bool:
    return shm[QUEUES_END:].tobytes() == GUARD  # (a memoryview compares byte by byte: slow)


@pytest.fixture
def pair() -> Iterator[tuple[FakeDevice, FakeDevice]]:
    a, b = fake_pair(SHM_SIZE)
    fill_guard(b.shmem)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


# --- The step-by-step hostile peer (hypothesis) ---------------------------------------------

INDEX_VALUES = st.one_of(
    st.integers(0, CAP - 1),
    st.sampled_from([CAP, CAP + 1, 0xFFFF, 0x8000_0000, 0xFFFF_FFFF]),
    st.integers(0, 2**32 - 1),
)
HEADER_WORDS = st.one_of(st.sampled_from([HEAD, TAIL]), st.integers(0, 31).map(lambda i: 4 * i))
PAYLOADS = st.one_of(
    st.tuples(st.just("valid"), st.sampled_from(SAMPLES)),
    st.tuples(st.just("size"), st.sampled_from(SAMPLES), st.integers(0, 0xFFFF)),
    st.tuples(st.just("id"), st.integers(0, 255), st.integers(0, 255), st.integers(0, 48)),
    st.tuples(st.just("token"), st.sampled_from(SAMPLES), st.integers(0, 0xFFFF)),
    st.tuples(st.just("bytes"), st.binary(min_size=1, max_size=SLOT_SIZE)),
)
ACTIONS = st.one_of(
    st.tuples(st.just("word"), st.sampled_from(["rx", "tx"]), HEADER_WORDS, INDEX_VALUES),
    st.tuples(
        st.just("slot"),
        st.sampled_from(["rx", "tx"]),
        st.integers(0, CAP - 1),
        st.binary(min_size=1, max_size=SLOT_SIZE),
    ),
    st.tuples(st.just("put"), PAYLOADS),
    st.tuples(st.just("put"), PAYLOADS),
    st.tuples(st.just("ring"), st.integers(1, 2000)),
    st.tuples(st.just("corrupt"), st.sampled_from(["rx", "tx"]), st.integers(CAP, 2**32 - 1)),
    st.tuples(st.just("burst"), st.integers(1, CAP)),
    st.tuples(st.just("bus"), st.sampled_from(["receive", "receive_wait", "send", "request"])),
    st.tuples(st.just("bus"), st.sampled_from(["receive", "send", "request"])),
)


def render(payload: tuple, profile: str) -> bytes:
    """The bytes a hostile peer writes for one PAYLOADS draw."""
    size = p.MESSAGE_SIZE[profile]
    kind = payload[0]
    if kind == "bytes":
        return payload[1]
    if kind == "id":  # a header with any type and id, then zeros
        _, type_, msg_id, extra = payload
        raw = bytearray(size)
        raw[0], raw[1] = type_, msg_id
        set_size(raw, profile, p.HEADER_SIZE[profile] + extra)
        return bytes(raw)
    try:
        raw = bytearray(p.encode(payload[1], profile))
    except ValueError:
        return bytes(size)  # this profile has no such message: zeros (malformed size 0)
    if kind == "size":  # msg_size lies
        set_size(raw, profile, payload[2])
    elif kind == "token" and profile == "spec-v1":  # a response to a request never sent
        struct.pack_into("<H", raw, 4, payload[2])
    return bytes(raw)


@dataclass
class Model:
    """What the bus under test must have done, tracked from outside (no private state read)."""

    rx_tail: int = 0  # the bus's own consumer index, as it must be
    tx_head: int = 0  # the bus's own producer index
    tokens: int = 0  # spec-v1 tokens it has allocated


def check_step(
    bus: VirtioMsgBus,
    shm: memoryview,
    model: Model,
    op: str,
    role: str,
    profile: str,
    seq: int,
) -> None:
    """Run one bus operation under the hostile state and check everything it did."""
    tx, rx = QUEUES[role]
    before = bytes(shm[:QUEUES_END])
    peer_head = word(shm, rx + HEAD)
    pending = []
    if peer_head < CAP:  # the slots a drain must consume, classified as the bus must count them
        i = model.rx_tail
        while i != peer_head:
            start = slot_offset(rx, i)
            pending.append(classify(before[start : start + SLOT_SIZE], profile))
            i = (i + 1) % CAP
    stats0 = dict(vars(bus.stats))
    timeout = {"receive": 0.0, "receive_wait": 0.002, "send": 0.002, "request": 0.003}[op]
    out_msg = p.EventUsed(seq) if role == "device" else p.EventAvail(seq, 0)
    t0 = time.monotonic()
    result: object = None
    try:
        if op.startswith("receive"):
            result = bus.receive(timeout)
        elif op == "send":
            bus.send(out_msg, timeout)
        else:
            result = bus.request(p.GetDeviceStatus(), timeout)
    except DOCUMENTED as exc:
        result = exc
    elapsed = time.monotonic() - t0
    event(f"{op} -> {type(result).__name__}")
    assert elapsed < timeout + SLACK, f"{op} took {elapsed:.3f} s for a {timeout} s timeout"

    # Memory: only the bus's own index words, the one slot it may have produced into, and
    # (before it sleeps) its receive queue's polling flag, which a bus that does not
    # coalesce may only clear.
    after = bytes(shm[:QUEUES_END])
    next_slot = slot_offset(tx, model.tx_head)
    flag = rx + POLLING_OFFSET
    assert after[flag : flag + 4] in (before[flag : flag + 4], bytes(4))
    allowed = sorted(
        [(tx + HEAD, 4), (rx + TAIL, 4), (flag, 4), (next_slot, p.MESSAGE_SIZE[profile])]
    )
    pos = 0
    for start, length in [*allowed, (QUEUES_END, 0)]:
        assert before[pos:start] == after[pos:start], (
            f"{op} wrote outside its own index words and next slot, in 0x{pos:x}..0x{start:x}"
        )
        pos = start + length
    assert guard_intact(shm), f"{op} wrote past the queues (BAR2 0x2000..)"

    # Counters: a drain consumed all of `pending` or nothing, and counted each slot.
    delta = {k: v - stats0[k] for k, v in vars(bus.stats).items()}
    consumed = delta["received"] + delta["malformed"] + delta["unknown"]
    if op.startswith("receive") and result is None:
        assert peer_head >= CAP or consumed == len(pending)
    assert consumed in (0, len(pending)), (op, delta, pending)
    if consumed:
        event("drained " + ("hostile slots" if delta["malformed"] + delta["unknown"] else "slots"))
        assert delta["malformed"] == pending.count("malformed")
        assert delta["unknown"] == pending.count("unknown")
        assert delta["received"] == pending.count("response") + pending.count("message")
        assert delta["stray_responses"] <= pending.count("response")
        model.rx_tail = peer_head
        assert word(shm, rx + TAIL) == model.rx_tail  # published where it must be
    else:
        assert delta["stray_responses"] == 0
    if isinstance(result, p.Message) and op == "request":  # the answer: right kind, right token
        assert isinstance(result, p.GetDeviceStatusResponse), result
        if profile == "spec-v1":
            assert result.token == model.tokens % 0xFFFF + 1, result
    elif isinstance(result, p.Message):
        assert not p.is_response(result), f"receive() returned a response: {result}"

    # The producer side: a sent message sits at the bus's own head, which moved by one.
    new_head = word(shm, tx + HEAD)
    size = p.MESSAGE_SIZE[profile]
    if op == "request":
        model.tokens += 1  # allocated before the send, whether or not the send succeeds
    if op == "send" and not isinstance(result, Exception):
        assert after[next_slot : next_slot + size] == p.encode(out_msg, profile)
        model.tx_head = (model.tx_head + 1) % CAP
        assert new_head == model.tx_head
    elif op == "request" and delta["sent"]:
        token = (model.tokens - 1) % 0xFFFF + 1 if profile == "spec-v1" else 0
        sent = p.encode(p.GetDeviceStatus(token=token), profile)
        assert after[next_slot : next_slot + size] == sent
        model.tx_head = (model.tx_head + 1) % CAP
        assert new_head == model.tx_head
    else:
        assert delta["sent"] == 0
        assert after[tx + HEAD : tx + HEAD + 4] == before[tx + HEAD : tx + HEAD + 4]


def recover(a: FakeDevice, b: FakeDevice, role: str, profile: str, owner: str) -> None:
    """The recovery protocol of docs/recovery.md, then a clean exchange both ways."""
    if owner == "peer":
        reset_queues_of(b)  # the peer owns reset: it zeroes both queues ...
        bus = VirtioMsgBus(a, role, b.vmid, profile, poll_interval=0.001)  # ... we re-attach
        peer = VirtioMsgBus(b, OTHER_ROLE[role], a.vmid, profile, poll_interval=0.001)
    else:
        bus = VirtioMsgBus(a, role, b.vmid, profile, reset_queues=True, poll_interval=0.001)
        peer = VirtioMsgBus(b, OTHER_ROLE[role], a.vmid, profile, poll_interval=0.001)
    with bus, peer:
        for i in range(2 * CAP + 5):  # more than a lap of each ring, both ways
            peer.send(p.EventUsed(i))
            bus.send(p.EventAvail(i, 0))
            assert bus.receive(1.0) == p.EventUsed(i)
            assert peer.receive(1.0) == p.EventAvail(i, 0)
        assert bus.receive(0) is None and peer.receive(0) is None
        assert bus.stats.dropped == peer.stats.dropped == 0


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    role=st.sampled_from(["driver", "device"]),
    profile=st.sampled_from(p.PROFILES),
    actions=st.lists(ACTIONS, min_size=1, max_size=30),
    owner=st.sampled_from(["peer", "bus"]),
)
def test_hostile_peer_step_by_step(role: str, profile: str, actions: list, owner: str) -> None:
    a, b = fake_pair(SHM_SIZE)
    try:
        shm = b.shmem  # the peer's own mapping of BAR2
        fill_guard(shm)
        bus = VirtioMsgBus(a, role, b.vmid, profile, reset_queues=True, poll_interval=0.001, spin=0)
        tx, rx = QUEUES[role]
        queue_of = {"rx": rx, "tx": tx}
        model = Model()
        with bus:
            for seq, action in enumerate(actions):
                kind = action[0]
                if kind == "word":
                    set_word(shm, queue_of[action[1]] + action[2], action[3])
                elif kind == "slot":
                    start = slot_offset(queue_of[action[1]], action[2])
                    shm[start : start + len(action[3])] = action[3]
                elif kind == "put":
                    peer_put(shm, rx, render(action[1], profile))
                elif kind == "ring":
                    for _ in range(action[1]):
                        b.ring(a.vmid, 0)
                elif kind == "corrupt":  # the peer's own index word, out of range
                    set_word(shm, rx + HEAD if action[1] == "rx" else tx + TAIL, action[2])
                elif kind == "burst":  # fill the send queue towards full
                    for _ in range(action[1]):
                        check_step(bus, shm, model, "send", role, profile, seq)
                else:
                    check_step(bus, shm, model, action[1], role, profile, seq)
        recover(a, b, role, profile, owner)
        assert guard_intact(shm)
    finally:
        a.close()
        b.close()


# --- Specific hostile inputs, exhaustively ------------------------------------------------------


def drain_all(bus: VirtioMsgBus, shm: memoryview, queue: int, items: list[bytes]) -> None:
    """Feed ``items`` through the bus's receive queue, a queue-full batch at a time."""
    for start in range(0, len(items), CAP - 1):
        for data in items[start : start + CAP - 1]:
            peer_put(shm, queue, data)
        while bus.receive(0) is not None:
            pass


@pytest.mark.parametrize("profile", p.PROFILES)
def test_every_msg_size_lie_is_dropped_and_counted(pair, profile) -> None:
    a, b = pair
    bus = VirtioMsgBus(a, "driver", b.vmid, profile, reset_queues=True)
    sizes = [*range(0, 70), *range(70, 0x10000, 257), 0xFFFF]
    samples = encodable(profile)
    items = []
    for n, size in enumerate(sizes):
        raw = bytearray(samples[n % len(samples)] if n % 3 else bytes(48))
        raw = raw[: p.MESSAGE_SIZE[profile]].ljust(p.MESSAGE_SIZE[profile], b"\0")
        set_size(raw, profile, size)
        items.append(bytes(raw))
    expect = [classify(item.ljust(SLOT_SIZE, b"\0"), profile) for item in items]
    with bus:
        drain_all(bus, b.shmem, DEVICE_QUEUE_OFFSET, items)
        s = bus.stats
        assert s.malformed == expect.count("malformed") > 0
        assert s.unknown == expect.count("unknown")
        assert s.received == expect.count("message") + expect.count("response")
        assert s.stray_responses == expect.count("response")
    assert guard_intact(b.shmem)


@pytest.mark.parametrize("profile", p.PROFILES)
def test_every_type_and_msg_id_is_counted_never_raised(pair, profile) -> None:
    a, b = pair
    rng = random.Random(9)
    items = []
    for type_ in (0, 1, 2, 3, 0xFC, 0xFF):
        for msg_id in range(256):
            raw = bytearray(rng.randbytes(p.MESSAGE_SIZE[profile]))
            raw[0], raw[1] = type_, msg_id
            set_size(
                raw, profile, p.MESSAGE_SIZE[profile] if msg_id % 2 else rng.randrange(0x10000)
            )
            items.append(bytes(raw))
    expect = [classify(item.ljust(SLOT_SIZE, b"\0"), profile) for item in items]
    with VirtioMsgBus(a, "driver", b.vmid, profile, reset_queues=True) as bus:
        delivered = 0
        for start in range(0, len(items), CAP - 1):
            for data in items[start : start + CAP - 1]:
                peer_put(b.shmem, DEVICE_QUEUE_OFFSET, data)
            while bus.receive(0) is not None:
                delivered += 1
        s = bus.stats
        assert (s.malformed, s.unknown) == (expect.count("malformed"), expect.count("unknown"))
        assert s.stray_responses == expect.count("response")
        assert delivered == expect.count("message")
        assert s.dropped == len(items) - delivered
    assert guard_intact(b.shmem)


def test_responses_to_requests_never_sent_are_strays(pair) -> None:
    a, b = pair
    responses = [raw for raw in encodable("spec-v1") if raw[0] & 1]  # type bit 0: response
    with VirtioMsgBus(a, "driver", b.vmid, "spec-v1", reset_queues=True) as bus:
        for n in range(CAP - 1):
            peer_put(b.shmem, DEVICE_QUEUE_OFFSET, responses[n % len(responses)])
        assert bus.receive(0) is None
        assert bus.stats.stray_responses == CAP - 1
        # While a request waits, an answer with the wrong token is a stray too.
        peer_put(
            b.shmem, DEVICE_QUEUE_OFFSET, p.encode(p.GetDeviceStatusResponse(1, token=9), "spec-v1")
        )
        with pytest.raises(BusTimeout):
            bus.request(p.GetDeviceStatus(), 0.02)
        assert bus.stats.stray_responses == CAP
        assert bus.stats.dropped == CAP


def test_corrupt_indexes_raise_queue_corrupt_every_time_until_reset(pair) -> None:
    a, b = pair
    bus = VirtioMsgBus(a, "driver", b.vmid, reset_queues=True, poll_interval=0.001)
    set_word(b.shmem, DEVICE_QUEUE_OFFSET + HEAD, CAP)  # the peer's head of our receive queue
    set_word(b.shmem, DRIVER_QUEUE_OFFSET + TAIL, 0xFFFF_FFFF)  # the peer's tail of our send queue
    for _ in range(3):  # every call, not just once; nothing is indexed with the bad values
        with pytest.raises(QueueCorrupt, match=f"head index {CAP} "):
            bus.receive(0)
    for _ in range(CAP - 1):  # sends fit while the cached tail says there is room ...
        bus.send(p.EventAvail(0, 0))
    with pytest.raises(QueueCorrupt, match="tail index 4294967295"):  # ... then it is read
        bus.send(p.EventAvail(0, 0))
    with pytest.raises(QueueCorrupt):
        bus.request(p.GetDeviceStatus(), 0.01)
    assert guard_intact(b.shmem)
    bus.close()
    recover(a, b, "driver", "qemu-v0", "peer")


# --- Live hostile peers in another process ----------------------------------------------------


def _flood_doorbells(b: FakeDevice, vmid: int, seconds: float) -> None:
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        b.ring(vmid, n & 1)
        n += 1
    os._exit(0)


def _fork(target, *args) -> multiprocessing.process.BaseProcess:
    proc = multiprocessing.get_context("fork").Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def _reap(proc: multiprocessing.process.BaseProcess) -> None:
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    proc.close()


def test_a_flood_of_doorbells_with_empty_queues_neither_hangs_nor_drops(pair) -> None:
    a, b = pair
    bus = VirtioMsgBus(a, "driver", b.vmid, reset_queues=True, poll_interval=0.005)
    flooder = _fork(_flood_doorbells, b, a.vmid, 1.0)
    try:
        with bus:
            t0 = time.monotonic()
            assert bus.receive(0.3) is None
            assert time.monotonic() - t0 < 0.3 + SLACK
            t0 = time.monotonic()
            with pytest.raises(BusTimeout):
                bus.request(p.GetDeviceStatus(), 0.3)
            assert time.monotonic() - t0 < 0.3 + SLACK
            assert bus.stats.doorbell_wakeups > 0
            assert bus.stats.dropped == 0 and bus.stats.received == 0
    finally:
        _reap(flooder)
    assert guard_intact(b.shmem)


def _scribble(shm_dev: FakeDevice, peer_vmid: int, seconds: float, seed: int) -> None:
    """A peer process gone mad: random indexes, slots, messages and doorbells in both queues."""
    rng = random.Random(seed)
    shm = shm_dev.shmem
    end = time.monotonic() + seconds
    samples = encodable("qemu-v0")
    while time.monotonic() < end:
        queue = rng.choice((DRIVER_QUEUE_OFFSET, DEVICE_QUEUE_OFFSET))
        roll = rng.randrange(10)
        if roll < 3:
            value = rng.choice((rng.randrange(CAP), CAP, rng.randrange(1 << 32)))
            set_word(shm, queue + rng.choice((HEAD, TAIL)), value)
        elif roll < 5:
            start = slot_offset(queue, rng.randrange(CAP))
            shm[start : start + SLOT_SIZE] = rng.randbytes(SLOT_SIZE)
        elif roll < 9:
            data = bytearray(rng.choice(samples))
            if rng.random() < 0.3:
                struct.pack_into("<H", data, 4, rng.randrange(0x10000))
            peer_put(shm, queue, bytes(data))
        else:
            for _ in range(rng.randrange(100)):
                shm_dev.ring(peer_vmid, 0)
    os._exit(0)


@pytest.mark.parametrize("role", ["driver", "device"])
def test_a_peer_scribbling_concurrently_gets_only_documented_errors(pair, role) -> None:
    a, b = pair
    bus = VirtioMsgBus(a, role, b.vmid, reset_queues=True, poll_interval=0.001, spin=0)
    scribbler = _fork(_scribble, b, a.vmid, 1.5, 42 if role == "driver" else 43)
    errors: dict[str, int] = {}
    worst = 0.0
    ops = 0
    try:
        with bus:
            while scribbler.is_alive():
                op = ops % 3
                t0 = time.monotonic()
                try:
                    if op == 0:
                        bus.receive(0.002)
                    elif op == 1:
                        bus.send(p.EventUsed(ops), 0.002)
                    else:
                        bus.request(p.GetDeviceStatus(), 0.004)
                except DOCUMENTED as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                worst = max(worst, time.monotonic() - t0)
                ops += 1
            dropped = bus.stats.dropped
    finally:
        _reap(scribbler)
    assert ops > 100 and worst < 0.004 + SLACK
    assert errors.get("QueueCorrupt", 0) > 0 and dropped > 0  # it really was hostile
    assert guard_intact(b.shmem)
    recover(a, b, role, "qemu-v0", "peer")
    recover(a, b, role, "qemu-v0", "bus")


# --- Bounded waits while the bus answers the peer ----------------------------------------------


def test_a_request_keeps_its_deadline_while_answering_peer_requests(pair) -> None:
    """A peer that floods requests and never consumes the answers cannot stretch a request.

    ``request(timeout=t)`` answers the peer's requests through ``handler`` while it waits; the
    answers fill the queue the peer does not drain, and each send of an answer must then wait
    no longer than what is left of ``t``.
    """
    a, b = pair

    def handler(msg: p.Message) -> p.Message:
        return p.IommuTranslateResponse(va=msg.va, pa=msg.va, prot=msg.prot)

    bus = VirtioMsgBus(a, "driver", b.vmid, reset_queues=True, handler=handler)
    for i in range(CAP - 1):
        peer_put(b.shmem, DEVICE_QUEUE_OFFSET, p.encode(p.IommuTranslate(va=i, prot=1)))
    with bus:
        t0 = time.monotonic()
        with pytest.raises(BusTimeout):
            bus.request(p.GetDeviceStatus(), timeout=0.05)
        elapsed = time.monotonic() - t0
    assert elapsed < 0.05 + SLACK, f"request(timeout=0.05) took {elapsed:.2f} s"


# --- The device model under a hostile driver -----------------------------------------------------


def test_set_features_far_past_the_device_features_stays_small() -> None:
    """The device model keeps driver features it can hold, not a 2**32-block integer."""
    device = RngDevice()
    t0 = time.monotonic()
    reply = device.handle(p.SetFeatures(index=1 << 20, num=2, features=(1 << 64) - 1))
    assert time.monotonic() - t0 < 0.05
    assert isinstance(reply, p.SetFeaturesResponse)
    bits = device.driver_features.bit_length()
    assert bits <= device.num_feature_bits, f"driver_features grew to {bits} bits"


def _serve_rng(dev: FakeDevice, drv: FakeDevice, drv_vmid: int, limit_bytes: int) -> None:
    drv.close()
    resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with VirtioMsgBus(dev, "device", drv_vmid) as bus:
        RngDevice().serve(bus)


def _address_space() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


def test_a_hostile_driver_cannot_make_the_device_model_exhaust_memory(pair) -> None:
    """SET_FEATURES with block index 2**32-1 must be answered, not turned into 17 GB.

    The device model runs in a child under an address-space limit (its size + 512 MiB), so
    a regression fails with a dead child instead of exhausting the machine.
    """
    a, b = pair
    reset_queues_of(a)
    child = _fork(_serve_rng, b, a, a.vmid, _address_space() + (512 << 20))
    try:
        with VirtioMsgBus(a, "driver", b.vmid, poll_interval=0.005) as bus:
            t0 = time.monotonic()
            hostile = p.SetFeatures(index=0xFFFF_FFFF, num=2, features=(1 << 64) - 1)
            assert isinstance(bus.request(hostile, 2.0), p.SetFeaturesResponse)
            assert time.monotonic() - t0 < 1.0
            # The device still serves, and offers what it offered before.
            assert bus.request(p.GetFeatures(0, 2), 2.0).features == RngDevice.device_features
            assert child.is_alive()
    finally:
        child.kill()
        _reap(child)


# --- Untrusted clients of the server, an untrusted server, no root -----------------------------


def open_fds() -> int:
    """This process's open fd count, once it has stopped changing (a server thread in this
    process may still be closing the fds of a peer that just left)."""
    deadline = time.monotonic() + 2
    count = len(os.listdir("/proc/self/fd"))
    while time.monotonic() < deadline:
        time.sleep(0.02)
        again = len(os.listdir("/proc/self/fd"))
        if again == count:
            break
        count = again
    return count


def test_a_client_that_sends_fds_is_dropped_and_its_fds_not_kept(tmp_path) -> None:
    """A client may only listen: one that sends bytes with fds attached is dropped, and the
    fds it passed do not stay open in the server (nor anywhere in this process)."""
    path = tmp_path / "s.sock"
    with IvshmemServer(path, shm_size="64K").start() as server:
        good = ServerClientDevice(path)
        before = open_fds()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as evil:
            evil.connect(str(path))
            deadline = time.monotonic() + 5
            while len(server.peer_ids) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.001)
            evil_id = server.peer_ids[-1]
            passed = [os.eventfd(0) for _ in range(3)]
            socket.send_fds(evil, [b"x" * 8], passed)
            for fd in passed:
                os.close(fd)
            while evil_id in server.peer_ids:
                assert time.monotonic() < deadline, "the client that sent data is still a peer"
                time.sleep(0.001)
            evil.settimeout(5)
            while evil.recv(4096):  # its greeting, then EOF: the server hung up
                pass
        while evil_id in good.peers():  # the others are told it left
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert open_fds() == before
        good.close()


class _ScriptedServer:
    """A hostile ivshmem server: accepts one client and sends it (value, fd) messages."""

    def __init__(self, path, script: list[tuple[int, int | None]]) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.script = script
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        with conn, contextlib.suppress(OSError):  # the client may hang up at any point
            for value, fd in self.script:
                data = value.to_bytes(8, "little", signed=True)
                if fd is None:
                    conn.sendall(data)
                else:
                    socket.send_fds(conn, [data], [fd])
            conn.recv(1)  # until the client hangs up

    def close(self) -> None:
        self.thread.join(5)
        self.listener.close()


@pytest.mark.parametrize("kind", ["empty memfd", "eventfd"])
def test_a_server_whose_shared_memory_cannot_be_mapped_is_a_client_error(tmp_path, kind) -> None:
    """The client's documented error for a server that does not speak the protocol is
    ServerClientError; an shm fd that cannot be mmap'd is such a case, and leaks nothing."""
    shm = os.memfd_create("empty") if kind == "empty memfd" else os.eventfd(0)
    own = os.eventfd(0)
    before = open_fds()
    server = _ScriptedServer(tmp_path / "s.sock", [(0, None), (3, None), (-1, shm), (3, own)])
    try:
        with pytest.raises(ServerClientError):
            ServerClientDevice(tmp_path / "s.sock", timeout=2)
    finally:
        server.close()  # its thread ends when the client hangs up
    try:
        assert open_fds() == before
    finally:
        os.close(shm)
        os.close(own)


def _unprivileged_session(directory: str, conn) -> None:
    """Server, two clients with buses, and a fake pair with buses: all without root."""
    try:
        a, b = fake_pair()  # import what is imported lazily (cffi for the fence) while the
        with a, b, VirtioMsgBus(a, "driver", b.vmid, reset_queues=True):  # interpreter's
            pass  # tree (here under /root) is still readable
        if os.geteuid() == 0:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)  # nobody: no capabilities left
        path = os.path.join(directory, "s.sock")
        with IvshmemServer(path, shm_size="64K").start():
            with ServerClientDevice(path) as one, ServerClientDevice(path) as two:
                (two_id,) = one.peers()
                with (
                    VirtioMsgBus(one, "driver", two_id, reset_queues=True) as drv,
                    VirtioMsgBus(two, "device", one.vmid) as dev,
                ):
                    drv.send(p.EventAvail(0, 1))
                    assert dev.receive(2.0) == p.EventAvail(0, 1)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            assert os.stat(path).st_uid == os.geteuid()
        a, b = fake_pair(directory=directory)
        with a, b, VirtioMsgBus(a, "driver", b.vmid, reset_queues=True) as drv:
            drv.send(p.EventUsed(1))
        conn.send(("ok", os.geteuid()))
    except BaseException as exc:  # reported to the parent, which fails the test
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def test_server_client_and_fake_pair_need_no_root(tmp_path) -> None:
    directory = tempfile.mkdtemp(prefix="ivshmem-noroot-")  # not under pytest's 0700 tree
    if os.geteuid() == 0:  # the unprivileged user's own directory (0700), as the server wants
        nobody = pwd.getpwnam("nobody")
        os.chown(directory, nobody.pw_uid, nobody.pw_gid)
    try:
        parent, child_end = multiprocessing.get_context("fork").Pipe(duplex=False)
        proc = _fork(_unprivileged_session, directory, child_end)
        child_end.close()
        assert parent.poll(20), "the unprivileged session did not report"
        status, detail = parent.recv()
        _reap(proc)
        assert status == "ok", detail
        assert detail != 0 or os.geteuid() != 0  # as root, it really ran as nobody
    finally:
        shutil.rmtree(directory)

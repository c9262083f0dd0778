"""A QEMU-like end of the linux-user virtio-msg bus, for tests: written from the contract
(linux-user-bus.md, wire-format.md sections 3 and 4, the virtio split-ring layout), never
from QEMU's code, and importing nothing of ivshmem_bus, so the project is tested against an
independent reading of the bytes.

Two roles, as QEMU's two machines:

- ``device`` (QEMU's ``x-virtio-msg`` machine with virtio-rng): opens the queue files with
  O_CREAT and ftruncate and does NOT zero them (as QEMU), listens on the socket, and answers
  as the measured QEMU device does: DEVICE_INFO device 4, vendor 0x554D4551, 64 feature bits,
  config 0; GET_FEATURES with ``num`` left 0 (QEMU's packer bug); GET_VQUEUE max 1024 for
  queue 0 and 0 past it; status and SET_VQUEUE; on EVENT_AVAIL(0) it fills the driver's
  buffers (in the ``--mem`` file at ``--mem-offset``) from ``entropy_stream`` and sends
  EVENT_USED(0).
- ``driver`` (QEMU's driver machine): opens the files the same way, connects, sends its first
  request at once and polls the queue for each response as QEMU does (1024 attempts: 129
  spins, then sleeps of i/128 us, each at least the timer slack; about 1 ms of requested
  polling, then QEMU aborts: here exit status 134), or within ``--deadline-ms`` of wall
  clock; then it prints what it learnt, and the slowest response, as one JSON line.

Run: ``python tests/linux_user_peer.py device --socket S --queue-dir D [--mem F]`` (prints
``listening on S`` when ready), or ``... driver --socket S --queue-dir D``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import select
import signal
import socket
import struct
import sys
import time

SLOTS = 4096
FILE_SIZE = 128 + SLOTS * 64  # 262,272
HEAD, TAIL, SLOT0, SLOT = 0x00, 0x40, 0x80, 64
MSG_SIZE = 44  # qemu-v0: 6-byte header + 38-byte payload, the whole 44 copied
DOORBELL = b"\xed"
ABORT_STATUS = 134  # what a shell reports for abort()

# qemu-v0 message ids (wire-format.md section 4)
DEVICE_INFO, GET_FEATURES, SET_FEATURES, GET_CONFIG = 0x02, 0x03, 0x04, 0x05
GET_STATUS, SET_STATUS, GET_VQUEUE, SET_VQUEUE, RESET_VQUEUE = 0x07, 0x08, 0x09, 0x0A, 0x0B
EVENT_AVAIL, EVENT_USED, IOMMU_ENABLE = 0x41, 0x42, 0x80
RESPONSE = 0x01

VENDOR_QEMU = 0x554D4551
RNG_ID = 4
MAX_QUEUE = 1024
FEATURES = (1 << 32) | (1 << 33)  # VERSION_1, ACCESS_PLATFORM (iommu_platform=on)
VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT = 1, 2, 4


def entropy_stream(start: int, length: int, seed: bytes = b"linux-user-peer") -> bytes:
    """Bytes ``start .. start+length`` of the device's known "entropy": SHA-256 of the seed
    and a 64-bit block counter, concatenated. Tests recompute it to check every byte."""
    out = bytearray()
    block = start // 32
    while len(out) < (start % 32) + length:
        out += hashlib.sha256(seed + block.to_bytes(8, "little")).digest()
        block += 1
    skip = start % 32
    return bytes(out[skip : skip + length])


def encode(msg_type: int, msg_id: int, payload: bytes = b"") -> bytes:
    if len(payload) > MSG_SIZE - 6:
        raise ValueError("payload too long for qemu-v0")
    header = struct.pack("<BBHH", msg_type, msg_id, 0, 6 + len(payload))
    return (header + payload).ljust(MSG_SIZE, b"\0")


class Ring:
    """One SPSC queue in a mapped file: the producer owns head, the consumer tail; the
    peer's index is range-checked before use."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.idx = view[:128].cast("I")

    def _index(self, word: int) -> int:
        value = self.idx[word]
        if value >= SLOTS:
            raise SystemExit(f"peer: corrupt queue index {value}")
        return value

    def put(self, raw: bytes) -> None:
        head = self._index(HEAD // 4)
        nxt = (head + 1) % SLOTS
        while nxt == self._index(TAIL // 4):
            time.sleep(1e-5)  # full: the consumer catches up
        off = SLOT0 + head * SLOT
        self.view[off : off + len(raw)] = raw
        self.idx[HEAD // 4] = nxt  # one aligned 32-bit store, after the slot (x86 TSO)

    def get(self) -> bytes | None:
        tail = self._index(TAIL // 4)
        if tail == self._index(HEAD // 4):
            return None
        off = SLOT0 + tail * SLOT
        raw = bytes(self.view[off : off + MSG_SIZE])
        self.idx[TAIL // 4] = (tail + 1) % SLOTS
        return raw

    def release(self) -> None:
        self.idx.release()


def open_queue(path: str) -> tuple[mmap.mmap, Ring]:
    """As QEMU: O_CREAT, ftruncate to the queue size, no zeroing."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, FILE_SIZE)
        mapping = mmap.mmap(fd, FILE_SIZE, mmap.MAP_SHARED)
    finally:
        os.close(fd)
    return mapping, Ring(memoryview(mapping))


class Rng:
    """The device's one virtqueue (split ring) over the driver's RAM file."""

    def __init__(self, mem: str | None, mem_offset: int, seed: bytes) -> None:
        self.mem = None
        if mem is not None:
            fd = os.open(mem, os.O_RDWR | os.O_CLOEXEC)
            try:
                self.mem = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED)
            finally:
                os.close(fd)
        self.mem_offset = mem_offset
        self.seed = seed
        self.produced = 0  # bytes of the stream handed out so far
        self.reset()

    def reset(self) -> None:
        self.size = 0
        self.desc = self.avail = self.used = 0
        self.last_avail = 0

    def _span(self, addr: int, length: int) -> int:
        """File offset of driver address ``addr``, the whole span checked."""
        assert self.mem is not None
        off = addr - self.mem_offset
        if off < 0 or length < 0 or off + length > len(self.mem):
            raise ValueError(f"address 0x{addr:x}+{length} outside the RAM file")
        return off

    def read(self, addr: int, fmt: str) -> tuple[int, ...]:
        assert self.mem is not None
        return struct.unpack_from(fmt, self.mem, self._span(addr, struct.calcsize(fmt)))

    def write(self, addr: int, data: bytes) -> None:
        assert self.mem is not None
        off = self._span(addr, len(data))
        self.mem[off : off + len(data)] = data

    def fill(self) -> int:
        """Serve every new available buffer; how many were used."""
        if self.mem is None or not self.size:
            return 0
        (avail_idx,) = self.read(self.avail + 2, "<H")
        served = 0
        while self.last_avail != avail_idx:
            slot = self.last_avail % self.size
            (head,) = self.read(self.avail + 4 + 2 * slot, "<H")
            written = self._fill_chain(head)
            (used_idx,) = self.read(self.used + 2, "<H")
            self.write(
                self.used + 4 + 8 * (used_idx % self.size), struct.pack("<II", head, written)
            )
            self.write(self.used + 2, struct.pack("<H", (used_idx + 1) & 0xFFFF))
            self.last_avail = (self.last_avail + 1) & 0xFFFF
            served += 1
        return served

    def _fill_chain(self, head: int) -> int:
        written, index = 0, head
        for _ in range(self.size):  # a chain longer than the table is a loop
            if index >= self.size:
                raise ValueError(f"descriptor index {index} >= queue size {self.size}")
            addr, length, flags, nxt = self.read(self.desc + 16 * index, "<QIHH")
            if flags & VRING_DESC_F_INDIRECT:
                raise ValueError("indirect descriptors were not offered")
            if flags & VRING_DESC_F_WRITE:
                self.write(addr, entropy_stream(self.produced, length, self.seed))
                self.produced += length
                written += length
            if not flags & VRING_DESC_F_NEXT:
                return written
            index = nxt
        raise ValueError("descriptor chain loops")


class Device:
    """The QEMU-like device: answers requests, fills rng buffers."""

    def __init__(self, rng: Rng) -> None:
        self.rng = rng
        self.status = 0
        self.driver_features = 0

    def handle(self, raw: bytes) -> bytes | None:
        msg_type, msg_id, _dev, size = struct.unpack_from("<BBHH", raw)
        p = raw[6:size] if 6 <= size <= MSG_SIZE else b""
        resp = msg_type | RESPONSE
        if msg_type & RESPONSE:
            return None
        if msg_id == DEVICE_INFO:
            return encode(resp, msg_id, struct.pack("<IIII", RNG_ID, VENDOR_QEMU, 64, 0))
        if msg_id == GET_FEATURES:
            index = struct.unpack_from("<I", p.ljust(8, b"\0"))[0]
            bits = FEATURES if index == 0 else 0
            return encode(resp, msg_id, struct.pack("<IIQ", index, 0, bits))  # num left 0
        if msg_id == SET_FEATURES:
            index, num, bits = struct.unpack_from("<IIQ", p.ljust(16, b"\0"))
            if index == 0:
                self.driver_features = bits
            return encode(resp, msg_id, struct.pack("<IIQ", index, num, bits))
        if msg_id == GET_CONFIG:
            _offset, _size = struct.unpack_from("<II", p.ljust(8, b"\0"))
            return encode(resp, msg_id, struct.pack("<IIIQ", 0, 0, 0, 0))
        if msg_id == GET_STATUS:
            return encode(resp, msg_id, struct.pack("<I", self.status))
        if msg_id == SET_STATUS:
            (status,) = struct.unpack_from("<I", p.ljust(4, b"\0"))
            # iommu_platform=on: a driver that did not accept ACCESS_PLATFORM is refused
            # FEATURES_OK (the virtio spec lets a device fail to operate without it; QEMU does)
            if status & 8 and not self.status & 8 and not self.driver_features >> 33 & 1:
                status &= ~8
            self.status = status
            if self.status == 0:
                self.rng.reset()
                self.driver_features = 0
            return encode(resp, msg_id, struct.pack("<I", self.status))
        if msg_id == GET_VQUEUE:
            (index,) = struct.unpack_from("<I", p.ljust(4, b"\0"))
            if index == 0:
                r = self.rng
                body = struct.pack("<IIIQQQ", 0, MAX_QUEUE, r.size, r.desc, r.avail, r.used)
            else:
                body = struct.pack("<IIIQQQ", index, 0, 0, 0, 0, 0)
            return encode(resp, msg_id, body)
        if msg_id == SET_VQUEUE:
            index, _unused, qsize, desc, avail, used = struct.unpack_from(
                "<IIIQQQ", p.ljust(36, b"\0")
            )
            if index == 0 and 0 < qsize <= MAX_QUEUE:
                self.rng.size, self.rng.desc, self.rng.avail, self.rng.used = (
                    qsize,
                    desc,
                    avail,
                    used,
                )
                self.rng.last_avail = 0
            return encode(resp, msg_id, p[:36].ljust(36, b"\0"))
        if msg_id == EVENT_AVAIL:
            (index,) = struct.unpack_from("<I", p.ljust(4, b"\0"))
            if index == 0 and self.rng.fill():
                return encode(0, EVENT_USED, struct.pack("<I", 0))
            return None
        return None  # RESET_VQUEUE (QEMU never replies), IOMMU_ENABLE, unknown ids


def run_device(args: argparse.Namespace) -> int:
    maps = [
        open_queue(os.path.join(args.queue_dir, f"queue-{args.bus_name}-{d}"))
        for d in ("driver", "device")
    ]
    rx, tx = maps[0][1], maps[1][1]
    device = Device(Rng(args.mem, args.mem_offset, args.seed.encode()))
    if os.path.exists(args.socket):
        os.unlink(args.socket)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(args.socket)
    server.listen(1)
    print(f"listening on {args.socket}", flush=True)
    conn: socket.socket | None = None
    blocked = 0  # doorbells the socket would not take: QEMU would block or lose them
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    while not stopping:
        ready, _, _ = select.select([conn or server], [], [], 0.1)
        if not ready:
            continue
        if conn is None:
            conn, _ = server.accept()
            conn.setblocking(False)
            continue
        try:
            data = conn.recv(128)
        except BlockingIOError:
            continue
        except ConnectionResetError:  # hung up with our doorbells unread
            data = b""
        if not data:  # the driver hung up
            conn.close()
            conn = None
            if args.once:
                break
            continue
        while (raw := rx.get()) is not None:
            reply = device.handle(raw)
            if reply is not None:
                tx.put(reply)
                try:
                    conn.send(DOORBELL)
                except BlockingIOError:  # the driver does not read its doorbells
                    blocked += 1
    print(
        json.dumps(
            {"status": device.status, "produced": device.rng.produced, "doorbells_blocked": blocked}
        ),
        flush=True,
    )
    for _mapping, ring in maps:
        ring.release()
    return 0


class Deadline(Exception):
    pass


def _waited(deadline: float | None) -> str:
    return "QEMU's 1024 polls" if deadline is None else f"{deadline * 1000:g} ms"


def run_driver(args: argparse.Namespace) -> int:
    maps = [
        open_queue(os.path.join(args.queue_dir, f"queue-{args.bus_name}-{d}"))
        for d in ("driver", "device")
    ]
    tx, rx = maps[0][1], maps[1][1]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args.socket)
    sock.setblocking(False)
    deadline = None if args.deadline_ms is None else args.deadline_ms / 1000
    worst = 0.0
    blocked = 0  # doorbells the socket would not take: QEMU would block or lose them

    def ring() -> None:
        nonlocal blocked
        try:
            while sock.recv(128):  # QEMU's main loop reads the other end's doorbells
                pass
        except BlockingIOError:
            pass
        try:
            sock.send(DOORBELL)
        except BlockingIOError:
            blocked += 1

    def request(msg_id: int, payload: bytes = b"") -> bytes:
        nonlocal worst
        tx.put(encode(0, msg_id, payload))
        ring()
        t0 = time.perf_counter()
        for attempt in range(1024):  # polls the queue, not the socket, as QEMU's wait does
            raw = rx.get()
            if raw is not None and raw[1] == msg_id and raw[0] & RESPONSE:
                worst = max(worst, time.perf_counter() - t0)
                return raw
            if deadline is not None and time.perf_counter() - t0 > deadline:
                break
            if deadline is None and attempt > 128:  # QEMU: spins, then usleep(i / 128)
                time.sleep((attempt // 128) * 1e-6)  # at least the timer slack, as in C
        raise Deadline(f"no response to message 0x{msg_id:02x} ({_waited(deadline)})")

    out: dict[str, object] = {}
    try:
        info = request(DEVICE_INFO)  # at once, right after connecting
        out["device_id"], out["vendor_id"], out["feature_bits"], out["config_size"] = (
            struct.unpack_from("<IIII", info, 6)
        )
        feats = request(GET_FEATURES, struct.pack("<II", 0, 2))
        out["features"] = struct.unpack_from("<Q", feats, 14)[0]
        request(SET_FEATURES, struct.pack("<IIQ", 0, 2, out["features"]))
        for status in (1, 3, 11):  # ACKNOWLEDGE, DRIVER, FEATURES_OK
            request(SET_STATUS, struct.pack("<I", status))
        queues = []
        for index in range(8):
            vq = request(GET_VQUEUE, struct.pack("<I", index))
            max_size = struct.unpack_from("<I", vq, 10)[0]
            if not max_size:
                break
            queues.append(max_size)
        out["queues"] = queues
        times = []
        for _ in range(args.pings):
            t0 = time.perf_counter()
            request(GET_STATUS)
            times.append((time.perf_counter() - t0) * 1e6)
        if times:
            times.sort()
            out["ping_p50_us"] = round(times[len(times) // 2], 1)
        out["status"] = struct.unpack_from("<I", request(GET_STATUS), 6)[0]
        request(SET_STATUS, struct.pack("<I", 0))
    except Deadline as exc:
        print(f"abort: {exc}", file=sys.stderr, flush=True)
        return ABORT_STATUS
    finally:
        sock.close()
        for _mapping, queue in maps:
            queue.release()
    out["worst_response_us"] = round(worst * 1e6, 1)
    out["doorbells_blocked"] = blocked
    print(json.dumps(out), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role", required=True)
    for role in ("device", "driver"):
        p = sub.add_parser(role)
        p.add_argument("--socket", required=True)
        p.add_argument("--queue-dir", default=".")
        p.add_argument("--bus-name", default="linux-user")
    dev = sub.choices["device"]
    dev.add_argument("--mem")
    dev.add_argument("--mem-offset", type=lambda s: int(s, 0), default=0x40000000)
    dev.add_argument("--seed", default="linux-user-peer")
    dev.add_argument("--once", action="store_true", help="exit when the driver hangs up")
    drv = sub.choices["driver"]
    drv.add_argument(
        "--deadline-ms", type=float, default=None,
        help="a wall-clock deadline instead of QEMU's 1024 polls (spins, then 1-7 us sleeps)",
    )  # fmt: skip
    drv.add_argument("--pings", type=int, default=0)
    args = parser.parse_args(argv)
    return run_device(args) if args.role == "device" else run_driver(args)


if __name__ == "__main__":
    sys.exit(main())

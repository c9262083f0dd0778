"""The guest side of the e2e scenarios: small steps over ivshmem_bus's public API, JSON out.

Run inside a guest as ``$PY tests/e2e/guest_tool.py STEP ...`` (the harness sets ``$PY``,
``PYTHONPATH`` and the working directory); each step prints one JSON object as its last line
and exits 0, or raises (exit 1, traceback on stderr). The host test imports the same
functions to play a host peer (``ServerClientDevice``) with the same code.

Peers meet in BAR2 above the bus queues (0x0000-0x1FFF): patterns at ``PATTERN_BASE`` and
"my vectors are on" flags at ``FLAG_BASE``, one slot per peer name, stamped with the test's
token so a stale value from an earlier scenario never counts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import threading
import time

NAMES = ("a", "b", "h")  # guest a, guest b, the host peer
PATTERN_BASE = 0x100000  # 1 MiB: far from the bus queues
PATTERN_LEN = 256
FLAG_BASE = 0x200000
FLAG_LEN = 32


def pattern(token: str, name: str) -> bytes:
    seed = f"{token}:{name}".encode()
    return b"".join(hashlib.sha256(seed + bytes([i])).digest() for i in range(PATTERN_LEN // 32))


def pattern_offset(name: str) -> int:
    return PATTERN_BASE + NAMES.index(name) * 0x1000


def flag_value(token: str, label: str, name: str) -> bytes:
    return hashlib.sha256(f"flag:{token}:{label}:{name}".encode()).digest()[:FLAG_LEN]


def flag_offset(me: str, peer: str) -> int:
    return FLAG_BASE + (NAMES.index(me) * len(NAMES) + NAMES.index(peer)) * 0x40


def wait_until(check, timeout: float, what: str, interval: float = 0.005, abort=None):
    """Poll ``check`` until true; ``abort()`` (if given) may raise to give up early."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if abort is not None:
            abort()
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


# Steps, usable from the host with any IvshmemDevice -------------------------------------------


def share_patterns(shm, token: str, me: str, others: list[str], timeout: float, abort=None) -> dict:
    """Write my pattern, wait for every other peer's, verify them byte for byte."""
    mine = pattern(token, me)
    off = pattern_offset(me)
    shm[off : off + PATTERN_LEN] = mine
    seen = {}
    for other in others:
        want, o = pattern(token, other), pattern_offset(other)
        t0 = time.monotonic()
        wait_until(
            lambda w=want, o=o: bytes(shm[o : o + PATTERN_LEN]) == w,
            timeout,
            f"{me}: pattern of {other} at 0x{o:x}",
            abort=abort,
        )
        seen[other] = round(time.monotonic() - t0, 3)
    return {"wrote": f"0x{off:x}", "seen_after_s": seen}


def doorbell_session(dev, token: str, label: str, me: str, peer: str, peer_vmid: int,
                     lead: bool, rounds: int, timeout: float, abort=None) -> dict:  # fmt: skip
    """Ping-pong doorbells with one peer on every vector, ``rounds`` times, waited with wait().

    Both sides first raise a flag in BAR2 once their vectors are on (a doorbell rung before
    that would be lost), then the leader rings vector v and waits for the same vector back.
    """
    shm = dev.shmem
    mine, theirs = flag_offset(me, peer), flag_offset(peer, me)
    dev.drain()  # stale doorbells out before the flag: after it, the peer may ring at once
    shm[mine : mine + FLAG_LEN] = flag_value(token, label, me)
    want = flag_value(token, label, peer)
    wait_until(lambda: bytes(shm[theirs : theirs + FLAG_LEN]) == want, timeout,
               f"{me}: {peer}'s vectors-on flag", abort=abort)  # fmt: skip
    latencies: dict[int, list[float]] = {v: [] for v in range(dev.vectors)}
    extra: list[int] = []

    def receive(vector: int) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{me}: no doorbell on vector {vector} from {peer} "
                                   f"within {timeout:g} s")  # fmt: skip
            fired = dev.wait(min(left, 1.0))
            extra.extend(sorted(fired - {vector}))
            if vector in fired:
                return
            if abort is not None and not fired:
                abort()

    for _ in range(rounds):
        for vector in range(dev.vectors):
            t0 = time.perf_counter()
            if lead:
                dev.ring(peer_vmid, vector)
                receive(vector)
                latencies[vector].append((time.perf_counter() - t0) * 1e3)
            else:
                receive(vector)
                dev.ring(peer_vmid, vector)
    out = {"peer": peer, "peer_vmid": peer_vmid, "rounds": rounds, "vectors": dev.vectors,
           "unexpected_vectors": extra}  # fmt: skip
    if lead:
        out["round_trip_ms_p50"] = {
            v: round(statistics.median(ts), 3) for v, ts in latencies.items() if ts
        }
    return out


def serve_rng(dev, remote: int, stop, profile: str = "qemu-v0") -> int:
    """Serve the Python rng device on a device-role bus until ``stop()``; messages handled."""
    from ivshmem_bus.bus import VirtioMsgBus
    from ivshmem_bus.devices import RngDevice

    with VirtioMsgBus(dev, "device", remote, profile, reset_queues=True) as bus:
        return RngDevice(profile).serve(bus, stop)


def round_trips(dev, remote: int, count: int, timeout: float) -> dict:
    """Probe, then ``count`` GET_DEVICE_STATUS round trips, driver role."""
    from ivshmem_bus.bus import VirtioMsgBus
    from ivshmem_bus.drivers import VirtioMsgDriver

    with VirtioMsgBus(dev, "driver", remote) as bus:
        driver = VirtioMsgDriver(bus, timeout=timeout)
        t0 = time.monotonic()
        desc = driver.probe()
        probe_s = time.monotonic() - t0
        times = []
        for _ in range(count):
            t = time.perf_counter()
            driver.get_status()
            times.append((time.perf_counter() - t) * 1e6)
        stats = bus.stats
    times.sort()
    return {
        "device_id": desc.device_id,
        "probe_s": round(probe_s, 3),
        "count": len(times),
        "total_s": round(sum(times) / 1e6, 3),
        "p50_us": round(times[len(times) // 2], 1),
        "p99_us": round(times[int(len(times) * 0.99) - 1], 1),
        "max_us": round(times[-1], 1),
        "timeouts": stats.timeouts,
        "doorbell_wakeups": stats.doorbell_wakeups,
    }


def payload(token: str, label: str, size: int) -> bytes:
    """The bytes one direction of a data-path scenario carries (host and guests agree)."""
    return hashlib.shake_256(f"payload:{token}:{label}".encode()).digest(size)


class Region:
    """A range of driver addresses for a ``PoolAllocator`` (name, base, size: all it reads)."""

    def __init__(self, name: str, base: int, size: int) -> None:
        self.name, self.base, self.size = f"{name} [0x{base:x}, +0x{size:x})", base, size


def console_in_own_ram(dev, remote: int, ram_bdf: str, region: tuple[int, int], token: str,
                       size: int, timeout: float) -> dict:  # fmt: skip
    """Console driver whose queues and buffers live in this guest's own RAM.

    ``ram_bdf`` is an ivshmem-plain function over this guest's RAM file, so its BAR2 offset A
    is guest-physical address A (mem-offset 0); ``region`` is RAM the kernel never uses (it
    was booted with ``mem=``). The device sees the same addresses in its ivshmem-plain over
    the same file. Sends ``payload(token, "b2a")``, then reads ``payload(token, "a2b")``.
    """
    from ivshmem_bus.bus import VirtioMsgBus
    from ivshmem_bus.drivers import ConsoleDriver, VirtioMsgDriver
    from ivshmem_bus.memory import PoolAllocator, open_window

    send, want = payload(token, "b2a", size), payload(token, "a2b", size)
    got = bytearray()
    with (
        VirtioMsgBus(dev, "driver", remote) as bus,
        open_window(ram_bdf, mem_offset=0, role="driver") as window,
    ):
        alloc = PoolAllocator(Region(window.name, *region))  # type: ignore[arg-type]
        t0 = time.monotonic()
        console = ConsoleDriver(VirtioMsgDriver(bus, timeout=timeout), window, allocator=alloc)
        try:
            areas = [
                (q.layout.desc_addr, q.layout.avail_addr, q.layout.used_addr, *q.addrs)
                for q in (console.rx, console.tx)
            ]
            console.write(send)
            console.drain()
            sent_s = time.monotonic() - t0
            deadline = time.monotonic() + timeout
            while len(got) < len(want) and time.monotonic() < deadline:
                got += console.read(timeout=1.0)
        finally:
            console.close()
    lo, hi = region[0], region[0] + region[1]
    return {
        "window": window.name,
        "sent": len(send),
        "sent_s": round(sent_s, 3),
        "received": len(got),
        "received_ok": bytes(got) == want,
        "total_s": round(time.monotonic() - t0, 3),
        "addresses_in_region": all(lo <= a < hi for q in areas for a in q),
        "lowest": hex(min(a for q in areas for a in q)),
    }


class Stalls:
    """A thread that wakes every 10 ms and keeps the gaps longer than 100 ms: how long this
    process was held up (a guest vCPU the host did not run, the GIL). A driver held up for a
    second finds the device silent for a whole ping window whatever the device did."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._gaps: list[tuple[float, float]] = []  # (seconds since start, gap in seconds)
        self._thread = threading.Thread(target=self._run, name="stalls", daemon=True)

    def start(self) -> Stalls:
        self._thread.start()
        return self

    def _run(self) -> None:
        t0 = last = time.monotonic()
        while not self._stop.wait(0.01):
            now = time.monotonic()
            if now - last > 0.1:
                self._gaps.append((now - t0, now - last))
            last = now

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def report(self) -> dict:
        """The longest gap, how many were over 100 ms, and the ten longest (at, ms)."""
        top = sorted(self._gaps, key=lambda g: -g[1])[:10]
        return {
            "max": round(top[0][1] * 1e3, 1) if top else 0.0,
            "over_100": len(self._gaps),
            "longest": [[round(at, 2), round(gap * 1e3, 1)] for at, gap in top],
        }


def linux_peer_run(dev, ram, region: tuple[int, int], entropy: int, send: bytes, want: int,
                   run_s: float, timeout: float, racy_bitmap: bool = True) -> dict:  # fmt: skip
    """The Linux-like driver (tests/linux_peer.py) over ``dev`` with its RAM in ``ram``.

    ``ram`` is a window over this guest's own RAM at base 0 (guest-physical = offset); the
    peer gets only ``region`` of it (RAM the kernel never uses: ``mem=``). Start-up, then
    ``entropy`` bytes from dev_id 0 (64 at a time), ``send`` written to the console at dev_id 1
    and ``want`` bytes read from it, then the bus is kept up until ``run_s`` seconds passed
    since GET_DEVICES and every PING sent so far was answered. What the peer put on the wire
    (SET_VQUEUE areas, descriptor buffers) is read back here and checked against ``region``.
    ``racy_bitmap``: the peer re-reads the GET_DEVICES bitmap from its shared bus buffer, as
    the Linux stack does (see LinuxLikePeer).
    """
    from ivshmem_bus.core import protocol as p
    from ivshmem_bus.core.virtqueue import VirtqLayout
    from ivshmem_bus.core.window import BufferWindow
    from tests.linux_peer import STALE, LinuxLikePeer, Teardown

    spans: list[tuple[int, int]] = []  # (address, length) the peer gave the device

    class Peer(LinuxLikePeer):
        def send(self, msg: p.Message, *, msg_size: int | None = None) -> None:
            if isinstance(msg, p.SetVqueue):
                layout = VirtqLayout(msg.size, msg.descriptor_addr, msg.driver_addr,
                                     msg.device_addr)  # fmt: skip
                spans.extend((a, n) for _, a, n in layout.areas())
            super().send(msg, msg_size=msg_size)

    start, length = region
    whole = ram.buffer
    part = whole[start : start + length]
    name = f"{ram.name} [0x{start:x}, +0x{length:x})"
    peer = Peer(dev, BufferWindow(part, start, name=name, fence=ram.fence),
                request_timeout=timeout, racy_bitmap=racy_bitmap)  # fmt: skip
    out: dict = {"window": ram.name}

    def pings() -> dict:  # taken once every PING sent so far was answered (or on an error)
        rtts = sorted(peer.ping_rtts)
        return dict(
            run_s=round(time.monotonic() - t0, 3), pings_sent=peer.pings_sent,
            pings_answered=len(rtts), ping_responses=peer.ping_responses,
            ping_rtt_ms_p50=round(rtts[len(rtts) // 2] * 1e3, 2) if rtts else None,
            ping_rtt_ms_max=round(rtts[-1] * 1e3, 2) if rtts else None,
            pings_from_device=sum(isinstance(m, p.BusPing) for m in peer.bus_messages),
        )  # fmt: skip

    gaps = Stalls().start()  # this process held up (the guest starved, the GIL): for the report
    t0 = time.monotonic()
    try:
        peer.start()
        devices = peer.probe_all()
        out["startup_s"] = round(time.monotonic() - t0, 3)
        gd = next(m for m in peer.bus_messages if isinstance(m, p.BusGetDevicesResponse))
        out["bitmap"] = gd.bitmap[0]
        out["devices"] = [[d.dev_id, d.device_id] for d in devices]
        out["status"] = [
            peer.request(p.GetDeviceStatus(dev_num=d.dev_id)).status  # type: ignore[attr-defined]
            for d in devices
        ]
        t1 = time.monotonic()
        got = peer.read_entropy(0, entropy)
        out["entropy_s"] = round(time.monotonic() - t1, 3)
        out["entropy_sha256"] = hashlib.sha256(got).hexdigest()
        out["entropy_len"] = len(got)
        t1 = time.monotonic()
        peer.console_open(1)
        for i in range(0, len(send), 4096):
            peer.console_write(1, send[i : i + 4096])
        received = peer.console_read(1, want, timeout=timeout)
        out["console_s"] = round(time.monotonic() - t1, 3)
        out["console_received_sha256"] = hashlib.sha256(received).hexdigest()
        out["console_received_len"] = len(received)
        # keep the bus up: every PING of the run answered, none of ours echoed back
        wait_until(lambda: peer.stale or (time.monotonic() - t0 >= run_s and peer.pings_sent
                   and len(peer.ping_rtts) == peer.pings_sent),
                   run_s + 3 * timeout, "every PING answered")  # fmt: skip
        out.update(pings())
        # and each descriptor's buffer, as the device reads it in the rings (read back
        # through the whole RAM window, not the peer's)
        for q in peer._queues:
            table = whole[q.layout.desc_addr : q.layout.desc_addr + 16 * q.layout.size]
            for i in range(q.layout.size):
                addr = int.from_bytes(table[16 * i : 16 * i + 8], "little")
                size = int.from_bytes(table[16 * i + 8 : 16 * i + 12], "little")
                if size:
                    spans.append((addr, size))
            table.release()
    except Teardown as exc:  # reported with everything known so far, not as a traceback
        out["error"] = str(exc)
        out.update(pings())
    finally:
        gaps.stop()
        peer.close()
        peer.release_ram()
        part.release()  # ``whole`` is the window's own view: it goes with the window
    out["stalls_ms"] = gaps.report()
    out["echoes"] = peer.echoes  # PING responses this side answered: the device drops them
    out["stale"] = peer.stale or STALE in peer.log
    out["log"] = peer.log[-10:]
    out["address_spans"] = len(spans)
    out["addresses_in_region"] = bool(spans) and all(
        start <= a and a + n <= start + length for a, n in spans
    )
    if spans:
        out["lowest"] = hex(min(a for a, _ in spans))
        out["highest"] = hex(max(a + n for a, n in spans))
    return out


# Guest command line ------------------------------------------------------------------------------


def _function_record(fn) -> dict:
    return {
        "bdf": fn.bdf, "driver": fn.driver, "iommu_group": fn.iommu_group,
        "bar_sizes": list(fn.bar_sizes), "msix_vectors": fn.msix_vectors,
        "is_doorbell": fn.is_doorbell,
    }  # fmt: skip


def _step_list(args) -> dict:
    from ivshmem_bus.backends.vfio import pci

    fns = pci.list_ivshmem()
    out = {"devices": [_function_record(fn) for fn in fns]}
    if args.vmid:  # IVPosition through resource0: only while no driver owns the device
        out["vmid"] = {fn.bdf: pci.read_vmid_from_resource0(fn) for fn in fns if not fn.driver}
    return out


def _step_bind(args) -> dict:
    from ivshmem_bus.backends import open_backend
    from ivshmem_bus.backends.vfio import pci

    t0 = time.monotonic()
    binding = pci.bind(args.bdf, noiommu=args.noiommu)
    bind_s = time.monotonic() - t0
    after = pci.get_function(args.bdf)
    t0 = time.monotonic()
    with open_backend(device=args.bdf) as dev:
        open_s = time.monotonic() - t0
        return {
            "binding": {
                "previous_driver": binding.previous_driver,
                "group": binding.group,
                "node": binding.node,
                "noiommu": binding.noiommu,
            },
            "function": _function_record(after),
            "vmid": dev.vmid,
            "shmem_size": len(dev.shmem),
            "vectors": dev.vectors,
            "uses_intx": getattr(dev, "uses_intx", None),
            "bind_s": round(bind_s, 3),
            "open_s": round(open_s, 3),
        }


def _step_shm(args) -> dict:
    from ivshmem_bus.backends import open_backend

    with open_backend(device=args.bdf) as dev:
        return share_patterns(dev.shmem, args.token, args.me, args.others, args.timeout)


def _step_doorbell(args) -> dict:
    from ivshmem_bus.backends import open_backend

    sessions = []
    with open_backend(device=args.bdf) as dev:
        for spec in args.session:
            label, peer, vmid, role = spec.split(":")
            session = doorbell_session(
                dev, args.token, label, args.me, peer, int(vmid, 0), role == "lead",
                args.rounds, args.timeout,
            )  # fmt: skip
            sessions.append(session)
    return {"sessions": sessions}


def _step_roundtrips(args) -> dict:
    from ivshmem_bus.backends import open_backend

    with open_backend(device=args.bdf) as dev:
        return round_trips(dev, args.remote, args.count, args.timeout)


def _step_console_own_ram(args) -> dict:
    from ivshmem_bus.backends import open_backend

    with open_backend(device=args.bdf) as dev:
        return console_in_own_ram(dev, args.remote, args.ram, (args.region, args.region_len),
                                  args.token, args.size, args.timeout)  # fmt: skip


def _step_linux_peer(args) -> dict:
    from ivshmem_bus.backends import open_backend
    from ivshmem_bus.memory import open_window

    with (
        open_backend(device=args.bdf) as dev,
        open_window(args.ram, mem_offset=0, role="driver") as ram,
    ):
        return linux_peer_run(dev, ram, (args.region, args.region_len), args.entropy,
                              payload(args.token, "b2a", args.console),
                              args.console, args.run_seconds, args.timeout,
                              racy_bitmap=not args.exact_bitmap)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    t0 = time.monotonic()
    parser = argparse.ArgumentParser(prog="guest_tool.py")
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("list")
    p.add_argument("--vmid", action="store_true")
    p.set_defaults(func=_step_list)
    p = sub.add_parser("bind")
    p.add_argument("bdf")
    p.add_argument("--noiommu", action="store_true")
    p.set_defaults(func=_step_bind)
    p = sub.add_parser("shm")
    p.add_argument("bdf")
    p.add_argument("--token", required=True)
    p.add_argument("--me", choices=NAMES, required=True)
    p.add_argument("--others", nargs="+", choices=NAMES, required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(func=_step_shm)
    p = sub.add_parser("doorbell")
    p.add_argument("bdf")
    p.add_argument("--token", required=True)
    p.add_argument("--me", choices=NAMES, required=True)
    p.add_argument("--session", action="append", required=True,
                   metavar="LABEL:PEER:VMID:lead|follow")  # fmt: skip
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(func=_step_doorbell)
    p = sub.add_parser("roundtrips")
    p.add_argument("bdf")
    p.add_argument("--remote", type=lambda s: int(s, 0), required=True)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=_step_roundtrips)
    p = sub.add_parser("console-own-ram")
    p.add_argument("bdf")
    p.add_argument("--remote", type=lambda s: int(s, 0), required=True)
    p.add_argument("--ram", required=True, help="ivshmem-plain BDF over this guest's RAM")
    p.add_argument("--region", type=lambda s: int(s, 0), required=True)
    p.add_argument("--region-len", type=lambda s: int(s, 0), required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--size", type=int, default=65536)
    p.add_argument("--timeout", type=float, default=30.0)
    p.set_defaults(func=_step_console_own_ram)
    p = sub.add_parser("linux-peer")
    p.add_argument("bdf")
    p.add_argument("--ram", required=True, help="ivshmem-plain BDF over this guest's RAM")
    p.add_argument("--region", type=lambda s: int(s, 0), required=True)
    p.add_argument("--region-len", type=lambda s: int(s, 0), required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--entropy", type=int, default=16384)
    p.add_argument("--console", type=int, default=16384, help="bytes each way")
    p.add_argument("--run-seconds", type=float, default=6.0)
    p.add_argument(
        "--exact-bitmap", action="store_true",
        help="read GET_DEVICES' bitmap from its response, not from the shared bus buffer",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=_step_linux_peer)
    args = parser.parse_args(argv)
    out = args.func(args)
    out["step_s"] = round(time.monotonic() - t0, 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Long fuzz runs over what a hostile peer controls: ``protocol.decode`` and the bus receive path.

    python tools/fuzz.py [--target decode|bus|both] [--seconds 120] [--engine atheris|hypothesis]

Targets (each input also picks the profile, and for ``bus`` the role):

``decode``
    Any bytes. ``decode`` must return a message or raise ``ProtocolError``, nothing else. A
    decoded message must pass its own field checks (``dataclasses.replace`` re-runs them),
    re-encode in the same profile and decode back to itself, and must not depend on bytes
    past its ``msg_size`` (decoding the input cut at ``msg_size`` gives the same message).

``bus``
    The input becomes the peer's side of BAR2: its index words (the receive queue's head, the
    send queue's tail; in range or not) and the receive queue's slots. Then the bus under test
    drains its queue, sends, and makes a request (all with timeout 0, so nothing sleeps).
    Only ``QueueCorrupt`` and ``BusTimeout`` may come out; the peer's index words and BAR2
    past the queues (a guard pattern up to 1 MiB) must be untouched; every consumed slot
    must be counted as received, malformed or unknown.

Engines: ``atheris`` (coverage-guided libFuzzer, when ``pip install atheris`` works; the
package's modules are instrumented) or ``hypothesis`` (seeded batches of random inputs, half
of them built from plausible headers, until the time is up). The summary gives inputs tried,
inputs per second and every distinct finding with a reproducing input in hex; exit status 1
when there is a finding. ``--repro HEX`` runs one input again and shows its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import sys
import time
import traceback
from collections.abc import Callable

try:
    import atheris
except ImportError:  # pragma: no cover - depends on the machine
    atheris = None


def _engine_arg(argv: list[str]) -> str:
    """The engine asked for, decided before the imports below (atheris instruments them)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--engine", default="atheris" if atheris is not None else "hypothesis")
    return pre.parse_known_args(argv)[0].engine


ENGINE = _engine_arg(sys.argv[1:])
_instrument = (
    atheris.instrument_imports(include=["ivshmem_bus"], enable_loader_override=False)
    if ENGINE == "atheris" and atheris is not None
    else contextlib.nullcontext()
)
with _instrument:
    from ivshmem_bus.backends.fake import fake_pair
    from ivshmem_bus.bus import (
        DEVICE_QUEUE_OFFSET,
        DRIVER_QUEUE_OFFSET,
        QUEUE_SIZE,
        VirtioMsgBus,
        reset_queues_of,
    )
    from ivshmem_bus.core import protocol as p
    from ivshmem_bus.core.queue import QUEUE_HEADER_SIZE, SLOT_SIZE, queue_capacity
    from ivshmem_bus.errors import BusTimeout, ProtocolError, QueueCorrupt

CAP = queue_capacity(QUEUE_SIZE)
QUEUES_END = DEVICE_QUEUE_OFFSET + QUEUE_SIZE
ROLES = ("driver", "device")
QUEUES = {  # role of the bus under test -> (the queue it sends on, the queue it receives on)
    "driver": (DRIVER_QUEUE_OFFSET, DEVICE_QUEUE_OFFSET),
    "device": (DEVICE_QUEUE_OFFSET, DRIVER_QUEUE_OFFSET),
}


class Finding(AssertionError):
    """An invariant the code under fuzz broke."""


# --- decode ----------------------------------------------------------------------------------


def same_unknown(a: p.Message, b: p.Message, profile: str) -> bool:
    """UnknownMessage keeps its header bytes as received; compare what re-encoding keeps."""
    hsize = p.HEADER_SIZE[profile]
    return (
        isinstance(b, p.UnknownMessage)
        and (a.msg_type, a.unknown_id, a.dev_num, a.token)
        == (b.msg_type, b.unknown_id, b.dev_num, b.token)
        and a.raw[hsize:] == b.raw[hsize:]
    )


def check_decode(data: bytes, profile: str) -> str:
    """One decode input; returns the outcome's name, raises Finding (or anything) on a bug."""
    try:
        msg = p.decode(data, profile)
    except ProtocolError:
        return "malformed"
    if not isinstance(msg, p.Message):
        raise Finding(f"decode returned {type(msg).__name__}, not a message")
    name = type(msg).__name__
    try:
        dataclasses.replace(msg)  # the constructor's field checks, which decode skips
    except (TypeError, ValueError) as exc:
        raise Finding(f"decode built an invalid {name}: {exc}") from exc
    try:
        raw = p.encode(msg, profile)
    except ValueError as exc:
        raise Finding(f"a decoded {name} does not re-encode in {profile}: {exc}") from exc
    again = p.decode(raw, profile)
    unknown = isinstance(msg, p.UnknownMessage)
    if not (same_unknown(msg, again, profile) if unknown else again == msg):
        raise Finding(f"{name} changed in an encode/decode round trip: {msg!r} -> {again!r}")
    size_at = 4 if profile == "qemu-v0" else 6
    size = int.from_bytes(data[size_at : size_at + 2], "little")
    cut = p.decode(data[:size], profile)
    if not (same_unknown(msg, cut, profile) if unknown else cut == msg):
        raise Finding(f"{name} depends on bytes past its msg_size {size}")
    return "unknown" if unknown else "message"


# --- the bus receive path ----------------------------------------------------------------------


def _word(shm: memoryview, offset: int) -> int:
    return int.from_bytes(shm[offset : offset + 4], "little")


class BusTarget:
    """One fake pair, reused: each input resets the queues and attaches a fresh bus."""

    def __init__(self) -> None:
        self.a, self.b = fake_pair()  # 1 MiB BAR2
        shm = self.b.shmem
        self.guard = (bytes(range(251)) * (len(shm) // 251 + 1))[: len(shm) - QUEUES_END]
        shm[QUEUES_END:] = self.guard

    def close(self) -> None:
        self.a.close()
        self.b.close()

    def check(self, data: bytes) -> str:
        if len(data) < 10:
            return "short"
        profile = p.PROFILES[data[0] & 1]
        role = ROLES[data[0] >> 1 & 1]
        in_range = data[0] >> 2  # low bits: which peer words are reduced into range
        tx, rx = QUEUES[role]
        shm = self.b.shmem
        reset_queues_of(self.b)  # the peer owns reset; the bus under test attaches after it
        bus = VirtioMsgBus(self.a, role, self.b.vmid, profile, spin=0, poll_interval=0)
        rx_head = int.from_bytes(data[1:5], "little")
        tx_tail = int.from_bytes(data[5:9], "little")
        if in_range & 1:
            rx_head %= CAP
        if in_range & 2:
            tx_tail %= CAP
        slots = data[9:]
        for i in range(min(CAP, (len(slots) + SLOT_SIZE - 1) // SLOT_SIZE)):
            chunk = slots[i * SLOT_SIZE : (i + 1) * SLOT_SIZE]
            start = rx + QUEUE_HEADER_SIZE + i * SLOT_SIZE
            shm[start : start + len(chunk)] = chunk
        shm[rx : rx + 4] = rx_head.to_bytes(4, "little")
        shm[tx + 0x40 : tx + 0x44] = tx_tail.to_bytes(4, "little")
        expect = []
        if rx_head < CAP:
            for i in range(rx_head):
                start = rx + QUEUE_HEADER_SIZE + i * SLOT_SIZE
                expect.append(_classify(bytes(shm[start : start + SLOT_SIZE]), profile))
        outcome = "ok"
        with bus:
            try:
                for _ in range(2 * CAP):  # receive(0) returns each delivered message once
                    if bus.receive(0) is None:
                        break
                bus.send(p.EventUsed(1) if role == "device" else p.EventAvail(1, 0), 0)
                bus.request(p.GetDeviceStatus(), 0)
            except (QueueCorrupt, BusTimeout) as exc:
                outcome = type(exc).__name__
            s = bus.stats
            consumed = s.received + s.malformed + s.unknown
        if _word(shm, rx) != rx_head or _word(shm, tx + 0x40) != tx_tail:
            raise Finding(f"the {role} bus wrote the peer's own index word")
        if shm[QUEUES_END:].tobytes() != self.guard:
            raise Finding(f"the {role} bus wrote BAR2 past the queues")
        if rx_head < CAP:
            if consumed != len(expect):
                raise Finding(f"consumed {consumed} slots, {len(expect)} were there")
            if s.malformed != expect.count("malformed") or s.unknown != expect.count("unknown"):
                raise Finding(f"miscounted: {s} for {expect}")
        elif consumed:
            raise Finding(f"consumed {consumed} slots past a corrupt head {rx_head}")
        return outcome


def _classify(slot: bytes, profile: str) -> str:
    try:
        msg = p.decode(slot, profile)
    except ProtocolError:
        return "malformed"
    return "unknown" if isinstance(msg, p.UnknownMessage) else "message"


# --- driving ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    target: str
    inputs: int = 0
    outcomes: dict[str, int] = dataclasses.field(default_factory=dict)
    findings: dict[str, str] = dataclasses.field(default_factory=dict)  # summary -> input hex
    seconds: float = 0.0

    def one(self, fn: Callable[[bytes], str], data: bytes) -> None:
        self.inputs += 1
        try:
            outcome = fn(data)
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            what = re.sub(r"\d+", "N", str(exc))[:160]  # one finding per kind, not per value
            place = f"{os.path.basename(where.filename)}:{where.lineno}"
            self.findings.setdefault(f"{type(exc).__name__}: {what} (at {place})", data.hex())
            outcome = "FINDING"
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def report(self) -> str:
        rate = self.inputs / self.seconds if self.seconds else 0.0
        lines = [
            f"{self.target}: {self.inputs:,} inputs in {self.seconds:.0f} s = {rate:,.0f}/s; "
            + ", ".join(f"{k} {v:,}" for k, v in sorted(self.outcomes.items())),
            f"{self.target}: {len(self.findings)} distinct finding(s)",
        ]
        lines += [f"  {key}\n    input: {data}" for key, data in self.findings.items()]
        return "\n".join(lines)


def decode_input(data: bytes) -> str:
    return check_decode(data[1:], p.PROFILES[data[0] & 1]) if data else "empty"


KNOWN_IDS = sorted(
    {c.MSG_ID for c in vars(p).values() if isinstance(c, type) and issubclass(c, p.Message)} - {-1}
)


def _inputs(st, target: str, min_size: int, max_size: int):
    """Hypothesis strategy: raw bytes, half the time built from plausible message headers
    (known ids, sizes near the real ones) so the payload decoders are reached too."""
    header = st.tuples(
        st.one_of(st.integers(0, 3), st.integers(0, 255)),  # type
        st.one_of(st.sampled_from(KNOWN_IDS), st.integers(0, 255)),  # msg_id
        st.integers(0, 0xFFFF),  # dev_num
        st.integers(0, 0xFFFF),  # token (spec-v1 only)
        st.one_of(st.sampled_from([6, 8, 44, 48]), st.integers(0, 64), st.integers(0, 0xFFFF)),
        st.binary(min_size=40, max_size=58),  # payload
    )

    def message(profile: int, h: tuple) -> bytes:
        type_, msg_id, dev_num, token, size, payload = h
        if profile == 0:
            return (
                bytes([type_, msg_id])
                + dev_num.to_bytes(2, "little")
                + size.to_bytes(2, "little")
                + payload
            )
        return (
            bytes([type_, msg_id])
            + b"".join(v.to_bytes(2, "little") for v in (dev_num, token, size))
            + payload
        )

    raw = st.binary(min_size=min_size, max_size=max_size)
    if target == "decode":
        built = st.tuples(st.integers(0, 1), header).map(lambda t: bytes([t[0]]) + message(*t))
    else:
        built = st.tuples(
            st.integers(0, 255),
            st.binary(min_size=8, max_size=8),
            st.lists(header, max_size=CAP),
        ).map(
            lambda t: (
                bytes([t[0]])
                + t[1]
                + b"".join(message(t[0] & 1, h)[:SLOT_SIZE].ljust(SLOT_SIZE, b"\0") for h in t[2])
            )
        )
    return st.one_of(raw, built)


def run_hypothesis(
    run: Run, fn: Callable[[bytes], str], seconds: float, min_size: int, max_size: int
) -> None:
    """Batches of 1,000 examples, seeded 1, 2, 3, ... (reproducible), until the time is up."""
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis import strategies as st

    @settings(
        max_examples=1000,
        deadline=None,
        database=None,
        phases=[Phase.generate],  # findings are recorded, not raised: nothing to shrink
        suppress_health_check=list(HealthCheck),
    )
    @given(_inputs(st, run.target, min_size, max_size))
    def body(data: bytes) -> None:
        run.one(fn, data)

    start = time.monotonic()
    end = start + seconds
    batch = 0
    while time.monotonic() < end:
        batch += 1
        seed(batch)(body)()
    run.seconds = time.monotonic() - start


def run_atheris(run: Run, fn: Callable[[bytes], str], seconds: float, max_size: int) -> None:
    """libFuzzer never returns: the report is printed, and the process ended, from the
    input callback once ``seconds`` have passed (libFuzzer's own limit is the fallback)."""
    start = time.monotonic()
    end = start + seconds

    def one(data: bytes) -> None:
        run.one(fn, data)
        if time.monotonic() >= end:
            run.seconds = time.monotonic() - start
            print(run.report(), flush=True)
            os._exit(1 if run.findings else 0)

    argv = [
        sys.argv[0],
        f"-max_total_time={int(seconds) + 30}",
        f"-max_len={max_size}",
        "-print_final_stats=1",
    ]
    atheris.Setup(argv, one)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=("decode", "bus", "both"), default="both")
    parser.add_argument("--seconds", type=float, default=120.0, help="per target")
    parser.add_argument("--engine", choices=("atheris", "hypothesis"), default=ENGINE)
    parser.add_argument("--repro", metavar="HEX", help="run one input of --target, raise")
    args = parser.parse_args(argv)
    if args.repro is not None:
        if args.target == "both":
            parser.error("--repro needs --target decode or --target bus")
        data = bytes.fromhex(args.repro)
        if args.target == "decode":
            print(decode_input(data))
        else:
            bus = BusTarget()
            try:
                print(bus.check(data))
            finally:
                bus.close()
        return 0
    if args.engine == "atheris" and atheris is None:
        parser.error("atheris is not installed: pip install atheris, or use --engine hypothesis")
    targets = ["decode", "bus"] if args.target == "both" else [args.target]
    if args.engine == "atheris" and len(targets) > 1:
        # libFuzzer runs one target per process: run each in a child, one after the other.
        status = 0
        for target in targets:
            cmd = [sys.executable, __file__, "--engine", "atheris", "--target", target,
                   "--seconds", str(args.seconds)]  # fmt: skip
            status |= os.spawnv(os.P_WAIT, sys.executable, cmd)
        return status
    found = 0
    for target in targets:
        run = Run(target)
        bus = BusTarget() if target == "bus" else None
        fn = decode_input if bus is None else bus.check
        min_size, max_size = (1, 1 + 64) if bus is None else (10, 9 + CAP * SLOT_SIZE)
        print(f"fuzzing {target} with {args.engine} for {args.seconds:.0f} s ...", flush=True)
        try:
            if args.engine == "atheris":
                run_atheris(run, fn, args.seconds, max_size)  # exits the process
            run_hypothesis(run, fn, args.seconds, min_size, max_size)
        finally:
            if bus is not None:
                bus.close()
        print(run.report(), flush=True)
        found += len(run.findings)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

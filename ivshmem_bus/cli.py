"""``ivshmem-bus``: argparse and printing only; every operation lives in the library.

Exit codes: 0 success, 1 the operation failed (the message names the device and the fix),
2 bad usage (argparse's own convention).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from . import __version__, protocol
from .errors import IvshmemBusError

__all__ = ["main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo, summarize

    result = run_demo(args.profile, args.round_trips)
    d = result.description
    if args.json:
        print(
            json.dumps(
                {
                    "backend": "fake",
                    "driver_vmid": result.driver_vmid,
                    "device_vmid": result.device_vmid,
                    "profile": result.profile,
                    "device": d.as_dict(),
                    "negotiated_features": f"0x{result.features:x}",
                    "status": result.status,
                    "round_trips_us": summarize(result.round_trips_us),
                },
                indent=2,
            )
        )
        return 0
    from .transport import feature_names, status_names

    print(
        f"fake ivshmem pair (no hardware): driver vmid {result.driver_vmid} <-> "
        f"device vmid {result.device_vmid}, profile {result.profile}"
    )
    print(f"probe of vmid {result.device_vmid}:")
    print(f"  device:    {d.device_name} (virtio id {d.device_id})")
    print(f"  vendor:    {d.vendor}")
    print(f"  features:  0x{d.features:x} {' '.join(d.feature_names) or '-'}")
    print(f"  config:    {d.config_size} bytes")
    queues = ", ".join(f"{q.index} (max {q.max_size})" for q in d.queues) or "none"
    print(f"  queues:    {queues}")
    print(
        f"initialized: status {status_names(result.status)}, "
        f"features {' '.join(feature_names(result.features)) or '-'}"
    )
    print(
        f"{len(result.round_trips_us)} request/response round trips: "
        f"{summarize(result.round_trips_us)}"
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ivshmem-bus",
        description="A virtio-msg bus over QEMU's ivshmem PCI device (VFIO, fake, server).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo",
        help="probe a Python virtio device over a fake ivshmem pair (no hardware, no root)",
        description="Run the rng virtio device in a child process and probe it from a "
        "driver over a fake ivshmem pair: the whole bus with no hardware.",
    )
    demo.add_argument("--profile", choices=protocol.PROFILES, default="qemu-v0")
    demo.add_argument("--round-trips", type=int, default=1000, metavar="N")
    demo.add_argument("--json", action="store_true", help="machine-readable output")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ivshmem-bus`` and ``python -m ivshmem_bus``."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="ivshmem-bus: %(levelname)s: %(message)s",
    )
    try:
        return args.func(args)
    except IvshmemBusError as exc:
        print(f"ivshmem-bus: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

"""The argparse types and option groups the commands share: numbers in range, VMIDs, BDFs,
sizes, and the backend options (which ivshmem device, the linux-user bus's files) with the
device they name (``backend``)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ..core import protocol
from ..core.regs import PEER_IDS, is_peer_id

if TYPE_CHECKING:
    from ..backends.base import IvshmemDevice

__all__ = [
    "COUNT",
    "SECONDS",
    "TIMEOUT",
    "VECTORS",
    "add_backend_args",
    "add_linux_user_options",
    "backend",
    "bdf_arg",
    "default_to_fake",
    "mem_offset_arg",
    "number",
    "serve_hint",
    "size_arg",
    "vectors_arg",
    "vmid_arg",
]


def bdf_arg(text: str) -> str:
    from ..backends.vfio import pci

    try:
        return pci.normalize_bdf(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def vmid_arg(text: str) -> str:
    """argparse type for --remote-vmid: 'auto' or a peer id (decimal or 0x hex)."""
    if text == "auto":
        return text
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a VMID (a number or 'auto')") from None
    if not is_peer_id(value):
        raise argparse.ArgumentTypeError(f"{text} is not a VMID ({PEER_IDS})")
    return text


def number(kind: type, low: float, *, above: bool = False, what: str = ""):
    """An argparse type: a ``kind`` (int or float) >= ``low`` (> ``low`` with ``above``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value >= low or (above and value == low):  # not >=: NaN is out of range too
            bound = f"more than {low:g}" if above else f"at least {low:g}"
            raise argparse.ArgumentTypeError(
                f"{text} is out of range: {what or 'it'} must be {bound}"
            )
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


SECONDS = number(float, 0, what="a time in seconds")
TIMEOUT = number(float, 0, above=True, what="a timeout in seconds")
COUNT = number(int, 1, what="a count")
VECTORS = number(int, 1, what="a vector count (1..64)")


def vectors_arg(text: str) -> int:
    value = VECTORS(text)
    if value > 64:
        raise argparse.ArgumentTypeError(f"{text} is out of range: vectors are 1..64")
    return value


def size_arg(text: str) -> str:
    """argparse type for ``server -l``: a power of two of at least 8K (the bus's two queues)."""
    from ..server import parse_size

    try:
        size = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size & (size - 1):
        raise argparse.ArgumentTypeError(f"{text} is not a power of two: use e.g. 4M")
    if size < 8192:
        raise argparse.ArgumentTypeError(
            f"{text} is {size} bytes: the bus needs at least 8K (two 4 KiB queues)"
        )
    return text


def add_backend_args(p: argparse.ArgumentParser, *, remote: bool = True, mem: bool = True) -> None:
    """The backend options; ``mem=False`` leaves ``--mem``/``--mem-offset`` to a command that
    defines its own memory window (serve's, with the data path)."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--server", metavar="PATH", help="join the ivshmem server at PATH")
    where.add_argument("--device", metavar="BDF", help="a VFIO-bound ivshmem PCI function")
    where.add_argument(
        "--fake", metavar="DIR", help="a fake fabric in DIR (the default without ivshmem hardware)"
    )
    where.add_argument(
        "--linux-user", metavar="SOCKET",
        help="QEMU's linux-user bus, its chardev socket (serve listens, the others connect)",
    )  # fmt: skip
    add_linux_user_options(p, mem=mem)
    p.add_argument("--vectors", type=vectors_arg, default=1, help="vectors the server gives (-n)")
    p.add_argument("--profile", choices=protocol.PROFILES, default="qemu-v0")
    if remote:
        p.add_argument(
            "--remote-vmid",
            default="auto",
            metavar="N",
            type=vmid_arg,
            help="the peer's VMID, or 'auto': the one other peer the server announced",
        )
        p.add_argument(
            "--coalesce", action="store_true",
            help="ring the peer only when it may be asleep (both ends ivshmem-bus, not QEMU; "
            "needs the compiled helper)",
        )  # fmt: skip


def mem_offset_arg(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an address (0x40000000)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def add_linux_user_options(p: argparse.ArgumentParser, *, mem: bool = True) -> None:
    """The linux-user bus's options (linux-user-bus.md; defaults as the seed's QEMU)."""
    g = p.add_argument_group("linux-user bus (with --linux-user)")
    g.add_argument(
        "--bus-name",
        default="linux-user",
        metavar="NAME",
        help="QEMU's name=: the queue files are queue-NAME-driver/-device",
    )
    g.add_argument(
        "--queue-dir",
        default=".",
        metavar="DIR",
        help="where the queue files are (QEMU's working directory; default: here)",
    )
    if not mem:
        return
    g.add_argument("--mem", metavar="FILE", help="the driver's RAM file (QEMU's mem-path)")
    g.add_argument(
        "--mem-offset",
        type=mem_offset_arg,
        default=0x40000000,
        metavar="N",
        help="driver address of the RAM file's first byte (default 0x40000000)",
    )


def backend(args: argparse.Namespace) -> IvshmemDevice:
    """The device the backend options name (``open_backend``; the fake one by default)."""
    from ..backends import open_backend

    default_to_fake(args)
    return open_backend(
        server=args.server, device=args.device, fake=args.fake, vectors=args.vectors,
        linux_user=args.linux_user, listen=getattr(args, "listen", False),
        bus_name=args.bus_name, queue_dir=args.queue_dir, mem=getattr(args, "mem", None),
        mem_offset=getattr(args, "mem_offset", None),
    )  # fmt: skip


def default_to_fake(args: argparse.Namespace) -> None:
    """No backend named: the fake device where no ivshmem hardware is present (said so)."""
    if args.server or getattr(args, "device", None) or args.fake or args.linux_user:
        return
    from ..backends.fabric import default_fake_dir
    from ..backends.vfio import pci

    found = pci.list_ivshmem(args.sysfs)
    if found:
        raise ValueError(
            f"ivshmem hardware is present ({', '.join(f.bdf for f in found)}): choose "
            f"--device BDF, --server PATH or --fake DIR"
        )
    args.fake = default_fake_dir()
    print(
        f"no ivshmem hardware: using the fake device (a private fabric in {args.fake})",
        file=sys.stderr,
        flush=True,
    )


def serve_hint(args: argparse.Namespace) -> str:
    """The serve command that would give this driver its device (for "start the device")."""
    if args.server:
        return f"ivshmem-bus serve --server {args.server}"
    if args.fake:
        return f"ivshmem-bus serve --fake {args.fake}"
    return "ivshmem-bus serve --device BDF on the other machine"

"""``ivshmem-bus``: argparse and printing only; every operation lives in the library.

Exit codes: 0 success, 1 the operation failed (the message names the device and the fix),
2 bad usage (argparse's own convention).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from .. import __version__
from ..core import protocol
from ..core.regs import PEER_IDS, is_peer_id
from ..errors import IvshmemBusError
from . import signals
from .data import add_data_commands, add_serve_args
from .link import (
    cmd_demo,
    cmd_monitor,
    cmd_ping,
    cmd_probe,
    cmd_serve,
    cmd_server,
)
from .pci import cmd_bind, cmd_list, cmd_unbind, cmd_vmid

__all__ = ["main"]


def _bdf_arg(text: str) -> str:
    from ..backends.vfio import pci

    try:
        return pci.normalize_bdf(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _vmid_arg(text: str) -> str:
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


def _number(kind: type, low: float, *, above: bool = False, what: str = ""):
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


SECONDS = _number(float, 0, what="a time in seconds")
TIMEOUT = _number(float, 0, above=True, what="a timeout in seconds")
COUNT = _number(int, 1, what="a count")
VECTORS = _number(int, 1, what="a vector count (1..64)")


def _vectors(text: str) -> int:
    value = VECTORS(text)
    if value > 64:
        raise argparse.ArgumentTypeError(f"{text} is out of range: vectors are 1..64")
    return value


def _size_arg(text: str) -> str:
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


def _add_backend_args(p: argparse.ArgumentParser, *, remote: bool = True, mem: bool = True) -> None:
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
    _add_linux_user_options(p, mem=mem)
    p.add_argument("--vectors", type=_vectors, default=1, help="vectors the server gives (-n)")
    p.add_argument("--profile", choices=protocol.PROFILES, default="qemu-v0")
    if remote:
        p.add_argument(
            "--remote-vmid",
            default="auto",
            metavar="N",
            type=_vmid_arg,
            help="the peer's VMID, or 'auto': the one other peer the server announced",
        )
        p.add_argument(
            "--coalesce", action="store_true",
            help="ring the peer only when it may be asleep (both ends ivshmem-bus, not QEMU; "
            "needs the compiled helper)",
        )  # fmt: skip


def _mem_offset_arg(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an address (0x40000000)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _add_linux_user_options(p: argparse.ArgumentParser, *, mem: bool = True) -> None:
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
        type=_mem_offset_arg,
        default=0x40000000,
        metavar="N",
        help="driver address of the RAM file's first byte (default 0x40000000)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ivshmem-bus",
        description="A virtio-msg bus over QEMU's ivshmem PCI device (VFIO, fake, server).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--sysfs", default="/sys", help=argparse.SUPPRESS)  # tests, chroots
    parser.add_argument("--dev", default="/dev", help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    lst = sub.add_parser("list", help="every ivshmem PCI function, like lspci")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_list)

    vmid = sub.add_parser("vmid", help="this machine's VMID (IVPosition), for the other side")
    vmid.add_argument("bdf", nargs="?", type=_bdf_arg, metavar="BDF")
    vmid.add_argument("--format", choices=["hex", "dec"], default="hex")
    vmid.set_defaults(func=cmd_vmid)

    bind = sub.add_parser("bind", help="bind an ivshmem function to vfio-pci (root)")
    bind.add_argument("bdf", type=_bdf_arg, metavar="BDF")
    bind.add_argument(
        "--noiommu",
        action="store_true",
        help="allow no-IOMMU mode (unrestricted DMA; taints the kernel)",
    )
    bind.set_defaults(func=cmd_bind)

    unbind = sub.add_parser("unbind", help="give the function back to its previous driver (root)")
    unbind.add_argument("bdf", type=_bdf_arg, metavar="BDF")
    unbind.set_defaults(func=cmd_unbind)

    demo = sub.add_parser(
        "demo",
        help="probe a Python virtio device over a fake ivshmem pair (no hardware, no root)",
        description="Run the rng virtio device in a child process and probe it from a "
        "driver over a fake ivshmem pair: the whole bus with no hardware.",
    )
    demo.add_argument("--profile", choices=protocol.PROFILES, default="qemu-v0")
    demo.add_argument("--round-trips", type=_number(int, 0), default=1000, metavar="N")
    demo.add_argument("--json", action="store_true", help="machine-readable output")
    demo.set_defaults(func=cmd_demo)

    server = sub.add_parser(
        "server",
        help="a QEMU-compatible ivshmem server (option letters as QEMU's ivshmem-server)",
        description="Serve shared memory and doorbell eventfds to QEMU ivshmem-doorbell "
        "devices and host peers over a UNIX socket. Runs in the foreground until SIGINT/SIGTERM.",
    )
    server.add_argument("-S", dest="socket", default="/tmp/ivshmem_socket", metavar="PATH")
    server.add_argument(
        "-l", dest="size", type=_size_arg, default="4M", metavar="SIZE", help="e.g. 4M, 1G"
    )
    server.add_argument("-n", dest="vectors", type=_vectors, default=1, metavar="VECTORS")
    memory = server.add_mutually_exclusive_group()
    memory.add_argument("-m", "--shm", dest="shm", metavar="PATH", help="file to share")
    memory.add_argument(
        "-M", dest="shm_name", metavar="NAME",
        help="POSIX shared-memory object /dev/shm/NAME, used as a -m file (kept at exit)",
    )  # fmt: skip
    server.add_argument("-F", dest="foreground", action="store_true", help="foreground (default)")
    server.add_argument("-p", dest="pid_file", metavar="PIDFILE", help="write our pid there")
    server.add_argument("--max-peers", type=_number(int, 1), default=64)
    server.add_argument(
        "--idle-exit",
        type=SECONDS,
        default=None,
        metavar="SECONDS",
        help="exit after SECONDS with no peer (fake fabrics use this)",
    )
    server.set_defaults(func=cmd_server)

    serve = sub.add_parser("serve", help="run the Python virtio-msg device (device role)")
    _add_backend_args(serve, mem=False)  # its --mem and --mem-offset: add_serve_args
    add_serve_args(serve)
    serve.add_argument(
        "--wait",
        type=SECONDS,
        default=float("inf"),
        metavar="SECONDS",
        help="with --remote-vmid auto: how long to wait for the driver's peer",
    )
    serve.add_argument(
        "--sched",
        choices=["auto", "fifo", "normal"],
        default="auto",
        help="real-time scheduling for QEMU's 1 ms deadline on a busy machine (auto: "
        "SCHED_FIFO when permitted, e.g. as root)",
    )
    resets = serve.add_mutually_exclusive_group()
    resets.add_argument(
        "--no-reset-queues",
        dest="reset_queues",
        action="store_false",
        default=None,
        help="do not zero the queues at start (the driver side started first; the default "
        "with --profile linux-v0)",
    )
    resets.add_argument(
        "--reset-queues",
        dest="reset_queues",
        action="store_true",
        help="zero the queues at start (the default except with --profile linux-v0)",
    )
    serve.set_defaults(func=cmd_serve, listen=True)  # --linux-user: QEMU's driver connects

    probe = sub.add_parser("probe", help="describe the remote virtio-msg device (driver role)")
    _add_backend_args(probe)
    probe.add_argument("--timeout", type=TIMEOUT, default=1.0, metavar="SECONDS")
    probe.add_argument("--json", action="store_true")
    probe.set_defaults(func=cmd_probe)

    ping = sub.add_parser("ping", help="bus round-trip check, like ping")
    _add_backend_args(ping)
    ping.add_argument("-c", "--count", type=COUNT, default=5)
    ping.add_argument("-i", "--interval", type=SECONDS, default=0.2, metavar="SECONDS")
    ping.add_argument("--timeout", type=TIMEOUT, default=1.0, metavar="SECONDS")
    ping.set_defaults(func=cmd_ping)

    monitor = sub.add_parser(
        "monitor", help="read-only tap on both queues of a live link (never writes)"
    )
    src = monitor.add_mutually_exclusive_group()
    src.add_argument("--server", metavar="PATH", help="take BAR2 from this server, then hang up")
    src.add_argument("--fake", metavar="DIR", help="the fake fabric in DIR (the default)")
    src.add_argument("--shm", metavar="FILE", help="a shared-memory file (the server's -m)")
    src.add_argument(
        "--linux-user", metavar="SOCKET",
        help="QEMU's linux-user bus: its queue files, read-only (the socket is not touched)",
    )  # fmt: skip
    _add_linux_user_options(monitor)
    monitor.add_argument("--profile", choices=protocol.PROFILES, default="qemu-v0")
    monitor.add_argument("--pcap", metavar="FILE", help="also write a pcap (tools/virtio-msg.lua)")
    monitor.add_argument("--count", type=_number(int, 0), default=0, help="stop after N messages")
    monitor.add_argument("--duration", type=SECONDS, default=None, metavar="SECONDS")
    monitor.add_argument("--interval", type=TIMEOUT, default=1e-4, metavar="SECONDS")
    monitor.set_defaults(func=cmd_monitor)

    add_data_commands(sub, _add_backend_args)
    _add_bench(sub)
    return parser


def _source_tree_bench() -> ModuleType | None:
    """The benchmark package of a source checkout (``bench/`` beside ``ivshmem_bus/``).

    The benchmark is not installed with the package (its C reference and targets are for
    developers); an editable install or a run from the checkout finds it here.
    """
    root = Path(__file__).resolve().parents[2]
    if not (root / "bench" / "__init__.py").is_file():
        return None
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import bench

    return bench


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = _source_tree_bench()
    help_text = "throughput and latency against a C reference (from a source checkout)"
    if bench is None:
        p = sub.add_parser("bench", help=help_text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_no_bench)
        return
    p = sub.add_parser(
        "bench",
        help=help_text,
        description=bench.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_arguments(p)  # the options of python -m bench, exactly
    p.set_defaults(func=bench.cmd_bench)


def _no_bench(args: argparse.Namespace) -> int:
    raise IvshmemBusError(
        "the benchmark is not installed with the package: run it from a source checkout "
        "(pip install -e . there, then ivshmem-bus bench, or python -m bench)"
    )


def vmid_main(argv: Sequence[str] | None = None) -> int:
    """``ivshmem-vmid``: the same as ``ivshmem-bus vmid``, with its own name in its usage."""
    return main(["vmid", *(sys.argv[1:] if argv is None else argv)], prog="ivshmem-vmid")


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    group = parser._subparsers
    actions = group._group_actions if group is not None else []
    return next(a.choices for a in actions if isinstance(a.choices, dict))


def _verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """``-v`` after the command too (``ivshmem-bus probe -v``), not only before it."""
    for name, sub in _commands(parser).items():
        if name != "bench":  # the benchmark takes exactly python -m bench's options
            sub.add_argument(
                "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                help="debug logging",
            )  # fmt: skip


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``ivshmem-bus`` and ``python -m ivshmem_bus``."""
    restore = signals.install()
    try:
        return _main(argv, prog)
    finally:
        restore()


def _main(argv: Sequence[str] | None, prog: str | None) -> int:
    parser = _parser()
    _verbose_everywhere(parser)
    try:
        if prog is None:
            args = parser.parse_args(argv)
        else:  # ivshmem-vmid: the vmid command's own parser, under its own name
            vmid = _commands(parser)["vmid"]
            vmid.prog = prog
            top = parser.parse_args(["vmid"])  # the top level's defaults (sysfs, dev, -v)
            args = vmid.parse_args(list(argv or [])[1:], namespace=top)
    except signals.Stopped as exc:
        return signals.exit_code(exc)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="ivshmem-bus: %(levelname)s: %(message)s",
    )
    try:
        return args.func(args)
    except (IvshmemBusError, OSError) as exc:
        print(f"ivshmem-bus: error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # an argument the library refused (bad size, bad vectors)
        print(f"ivshmem-bus: error: {exc}", file=sys.stderr)
        return 2
    except signals.Stopped as exc:
        return signals.exit_code(exc)

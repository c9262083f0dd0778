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
from ..errors import IvshmemBusError
from . import signals
from .args import add_backend_args
from .data import add_data_commands
from .link import add_link_commands
from .pci import add_pci_commands

__all__ = ["main"]


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

    add_pci_commands(sub)
    add_link_commands(sub)
    add_data_commands(sub, add_backend_args)
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

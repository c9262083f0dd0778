"""Handlers of the data-path commands: ``rng``, ``console``, and ``serve``'s device choice.

Printing and wiring only; the drivers (``drivers.RngDriver``, ``drivers.ConsoleDriver``) and
devices (``devices.RngDevice``, ``devices.ConsoleDevice``) do the work. The Python driver's
queues and buffers always live in the pool of the doorbell device's BAR2; the served device
reads them through ``--mem`` (the pool by default, or an ivshmem-plain BDF, or a file).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from ..backends.base import IvshmemDevice
from ..devices import ConsoleDevice, RngDevice, VirtioMsgDevice
from ..devices.hostio import FdIO, HostIO, PtyIO, SocketIO
from .args import mem_offset_arg

if TYPE_CHECKING:
    from ..drivers import VirtioMsgDriver
    from ..memory import FileWindow, PlainWindow, PoolWindow

__all__ = ["add_data_commands", "add_serve_args", "cmd_console", "cmd_rng", "served_device"]

_SIZE = re.compile(r"(\d+)([KMG]?)", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _bytes_arg(text: str) -> int:
    """argparse type for -n: digits with an optional K, M or G suffix (1024-based)."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a byte count (e.g. 4096, 64K, 1M)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


DEVICE_TYPES = ("rng", "console")
TIMEOUT_HELP = (
    "how long to wait for each answer, and with --remote-vmid auto for the device's peer "
    "(default 2)"
)


def _device_types(text: str) -> list[str]:
    """argparse type for --device-type: one type or a comma list, each at most once (the
    first at dev_id 0, the next at 1, ...)."""
    names = [n.strip() for n in text.split(",")]
    for name in names:
        if name not in DEVICE_TYPES:
            raise argparse.ArgumentTypeError(
                f"{name!r} is not a device type: use {', '.join(DEVICE_TYPES)} or a comma list"
            )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r} names a device type twice: list each once")
    return names


def add_serve_args(serve: argparse.ArgumentParser) -> None:
    """``serve``'s device options: the type(s), the source, the memory window, the console's
    host side."""
    serve.add_argument(
        "--device-type", type=_device_types, default=["rng"], metavar="TYPE[,TYPE]",
        help="rng (default), console, or a list such as rng,console: one device per type at "
        "dev_id 0, 1, ... (several need --profile linux-v0)",
    )  # fmt: skip
    serve.add_argument("--source", metavar="FILE", help="rng: serve FILE's bytes in order")
    serve.add_argument(
        "--mem", default="pool", metavar="WINDOW",
        help="where the driver's addresses point: pool (the doorbell device's BAR2 above the "
        "message queues, default), the BDF of an ivshmem-plain function, or a file",
    )  # fmt: skip
    serve.add_argument(
        "--mem-offset", type=mem_offset_arg, default=None, metavar="N",
        help="the driver address of the window's first byte (BDF or file windows; default "
        "0x40000000 with --linux-user, else 0)",
    )  # fmt: skip
    host = serve.add_mutually_exclusive_group()
    host.add_argument("--console-socket", metavar="PATH", help="console: a UNIX socket to attach")
    host.add_argument("--console-pty", action="store_true", help="console: a new pty to attach")
    serve.set_defaults(served_device=served_device)  # what link.cmd_serve opens


def add_data_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    add_backend_args: Callable[[argparse.ArgumentParser], None],
) -> None:
    rng = sub.add_parser(
        "rng", help="read entropy from the remote virtio-rng device to stdout (driver role)"
    )
    add_backend_args(rng)
    rng.add_argument(
        "-n", "--bytes", type=_bytes_arg, default=4096, metavar="BYTES",
        help="how many bytes (K, M, G suffixes; default 4096)",
    )  # fmt: skip
    rng.add_argument("--timeout", type=float, default=2.0, metavar="SECONDS", help=TIMEOUT_HELP)
    rng.set_defaults(func=cmd_rng)

    console = sub.add_parser(
        "console", help="attach this terminal (or stdin/stdout) to the remote virtio console"
    )
    add_backend_args(console)
    console.add_argument("--timeout", type=float, default=2.0, metavar="SECONDS", help=TIMEOUT_HELP)
    console.add_argument(
        "--linger", type=float, default=0.5, metavar="SECONDS",
        help="after stdin ends, keep printing until the device is quiet this long",
    )  # fmt: skip
    console.set_defaults(func=cmd_console)


@contextlib.contextmanager
def _driver_link(
    args: argparse.Namespace,
) -> Iterator[tuple[VirtioMsgDriver, PoolWindow | PlainWindow | FileWindow]]:
    """(transport driver, the driver's window) on the backend the options name."""
    from ..bus import VirtioMsgBus
    from ..drivers import VirtioMsgDriver
    from ..ownership import resolve_driver_remote
    from .args import backend, serve_hint

    hint = serve_hint(args)
    if args.func is cmd_console and (args.server or args.fake):
        hint += " --device-type console"  # serve's default device is the rng
    with backend(args) as dev:
        remote = resolve_driver_remote(dev, args.remote_vmid, hint=hint, wait=args.timeout)
        with (
            VirtioMsgBus(dev, "driver", remote, args.profile, coalesce=args.coalesce) as bus,
            _driver_window(args, dev) as window,
        ):
            yield VirtioMsgDriver(bus, timeout=args.timeout), window


def _driver_window(
    args: argparse.Namespace, dev: IvshmemDevice
) -> PoolWindow | PlainWindow | FileWindow:
    """Where the Python driver puts its queues and buffers: the pool in the doorbell
    device's BAR2, or on the linux-user bus (no BAR2) the RAM file ``--mem`` names."""
    from ..memory import open_window

    if getattr(args, "linux_user", None):
        if not args.mem:
            raise ValueError(
                "--linux-user has no BAR2 for the driver's queues: name the RAM file the "
                "device maps with --mem FILE (QEMU's mem-path)"
            )
        return open_window(args.mem, mem_offset=args.mem_offset, role="driver")
    return open_window("pool", device=dev, role="driver")


def cmd_rng(args: argparse.Namespace) -> int:
    from ..drivers import RngDriver

    out = sys.stdout.buffer
    with _driver_link(args) as (driver, window):
        rng = RngDriver(driver, window)
        try:
            for chunk in rng.iter_entropy(args.bytes):
                out.write(chunk)
            out.flush()
        except BrokenPipeError:  # `| head -c N` took what it wanted: stop, as cat does
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush goes there
            os.close(devnull)
            return 141  # 128 + SIGPIPE, what a shell reports for cat
        finally:
            rng.close()
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    from ..drivers import ConsoleDriver

    with _driver_link(args) as (driver, window):
        console = ConsoleDriver(driver, window)
        try:
            with _raw_terminal(0) as tty:
                if tty:
                    print("attached; Ctrl-] detaches\r", file=sys.stderr, flush=True)
                console.attach(0, 1, linger=args.linger, escape=tty)
        finally:
            console.close()
    return 0


@contextlib.contextmanager
def _raw_terminal(fd: int) -> Iterator[bool]:
    """Raw mode on ``fd`` while the block runs, only when it is a terminal (True then)."""
    if not os.isatty(fd):
        yield False
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def served_device(args: argparse.Namespace, dev: IvshmemDevice) -> Iterator[list[VirtioMsgDevice]]:
    """The devices ``serve --device-type`` names (dev_id = place in the list), all over the
    window ``--mem`` names; closed (devices, host side, window, in that order) when the block
    ends.

    A console on stdio keeps the real stdout for its bytes and sends the serve command's own
    messages to stderr, so the two never mix; when that stdout is a terminal, its size is the
    console's cols/rows, followed on SIGWINCH.
    """
    from ..memory import open_window

    if "rng" not in args.device_type and args.source:
        raise ValueError("--source is for --device-type rng (the entropy it serves)")
    if "console" not in args.device_type and (args.console_socket or args.console_pty):
        raise ValueError("--console-socket and --console-pty are for --device-type console")
    with contextlib.ExitStack() as stack:
        linux_user = getattr(args, "linux_user", None)
        offset = args.mem_offset
        if offset is None:  # the seed's 0x40000000 on the linux-user bus; the pool's 0
            offset = 0x40000000 if linux_user else 0
        window = None
        if linux_user and args.mem == "pool":  # no BAR2: without --mem FILE, probe-only
            print(f"{dev.name}: no --mem FILE: answering the control plane only", flush=True)
        else:
            window = open_window(
                args.mem, device=dev, mem_offset=offset, role="device",
                sysfs=args.sysfs, dev=args.dev,
            )  # fmt: skip
            stack.callback(window.close)
        devices: list[VirtioMsgDevice] = []
        for name in args.device_type:
            device: VirtioMsgDevice
            if name == "rng":
                device = RngDevice(args.profile, source=args.source, window=window)
            else:
                io = stack.enter_context(_console_host(args))
                tty = _tty_of(io)
                cols, rows = os.get_terminal_size(tty) if tty is not None else (80, 25)
                device = ConsoleDevice(io, args.profile, cols=cols, rows=rows, window=window)
                if tty is not None:
                    stack.enter_context(_follow_resizes(tty, device))
            stack.callback(device.close)
            devices.append(device)
        yield devices


def _tty_of(io: HostIO) -> int | None:
    """The terminal a stdio console writes to, if it is one (its size is the console's)."""
    if isinstance(io, FdIO) and not isinstance(io, PtyIO) and os.isatty(io.out_fd):
        return io.out_fd
    return None


@contextlib.contextmanager
def _follow_resizes(fd: int, console: ConsoleDevice) -> Iterator[None]:
    """SIGWINCH: the terminal's new size goes to the driver (config generation, EVENT_CONFIG)."""
    import signal

    def on_winch(signum: int, frame: object) -> None:
        cols, rows = os.get_terminal_size(fd)
        console.resize(cols, rows)

    old = signal.signal(signal.SIGWINCH, on_winch)
    try:
        yield
    finally:
        signal.signal(signal.SIGWINCH, old)


@contextlib.contextmanager
def _console_host(args: argparse.Namespace) -> Iterator[HostIO]:
    io: HostIO
    if args.console_socket:
        io = SocketIO(args.console_socket)
        print(f"console on UNIX socket {args.console_socket}", flush=True)
    elif args.console_pty:
        pty = PtyIO()
        io = pty
        print(f"console on {pty.slave_name}", flush=True)
    else:
        sys.stdout.flush()
        console_out = os.dup(1)
        saved = os.dup(1)
        os.dup2(2, 1)  # the command's own messages go to stderr from here on
        io = FdIO(0, console_out)
        try:
            yield io
        finally:
            io.flush()
            io.close()
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            os.close(console_out)
        return
    try:
        yield io
    finally:
        io.close()

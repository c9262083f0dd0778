"""The link commands: demo, server, serve, probe, ping, monitor: their parsers and handlers.

Printing only: each handler calls the library and prints what it returns; ``cli/__init__.py``
owns the top-level parser and the exit codes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..core import protocol
from ..errors import MonitorError
from . import signals
from .args import (
    COUNT,
    SECONDS,
    TIMEOUT,
    add_backend_args,
    add_linux_user_options,
    backend,
    default_to_fake,
    number,
    serve_hint,
    size_arg,
    vectors_arg,
)
from .data import add_serve_args

if TYPE_CHECKING:  # annotations only: the commands import their layers when they run
    from ..backends.base import IvshmemDevice
    from ..bus import VirtioMsgBus
    from ..drivers import DeviceDescription


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo, summarize, summary

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
                    "round_trips_us": summary(result.round_trips_us),
                },
                indent=2,
            )
        )
        return 0
    from ..core.virtio import feature_names, status_names

    print(
        f"fake ivshmem pair (no hardware): driver vmid {result.driver_vmid} <-> "
        f"device vmid {result.device_vmid}, profile {result.profile}"
    )
    _print_description(result.device_vmid, d)
    print(
        f"initialized: status {status_names(result.status)}, "
        f"features {' '.join(feature_names(result.features)) or '-'}"
    )
    print(
        f"{len(result.round_trips_us)} request/response round trips: "
        f"{summarize(result.round_trips_us)}"
    )
    return 0


def _print_description(vmid: int, d: DeviceDescription) -> None:
    print(f"probe of vmid {vmid}:")
    print(f"  device:    {d.device_name} (virtio id {d.device_id})")
    print(f"  vendor:    {d.vendor}")
    print(f"  features:  0x{d.features:x} {' '.join(d.feature_names) or '-'}")
    print(f"  config:    {d.config_size} bytes")
    queues = ", ".join(f"{q.index} (max {q.max_size})" for q in d.queues) or "none"
    print(f"  queues:    {queues}")


def cmd_server(args: argparse.Namespace) -> int:
    from ..contrib.daemon import PidFile
    from ..contrib.ivshmem_server import shm_object_path
    from ..server import IvshmemServer

    logging.getLogger("ivshmem_bus.server").setLevel(logging.INFO)
    shm = shm_object_path(args.shm_name) if args.shm_name else args.shm  # QEMU's -M
    pid_file = PidFile(args.pid_file) if args.pid_file else contextlib.nullcontext()
    with IvshmemServer(
        args.socket, shm_size=args.size, shm_path=shm, vectors=args.vectors,
        max_peers=args.max_peers,
    ) as server, pid_file:  # fmt: skip
        print(
            f"ivshmem server on {server.socket_path}: {server.shm_size} bytes of shared "
            f"memory, {server.vectors} vector(s), up to {server.max_peers} peers",
            flush=True,
        )
        if server.serve_forever(signals.stop_event(), idle_exit=args.idle_exit):
            print(f"no peer for {args.idle_exit:g} s: exiting", flush=True)
    print("ivshmem server stopped", flush=True)
    return 0


def check_linux_vmid(dev: IvshmemDevice, profile: str) -> None:
    """The Linux driver rings VMID 0 as the device (hard-coded): a linux-v0 device side must
    be VMID 0, the first peer of its ivshmem server.

    Raises:
        DeviceVmidError: it is not (the message names the fix).
    """
    from ..errors import DeviceVmidError

    vmid = dev.vmid
    if profile == "linux-v0" and vmid != 0:
        raise DeviceVmidError(
            f"{dev.name}: vmid {vmid}, but the Linux virtio-msg driver talks only to vmid 0: "
            "start the device side first (the server's first peer gets vmid 0), or use a "
            "server whose first peer it is"
        )


def cmd_serve(args: argparse.Namespace) -> int:
    from ..core.virtio import status_names
    from ..serving import serve_link

    if len(args.device_type) > 1 and args.profile == "qemu-v0":
        raise ValueError(
            f"--device-type {','.join(args.device_type)}: qemu-v0 carries one device per bus; "
            "use --profile linux-v0 (or spec-v1) for several"
        )
    # the bus messages (GET_DEVICES, PING) are the hub's: every profile that has them
    hub = args.profile != "qemu-v0" or len(args.device_type) > 1
    # linux-v0: the driver may have queued its GET_DEVICES before we start (it must be
    # answered), and a restarted device side must pick up the queues where they are.
    reset = args.reset_queues if args.reset_queues is not None else args.profile != "linux-v0"
    from ..ownership import check_bar2

    with backend(args) as dev:
        check_linux_vmid(dev, args.profile)
        check_bar2(dev, _bar_fix(args))  # before the device's window needs BAR2's pool
        with args.served_device(args, dev) as devices:  # cli.data's
            stop = signals.stop_event()  # from here on a signal ends the loop below cleanly
            for dev_id, device in enumerate(devices):
                where = f"dev_id {dev_id} " if hub else ""
                device.on_status = lambda old, new, where=where: _say(
                    f"{where}driver status {status_names(old)} -> {status_names(new)}"
                )
            what = ", ".join(
                f"{name} (id {d.device_id})" + (f" at dev_id {i}" if hub else "")
                for i, (name, d) in enumerate(zip(args.device_type, devices, strict=True))
            )
            result = serve_link(
                dev, devices, hub=hub, remote=args.remote_vmid, profile=args.profile,
                coalesce=args.coalesce, reset_queues=reset, wait=args.wait,
                stop=stop.is_set, say=_say, bar_fix=_bar_fix(args), sched=args.sched,
                ready=f"{dev.name}: vmid {dev.vmid}; serving virtio {what} ({args.profile}); "
                "waiting for the driver's peer; Ctrl-C stops",
            )  # fmt: skip
            # said here, while a stdio console's stdout still carries only its bytes
            if result.hub_stats is not None:
                _say(f"hub: {result.hub_stats}")
            _say(f"stopped after {result.handled} messages; {result.stats}")
    return 0


def _say(line: str) -> None:
    print(line, flush=True)


def _bar_fix(args: argparse.Namespace) -> str:
    if args.server:
        return f"restart the server {args.server} with -l 8K or more"
    if args.fake:
        return f"remove the fake fabric {args.fake} (a new one is made with 4M)"
    return "give the ivshmem device a memory backend of 8K or more"


@contextlib.contextmanager
def _driver_link(args: argparse.Namespace, dev) -> Iterator[VirtioMsgBus]:
    """The driver role's bus, with the driver queue claimed for its duration."""
    from ..bus import VirtioMsgBus
    from ..ownership import check_bar2, claimed, resolve_driver_remote

    check_bar2(dev, _bar_fix(args))
    remote = resolve_driver_remote(dev, args.remote_vmid, hint=serve_hint(args))
    with (
        claimed(dev, "driver"),
        VirtioMsgBus(dev, "driver", remote, args.profile, coalesce=args.coalesce) as bus,
    ):
        yield bus


def cmd_probe(args: argparse.Namespace) -> int:
    from ..drivers import VirtioMsgDriver

    with backend(args) as dev:
        vmid = dev.vmid  # read while the device is open (a VFIO BAR0 goes with it)
        with _driver_link(args, dev) as bus:
            d = VirtioMsgDriver(bus, timeout=args.timeout).probe()
            remote = bus.remote_vmid
    if args.json:
        print(json.dumps({"vmid": vmid, "remote_vmid": remote, **d.as_dict()}, indent=2))
    else:
        _print_description(remote, d)
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    from ..ping import ping

    with backend(args) as dev, _driver_link(args, dev) as bus:
        stop = signals.stop_event()
        print(f"PING vmid {bus.remote_vmid} from vmid {dev.vmid} over {dev.name} ({args.profile})")
        result = ping(bus, args.count, args.interval, args.timeout, stop, _say)
    print("\n".join(result.summary()))
    return 0 if result.ok else 1


def cmd_monitor(args: argparse.Namespace) -> int:
    from ..monitor import PcapWriter, open_pcap, tap_fd

    if args.linux_user:  # queue files, not one shared memory: mapped read-only here
        return _monitor_linux_user(args)
    fd = _monitor_fd(args)
    try:
        with tap_fd(fd, args.profile, args.shm or args.server or args.fake) as tap:
            pcap = open_pcap(args.pcap) if args.pcap else None  # opened once the tap works
            with pcap or contextlib.nullcontext():
                writer = PcapWriter(pcap) if pcap else None
                stop = signals.stop_event()
                for seen in tap.follow(args.interval, args.duration, stop=stop.is_set,
                                       count=args.count):  # fmt: skip
                    print(seen.describe(args.profile), flush=True)
                    if writer:
                        writer.write(seen, args.profile)
    finally:
        os.close(fd)
    return 0


def _monitor_fd(args: argparse.Namespace) -> int:
    """The shared memory to tap: the -m file, or BAR2 fetched from a server (then hung up)."""
    if args.shm:
        try:
            return os.open(args.shm, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise MonitorError(
                f"cannot open the shared-memory file {args.shm}: {exc.strerror}: give the "
                f"server's -m file"
            ) from exc
    from ..backends.fabric import fake_socket
    from ..backends.server_client import fetch_shared_memory

    if not args.server:
        default_to_fake(args)
    return fetch_shared_memory(args.server or fake_socket(args.fake))


def _monitor_linux_user(args: argparse.Namespace) -> int:
    """``monitor --linux-user``: tap the two queue files; QEMU's chardev takes one client,
    so the socket is left alone."""
    from ..backends.linux_user import QueueFiles
    from ..monitor import LinkTap

    with (
        QueueFiles(args.queue_dir, args.bus_name, readonly=True) as files,
        LinkTap(None, args.profile, queues=files.message_queues()) as tap,
    ):
        stop = signals.stop_event()
        for seen in tap.follow(args.interval, args.duration, stop=stop.is_set, count=args.count):
            print(seen.describe(args.profile), flush=True)
    return 0


# -- parsers ---------------------------------------------------------------------------------


def add_link_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The link commands' parsers, in the order ``--help`` lists them."""
    for add in (_add_demo, _add_server, _add_serve, _add_probe, _add_ping, _add_monitor):
        add(sub)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``demo``: the whole bus over a fake pair, no hardware."""
    demo = sub.add_parser(
        "demo",
        help="probe a Python virtio device over a fake ivshmem pair (no hardware, no root)",
        description="Run the rng virtio device in a child process and probe it from a "
        "driver over a fake ivshmem pair: the whole bus with no hardware.",
    )
    demo.add_argument("--profile", choices=protocol.PROFILES, default="qemu-v0")
    demo.add_argument("--round-trips", type=number(int, 0), default=1000, metavar="N")
    demo.add_argument("--json", action="store_true", help="machine-readable output")
    demo.set_defaults(func=cmd_demo)


def _add_server(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``server``: QEMU's ivshmem-server, its option letters."""
    server = sub.add_parser(
        "server",
        help="a QEMU-compatible ivshmem server (option letters as QEMU's ivshmem-server)",
        description="Serve shared memory and doorbell eventfds to QEMU ivshmem-doorbell "
        "devices and host peers over a UNIX socket. Runs in the foreground until SIGINT/SIGTERM.",
    )
    server.add_argument("-S", dest="socket", default="/tmp/ivshmem_socket", metavar="PATH")
    server.add_argument(
        "-l", dest="size", type=size_arg, default="4M", metavar="SIZE", help="e.g. 4M, 1G"
    )
    server.add_argument("-n", dest="vectors", type=vectors_arg, default=1, metavar="VECTORS")
    memory = server.add_mutually_exclusive_group()
    memory.add_argument("-m", "--shm", dest="shm", metavar="PATH", help="file to share")
    memory.add_argument(
        "-M", dest="shm_name", metavar="NAME",
        help="POSIX shared-memory object /dev/shm/NAME, used as a -m file (kept at exit)",
    )  # fmt: skip
    server.add_argument("-F", dest="foreground", action="store_true", help="foreground (default)")
    server.add_argument("-p", dest="pid_file", metavar="PIDFILE", help="write our pid there")
    server.add_argument("--max-peers", type=number(int, 1), default=64)
    server.add_argument(
        "--idle-exit",
        type=SECONDS,
        default=None,
        metavar="SECONDS",
        help="exit after SECONDS with no peer (fake fabrics use this)",
    )
    server.set_defaults(func=cmd_server)


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``serve``: the device role (its device options: ``data.add_serve_args``)."""
    serve = sub.add_parser("serve", help="run the Python virtio-msg device (device role)")
    add_backend_args(serve, mem=False)  # its --mem and --mem-offset: add_serve_args
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


def _add_probe(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``probe``: the driver role's description of the device."""
    probe = sub.add_parser("probe", help="describe the remote virtio-msg device (driver role)")
    add_backend_args(probe)
    probe.add_argument("--timeout", type=TIMEOUT, default=1.0, metavar="SECONDS")
    probe.add_argument("--json", action="store_true")
    probe.set_defaults(func=cmd_probe)


def _add_ping(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``ping``: bus round trips."""
    ping = sub.add_parser("ping", help="bus round-trip check, like ping")
    add_backend_args(ping)
    ping.add_argument("-c", "--count", type=COUNT, default=5)
    ping.add_argument("-i", "--interval", type=SECONDS, default=0.2, metavar="SECONDS")
    ping.add_argument("--timeout", type=TIMEOUT, default=1.0, metavar="SECONDS")
    ping.set_defaults(func=cmd_ping)


def _add_monitor(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``monitor``: the read-only tap (its own sources: it never joins as a peer)."""
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
    add_linux_user_options(monitor)
    monitor.add_argument("--profile", choices=protocol.PROFILES, default="qemu-v0")
    monitor.add_argument("--pcap", metavar="FILE", help="also write a pcap (tools/virtio-msg.lua)")
    monitor.add_argument("--count", type=number(int, 0), default=0, help="stop after N messages")
    monitor.add_argument("--duration", type=SECONDS, default=None, metavar="SECONDS")
    monitor.add_argument("--interval", type=TIMEOUT, default=1e-4, metavar="SECONDS")
    monitor.set_defaults(func=cmd_monitor)

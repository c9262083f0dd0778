"""``ivshmem-bus``: argparse and printing only; every operation lives in the library.

Exit codes: 0 success, 1 the operation failed (the message names the device and the fix),
2 bad usage (argparse's own convention).
"""

from __future__ import annotations

import argparse
import json
import logging
import mmap
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

from . import __version__, protocol
from .errors import BusTimeout, IvshmemBusError

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


def _print_description(vmid: int, d) -> None:
    print(f"probe of vmid {vmid}:")
    print(f"  device:    {d.device_name} (virtio id {d.device_id})")
    print(f"  vendor:    {d.vendor}")
    print(f"  features:  0x{d.features:x} {' '.join(d.feature_names) or '-'}")
    print(f"  config:    {d.config_size} bytes")
    queues = ", ".join(f"{q.index} (max {q.max_size})" for q in d.queues) or "none"
    print(f"  queues:    {queues}")


def _stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM, for loops that must stop cleanly."""
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def _backend(args: argparse.Namespace):
    from .backends import open_backend

    return open_backend(server=args.server, device=args.device, vectors=args.vectors)


def _cmd_server(args: argparse.Namespace) -> int:
    from .server import IvshmemServer

    logging.getLogger("ivshmem_bus.server").setLevel(logging.INFO)
    stop = _stop_on_signals()
    with IvshmemServer(
        args.socket, shm_size=args.size, shm_path=args.shm, vectors=args.vectors,
        max_peers=args.max_peers,
    ) as server:  # fmt: skip
        print(
            f"ivshmem server on {server.socket_path}: {server.shm_size} bytes of shared "
            f"memory, {server.vectors} vector(s), up to {server.max_peers} peers",
            flush=True,
        )
        server.serve_forever(stop)
    print("ivshmem server stopped", flush=True)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .backends import follow_single_peer, resolve_remote_vmid
    from .bus import VirtioMsgBus, reset_queues_of
    from .transport import RngDevice, status_names

    stop = _stop_on_signals()
    with _backend(args) as dev:
        if args.reset_queues:
            reset_queues_of(dev)  # before any peer can have sent us anything
        print(f"{dev.name}: vmid {dev.vmid}; waiting for the driver's peer", flush=True)
        remote = resolve_remote_vmid(dev, args.remote_vmid, wait=args.wait, settle=0.2)
        device = RngDevice(args.profile)

        def on_status(old: int, new: int) -> None:
            print(f"driver status {status_names(old)} -> {status_names(new)}", flush=True)

        device.on_status = on_status
        with VirtioMsgBus(dev, "device", remote, args.profile) as bus:
            print(
                f"serving virtio {args.device_type} (id {device.device_id}) to vmid {remote} "
                f"({args.profile}); Ctrl-C stops",
                flush=True,
            )

            def handle(msg: protocol.Message) -> protocol.Message | None:
                if args.remote_vmid == "auto":  # answer whoever the driver is now
                    now = follow_single_peer(dev, bus.remote_vmid)
                    if now != bus.remote_vmid:
                        print(f"driver peer {bus.remote_vmid} left; serving vmid {now}", flush=True)
                        bus.remote_vmid = now
                return device.handle(msg)

            handled = bus.serve(handle, stop=stop.is_set)
            print(f"stopped after {handled} messages; {bus.stats}", flush=True)
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from .backends import resolve_remote_vmid
    from .bus import VirtioMsgBus
    from .transport import VirtioMsgDriver

    with _backend(args) as dev:
        remote = resolve_remote_vmid(dev, args.remote_vmid)
        with VirtioMsgBus(dev, "driver", remote, args.profile) as bus:
            d = VirtioMsgDriver(bus, timeout=args.timeout).probe()
    if args.json:
        print(json.dumps({"vmid": dev.vmid, "remote_vmid": remote, **d.as_dict()}, indent=2))
    else:
        _print_description(remote, d)
    return 0


def _cmd_ping(args: argparse.Namespace) -> int:
    from .backends import resolve_remote_vmid
    from .bus import VirtioMsgBus

    stop = _stop_on_signals()
    times: list[float] = []
    sent = 0
    with _backend(args) as dev:
        remote = resolve_remote_vmid(dev, args.remote_vmid)
        with VirtioMsgBus(dev, "driver", remote, args.profile) as bus:
            print(f"PING vmid {remote} from vmid {dev.vmid} over {dev.name} ({args.profile})")
            for seq in range(1, args.count + 1):
                if stop.is_set():
                    break
                # qemu-v0 has no PING: GET_DEVICE_STATUS is the cheapest round trip there
                msg = (
                    protocol.BusPing(data=seq)
                    if args.profile == "spec-v1"
                    else (protocol.GetDeviceStatus())
                )
                sent += 1
                t0 = time.perf_counter()
                try:
                    bus.request(msg, args.timeout)
                except BusTimeout:
                    print(f"no reply from vmid {remote}: seq={seq}", flush=True)
                    continue
                times.append((time.perf_counter() - t0) * 1e6)
                print(f"reply from vmid {remote}: seq={seq} time={times[-1]:.1f} us", flush=True)
                if seq < args.count:
                    stop.wait(args.interval)
    print(f"--- vmid {remote} ping statistics ---")
    loss = 100.0 * (sent - len(times)) / sent if sent else 0.0
    print(f"{sent} requests sent, {len(times)} replies received, {loss:.0f}% loss")
    if times:
        avg = sum(times) / len(times)
        print(f"round trip min/avg/max = {min(times):.1f}/{avg:.1f}/{max(times):.1f} us")
    return 0 if times and len(times) == sent else 1


def _cmd_monitor(args: argparse.Namespace) -> int:
    from .monitor import LinkTap, PcapWriter

    stop = _stop_on_signals()
    fd = -1
    if args.server:
        from .client import fetch_shared_memory

        fd = fetch_shared_memory(args.server)
    else:
        fd = os.open(args.shm, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as mem:
            tap = LinkTap(memoryview(mem), args.profile)
            pcap_file = open(args.pcap, "wb") if args.pcap else None  # noqa: SIM115
            try:
                writer = PcapWriter(pcap_file) if pcap_file else None
                shown = 0
                end = None if args.duration is None else time.monotonic() + args.duration
                while not stop.is_set() and (end is None or time.monotonic() < end):
                    for seen in tap.poll():
                        print(seen.describe(args.profile), flush=True)
                        if writer:
                            writer.write(seen, args.profile)
                        shown += 1
                        if args.count and shown >= args.count:
                            return 0
                    time.sleep(args.interval)
            finally:
                tap.release()
                if pcap_file:
                    pcap_file.close()
    finally:
        os.close(fd)
    return 0


# --- Devices: list, vmid, bind, unbind -----------------------------------------------------


def _read_vmid(fn, args: argparse.Namespace) -> tuple[int | None, str | None]:
    """(VMID, None) or (None, why it cannot be read), the way the device allows."""
    from . import pci

    if fn.driver == pci.VFIO_PCI:
        from .vfio_device import open_device

        try:
            with open_device(fn.bdf, sysfs=args.sysfs, dev=args.dev) as dev:
                return dev.vmid, None
        except (IvshmemBusError, OSError) as exc:
            return None, f"VFIO: {exc}"
    if fn.driver is None:
        try:
            return pci.read_vmid_from_resource0(fn, root=args.sysfs), None
        except (IvshmemBusError, OSError) as exc:
            return None, f"resource0: {exc}"
    return None, f"owned by {fn.driver}: bind it to vfio-pci (ivshmem-bus bind {fn.bdf})"


def _group_label(fn, dev_root: str) -> str:
    if fn.iommu_group is None:
        return "-"
    if os.path.exists(os.path.join(dev_root, "vfio", f"noiommu-{fn.iommu_group}")):
        return f"noiommu-{fn.iommu_group}"
    return str(fn.iommu_group)


def _cmd_list(args: argparse.Namespace) -> int:
    from . import pci

    rows = []
    for fn in pci.list_ivshmem(args.sysfs):
        vmid, why = _read_vmid(fn, args)
        rows.append(
            {
                "bdf": fn.bdf,
                "kind": "doorbell" if fn.is_doorbell else "plain",
                "revision": fn.revision,
                "driver": fn.driver,
                "iommu_group": _group_label(fn, args.dev),
                "bar2_size": fn.shmem_size,
                "msix_vectors": fn.msix_vectors,
                "vmid": vmid,
                "vmid_error": why,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no ivshmem devices (1af4:1110); try the fake device: ivshmem-bus demo")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("BDF", "TYPE", "REV", "DRIVER", "GROUP", "BAR2", "MSI-X", "VMID"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["bdf"], r["kind"], str(r["revision"]), r["driver"] or "none", r["iommu_group"],
            _size(r["bar2_size"]), str(r["msix_vectors"] if r["msix_vectors"] is not None else "-"),
            f"0x{r['vmid']:x}" if r["vmid"] is not None else f"? ({r['vmid_error']})",
        )  # fmt: skip
    Console(soft_wrap=True).print(table)
    return 0


def _size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _cmd_vmid(args: argparse.Namespace) -> int:
    from . import pci

    if args.bdf:
        fn = pci.get_function(args.bdf, args.sysfs)
        if not fn.is_ivshmem:
            raise pci.PciError(f"{fn.bdf} is not an ivshmem device (1af4:1110)")
    else:
        doorbells = [fn for fn in pci.list_ivshmem(args.sysfs) if fn.is_doorbell]
        if not doorbells:
            raise pci.PciError(
                "no ivshmem-doorbell device: start the guest with -device ivshmem-doorbell"
            )
        if len(doorbells) > 1:
            raise pci.PciError(
                f"several ivshmem-doorbell devices ({', '.join(f.bdf for f in doorbells)}): "
                f"name one: ivshmem-bus vmid BDF"
            )
        fn = doorbells[0]
    vmid, why = _read_vmid(fn, args)
    if vmid is None:
        raise pci.PciError(f"{fn.bdf}: cannot read the VMID: {why}")
    print(vmid if args.format == "dec" else f"0x{vmid:x}")
    return 0


def _cmd_bind(args: argparse.Namespace) -> int:
    from . import pci

    if args.noiommu:
        print(
            "warning: no-IOMMU mode gives the device unrestricted DMA and taints the kernel",
            file=sys.stderr,
        )
    b = pci.bind(args.bdf, root=args.sysfs, dev_root=args.dev, noiommu=args.noiommu)
    before = b.previous_driver or "no driver"
    if b.previous_driver == pci.VFIO_PCI:
        print(f"{b.bdf} is already bound to vfio-pci ({b.node})")
    else:
        print(f"{b.bdf} bound to vfio-pci ({b.node}); it was on {before}")
    return 0


def _cmd_unbind(args: argparse.Namespace) -> int:
    from . import pci

    now = pci.unbind(args.bdf, root=args.sysfs)
    print(f"{pci.normalize_bdf(args.bdf)} released from vfio-pci; now on {now or 'no driver'}")
    return 0


def _bdf_arg(text: str) -> str:
    from . import pci

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
    if not 0 <= value <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"{text} is not a VMID (0..65535)")
    return text


def _add_backend_args(p: argparse.ArgumentParser, *, remote: bool = True) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", metavar="PATH", help="join the ivshmem server at PATH")
    where.add_argument("--device", metavar="BDF", help="a VFIO-bound ivshmem PCI function")
    p.add_argument("--vectors", type=int, default=1, help="vectors the server gives (-n)")
    p.add_argument("--profile", choices=protocol.PROFILES, default="qemu-v0")
    if remote:
        p.add_argument(
            "--remote-vmid", default="auto", metavar="N", type=_vmid_arg,
            help="the peer's VMID, or 'auto': the one other peer the server announced",
        )  # fmt: skip


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
    lst.set_defaults(func=_cmd_list)

    vmid = sub.add_parser("vmid", help="this machine's VMID (IVPosition), for the other side")
    vmid.add_argument("bdf", nargs="?", type=_bdf_arg, metavar="BDF")
    vmid.add_argument("--format", choices=["hex", "dec"], default="hex")
    vmid.set_defaults(func=_cmd_vmid)

    bind = sub.add_parser("bind", help="bind an ivshmem function to vfio-pci (root)")
    bind.add_argument("bdf", type=_bdf_arg, metavar="BDF")
    bind.add_argument(
        "--noiommu",
        action="store_true",
        help="allow no-IOMMU mode (unrestricted DMA; taints the kernel)",
    )
    bind.set_defaults(func=_cmd_bind)

    unbind = sub.add_parser("unbind", help="give the function back to its previous driver (root)")
    unbind.add_argument("bdf", type=_bdf_arg, metavar="BDF")
    unbind.set_defaults(func=_cmd_unbind)

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

    server = sub.add_parser(
        "server",
        help="a QEMU-compatible ivshmem server (option letters as QEMU's ivshmem-server)",
        description="Serve shared memory and doorbell eventfds to QEMU ivshmem-doorbell "
        "devices and host peers over a UNIX socket. Runs in the foreground until SIGINT/SIGTERM.",
    )
    server.add_argument("-S", dest="socket", default="/tmp/ivshmem_socket", metavar="PATH")
    server.add_argument("-l", dest="size", default="4M", metavar="SIZE", help="e.g. 4M, 1G")
    server.add_argument("-n", dest="vectors", type=int, default=1, metavar="VECTORS")
    server.add_argument("-m", "--shm", dest="shm", metavar="PATH", help="file to share")
    server.add_argument("-F", dest="foreground", action="store_true", help="foreground (default)")
    server.add_argument("--max-peers", type=int, default=64)
    server.set_defaults(func=_cmd_server)

    serve = sub.add_parser("serve", help="run the Python virtio-msg device (device role)")
    _add_backend_args(serve)
    serve.add_argument("--device-type", choices=["rng"], default="rng")
    serve.add_argument(
        "--wait",
        type=float,
        default=float("inf"),
        metavar="SECONDS",
        help="with --remote-vmid auto: how long to wait for the driver's peer",
    )
    serve.add_argument(
        "--no-reset-queues",
        dest="reset_queues",
        action="store_false",
        help="do not zero the queues at start (the driver side started first)",
    )
    serve.set_defaults(func=_cmd_serve)

    probe = sub.add_parser("probe", help="describe the remote virtio-msg device (driver role)")
    _add_backend_args(probe)
    probe.add_argument("--timeout", type=float, default=1.0, metavar="SECONDS")
    probe.add_argument("--json", action="store_true")
    probe.set_defaults(func=_cmd_probe)

    ping = sub.add_parser("ping", help="bus round-trip check, like ping")
    _add_backend_args(ping)
    ping.add_argument("-c", "--count", type=int, default=5)
    ping.add_argument("-i", "--interval", type=float, default=0.2, metavar="SECONDS")
    ping.add_argument("--timeout", type=float, default=1.0, metavar="SECONDS")
    ping.set_defaults(func=_cmd_ping)

    monitor = sub.add_parser(
        "monitor", help="read-only tap on both queues of a live link (never writes)"
    )
    src = monitor.add_mutually_exclusive_group(required=True)
    src.add_argument("--server", metavar="PATH", help="take BAR2 from this server, then hang up")
    src.add_argument("--shm", metavar="FILE", help="a shared-memory file (the server's -m)")
    monitor.add_argument("--profile", choices=protocol.PROFILES, default="qemu-v0")
    monitor.add_argument("--pcap", metavar="FILE", help="also write a pcap (tools/virtio-msg.lua)")
    monitor.add_argument("--count", type=int, default=0, help="stop after N messages")
    monitor.add_argument("--duration", type=float, default=None, metavar="SECONDS")
    monitor.add_argument("--interval", type=float, default=1e-4, metavar="SECONDS")
    monitor.set_defaults(func=_cmd_monitor)
    return parser


def vmid_main(argv: Sequence[str] | None = None) -> int:
    """``ivshmem-vmid``: the same as ``ivshmem-bus vmid``."""
    return main(["vmid", *(sys.argv[1:] if argv is None else argv)])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ivshmem-bus`` and ``python -m ivshmem_bus``."""
    args = _parser().parse_args(argv)
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
    except KeyboardInterrupt:
        return 130

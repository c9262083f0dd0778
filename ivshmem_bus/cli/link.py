"""Handlers of the link commands: demo, server, serve, probe, ping, monitor.

Printing only: each handler calls the library and prints what it returns; ``cli.py`` owns the
parser and the exit codes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import mmap
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

from ..core import protocol
from ..errors import BusTimeout

if TYPE_CHECKING:  # annotations only: the commands import their layers when they run
    from ..backends.base import IvshmemDevice
    from ..transport import DeviceDescription


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo, summarize

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
    from ..transport import feature_names, status_names

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


def _stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM, for loops that must stop cleanly."""
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def _backend(args: argparse.Namespace) -> IvshmemDevice:
    from ..backends import open_backend

    _default_to_fake(args)
    return open_backend(
        server=args.server, device=args.device, fake=args.fake, vectors=args.vectors,
        linux_user=args.linux_user, listen=getattr(args, "listen", False),
        bus_name=args.bus_name, queue_dir=args.queue_dir, mem=getattr(args, "mem", None),
        mem_offset=getattr(args, "mem_offset", None),
    )  # fmt: skip


def _default_to_fake(args: argparse.Namespace) -> None:
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


def cmd_server(args: argparse.Namespace) -> int:
    from ..contrib.daemon import PidFile
    from ..contrib.ivshmem_server import shm_object_path
    from ..server import IvshmemServer

    logging.getLogger("ivshmem_bus.server").setLevel(logging.INFO)
    stop = _stop_on_signals()
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
        if args.idle_exit is None:
            server.serve_forever(stop)
        else:  # a fake fabric's server: gone once nobody has used it for a while
            idle_since = time.monotonic()
            while not stop.is_set():
                server.serve_forever(stop, timeout=0.5)
                if server.peer_ids:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since >= args.idle_exit:
                    print(f"no peer for {args.idle_exit:g} s: exiting", flush=True)
                    break
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
    from ..backends.peers import follow_single_peer, resolve_remote_vmid
    from ..bus import VirtioMsgBus, reset_queues_of
    from ..devices import DeviceHub
    from ..transport import status_names

    # the bus messages (GET_DEVICES, PING) are the hub's: every profile that has them
    hub_needed = args.profile != "qemu-v0" or len(args.device_type) > 1
    if len(args.device_type) > 1 and args.profile == "qemu-v0":
        raise ValueError(
            f"--device-type {','.join(args.device_type)}: qemu-v0 carries one device per bus; "
            "use --profile linux-v0 (or spec-v1) for several"
        )
    # linux-v0: the driver may have queued its GET_DEVICES before we start (it must be
    # answered), and a restarted device side must pick up the queues where they are.
    reset = args.reset_queues if args.reset_queues is not None else args.profile != "linux-v0"
    stop = _stop_on_signals()
    with _backend(args) as dev:
        check_linux_vmid(dev, args.profile)
        with args.served_device(args, dev) as devices:  # cli.data's
            if reset:
                reset_queues_of(dev)  # before any peer can have sent us anything
            print(f"{dev.name}: vmid {dev.vmid}; waiting for the driver's peer", flush=True)
            remote = resolve_remote_vmid(dev, args.remote_vmid, wait=args.wait, settle=0.2)

            for dev_id, device in enumerate(devices):

                def on_status(old: int, new: int, dev_id: int = dev_id) -> None:
                    where = f"dev_id {dev_id} " if hub_needed else ""
                    print(
                        f"{where}driver status {status_names(old)} -> {status_names(new)}",
                        flush=True,
                    )

                device.on_status = on_status
            with VirtioMsgBus(dev, "device", remote, args.profile, coalesce=args.coalesce) as bus:
                what = ", ".join(
                    f"{name} (id {d.device_id})" + (f" at dev_id {i}" if hub_needed else "")
                    for i, (name, d) in enumerate(zip(args.device_type, devices, strict=True))
                )
                print(
                    f"serving virtio {what} to vmid {remote} ({args.profile}); Ctrl-C stops",
                    flush=True,
                )

                def follow(msg: protocol.Message) -> None:
                    if args.remote_vmid == "auto":  # answer whoever the driver is now
                        now = follow_single_peer(dev, bus.remote_vmid)
                        if now != bus.remote_vmid:
                            print(
                                f"driver peer {bus.remote_vmid} left; serving vmid {now}",
                                flush=True,
                            )
                            bus.remote_vmid = now

                if hub_needed:
                    hub = DeviceHub(devices)
                    handled = hub.serve(bus, stop=stop.is_set, on_message=follow)
                    print(f"hub: {hub.stats}", flush=True)
                else:
                    handled = devices[0].serve(bus, stop=stop.is_set, on_message=follow)
                print(f"stopped after {handled} messages; {bus.stats}", flush=True)
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from ..backends.peers import resolve_remote_vmid
    from ..bus import VirtioMsgBus
    from ..transport import VirtioMsgDriver

    with _backend(args) as dev:
        vmid = dev.vmid  # read while the device is open (a VFIO BAR0 goes with it)
        remote = resolve_remote_vmid(dev, args.remote_vmid)
        with VirtioMsgBus(dev, "driver", remote, args.profile, coalesce=args.coalesce) as bus:
            d = VirtioMsgDriver(bus, timeout=args.timeout).probe()
    if args.json:
        print(json.dumps({"vmid": vmid, "remote_vmid": remote, **d.as_dict()}, indent=2))
    else:
        _print_description(remote, d)
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    from ..backends.peers import resolve_remote_vmid
    from ..bus import VirtioMsgBus

    stop = _stop_on_signals()
    times: list[float] = []
    sent = 0
    with _backend(args) as dev:
        remote = resolve_remote_vmid(dev, args.remote_vmid)
        with VirtioMsgBus(dev, "driver", remote, args.profile, coalesce=args.coalesce) as bus:
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


def cmd_monitor(args: argparse.Namespace) -> int:
    from ..monitor import LinkTap, PcapWriter

    stop = _stop_on_signals()
    if args.linux_user:  # queue files, not one shared memory: mapped read-only here
        return _monitor_linux_user(args, stop)
    fd = -1
    if args.shm:
        fd = os.open(args.shm, os.O_RDONLY | os.O_CLOEXEC)
    else:
        from ..backends.fabric import fake_socket
        from ..backends.server_client import fetch_shared_memory

        if not args.server:
            _default_to_fake(args)
        fd = fetch_shared_memory(args.server or fake_socket(args.fake))
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


def _monitor_linux_user(args: argparse.Namespace, stop: threading.Event) -> int:
    """``monitor --linux-user``: tap the two queue files; QEMU's chardev takes one client,
    so the socket is left alone."""
    from ..backends.linux_user import QueueFiles
    from ..monitor import LinkTap

    with QueueFiles(args.queue_dir, args.bus_name, readonly=True) as files:
        tap = LinkTap(None, args.profile, queues=files.message_queues())
        try:
            shown = 0
            end = None if args.duration is None else time.monotonic() + args.duration
            while not stop.is_set() and (end is None or time.monotonic() < end):
                for seen in tap.poll():
                    print(seen.describe(args.profile), flush=True)
                    shown += 1
                    if args.count and shown >= args.count:
                        return 0
                time.sleep(args.interval)
        finally:
            tap.release()
    return 0

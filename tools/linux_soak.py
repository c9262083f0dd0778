"""A long run of ``serve --profile linux-v0 --device-type rng,console`` under the Linux-like peer.

    python tools/linux_soak.py [--minutes M] [--json]

``serve`` is its own process and the first peer (VMID 0) of an ivshmem server run here; the
peer (tests/linux_peer.py) PINGs every second as the Linux driver does, reads entropy one
64-byte buffer at a time and writes a console line every second, for ``minutes``. The figures
are the issue's targets: PINGs missed (sent and never answered), PING responses the device
answered (it must answer none), the slowest PING, the bus never stale, and the serve
process's RSS and open fds at the start and at the end (flat).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ivshmem_bus.backends.server_client import ServerClientDevice  # noqa: E402
from ivshmem_bus.core.window import BufferWindow  # noqa: E402
from ivshmem_bus.server import IvshmemServer  # noqa: E402
from tests.linux_peer import LinuxLikePeer  # noqa: E402

RAM = 4 << 20


def _usage(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open fds) of process ``pid``."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def soak(minutes: float, tmp: Path) -> dict[str, object]:
    ram = tmp / "ram"
    ram.write_bytes(bytes(RAM))
    with IvshmemServer(tmp / "sock", shm_size="1M", vectors=2) as server:
        server.start()
        serve = subprocess.Popen(
            [sys.executable, "-m", "ivshmem_bus", "serve", "--server", server.socket_path,
             "--vectors", "2", "--profile", "linux-v0", "--device-type", "rng,console",
             "--mem", str(ram), "--console-socket", str(tmp / "console")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
        )  # fmt: skip
        while server.peer_ids != (0,):
            time.sleep(0.02)
        dev = ServerClientDevice(server.socket_path, vectors=2)
        with ram.open("r+b") as f:
            mm = mmap.mmap(f.fileno(), RAM)
        window = BufferWindow(mm, 0)
        peer = LinuxLikePeer(dev, window).start()
        try:
            peer.probe_all()
            peer.console_open(1)
            host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a reader of hvc0's far end
            host.connect(str(tmp / "console"))
            host.settimeout(5)
            entropy = len(peer.read_entropy(0, 64))  # /dev/urandom opened before the count
            start = _usage(serve.pid)
            lines = 0
            t_end = time.monotonic() + minutes * 60
            next_line = time.monotonic()
            while time.monotonic() < t_end and not peer.stale:
                entropy += len(peer.read_entropy(0, 64))
                if time.monotonic() >= next_line:
                    peer.console_write(1, b"soak\n")
                    lines += host.recv(64) == b"soak\n"
                    next_line += 1.0
                time.sleep(0.001)
            end = _usage(serve.pid)
            time.sleep(1.5)  # the last PING's answer
            result = {
                "minutes": minutes,
                "pings_sent": peer.pings_sent,
                "pings_missed": peer.pings_sent - len(peer.ping_rtts),
                "responses_answered": peer.ping_responses - len(peer.ping_rtts),
                "slowest_ping_ms": round(max(peer.ping_rtts, default=0) * 1e3, 2),
                "stale": peer.stale,
                "entropy_bytes": entropy,
                "console_lines": lines,
                "serve_rss_kib": [start[0], end[0]],
                "serve_fds": [start[1], end[1]],
            }
            host.close()
        finally:
            peer.close()
            peer.release_ram()
            serve.send_signal(signal.SIGINT)
            serve.wait(10)
            mm.close()
            dev.close()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = soak(args.minutes, Path(tmp))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:20} {value}")
    ok = not result["stale"] and result["pings_missed"] == 0 and result["responses_answered"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

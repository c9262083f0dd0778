"""Issue 17 end to end: a QEMU ivshmem-doorbell guest on the daemonized ``ivshmem-server``.

The seed's line (``ivshmem-server -S shmpath -p pidfile -l 1M -n 1``, with its own ``-M``
name so no other server's ``/dev/shm/ivshmem`` is touched) starts the daemon; one guest
joins it with QEMU's own ``-chardev socket`` + ``ivshmem-doorbell,vectors=1``; the host's
``ivshmem-client`` then lists it, rings it, and is rung by it (the guest through VFIO and
MSI-X). Last, ``kill $(cat pidfile)`` stops the daemon under the running guest.

One guest for the module (a boot costs 30-60 s under TCG); the scenarios run in file order.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.contrib_helpers import Expect, adopting_orphans, script, wait_exit
from tools.qemu_e2e.assets import AssetsMissing, find_assets
from tools.qemu_e2e.machine import IVSHMEM_ADDR, IVSHMEM_BDF, Guest

BDF = IVSHMEM_BDF
CLI = '"$PY" -m ivshmem_bus'
# The guest's side of the doorbell exchange: open through VFIO (MSI-X on), say so, wait for
# one doorbell, ring the peer given on the command line back on vector 0.
GUEST_PEER = """"$PY" -c '
import json, sys
from ivshmem_bus.backends import open_backend
with open_backend(device=sys.argv[1]) as dev:
    print("ready", dev.vmid, flush=True)
    fired = dev.wait(120)
    dev.ring(int(sys.argv[2]), 0)
    print(json.dumps({"fired": sorted(fired), "vmid": dev.vmid}))
' """


@dataclass
class Daemon:
    workdir: Path
    socket: Path
    pid_file: Path
    pid: int
    shm: Path
    guest: Guest
    orphans: list[int]


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    try:
        assets = find_assets()
    except AssetsMissing as exc:
        if os.environ.get("IVSHMEM_E2E_REQUIRED"):
            pytest.fail(f"e2e required but cannot run: {exc}", pytrace=False)
        pytest.skip(f"e2e: {exc}")
    workdir = Path(tempfile.mkdtemp(prefix="qemu-e2e-contrib-"))
    name = f"ivshmem-e2e-{uuid.uuid4().hex[:12]}"
    seed = ["-S", "shmpath", "-p", "pidfile", "-l", "1M", "-n", "1", "-M", name]
    with adopting_orphans() as orphans:
        started = subprocess.run([script("ivshmem-server"), *seed], cwd=workdir,
                                 capture_output=True, text=True, timeout=30)  # fmt: skip
        assert started.returncode == 0, started.stderr
        pid = int((workdir / "pidfile").read_text())
        orphans.append(pid)
        guest = Guest("g", assets, workdir, iommu="viommu", ivshmem_args=[
            "-chardev", f"socket,path={workdir / 'shmpath'},id=ivshmem",
            "-device", f"ivshmem-doorbell,chardev=ivshmem,vectors=1,addr={IVSHMEM_ADDR}",
        ])  # fmt: skip
        try:
            guest.start()
            guest.wait_ready()
            yield Daemon(workdir, workdir / "shmpath", workdir / "pidfile", pid,
                         Path("/dev/shm", name), guest, orphans)  # fmt: skip
        finally:
            guest.close()
            Path("/dev/shm", name).unlink(missing_ok=True)
            if not os.environ.get("IVSHMEM_E2E_KEEP"):
                shutil.rmtree(workdir, ignore_errors=True)


def client_script(d: Daemon, commands: str) -> str:
    """Run ``ivshmem-client`` with ``commands`` piped in; its stdout (it exits at EOF)."""
    result = subprocess.run([script("ivshmem-client"), "-S", str(d.socket)], input=commands,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_guest_joined_the_daemon(daemon: Daemon) -> None:
    out = daemon.guest.run(f"{CLI} list --json && {CLI} vmid {BDF} --format dec").check().stdout
    rows, end = json.JSONDecoder().raw_decode(out)
    assert [(r["bdf"], r["bar2_size"], r["msix_vectors"]) for r in rows] == [(BDF, 1 << 20, 1)]
    assert out[end:].strip() == "0"  # the daemon's first peer
    dump = client_script(daemon, "dump\n")
    assert "our_id = 1\n  vector 0 is enabled" in dump
    assert "peer_id = 0\n  vector 0 is enabled" in dump and "peer_id = 2" not in dump


def test_client_rings_the_guest_and_the_guest_rings_the_client(daemon: Daemon) -> None:
    daemon.guest.run(f"{CLI} bind {BDF}").check()
    client = Expect([script("ivshmem-client"), "-S", str(daemon.socket)])
    try:
        client.expect(r"listen on server socket \d+\n")
        client.send("dump\n")
        own = int(client.expect(r"our_id = (\d+)\n")[1])
        job = daemon.guest.submit(f"{GUEST_PEER}{BDF} {own}")
        deadline = time.monotonic() + 120
        while "ready" not in job.output()[0]:
            assert not job.done(), job.wait(1)
            daemon.guest.check_alive("waiting for the guest peer")
            assert time.monotonic() < deadline, job.output()
            time.sleep(0.05)
        t0 = time.monotonic()
        client.send("int 0 0\n")
        client.expect(rf"receive notification from peer_id={own} vector=0\n", timeout=60)
        rtt = time.monotonic() - t0
        result = json.loads(job.wait(60).check().stdout.splitlines()[-1])
        assert result == {"fired": [0], "vmid": 0}
        client.close_stdin()
        assert client.wait() == 0
        print(f"client -> guest -> client: {rtt * 1e3:.1f} ms")
    finally:
        client.kill()


def test_kill_pidfile_stops_the_daemon_under_a_guest(daemon: Daemon) -> None:
    kill = subprocess.run(["sh", "-c", "kill $(cat pidfile)"], cwd=daemon.workdir, timeout=10)
    assert kill.returncode == 0
    assert wait_exit(daemon.pid) == 0
    assert not daemon.socket.exists() and not daemon.pid_file.exists()
    assert not daemon.shm.exists()
    daemon.guest.check_alive("after the server stopped")  # QEMU keeps running without it

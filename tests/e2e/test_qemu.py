"""End to end in real QEMU (issue 7): two guests with an ivshmem device each, the project's
own server, the project's CLI and API inside the guests, and a host peer.

Scenarios run in file order on one pair of guests per mode (see conftest.py). Inside the
guests only the public CLI (``python -m ivshmem_bus``) and API (``guest_tool.py``) are used.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import re
import secrets
import threading
import time

import pytest

from tests.e2e import guest_tool
from tools.qemu_e2e.machine import IVSHMEM_BDF, Cluster, Guest, Job

BDF = IVSHMEM_BDF
SHM_SIZE = 4 << 20
CLI = '"$PY" -m ivshmem_bus'
TOOL = '"$PY" tests/e2e/guest_tool.py'
ROUND_TRIPS = 1000


def last_json(text: str):
    """The JSON document a command printed last (the whole output if it is one document)."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return json.loads(text.splitlines()[-1])


def run_json(guest: Guest, command: str, timeout: float = 120.0):
    return last_json(guest.run(command, timeout).check().stdout)


def probe_description(text: str) -> tuple[int, str, int]:
    """(remote vmid, device name, virtio id) from ``ivshmem-bus probe``'s text output.

    The text form, not --json: with a VFIO device, probe --json reads the VMID after closing
    the device and fails (see test_probe_json_on_vfio).
    """
    vmid = re.search(r"^probe of vmid (\d+):", text, re.M)
    dev = re.search(r"^\s*device:\s+(\S+) \(virtio id (\d+)\)", text, re.M)
    assert vmid and dev, text
    return int(vmid.group(1)), dev.group(1), int(dev.group(2))


def expected_vmids(cluster: Cluster) -> dict[str, int]:
    """What each guest must read as its VMID: the server's ids in boot order; 0 when plain."""
    return dict(cluster.vmids) if cluster.doorbells else {n: 0 for n in cluster.guests}


def abort_on_failure(*jobs: Job):
    """For host-side waits: raise at once when a guest command already failed."""

    def check() -> None:
        for job in jobs:
            if job.done():
                job.wait(1).check()

    return check


def ensure_bound(cluster: Cluster) -> None:
    """Earlier scenarios bind; a scenario run alone (-k) binds here."""
    if cluster.state.get("bound"):
        return
    flag = " --noiommu" if cluster.mode == "noiommu" else ""
    results = cluster.run_all({n: f"{CLI} bind {BDF}{flag}" for n in cluster.guests}, 120)
    for res in results.values():
        res.check()
    cluster.state["bound"] = True


@contextlib.contextmanager
def host_peer(cluster: Cluster):
    """A host program on the same shared memory: a server client (doorbell modes, vmid 2),
    or in plain mode the memory-backend file itself (no doorbells, BAR2 only)."""
    if cluster.doorbells:
        from ivshmem_bus.backends.server_client import ServerClientDevice

        with ServerClientDevice(cluster.socket_path, vectors=cluster.vectors) as dev:
            yield dev
    else:
        with open(cluster.shm_path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mem:
            view = memoryview(mem)
            try:
                yield type("PlainPeer", (), {"shmem": view, "vmid": None})()
            finally:
                view.release()


@contextlib.contextmanager
def spawned(guest: Guest, command: str, ready: str, timeout: float = 60.0, *, stream: int = 0):
    """A long-running command in ``guest``, up once ``ready`` shows in its stdout (``stream``
    1: its stderr); stopped (SIGTERM) and waited for on the way out, whatever happened."""
    job: Job = guest.spawn(command)
    try:
        deadline = time.monotonic() + timeout
        while ready not in job.output()[stream]:
            if job.done():
                job.wait(1).check()
                raise AssertionError(f"{command!r} ended before {ready!r}: {job.output()}")
            guest.check_alive(f"waiting for {ready!r}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"{command!r}: no {ready!r} within {timeout:g} s: "
                                     f"{job.output()}")  # fmt: skip
            time.sleep(0.05)
        yield job
    finally:
        job.stop()
        job.wait(60)


# Scenarios --------------------------------------------------------------------------------------


def test_guests_run_the_project(cluster: Cluster, timing):
    check = f'{CLI} --version && "$PY" -c "import ivshmem_bus.backends.vfio.pci, ivshmem_bus.bus"'
    results = cluster.run_all(dict.fromkeys(cluster.guests, check), 120)
    for res in results.values():
        assert res.check().stdout.startswith("ivshmem-bus ")
    timing["python_import_s"] = round(max(r.seconds for r in results.values()), 2)


def test_list_shows_the_device(cluster: Cluster, timing):
    results = cluster.run_all({n: f"{CLI} list --json && {TOOL} list" for n in cluster.guests}, 120)
    for name, res in results.items():
        out = res.check().stdout
        rows, _ = json.JSONDecoder().raw_decode(out)  # list --json, then guest_tool's line
        assert [r["bdf"] for r in rows] == [BDF], out
        row = rows[0]
        assert row["bar2_size"] == SHM_SIZE
        assert row["kind"] == ("doorbell" if cluster.doorbells else "plain")
        assert row["msix_vectors"] == (cluster.vectors if cluster.doorbells else 0)
        if not cluster.state.get("bound"):
            assert row["vmid"] == expected_vmids(cluster)[name], row
        (fn,) = last_json(out)["devices"]
        bar1 = 4096 if cluster.doorbells else 0  # the MSI-X table
        assert fn["bar_sizes"] == [256, bar1, SHM_SIZE, 0, 0, 0], fn
        if cluster.mode == "noiommu":
            assert fn["iommu_group"] is None
        else:
            assert fn["iommu_group"] is not None  # the vIOMMU gave it a group


def test_vmid_is_the_servers(cluster: Cluster, timing):
    results = cluster.run_all({n: f"{CLI} vmid {BDF} --format dec" for n in cluster.guests}, 120)
    got = {n: int(r.check().stdout.strip()) for n, r in results.items()}
    assert got == expected_vmids(cluster)
    if cluster.doorbells:
        assert got == {"a": 0, "b": 1}  # the server numbers peers in connection order


def test_bind_and_open(request, cluster: Cluster, timing):
    flag = " --noiommu" if cluster.mode == "noiommu" else ""
    bound = cluster.run_all({n: f"{CLI} bind {BDF}{flag}" for n in cluster.guests}, 120)
    for res in bound.values():
        assert f"{BDF} bound to vfio-pci" in res.check().stdout
    cluster.state["bound"] = True
    results = cluster.run_all({n: f"{TOOL} bind {BDF}{flag}" for n in cluster.guests}, 120)
    for name, res in results.items():
        info = last_json(res.check().stdout)
        assert info["binding"]["previous_driver"] == "vfio-pci"  # the CLI bound it already
        assert info["function"]["driver"] == "vfio-pci"
        node = info["binding"]["node"]
        if cluster.mode == "noiommu":
            assert node.startswith("/dev/vfio/noiommu-"), node
        else:
            assert node == f"/dev/vfio/{info['function']['iommu_group']}", node
        assert info["vmid"] == expected_vmids(cluster)[name]
        assert info["shmem_size"] == SHM_SIZE
        if cluster.doorbells:
            assert (info["vectors"], info["uses_intx"]) == (cluster.vectors, False)
        timing[f"{name}.open_s"] = info["open_s"]


def test_bar2_shared_by_both_guests_and_the_host(request, cluster: Cluster, timing):
    ensure_bound(cluster)
    token = secrets.token_hex(8)
    with host_peer(cluster) as host:
        jobs = {
            n: cluster[n].submit(
                f"{TOOL} shm {BDF} --token {token} --me {n} "
                f"--others {' '.join(o for o in ('a', 'b', 'h') if o != n)}"
            )
            for n in cluster.guests
        }
        seen = guest_tool.share_patterns(
            host.shmem, token, "h", ["a", "b"], timeout=120, abort=abort_on_failure(*jobs.values())
        )
        results = {n: j.wait(120).check() for n, j in jobs.items()}
    for res in results.values():
        assert set(last_json(res.stdout)["seen_after_s"]) == {"a", "b", "h"} - {res.guest}
    assert set(seen["seen_after_s"]) == {"a", "b"}


@pytest.mark.doorbells
def test_doorbells_both_ways_on_both_vectors(cluster: Cluster, timing):
    if not cluster.doorbells:
        pytest.skip("ivshmem-plain has no doorbells")
    ensure_bound(cluster)
    token, rounds = secrets.token_hex(8), 5
    va, vb = cluster.vmids["a"], cluster.vmids["b"]
    with host_peer(cluster) as host:
        ja = cluster["a"].submit(
            f"{TOOL} doorbell {BDF} --token {token} --me a --rounds {rounds} "
            f"--session ab:b:{vb}:lead --session ah:h:{host.vmid}:follow"
        )
        jb = cluster["b"].submit(
            f"{TOOL} doorbell {BDF} --token {token} --me b --rounds {rounds} "
            f"--session ab:a:{va}:follow"
        )
        host_out = guest_tool.doorbell_session(
            host, token, "ah", "h", "a", va, lead=True, rounds=rounds, timeout=120,
            abort=abort_on_failure(ja, jb),
        )  # fmt: skip
        ra, rb = ja.wait(120).check(), jb.wait(120).check()
    ab, ah = last_json(ra.stdout)["sessions"]
    (ba,) = last_json(rb.stdout)["sessions"]
    for session in (ab, ah, ba, host_out):
        assert session["rounds"] == rounds and session["vectors"] == cluster.vectors
        assert session["unexpected_vectors"] == [], session
    timing["guest_guest_rtt_ms_p50"] = json.dumps(ab["round_trip_ms_p50"])
    timing["host_guest_rtt_ms_p50"] = json.dumps(host_out["round_trip_ms_p50"])


def test_serve_probe_and_round_trips(request, cluster: Cluster, timing):
    ensure_bound(cluster)
    va, vb = expected_vmids(cluster)["a"], expected_vmids(cluster)["b"]
    serve = f"{CLI} serve --device {BDF} --remote-vmid {vb}"
    with spawned(cluster["a"], serve, "serving virtio") as job:
        t0 = time.monotonic()
        probe = cluster["b"].run(f"{CLI} probe --device {BDF} --remote-vmid {va} --timeout 10")
        timing["probe_s"] = round(time.monotonic() - t0, 2)
        assert probe_description(probe.check().stdout) == (va, "entropy", 4), probe.stdout
        t0 = time.monotonic()
        rt = run_json(
            cluster["b"], f"{TOOL} roundtrips {BDF} --remote {va} --count {ROUND_TRIPS}", 300
        )
        timing["round_trips_s"] = round(time.monotonic() - t0, 2)
    served = job.wait(60).check()
    assert rt["count"] == ROUND_TRIPS and rt["timeouts"] == 0, rt
    assert "stopped after" in served.stdout, served.stdout
    timing["round_trip_us_p50"] = rt["p50_us"]
    timing["round_trip_us_p99"] = rt["p99_us"]


@pytest.mark.doorbells
def test_coalesced_serve_and_ping_between_guests(cluster: Cluster, timing):
    """Both guests with --coalesce over VFIO and MSI-X: the polling flag and the fenced
    re-check on real doorbells; every reply arrives and the device's counters add up."""
    ensure_bound(cluster)
    va, vb = expected_vmids(cluster)["a"], expected_vmids(cluster)["b"]
    serve = f"{CLI} serve --device {BDF} --remote-vmid {vb} --coalesce"
    with spawned(cluster["a"], serve, "serving virtio") as job:
        ping = cluster["b"].run(
            f"{CLI} ping --device {BDF} --remote-vmid {va} --coalesce -c 100 -i 0", timeout=300
        )
    served = job.wait(60).check()
    assert "100 requests sent, 100 replies received, 0% loss" in ping.check().stdout, ping.stdout
    stats = served.stdout.split("stopped after ", 1)[1]
    rung = int(stats.split("doorbells_rung=", 1)[1].split(",", 1)[0])
    suppressed = int(stats.split("doorbells_suppressed=", 1)[1].split(",", 1)[0])
    assert rung + suppressed == 100, served.stdout
    timing["coalesced_replies_rung"] = rung
    timing["coalesced_lost_doorbells"] = int(stats.split("lost_doorbells=", 1)[1].split(",")[0])


@pytest.mark.doorbells
def test_host_peer_and_guest_exchange_messages(cluster: Cluster, timing):
    if not cluster.doorbells:
        pytest.skip("plain mode has no server for a host peer to join")
    ensure_bound(cluster)
    va = cluster.vmids["a"]
    with host_peer(cluster) as host:
        # host serves the rng device, guest a probes it
        stop = threading.Event()
        served: list[int] = []
        thread = threading.Thread(
            target=lambda: served.append(guest_tool.serve_rng(host, va, stop.is_set)),
            daemon=True,
        )
        thread.start()
        try:
            probe = cluster["a"].run(
                f"{CLI} probe --device {BDF} --remote-vmid {host.vmid} --timeout 10"
            )
        finally:
            stop.set()
            thread.join(10)
        assert probe_description(probe.check().stdout) == (host.vmid, "entropy", 4)
        assert served and served[0] > 0
        # guest a serves, the host drives: 200 round trips from the host side
        with spawned(cluster["a"], f"{CLI} serve --device {BDF} --remote-vmid {host.vmid}",
                     "serving virtio"):  # fmt: skip
            rt = guest_tool.round_trips(host, va, 200, timeout=10)
    assert rt["device_id"] == 4 and rt["count"] == 200 and rt["timeouts"] == 0, rt
    timing["host_to_guest_round_trip_us_p50"] = rt["p50_us"]


RNG_BYTES = 1 << 20


@pytest.mark.doorbells
def test_rng_driver_in_b_reads_the_source_of_the_device_in_a(cluster: Cluster, timing):
    """Issue 15 (6a): ``ivshmem-bus rng -n 1M`` in guest b against ``serve --device-type rng
    --source FILE`` in guest a, over VFIO and MSI-X, queues and buffers in the pool of BAR2:
    b's stdout is the file's first MiB, byte for byte (the file is longer: exactly N)."""
    ensure_bound(cluster)
    va, vb = cluster.vmids["a"], cluster.vmids["b"]
    source = secrets.token_bytes(RNG_BYTES + 4096)
    src = cluster["a"].results / "rng.source"  # a's results directory: shared with a
    src.write_bytes(source)
    out = cluster["b"].results / "rng.out"
    serve = f"{CLI} serve --device {BDF} --remote-vmid {vb} --device-type rng --source {src}"
    with spawned(cluster["a"], serve, "serving virtio") as job:
        t0 = time.monotonic()
        res = cluster["b"].run(
            f"{CLI} rng --device {BDF} --remote-vmid {va} -n 1M --timeout 10 > {out}", 300
        )
        timing["rng_1MiB_s"] = round(time.monotonic() - t0, 2)
    res.check()
    job.wait(60).check()
    got = out.read_bytes()
    assert len(got) == RNG_BYTES, len(got)
    assert got == source[:RNG_BYTES]


def test_request_sent_before_the_device_side_opened_is_answered(request, cluster: Cluster, timing):
    """The driver rings before the device side has MSI-X on (that doorbell is lost): the
    serving side must still find the request in its queue, well before the driver re-rings
    (halfway through its 240 s timeout: far enough that a guest slowed by a loaded host, whose
    serve takes tens of seconds to start, is still told apart from a re-ring)."""
    ensure_bound(cluster)
    va, vb = expected_vmids(cluster)["a"], expected_vmids(cluster)["b"]
    with host_peer(cluster) as host:
        host.shmem[0:0x2000] = bytes(0x2000)  # both queues empty; nobody is attached
    t0 = time.monotonic()
    probe = cluster["b"].submit(f"{CLI} probe --device {BDF} --remote-vmid {va} --timeout 240")
    time.sleep(4.0)  # b's python starts, opens the device and sends (TCG: about 2 s)
    assert not probe.done(), probe.wait(1)
    serve = f"{CLI} serve --device {BDF} --remote-vmid {vb} --no-reset-queues"
    with spawned(cluster["a"], serve, "serving virtio"):
        res = probe.wait(240).check()
    elapsed = time.monotonic() - t0
    assert probe_description(res.stdout) == (va, "entropy", 4)
    assert elapsed < 100, f"probe took {elapsed:.1f} s: answered only after the re-ring?"
    timing["probe_total_s"] = round(elapsed, 2)


def test_probe_json_on_vfio(request, cluster: Cluster, timing):
    ensure_bound(cluster)
    va, vb = expected_vmids(cluster)["a"], expected_vmids(cluster)["b"]
    with spawned(cluster["a"], f"{CLI} serve --device {BDF} --remote-vmid {vb}", "serving"):
        desc = run_json(
            cluster["b"], f"{CLI} probe --device {BDF} --remote-vmid {va} --json --timeout 10"
        )
    assert (desc["vmid"], desc["remote_vmid"], desc["device_id"]) == (vb, va, 4), desc

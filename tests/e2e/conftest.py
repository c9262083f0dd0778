"""Fixtures of the QEMU end-to-end scenarios (issue 7): guests, the server, the host peer.

The scenarios boot real QEMU guests (tools/qemu_e2e), so they run only when asked:

    python -m tools.qemu_e2e setup          # once, as root: packages, kernel, initramfs
    python -m pytest -m e2e tests/e2e       # or IVSHMEM_E2E=1 python -m pytest tests/e2e

Without ``-m e2e`` (or ``IVSHMEM_E2E=1``) they are skipped with that reason, so the unit-test
run never boots a guest by surprise. When asked but QEMU or the cached kernel is missing they
are skipped with the fix in the reason, unless ``IVSHMEM_E2E_REQUIRED=1`` (CI): then they fail.

``IVSHMEM_E2E_MODES`` picks the modes (comma-separated; default ``viommu,plain``, plus
``noiommu`` when its rebuilt vfio.ko is cached). Each mode boots one pair of guests for all its
scenarios (a session fixture); the timings are printed at the end and written to
``.cache/qemu-e2e/last-run.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.qemu_e2e.assets import CACHE, AssetsMissing, find_assets
from tools.qemu_e2e.machine import IVSHMEM_BDF, PEER_RAM_BDF, Cluster

TIMINGS: dict[str, dict[str, float | str]] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: boots QEMU guests (tools/qemu_e2e); opt in with -m e2e or IVSHMEM_E2E=1"
    )
    config.addinivalue_line(
        "markers", "doorbells: needs a server and doorbells: not generated for ivshmem-plain"
    )


def _opted_in(config: pytest.Config) -> bool:
    return "e2e" in (config.getoption("markexpr") or "").replace("not e2e", "") or bool(
        os.environ.get("IVSHMEM_E2E") or os.environ.get("IVSHMEM_E2E_REQUIRED")
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    ours = [i for i in items if here in Path(str(i.fspath)).parents]
    for item in ours:
        item.add_marker(pytest.mark.e2e)
    # ivshmem-plain has no server and no doorbells: those scenarios do not exist in that mode
    # (deselected, not skipped: there is nothing to skip)
    plain = [
        i for i in ours
        if i.get_closest_marker("doorbells") and getattr(i, "callspec", None)
        and i.callspec.params.get("cluster") == "plain"
    ]  # fmt: skip
    if plain:
        config.hook.pytest_deselected(items=plain)
        items[:] = [i for i in items if i not in plain]
        ours = [i for i in ours if i not in plain]
    if ours and not _opted_in(config):
        skip = pytest.mark.skip(reason="e2e: boots QEMU guests; run with -m e2e or IVSHMEM_E2E=1")
        for item in ours:
            item.add_marker(skip)


def _assets():
    try:
        return find_assets()
    except AssetsMissing as exc:
        if os.environ.get("IVSHMEM_E2E_REQUIRED"):
            pytest.fail(f"e2e required but cannot run: {exc}", pytrace=False)
        pytest.skip(f"e2e: {exc}")


def modes() -> list[str]:
    env = os.environ.get("IVSHMEM_E2E_MODES")
    if env:
        return [m.strip() for m in env.split(",") if m.strip()]
    wanted = ["viommu", "plain"]
    if any((CACHE / "noiommu").glob("*/vfio.ko")):
        wanted.append("noiommu")
    return wanted


@pytest.fixture(scope="session", params=modes())
def cluster(request: pytest.FixtureRequest):
    assets = _assets()
    mode = request.param
    if mode == "noiommu" and assets.initramfs_noiommu is None:
        reason = "no rebuilt vfio.ko: python -m tools.qemu_e2e setup --noiommu"
        if os.environ.get("IVSHMEM_E2E_REQUIRED"):
            pytest.fail(f"noiommu mode asked for but {reason}", pytrace=False)
        pytest.skip(f"e2e noiommu: {reason}")
    t0 = time.monotonic()
    with Cluster(mode, ("a", "b"), assets=assets) as c:
        rec = TIMINGS.setdefault(mode, {})
        rec["accel"] = assets.accel
        rec["cluster_start_s"] = round(time.monotonic() - t0, 2)
        for name, guest in c.guests.items():
            rec[f"boot_{name}_s"] = round(guest.boot_seconds or 0.0, 2)
        c.state = {}  # what earlier scenarios established (bound, vmids seen)
        yield c
        t1 = time.monotonic()
    rec["poweroff_s"] = round(time.monotonic() - t1, 2)


@contextlib.contextmanager
def peer_ram_cluster(key: str) -> Iterator[Cluster]:
    """A vIOMMU pair whose guest b's RAM is a shared file (``peer_ram=True``), both
    functions of each guest bound to vfio-pci; its timings under ``key``. Skipped when the
    modes asked for have no viommu. Each file that needs one boots its own: a device side
    that keeps the queues (linux-v0) must not find an earlier test's messages in them."""
    if "viommu" not in modes():
        pytest.skip("the peer-RAM guests run in vIOMMU mode: IVSHMEM_E2E_MODES has no viommu")
    assets = _assets()
    t0 = time.monotonic()
    with Cluster("viommu", ("a", "b"), assets=assets, peer_ram=True) as c:
        rec = TIMINGS.setdefault(key, {})
        rec["accel"] = assets.accel
        rec["cluster_start_s"] = round(time.monotonic() - t0, 2)
        t1 = time.monotonic()
        bind = (  # both functions in one interpreter: a Python start costs seconds under TCG
            '"$PY" -c "from ivshmem_bus.backends.vfio import pci; '
            f"[print(pci.bind(b)) for b in ('{IVSHMEM_BDF}', '{PEER_RAM_BDF}')]\""
        )
        for res in c.run_all(dict.fromkeys(c.guests, bind), 120).values():
            res.check()
        rec["bind_s"] = round(time.monotonic() - t1, 2)
        yield c


@pytest.fixture
def timing(request: pytest.FixtureRequest, cluster):
    """Records the scenario's wall time under its mode; tests may add their own figures."""
    rec: dict[str, float | str] = {}
    t0 = time.monotonic()
    yield rec
    name = request.node.originalname
    TIMINGS.setdefault(cluster.mode, {})[name] = round(time.monotonic() - t0, 2)
    for key, value in rec.items():
        TIMINGS[cluster.mode][f"{name}.{key}"] = value


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not TIMINGS:
        return
    terminalreporter.section("qemu e2e timings (seconds unless named)")
    for mode, rec in TIMINGS.items():
        terminalreporter.write_line(f"{mode}:")
        for key, value in rec.items():
            terminalreporter.write_line(f"  {key:45s} {value}")
    try:
        CACHE.mkdir(parents=True, exist_ok=True)
        (CACHE / "last-run.json").write_text(json.dumps(TIMINGS, indent=2) + "\n")
    except OSError:
        pass

"""``ivshmem-bus`` through its real entry points (subprocess), and the README's contract."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ivshmem_bus", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_demo_prints_the_probe_of_the_rng_device():
    out = run("demo", "--round-trips", "50")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == (
        "fake ivshmem pair (no hardware): driver vmid 1 <-> device vmid 2, profile qemu-v0"
    )
    assert "  device:    entropy (virtio id 4)" in lines
    assert "  vendor:    0x554d4551 (QEMU)" in lines
    assert "  features:  0x100000000 VERSION_1" in lines
    assert "  queues:    0 (max 1024)" in lines
    assert re.match(r"50 request/response round trips: p50 [\d.]+ us, p99 ", lines[-1])


def test_demo_json_spec_v1():
    out = run("demo", "--profile", "spec-v1", "--round-trips", "10", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["profile"] == "spec-v1" and doc["backend"] == "fake"
    assert doc["device"]["device_name"] == "entropy"
    assert doc["device"]["queues"] == [{"index": 0, "max_size": 1024}]
    assert doc["negotiated_features"] == "0x100000000"


def test_bad_usage_exits_2():
    out = run("no-such-command")
    assert out.returncode == 2
    assert "invalid choice" in out.stderr


def test_help_lists_the_subcommands():
    out = run("--help")
    assert out.returncode == 0
    assert "demo" in out.stdout


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block, "README has no sh block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_setup_and_test_commands_and_ci_runs_the_test_one():
    setup, test = _readme_commands()[:2]
    assert "pip install" in setup and "ivshmem-bus demo" in setup
    assert "pytest" in test
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci  # .ci/run runs the README's test command verbatim

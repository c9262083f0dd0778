"""list, vmid, bind, unbind through the real entry point, on a fake sysfs tree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ivshmem_bus import cli
from ivshmem_bus.backends.vfio import pci

from .fakesysfs import FakeSysfs

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tree(tmp_path):
    fake = FakeSysfs(tmp_path / "sys", tmp_path / "dev")
    fake.add_device("0000:00:04.0", driver=None, iommu_group=None, ivposition=0x2E)
    fake.add_device("0000:00:05.0", ids=(0x8086, 0x100E), driver="e1000", iommu_group=3)
    return fake


def run(fake: FakeSysfs, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "ivshmem_bus", "--sysfs", str(fake.root), "--dev",
            str(fake.dev_root), *args]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_list_json_schema_and_vmid_from_resource0(tree):
    out = run(tree, "list", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["bdf"] for r in rows] == ["0000:00:04.0"]  # the e1000 is not listed
    row = rows[0]
    assert set(row) == {"bdf", "kind", "revision", "driver", "iommu_group", "bar2_size",
                        "msix_vectors", "vmid", "vmid_error"}  # fmt: skip
    assert (row["kind"], row["driver"], row["msix_vectors"], row["vmid"]) == (
        "doorbell", None, 2, 0x2E,
    )  # fmt: skip
    assert row["bar2_size"] > 0 and row["vmid_error"] is None


def test_list_table_columns(tree):
    out = run(tree, "list")
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()[:2]
    assert header.split() == ["BDF", "TYPE", "REV", "DRIVER", "GROUP", "BAR2", "MSI-X", "VMID"]
    assert row.split()[:4] == ["0000:00:04.0", "doorbell", "1", "none"]
    assert row.split()[-1] == "0x2e"


def test_vmid_hex_dec_and_its_own_command(tree):
    assert run(tree, "vmid").stdout == "0x2e\n"
    assert run(tree, "vmid", "--format", "dec").stdout == "46\n"
    assert run(tree, "vmid", "00:04.0").stdout == "0x2e\n"


def test_vmid_with_several_devices_lists_them(tree):
    tree.add_device("0000:00:06.0", driver=None, iommu_group=None, ivposition=1)
    out = run(tree, "vmid")
    assert out.returncode == 1
    assert "several ivshmem-doorbell devices (0000:00:04.0, 0000:00:06.0)" in out.stderr


def test_vmid_of_a_device_owned_by_another_driver_says_how_to_fix(tree):
    tree.add_device("0000:00:07.0", driver="ivshmem_uio", iommu_group=None)
    out = run(tree, "vmid", "0000:00:07.0")
    assert out.returncode == 1
    assert "owned by ivshmem_uio: bind it to vfio-pci (ivshmem-bus bind 0000:00:07.0)" in out.stderr


def test_missing_and_non_ivshmem_devices(tree):
    out = run(tree, "vmid", "0000:00:09.0")
    assert out.returncode == 1 and "0000:00:09.0" in out.stderr
    out = run(tree, "vmid", "0000:00:05.0")
    assert out.returncode == 1
    assert out.stderr == (
        "ivshmem-bus: error: 0000:00:05.0 is not an ivshmem device (1af4:1110): "
        "'ivshmem-bus list' shows them\n"
    )
    out = run(tree, "bind", "0000:00:05.0", "--noiommu")
    assert out.returncode == 1 and "ivshmem" in out.stderr
    assert "taints" not in out.stderr  # no warning about a bind that is refused
    assert out.stderr.count("\n") == 1


def test_malformed_bdf_is_bad_usage(tree):
    for bad in ("zz", "0000:00:04.0/../..", "0000:00:04.8"):
        out = run(tree, "bind", bad)
        assert out.returncode == 2, bad
        assert "is not a PCI address" in out.stderr
    assert tree.writes == []


def test_noiommu_needs_the_flag(tree):
    out = run(tree, "bind", "0000:00:04.0")
    assert out.returncode == 1
    assert "--noiommu" in out.stderr


def test_bind_and_unbind_with_a_simulated_kernel(tree, monkeypatch, capsys):
    monkeypatch.setattr(pci, "_write", tree.write)
    tree.add_noiommu_param()
    base = ["--sysfs", str(tree.root), "--dev", str(tree.dev_root)]
    assert cli.main([*base, "bind", "0000:00:04.0", "--noiommu"]) == 0
    out = capsys.readouterr()
    assert "taints the kernel" in out.err
    assert out.out.startswith("0000:00:04.0 bound to vfio-pci (")
    assert "noiommu-" in out.out and "it was on no driver" in out.out
    assert tree.driver_of("0000:00:04.0") == "vfio-pci"
    assert cli.main([*base, "unbind", "0000:00:04.0"]) == 0
    assert "released from vfio-pci; now on no driver" in capsys.readouterr().out
    assert tree.override_of("0000:00:04.0") in ("", "(null)")


def test_ivshmem_vmid_is_installed_and_says_what_is_missing():
    script = Path(sys.executable).parent / "ivshmem-vmid"
    if not script.exists():
        pytest.skip("package not installed in this interpreter's environment (pip install -e .)")
    out = subprocess.run([str(script)], capture_output=True, text=True, timeout=60)
    # this machine (and CI's) has no ivshmem device
    assert out.returncode == 1
    assert "no ivshmem-doorbell device" in out.stderr

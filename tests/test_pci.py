"""backends/vfio/pci.py against a fake sysfs tree (tests/fakesysfs.py).

The fake tree cannot run a kernel, so binding is checked by the order and bytes of the writes
(recorded by FakeSysfs.write, which replaces pci._write) and by the state its kernel model
leaves behind (the driver link, the override, the group node).
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ivshmem_bus.backends.vfio import pci
from ivshmem_bus.errors import DeviceNotFound, IvshmemBusError, PciError

from .fakesysfs import DOORBELL_BARS, PLAIN_BARS, FakeSysfs, config_space

DB = "0000:00:04.0"  # ivshmem-doorbell
PLAIN = "0000:00:05.0"  # ivshmem-plain
NIC = "0000:00:03.0"  # not ivshmem


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSysfs:
    fs = FakeSysfs(tmp_path / "sys", tmp_path / "dev")
    fs.add_device(DB, msix_vectors=4, driver="ivshmem_test", iommu_group=7, ivposition=3)
    fs.add_device(PLAIN, bars=PLAIN_BARS, msix_vectors=0, iommu_group=8)
    fs.add_device(NIC, ids=(0x8086, 0x100E), class_code=0x020000, driver="e1000", iommu_group=9)
    monkeypatch.setattr(pci, "_write", fs.write)
    return fs


def no_modprobe(module: str) -> None:
    raise AssertionError(f"modprobe {module} was not expected")


# Enumeration


def test_list_returns_only_ivshmem_with_all_fields(fake: FakeSysfs) -> None:
    fns = pci.list_ivshmem(fake.root)
    assert [f.bdf for f in fns] == [DB, PLAIN]
    db, plain = fns
    assert (db.vendor, db.device, db.revision, db.class_code) == (0x1AF4, 0x1110, 1, 0x050000)
    assert (db.subsystem_vendor, db.subsystem_device) == (0x1AF4, 0x1100)
    assert db.bar_sizes == DOORBELL_BARS
    assert db.shmem_size == 1 << 22
    assert db.msix_vectors == 4
    assert db.is_doorbell and db.is_ivshmem
    assert (db.driver, db.iommu_group) == ("ivshmem_test", 7)
    assert plain.bar_sizes == PLAIN_BARS
    assert plain.msix_vectors == 0
    assert not plain.is_doorbell
    assert (plain.driver, plain.iommu_group) == (None, 8)


def test_list_uses_the_directory_walk_for_a_fake_tree(
    fake: FakeSysfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom() -> None:
        raise AssertionError("pyudev must not be consulted for a fake tree")

    monkeypatch.setattr(pci, "_udev_bdfs", boom)
    assert [f.bdf for f in pci.list_ivshmem(str(fake.root) + "/")] == [DB, PLAIN]


def test_list_on_an_empty_or_missing_tree(tmp_path: Path) -> None:
    assert pci.list_ivshmem(tmp_path / "nothing") == []
    assert pci.list_ivshmem(FakeSysfs(tmp_path / "sys", tmp_path / "dev").root) == []


def test_no_iommu_group_and_no_driver_read_as_none(fake: FakeSysfs) -> None:
    fake.add_device("0000:00:06.0", iommu_group=None)
    fn = pci.get_function("00:06.0", fake.root)
    assert (fn.driver, fn.iommu_group) == (None, None)


def test_doorbell_is_known_from_bar1_when_msix_is_unreadable(fake: FakeSysfs) -> None:
    # Non-root users read only the first 64 bytes of config space.
    cfg = fake.dev_dir(DB) / "config"
    cfg.write_bytes(cfg.read_bytes()[:64])
    fn = pci.get_function(DB, fake.root)
    assert fn.msix_vectors is None
    assert fn.is_doorbell


def test_get_function_any_device_and_not_found(fake: FakeSysfs) -> None:
    nic = pci.get_function(NIC, fake.root)
    assert (nic.vendor, nic.device, nic.driver, nic.is_ivshmem) == (0x8086, 0x100E, "e1000", False)
    with pytest.raises(DeviceNotFound) as info:
        pci.get_function("0000:00:1f.7", fake.root)
    assert info.value.bdf == "0000:00:1f.7"
    assert "no PCI device 0000:00:1f.7" in str(info.value)
    assert isinstance(info.value, PciError) and isinstance(info.value, IvshmemBusError)


def test_unparsable_attribute_is_a_pci_error_naming_the_device(fake: FakeSysfs) -> None:
    (fake.dev_dir(DB) / "vendor").write_text("garbage\n")
    with pytest.raises(PciError, match=DB):
        pci.get_function(DB, fake.root)


@pytest.mark.parametrize(
    ("text", "sizes"),
    [
        ("", (0,) * 6),
        (
            "0x00000000fea00000 0x00000000fea000ff 0x0000000000040200\n"
            "0x0000000000000000 0x0000000000000000 0x0000000000000000\n"
            "0x0000007000000000 0x00000070003fffff 0x000000000014220c\n",
            (256, 0, 1 << 22, 0, 0, 0),
        ),
    ],
)
def test_parse_resource(text: str, sizes: tuple[int, ...]) -> None:
    assert pci.parse_resource(text) == sizes


@pytest.mark.parametrize("vectors", [1, 2, 64, 2048])
def test_parse_msix_vectors(vectors: int) -> None:
    assert pci.parse_msix_vectors(config_space(0x1AF4, 0x1110, msix_vectors=vectors)) == vectors


def test_parse_msix_edge_cases() -> None:
    plain = config_space(0x1AF4, 0x1110)
    assert pci.parse_msix_vectors(plain) == 0
    no_caps = bytearray(plain)
    no_caps[6] = 0  # status bit 4 clear: the pointer at 0x34 means nothing
    assert pci.parse_msix_vectors(bytes(no_caps)) == 0
    assert pci.parse_msix_vectors(plain[:64]) is None
    loop = bytearray(plain)
    loop[0x41] = 0x40  # PM capability points at itself
    assert pci.parse_msix_vectors(bytes(loop)) == 0
    into_header = bytearray(plain)
    into_header[0x34] = 0x10
    assert pci.parse_msix_vectors(bytes(into_header)) == 0


@given(st.binary(max_size=300))
def test_parse_msix_vectors_is_total(config: bytes) -> None:
    # Fuzz invariant: any bytes give a table size 1..2048, 0, or None, and nothing else.
    n = pci.parse_msix_vectors(config)
    assert n is None or 0 <= n <= 2048


# Addresses


def test_normalize_bdf() -> None:
    assert pci.normalize_bdf("00:02.0") == "0000:00:02.0"
    assert pci.normalize_bdf("0000:00:1F.7") == "0000:00:1f.7"
    with pytest.raises(TypeError):
        pci.normalize_bdf(b"00:02.0")  # type: ignore[arg-type]


BAD_BDFS = [
    "",
    "0000:00:02.8",
    "0000:00:2.0",
    "000:00:02.0",
    "0000:00:02.0\n",
    " 0000:00:02.0",
    "0000:00:02.0/../../../../kernel",
    "../../../etc/passwd",
    "0000:00:02.0/driver_override",
    "g000:00:02.0",
]


@pytest.mark.parametrize("bdf", BAD_BDFS)
def test_malformed_bdf_is_rejected_before_any_write(fake: FakeSysfs, bdf: str) -> None:
    for op in (
        lambda: pci.bind(bdf, root=fake.root, dev_root=fake.dev_root, modprobe=no_modprobe),
        lambda: pci.unbind(bdf, root=fake.root),
        lambda: pci.get_function(bdf, fake.root),
    ):
        with pytest.raises(ValueError, match="is not a PCI address"):
            op()
    assert fake.writes == []


@given(st.text(alphabet="0123456789abcdefABCDEF:./\n -", max_size=16))
def test_normalize_bdf_returns_a_strict_address_or_raises(text: str) -> None:
    try:
        out = pci.normalize_bdf(text)
    except ValueError:
        return
    assert re.fullmatch(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]", out)


def test_pci_function_refuses_a_bad_bdf() -> None:
    with pytest.raises(ValueError):
        pci.PciFunction("../x", 0, 0, 0, 0, 0, 0, None, None, (0,) * 6, 0)


# Binding


def test_bind_writes_override_then_unbind_then_probe(fake: FakeSysfs) -> None:
    b = pci.bind("00:04.0", root=fake.root, dev_root=fake.dev_root, modprobe=no_modprobe)
    assert fake.writes == [
        (f"bus/pci/devices/{DB}/driver_override", "vfio-pci"),
        ("bus/pci/drivers/ivshmem_test/unbind", DB),
        ("bus/pci/drivers_probe", DB),
    ]
    assert b == pci.Binding(DB, "ivshmem_test", 7, str(fake.dev_root / "vfio/7"))
    assert not b.noiommu
    assert fake.driver_of(DB) == "vfio-pci"
    assert not any("new_id" in path for path, _ in fake.writes)


def test_unbind_restores_the_previous_driver(fake: FakeSysfs) -> None:
    pci.bind(DB, root=fake.root, dev_root=fake.dev_root, modprobe=no_modprobe)
    fake.writes.clear()
    assert pci.unbind(DB, root=fake.root) == "ivshmem_test"
    assert fake.writes == [
        (f"bus/pci/devices/{DB}/driver_override", "\n"),  # an empty write never reaches sysfs
        ("bus/pci/drivers/vfio-pci/unbind", DB),
        ("bus/pci/drivers_probe", DB),
    ]
    assert fake.override_of(DB) == "(null)"
    assert fake.driver_of(DB) == "ivshmem_test"


def test_bind_and_unbind_a_device_without_a_driver(fake: FakeSysfs) -> None:
    b = pci.bind(PLAIN, root=fake.root, dev_root=fake.dev_root, modprobe=no_modprobe)
    assert b.previous_driver is None
    assert [path for path, _ in fake.writes] == [
        f"bus/pci/devices/{PLAIN}/driver_override",
        "bus/pci/drivers_probe",
    ]
    assert pci.unbind(PLAIN, root=fake.root) is None
    assert fake.driver_of(PLAIN) is None


def test_bind_when_already_bound_writes_nothing(fake: FakeSysfs) -> None:
    pci.bind(DB, root=fake.root, dev_root=fake.dev_root, modprobe=no_modprobe)
    fake.writes.clear()
    b = pci.bind(DB, root=fake.root, dev_root=fake.dev_root, modprobe=no_modprobe)
    assert (b.previous_driver, b.group, fake.writes) == ("vfio-pci", 7, [])


def test_non_ivshmem_is_refused_by_bind_and_unbind(fake: FakeSysfs) -> None:
    with pytest.raises(PciError, match=r"0000:00:03.0 is 8086:100e, not ivshmem"):
        pci.bind(NIC, root=fake.root, dev_root=fake.dev_root, modprobe=no_modprobe)
    with pytest.raises(PciError, match="not ivshmem"):
        pci.unbind(NIC, root=fake.root)
    assert fake.writes == []
    assert fake.driver_of(NIC) == "e1000"


def test_bind_missing_device(fake: FakeSysfs) -> None:
    with pytest.raises(DeviceNotFound):
        pci.bind("0000:00:1f.0", root=fake.root, dev_root=fake.dev_root, modprobe=no_modprobe)
    assert fake.writes == []


def test_bind_loads_vfio_pci_when_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fs = FakeSysfs(tmp_path / "sys", tmp_path / "dev", vfio_pci=False)
    fs.add_device(DB)
    monkeypatch.setattr(pci, "_write", fs.write)
    loaded: list[str] = []

    def modprobe(module: str) -> None:
        loaded.append(module)
        fs.add_driver(module)

    pci.bind(DB, root=fs.root, dev_root=fs.dev_root, modprobe=modprobe)
    assert loaded == ["vfio-pci"]
    assert fs.driver_of(DB) == "vfio-pci"


def test_bind_fails_clearly_when_modprobe_does_not_load_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = FakeSysfs(tmp_path / "sys", tmp_path / "dev", vfio_pci=False)
    fs.add_device(DB)
    monkeypatch.setattr(pci, "_write", fs.write)
    with pytest.raises(PciError, match="drivers/vfio-pci is missing after `modprobe vfio-pci`"):
        pci.bind(DB, root=fs.root, dev_root=fs.dev_root, modprobe=lambda module: None)
    assert fs.writes == []


def test_permission_error_names_the_file_and_root(fake: FakeSysfs) -> None:
    rel = f"bus/pci/devices/{DB}/driver_override"
    fake.fail[rel] = errno.EACCES
    with pytest.raises(PciError) as info:
        pci.bind(DB, root=fake.root, dev_root=fake.dev_root, modprobe=no_modprobe)
    msg = str(info.value)
    assert str(fake.root / rel) in msg
    assert "'vfio-pci'" in msg and "root (CAP_SYS_ADMIN)" in msg
    assert (info.value.errno, info.value.path) == (errno.EACCES, str(fake.root / rel))
    assert fake.driver_of(DB) == "ivshmem_test"  # nothing else was attempted


def test_eperm_gets_the_same_advice(fake: FakeSysfs) -> None:
    fake.fail["bus/pci/drivers/ivshmem_test/unbind"] = errno.EPERM
    with pytest.raises(PciError, match=r"ivshmem_test/unbind.*CAP_SYS_ADMIN"):
        pci.bind(DB, root=fake.root, dev_root=fake.dev_root, modprobe=no_modprobe)


def test_real_write_is_one_write_and_never_creates(tmp_path: Path) -> None:
    target = tmp_path / "attr"
    target.write_text("(null)\n")
    pci._write(str(target), "vfio-pci")
    assert target.read_text() == "vfio-pci"
    with pytest.raises(FileNotFoundError):
        pci._write(str(tmp_path / "missing"), "x")
    assert not (tmp_path / "missing").exists()


def test_bind_rolls_back_when_vfio_pci_does_not_claim(
    fake: FakeSysfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_probe = fake._probe
    calls = []

    def refuse_first(bdf: str) -> None:  # vfio-pci's probe fails once, then the old driver
        calls.append(bdf)
        if len(calls) > 1:
            real_probe(bdf)

    monkeypatch.setattr(fake, "_probe", refuse_first)
    with pytest.raises(PciError, match="vfio-pci did not claim"):
        pci.bind(DB, root=fake.root, dev_root=fake.dev_root, modprobe=no_modprobe)
    assert fake.override_of(DB) == "(null)"
    assert fake.driver_of(DB) == "ivshmem_test"


# No-IOMMU


@pytest.fixture
def lone(fake: FakeSysfs) -> str:
    """An ivshmem device with no IOMMU group and no driver."""
    bdf = "0000:00:06.0"
    fake.add_device(bdf, iommu_group=None)
    return bdf


def test_no_group_without_opt_in_is_refused_before_any_write(fake: FakeSysfs, lone: str) -> None:
    fake.add_noiommu_param()
    with pytest.raises(PciError) as info:
        pci.bind(lone, root=fake.root, dev_root=fake.dev_root, modprobe=no_modprobe)
    assert "--noiommu" in str(info.value) and "noiommu=True" in str(info.value)
    assert "taints the kernel" in str(info.value)
    assert fake.writes == []


def test_noiommu_parameter_missing_explains_debian(fake: FakeSysfs, lone: str) -> None:
    with pytest.raises(PciError) as info:
        pci.bind(lone, root=fake.root, dev_root=fake.dev_root, noiommu=True, modprobe=no_modprobe)
    msg = str(info.value)
    assert "module/vfio/parameters/enable_unsafe_noiommu_mode does not exist" in msg
    assert "CONFIG_VFIO_NOIOMMU" in msg and "Debian" in msg
    assert fake.writes == []


def test_noiommu_opt_in_enables_the_mode_before_binding(fake: FakeSysfs, lone: str) -> None:
    fake.add_noiommu_param("N")
    b = pci.bind(lone, root=fake.root, dev_root=fake.dev_root, noiommu=True, modprobe=no_modprobe)
    assert fake.writes == [
        ("module/vfio/parameters/enable_unsafe_noiommu_mode", "1"),
        (f"bus/pci/devices/{lone}/driver_override", "vfio-pci"),
        ("bus/pci/drivers_probe", lone),
    ]
    assert b.noiommu
    assert b.node == str(fake.dev_root / f"vfio/noiommu-{b.group}")


def test_noiommu_already_enabled_is_not_written_again(fake: FakeSysfs, lone: str) -> None:
    fake.add_noiommu_param("Y")
    pci.bind(lone, root=fake.root, dev_root=fake.dev_root, noiommu=True, modprobe=no_modprobe)
    assert all("noiommu" not in path for path, _ in fake.writes)


def test_noiommu_is_not_used_for_a_device_with_a_group(fake: FakeSysfs) -> None:
    fake.add_noiommu_param("N")
    b = pci.bind(DB, root=fake.root, dev_root=fake.dev_root, noiommu=True, modprobe=no_modprobe)
    assert not b.noiommu
    assert all("noiommu" not in path for path, _ in fake.writes)


# Waiting for the group node


def test_wait_for_group_node_times_out_with_both_names(tmp_path: Path) -> None:
    with pytest.raises(PciError) as info:
        pci.wait_for_group_node(42, dev_root=tmp_path, timeout=0.05)
    msg = str(info.value)
    assert str(tmp_path / "vfio/42") in msg and str(tmp_path / "vfio/noiommu-42") in msg
    assert "within 0.05 s" in msg and "devtmpfs" in msg


def test_wait_for_group_node_finds_either_name(tmp_path: Path) -> None:
    (tmp_path / "vfio").mkdir()
    (tmp_path / "vfio/noiommu-3").touch()
    assert pci.wait_for_group_node(3, dev_root=tmp_path, timeout=0) == str(
        tmp_path / "vfio/noiommu-3"
    )


def test_bind_times_out_when_the_node_never_appears(fake: FakeSysfs) -> None:
    fake.create_nodes = False
    with pytest.raises(PciError, match=r"IOMMU group 7: neither .*vfio/7 nor .*noiommu-7"):
        pci.bind(DB, root=fake.root, dev_root=fake.dev_root, timeout=0.05, modprobe=no_modprobe)
    assert fake.driver_of(DB) == "vfio-pci"  # bound; unbind() undoes it


# IVPosition through resource0


def test_read_vmid_from_resource0(fake: FakeSysfs) -> None:
    fake.add_device("0000:00:07.0", ivposition=0x1234)
    fn = pci.get_function("0000:00:07.0", fake.root)
    assert pci.read_vmid_from_resource0(fn, fake.root) == 0x1234


def test_read_vmid_refuses_a_bound_device(fake: FakeSysfs) -> None:
    fn = pci.get_function(DB, fake.root)
    with pytest.raises(PciError, match="BAR0 is owned by ivshmem_test"):
        pci.read_vmid_from_resource0(fn, fake.root)


def test_read_vmid_with_memory_decoding_off(fake: FakeSysfs) -> None:
    fake.add_device("0000:00:07.0", command=0)
    fn = pci.get_function("0000:00:07.0", fake.root)
    with pytest.raises(PciError, match=r"memory decoding is off.*enable"):
        pci.read_vmid_from_resource0(fn, fake.root)


def test_read_vmid_unreadable_file(fake: FakeSysfs) -> None:
    fake.add_device("0000:00:07.0")
    os.unlink(fake.dev_dir("0000:00:07.0") / "resource0")
    fn = pci.get_function("0000:00:07.0", fake.root)
    with pytest.raises(PciError, match="resource0") as info:
        pci.read_vmid_from_resource0(fn, fake.root)
    assert info.value.errno == errno.ENOENT


# The real machine


def test_list_ivshmem_on_this_machine_runs() -> None:
    fns = pci.list_ivshmem()
    assert all(f.is_ivshmem for f in fns)
    walked = [f for b in pci._walk_bdfs("/sys") if (f := pci.get_function(b)).is_ivshmem]
    assert fns == walked

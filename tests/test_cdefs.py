"""Our cdefs/vfio.h against the system's <linux/vfio.h>: every size, offset and constant.

ixy's ``static_assert`` on struct layouts, moved to pytest. The cdefs were written by hand, so
a typo (a swapped field, 0x3B6C for 0x3B6D) would otherwise only show up as EINVAL on real
hardware. A probe program, generated from the names cffi parsed out of our cdefs, is compiled
against the kernel's header and prints what the C compiler says; each struct and constant is
one test. A name the kernel does not have fails the probe's compile, so it fails here too.

Needs a C compiler and linux-libc-dev (Debian: ``apt-get install gcc libc6-dev
linux-libc-dev``); without them these tests skip with that reason. The compiler-free tests
at the end check the numbers the VFIO notes state, and always run.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ivshmem_bus.native.ffi import ffi, lib

STRUCTS = sorted(ffi.list_types()[1])
CONSTANTS = sorted(name for name in dir(lib) if isinstance(getattr(lib, name), int))

# Upstream added a trailing pad after cap_offset; older headers (bookworm's 6.1) stop at 20
# bytes. The kernel takes any argsz >= 16, so either header matches our 24-byte struct.
OPTIONAL_KERNEL_FIELDS = {("vfio_device_info", "pad")}


def _fields(struct: str) -> list[tuple[str, object]]:
    return list(ffi.typeof(f"struct {struct}").fields)


def _probe_source() -> str:
    """A C program printing ``key<TAB>value`` for every struct member and constant we declare."""
    out = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <linux/vfio.h>",
        "#include <linux/pci_regs.h>",
        '#define P(key, fmt, expr) printf("%s\\t" fmt "\\n", key, expr)',
        "int main(void) {",
    ]
    for s in STRUCTS:
        t = f"struct {s}"
        out.append(f'P("sizeof {s}", "%zu", sizeof({t}));')
        out.append(f'P("alignof {s}", "%zu", _Alignof({t}));')
        for name, field in _fields(s):
            if (s, name) in OPTIONAL_KERNEL_FIELDS:
                continue
            member = f"(({t} *)0)->{name}"
            out.append(f'P("offsetof {s}.{name}", "%zu", offsetof({t}, {name}));')
            kind = field.type.kind  # type: ignore[attr-defined]
            if kind == "array" and field.type.length is None:  # type: ignore[attr-defined]
                # A flexible array has no sizeof: compare its element instead.
                out.append(f'P("itemsize {s}.{name}", "%zu", sizeof({member}[0]));')
            else:
                out.append(f'P("membersize {s}.{name}", "%zu", sizeof({member}));')
            if kind == "primitive":
                out.append(f'P("signed {s}.{name}", "%d", (int)((__typeof__({member}))-1 < 0));')
    for c in CONSTANTS:
        out.append(f'P("const {c}", "%lld", (long long)({c}));')
    out += ["return 0;", "}"]
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """What the C compiler says about <linux/vfio.h>, keyed like the probe's output."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc/gcc): apt-get install gcc libc6-dev")
    header = subprocess.run(
        [cc, "-E", "-x", "c", "-", "-o", "/dev/null"],
        input="#include <linux/vfio.h>\n",
        capture_output=True,
        text=True,
    )
    if header.returncode != 0:
        pytest.skip("<linux/vfio.h> not found: apt-get install linux-libc-dev")
    tmp: Path = tmp_path_factory.mktemp("vfio-probe")
    (tmp / "probe.c").write_text(_probe_source())
    build = subprocess.run(
        [cc, "-std=gnu11", "-Wall", "-o", str(tmp / "probe"), str(tmp / "probe.c")],
        capture_output=True,
        text=True,
    )
    # Not a skip: a name in our cdefs that the kernel header lacks is exactly a typo.
    assert build.returncode == 0, f"probe against <linux/vfio.h> did not compile:\n{build.stderr}"
    run = subprocess.run([str(tmp / "probe")], capture_output=True, text=True, check=True)
    return {
        key: int(value)
        for key, value in (line.split("\t") for line in run.stdout.split("\n") if line)
    }


@pytest.mark.parametrize("struct", STRUCTS)
def test_struct_layout_matches_kernel(kernel: dict[str, int], struct: str) -> None:
    ours: dict[str, int] = {
        f"sizeof {struct}": ffi.sizeof(f"struct {struct}"),
        f"alignof {struct}": ffi.alignof(f"struct {struct}"),
    }
    for name, field in _fields(struct):
        if (struct, name) in OPTIONAL_KERNEL_FIELDS:
            continue
        ctype = field.type  # type: ignore[attr-defined]
        ours[f"offsetof {struct}.{name}"] = field.offset  # type: ignore[attr-defined]
        if ctype.kind == "array" and ctype.length is None:
            ours[f"itemsize {struct}.{name}"] = ffi.sizeof(ctype.item)
        else:
            ours[f"membersize {struct}.{name}"] = ffi.sizeof(ctype)
        if ctype.kind == "primitive":
            ours[f"signed {struct}.{name}"] = int(int(ffi.cast(ctype, -1)) < 0)
    theirs = {key: kernel[key] for key in ours}
    if struct == "vfio_device_info":
        # Ours is the 24-byte upstream layout; a 20-byte (pre-pad) header is also accepted.
        assert theirs.pop(f"sizeof {struct}") in (20, 24)
        assert ours.pop(f"sizeof {struct}") == 24
        assert ffi.offsetof("struct vfio_device_info", "pad") == 20  # right after cap_offset
    assert ours == theirs


@pytest.mark.parametrize("name", CONSTANTS)
def test_constant_matches_kernel(kernel: dict[str, int], name: str) -> None:
    assert getattr(lib, name) == kernel[f"const {name}"]


# Compiler-free checks: the numbers docs/vfio.md §2 states ---------------------------------

IOCTLS = [
    "VFIO_GET_API_VERSION",
    "VFIO_CHECK_EXTENSION",
    "VFIO_SET_IOMMU",
    "VFIO_GROUP_GET_STATUS",
    "VFIO_GROUP_SET_CONTAINER",
    "VFIO_GROUP_UNSET_CONTAINER",
    "VFIO_GROUP_GET_DEVICE_FD",
    "VFIO_DEVICE_GET_INFO",
    "VFIO_DEVICE_GET_REGION_INFO",
    "VFIO_DEVICE_GET_IRQ_INFO",
    "VFIO_DEVICE_SET_IRQS",
    "VFIO_DEVICE_RESET",
]


@pytest.mark.parametrize(("n", "name"), list(enumerate(IOCTLS)))
def test_ioctl_numbers_are_io_semicolon_100_plus_n(n: int, name: str) -> None:
    assert getattr(lib, name) == ord(";") << 8 | (100 + n)


def test_struct_sizes_from_the_notes() -> None:
    sizes = {name: ffi.sizeof(f"struct {name}") for name in STRUCTS}
    assert sizes == {
        "vfio_group_status": 8,
        "vfio_device_info": 24,
        "vfio_region_info": 32,
        "vfio_info_cap_header": 8,
        "vfio_region_sparse_mmap_area": 16,
        "vfio_region_info_cap_sparse_mmap": 16,
        "vfio_irq_info": 16,
        "vfio_irq_set": 20,
    }
    assert ffi.offsetof("struct vfio_irq_set", "data") == 20
    assert ffi.offsetof("struct vfio_region_info", "size") == 16
    assert ffi.offsetof("struct vfio_region_info_cap_sparse_mmap", "areas") == 16


def test_msix_enable_and_disable_flags_from_the_notes() -> None:
    trigger = lib.VFIO_IRQ_SET_ACTION_TRIGGER
    assert lib.VFIO_IRQ_SET_DATA_EVENTFD | trigger == 0x24
    assert lib.VFIO_IRQ_SET_DATA_NONE | trigger == 0x21
    assert lib.VFIO_PCI_MSIX_IRQ_INDEX == 2
    assert lib.VFIO_PCI_CONFIG_REGION_INDEX == 7
    assert (lib.PCI_COMMAND, lib.PCI_COMMAND_MEMORY, lib.PCI_COMMAND_MASTER) == (4, 2, 4)

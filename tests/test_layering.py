"""The layering DEVELOPERS.md promises, checked: the sans-I/O core imports nothing from the
I/O edge, and the bus knows devices only through the device interface."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ivshmem_bus"
CORE = ("queue", "messages", "protocol", "_layouts", "errors")
EDGE = {"cffi", "pyudev", "periphery", "mmap", "select", "selectors", "socket", "fcntl"}


def test_importing_the_core_loads_nothing_of_the_edge():
    """In a fresh interpreter: which modules the core pulls in, by module name."""
    code = (
        "import sys, json\n"
        + "".join(f"import ivshmem_bus.{name}\n" for name in CORE)
        + "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    ours = {name for name in loaded if name.startswith("ivshmem_bus")}
    assert ours == {"ivshmem_bus", *(f"ivshmem_bus.{name}" for name in CORE)}
    assert not loaded & EDGE, loaded & EDGE


def _imports_of(module: str) -> tuple[set[str], set[str]]:
    """(sibling modules of the package, top-level absolute modules) that ``module`` imports."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    relative: set[str] = set()
    absolute: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                relative.add(node.module.split(".")[0])
            else:  # from . import x
                relative.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            absolute.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            absolute.update(alias.name.split(".")[0] for alias in node.names)
    return relative, absolute


def test_the_core_modules_import_only_each_other_and_the_stdlib():
    for module in CORE:
        relative, absolute = _imports_of(module)
        assert relative <= set(CORE), (module, relative - set(CORE))
        assert absolute <= set(sys.stdlib_module_names) | {"__future__"}, (module, absolute)
        assert not absolute & EDGE, (module, absolute & EDGE)


def test_the_bus_knows_only_the_device_interface():
    imports, _ = _imports_of("bus")
    backends = {"fake", "client", "vfio", "vfio_device", "pci", "regs", "_ffi", "server"}
    assert not imports & backends, imports & backends
    assert "device" in imports

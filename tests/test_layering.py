"""The layering the folders promise, checked on the import graph (folders, not file lists).

Low to high: ``errors`` (everyone's), ``core/`` (sans-I/O: bytes only), ``native/`` (the cffi
door), ``backends/`` (ivshmem devices), ``memory/`` (windows), then the bus, transport,
devices, monitor and server at the top, and ``cli/`` / ``contrib/`` (programs) above all. A
module imports only its own layer or lower ones, the bus knows devices only through
``backends.base``, and the graph has no circle.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ivshmem_bus"
EDGE = {"cffi", "pyudev", "periphery", "mmap", "select", "selectors", "socket", "fcntl"}
# layer -> the layers it may import (its own always allowed)
BELOW = {
    "errors": set(),
    "core": {"errors"},
    "native": {"errors", "root"},
    "backends": {"errors", "core", "native", "root"},
    "memory": {"errors", "core", "native", "backends", "root"},
}
PROGRAMS = {"cli", "contrib"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of the ivshmem_bus modules (or packages) ``name`` imports."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("ivshmem_bus"):
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ivshmem_bus"))
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    if parts[1] == "__main__":
        return "cli"
    return parts[1] if parts[1] in {*BELOW, *PROGRAMS} else "top"


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {n: {m for m in _imports(n, p) if m in mods and m != n} for n, p in mods.items()}


def test_importing_the_core_loads_nothing_of_the_edge():
    """In a fresh interpreter: which modules the core pulls in, by module name."""
    core = sorted(m for m in _modules() if _layer(m) == "core")
    code = (
        "import sys, json\n"
        + "".join(f"import {name}\n" for name in core)
        + "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    ours = {name for name in loaded if name.startswith("ivshmem_bus")}
    assert {_layer(m) for m in ours} <= {"root", "core", "errors"}, ours
    assert not loaded & EDGE, loaded & EDGE


def test_the_core_imports_only_the_core_errors_and_the_stdlib():
    for name, path in _modules().items():
        if _layer(name) != "core":
            continue
        tree = ast.parse(path.read_text())
        plain = [n for n in ast.walk(tree) if isinstance(n, ast.Import)]
        absolute = {a.name.split(".")[0] for n in plain for a in n.names} | {
            n.module.split(".")[0]
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module and not n.level
        }
        assert absolute <= set(sys.stdlib_module_names) | {"__future__"}, (name, absolute)
        assert not absolute & EDGE, (name, absolute & EDGE)


def test_every_module_imports_only_its_layer_or_lower_ones():
    for name, deps in _graph().items():
        layer = _layer(name)
        for dep in deps:
            other = _layer(dep)
            if other == layer or layer in PROGRAMS or (layer == "root" and other != "top"):
                continue
            if layer == "top":  # the bus, transport, devices, monitor, server
                assert other not in PROGRAMS, (name, dep)
            else:
                assert other in BELOW.get(layer, set()), f"{name} ({layer}) imports {dep} ({other})"


def test_the_bus_knows_only_the_device_interface():
    deps = _graph()["ivshmem_bus.bus"]
    backends = {d for d in deps if _layer(d) in {"backends", "native", "memory"}}
    assert backends <= {"ivshmem_bus.backends.base", "ivshmem_bus.backends"}, backends
    assert "ivshmem_bus.backends.base" in deps


def test_the_import_graph_has_no_circle():
    """Module-level imports only (a function's deferred import is how a circle is broken,
    and is still a smell: none is allowed between a package and its own modules here)."""
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if dep.startswith(node + "."):  # a package importing its own submodule
                continue
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] if dep in stack else [dep]
                raise AssertionError(" -> ".join([*cycle, dep]))
            if dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])

"""The README's library examples: they type-check, and the part that needs no server runs.

A newcomer copies these blocks first. ``mypy`` (the dev extra) checks every ```python block
as the package's own code is checked; the top-level statements that touch no device (imports
and prints) are executed, and the printed encoding is compared with the wire-format table's
example, written from docs/wire-format.md §4.1 and not from the codec.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# docs/wire-format.md §4.1: GetFeatures(index=0, num=2) in qemu-v0, msg_size 14, 44 bytes:
# type 00, msg_id 03, dev_num 0000, msg_size 0e00 | index 00000000, num 02000000 | 30 zeros.
GET_FEATURES_0_2 = "00" "03" "0000" "0e00" "00000000" "02000000" + "00" * 30  # fmt: skip


def _python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", README.read_text(), re.MULTILINE | re.DOTALL)


def _no_device_part(block: str) -> str:
    """The block's imports and top-level prints: what runs without a server or hardware."""
    tree = ast.parse(block)
    keep = [
        node
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        or (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name)
            and node.value.func.id == "print"
        )
    ]
    return ast.unparse(ast.Module(body=keep, type_ignores=[]))


def test_the_readme_has_a_library_example() -> None:
    blocks = _python_blocks()
    assert blocks, "README.md lost its ```python example"
    assert any("protocol.encode(" in b for b in blocks)


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy: the dev extra")
def test_every_readme_python_block_type_checks(tmp_path: Path) -> None:
    files = []
    for i, block in enumerate(_python_blocks()):
        path = tmp_path / f"readme_block_{i}.py"
        path.write_text(block)
        files.append(str(path))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--no-error-summary",
            *files,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_readme_encode_line_prints_the_wire_formats_example() -> None:
    printed = io.StringIO()
    for block in _python_blocks():
        with contextlib.redirect_stdout(printed):
            exec(compile(_no_device_part(block), "README.md", "exec"), {})
    lines = printed.getvalue().splitlines()
    assert GET_FEATURES_0_2 in lines, lines
    assert len(bytes.fromhex(GET_FEATURES_0_2)) == 44

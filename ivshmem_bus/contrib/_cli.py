"""What both drop-ins share: getopt-like parsing whose every error is one line, exit 1.

QEMU's tools exit 1 on any bad option (argparse would exit 2 with a usage block), and a
script that follows a tutorial tests for exactly that.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import NoReturn

__all__ = ["OneLineParser", "fail", "parse_uint"]

_UINT_RE = re.compile(r"(0[xX][0-9a-fA-F]+)|(0[0-7]*)|([1-9][0-9]*)")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 1."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, f"{message} (try '{self.prog} -h')")


def fail(prog: str, message: str) -> NoReturn:
    """Print ``prog: message`` as one line on stderr and exit 1, as QEMU's tools do."""
    print(f"{prog}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def parse_uint(text: str) -> int:
    """An unsigned integer as C's strtoull(base 0) reads it: 0x hex, leading-0 octal, decimal.

    QEMU's ``parse_uint_full(optarg, &v, 0)`` takes ``-n 0x10`` and ``-n 010`` (8); so do we.

    Raises:
        ValueError: ``text`` is not such a number (signs, spaces and trailing bytes included).
    """
    match = _UINT_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not an unsigned integer")
    hexa, octal, decimal = match.groups()
    if hexa is not None:
        return int(hexa, 16)
    if octal is not None:
        return int(octal, 8)
    return int(decimal)

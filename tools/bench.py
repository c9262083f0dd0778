"""``python tools/bench.py``: the same as ``ivshmem-bus bench`` (see ivshmem_bus/bench/)."""

import sys
from pathlib import Path

try:
    import ivshmem_bus  # noqa: F401
except ModuleNotFoundError:  # run from a source tree without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ivshmem_bus.bench import main

if __name__ == "__main__":
    raise SystemExit(main())

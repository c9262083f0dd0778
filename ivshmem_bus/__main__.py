"""``python -m ivshmem_bus``: the same as the ``ivshmem-bus`` command."""

import sys

from .cli import main

sys.exit(main())

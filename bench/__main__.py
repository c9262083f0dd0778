"""``python -m bench`` from a source checkout: the same as ``ivshmem-bus bench``."""

from bench import main

raise SystemExit(main())

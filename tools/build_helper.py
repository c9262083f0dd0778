"""Build ``ivshmem_bus.native._helper``, the compiled single-access helper (cffi API mode).

    python tools/build_helper.py        # build in place: ivshmem_bus/native/_helper*.so

``pip install .`` runs this through ``setup.py`` (``cffi_modules``); cffi *execs* the file
rather than importing it, so it must stand alone: no import of ``ivshmem_bus`` (whose
dependencies may not be installed at build time), paths from ``__file__`` only.

The C declarations are data, read from ``ivshmem_bus/native/cdefs/`` (cryptography's
``build_padding.py`` pattern): ``vfio.h`` and ``helper.h`` are both the cdef and real C in the
extension's source, so cffi checks our declarations against what the compiler sees, and the
same ``vfio.h`` is the ABI-mode cdef that ``ivshmem_bus/native/ffi.py`` parses when this extension
is absent. ``IVB_HELPER_VERSION`` stamps the package version into the ``.so`` so that
``_ffi.py`` can refuse one left over from another version.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

import cffi

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ivshmem_bus"
NATIVE = PACKAGE / "native"
CDEFS = NATIVE / "cdefs"
MODULE = "ivshmem_bus.native._helper"


def package_version() -> str:
    """``__version__`` from ``ivshmem_bus/__init__.py``, read as text (see the module doc).

    It is the value ``_ffi.py`` compares with at run time, so it is read from the same place.
    """
    text = (PACKAGE / "__init__.py").read_text()
    match = re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f'no __version__ = "..." line in {PACKAGE / "__init__.py"}')
    return match.group(1)


VERSION = package_version()

ffibuilder = cffi.FFI()
ffibuilder.cdef(
    (CDEFS / "vfio.h").read_text()
    + (CDEFS / "helper.h").read_text()
    + "\nstatic const char *const IVB_HELPER_VERSION;\n"
)
ffibuilder.set_source(
    MODULE,
    # vfio.h has no #include of its own (it is also a cdef): give it its types first.
    "#include <stddef.h>\n"
    "#include <stdint.h>\n"
    "#include <sys/ioctl.h>\n"
    '#include "vfio.h"\n'
    f'#define IVB_HELPER_VERSION "{VERSION}"\n' + (CDEFS / "helper.c").read_text(),
    include_dirs=[str(CDEFS)],
    # Checks our C (and, unavoidably, cffi's generated glue) for silent narrowing.
    extra_compile_args=["-Wconversion"],
)


def main() -> int:
    """Compile in a scratch directory and copy the extension into ``ivshmem_bus/native/``.

    Earlier builds are removed first: ``pip install -e .`` names the file ``_helper.abi3.so``
    and this build ``_helper.cpython-3XX-....so``, and Python would import whichever of the two
    its suffix order prefers, not the newer one.
    """
    with tempfile.TemporaryDirectory(prefix="ivb-helper-") as tmp:
        built = Path(ffibuilder.compile(tmpdir=tmp, verbose="-v" in sys.argv[1:]))
        for old in NATIVE.glob("_helper.*so"):
            old.unlink()
        target = NATIVE / built.name
        shutil.copy2(built, target)
    print(f"built {target} (IVB_HELPER_VERSION {VERSION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build hook for the optional compiled helper; all metadata lives in pyproject.toml.

``cffi_modules`` runs tools/build_helper.py and adds ``ivshmem_bus.native._helper`` as an extension.
Plain ``cffi_modules`` makes a missing compiler fail the whole ``pip install``; the package
works without the helper (ivshmem_bus/_ffi.py falls back), so the extension is marked
optional: setuptools then warns "building extension ... failed" and installs the rest.
"""

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that treats every extension as optional (cffi wraps this class's run)."""

    def run(self) -> None:
        for ext in self.extensions:
            ext.optional = True
        super().run()


setup(
    cffi_modules=["tools/build_helper.py:ffibuilder"],
    cmdclass={"build_ext": OptionalBuildExt},
)

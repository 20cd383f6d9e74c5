"""Builds xcr0run's compiled core (xcr0run/_core.c) into the package as a plain shared
library, libxcr0run_core.so, which xcr0run/_core.py loads with ctypes. Everything else
about the package is in pyproject.toml.

The library uses no Python API, so it needs a C compiler but no Python headers, and its
name is not importable as a module. It is optional: where no compiler exists the install
goes on without it and xcr0run runs its Python stop loop instead (`--show` says which).
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CORE_LIBRARY = "libxcr0run_core.so"


class BuildCore(build_ext):
    def get_ext_filename(self, fullname: str) -> str:
        # A fixed library name instead of the extension-module suffix (_core.cpython-...so),
        # so ctypes finds it and the import system never mistakes it for a module.
        # Called with the dotted name or its last part, depending on the caller.
        return "/".join([*fullname.split(".")[:-1], CORE_LIBRARY])


CORE = Extension(
    "xcr0run._core_library",
    sources=["xcr0run/_core.c"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-fvisibility=hidden"],
    optional=True,  # no compiler: install without it, the Python loop stands in
)

if __name__ == "__main__":  # also under setuptools' build backend; tests import CORE
    setup(ext_modules=[CORE], cmdclass={"build_ext": BuildCore})

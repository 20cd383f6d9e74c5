"""Builds xcr0run's two compiled parts. Both are optional, and neither uses the Python
API, so they need a C compiler but no Python headers. Everything else about the
package is in pyproject.toml.

- The core (xcr0run/_core.c), into the package as a plain shared library,
  libxcr0run_core.so, which xcr0run/_core.py loads with ctypes. Its name is not
  importable as a module. Without a compiler the install goes on without it and
  xcr0run runs its Python stop loop instead (`--show` says which).
- The `xcr0run` command (xcr0run/_entry.c), a small C program that records the signal
  dispositions it inherited, which Python destroys at start-up, and then execs the
  interpreter that runs xcr0run (the file says how it finds it). Without a compiler the
  command is pip's usual console script, which cannot pass on an ignored SIGPIPE or
  SIGXFSZ.

Which of the two commands a wheel has must be known before anything is built: pip asks
for the metadata (entry_points.txt, which names console scripts) first and puts it in
the wheel as it was, and it drops a script that has a console script's name. So when
this file runs, it compiles the entry once as a probe; where that works the entry is the
package's one script and no console script is declared, else only the console script.
"""

from __future__ import annotations

import os
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# After setuptools, which provides distutils where Python no longer does (3.12+).
from distutils.ccompiler import new_compiler
from distutils.command.build_scripts import build_scripts
from distutils.errors import CCompilerError, DistutilsError
from distutils.sysconfig import customize_compiler

CORE_LIBRARY = "libxcr0run_core.so"
ENTRY_SOURCE = "xcr0run/_entry.c"
COMMAND = "xcr0run"
CONSOLE_SCRIPT = f"{COMMAND} = xcr0run.__main__:main"
# The interpreter the entry looks for first: this one's version, which the wheel's tag
# (cpXY, from the core) is for, so no other can install it.
ENTRY_PYTHON = f"python{sys.version_info[0]}.{sys.version_info[1]}"
ENTRY_FLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra"]


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


def build_entry(output: str, build_temp: str) -> None:
    """Compile and link the entry into `output` with the compiler build_ext would use
    (CC, CFLAGS and LDFLAGS honoured); CCompilerError or DistutilsError if it cannot."""
    compiler = new_compiler()
    customize_compiler(compiler)
    objects = compiler.compile(
        [ENTRY_SOURCE],
        output_dir=build_temp,
        macros=[("XCR0RUN_PYTHON", f'"{ENTRY_PYTHON}"')],
        extra_postargs=ENTRY_FLAGS,
    )
    compiler.link_executable(objects, os.path.basename(output), os.path.dirname(output))


def entry_builds() -> bool:
    """Whether the entry compiles here: the probe that decides the metadata."""
    with tempfile.TemporaryDirectory(prefix="xcr0run-entry-") as scratch:
        try:
            build_entry(os.path.join(scratch, COMMAND), os.path.join(scratch, "objects"))
        except (CCompilerError, DistutilsError, OSError) as err:
            print(f"no C entry ({err}): `{COMMAND}` is pip's console script", file=sys.stderr)
            return False
    return True


class BuildEntry(build_scripts):
    """The scripts are one: the entry, compiled from ENTRY_SOURCE (listed as the script
    only when the probe compiled it). The metadata already says there is no console
    script, so a failure here fails the build instead of installing no command."""

    def run(self) -> None:
        if not self.scripts:
            return
        self.mkpath(self.build_dir)
        # Objects apart: install_scripts copies all of build_dir.
        build_temp = os.path.join(self.get_finalized_command("build").build_temp, "entry")
        self.mkpath(build_temp)
        build_entry(os.path.join(self.build_dir, COMMAND), build_temp)


if __name__ == "__main__":  # also under setuptools' build backend; tests import CORE
    with_entry = entry_builds()
    setup(
        ext_modules=[CORE],
        scripts=[ENTRY_SOURCE] if with_entry else [],
        entry_points={"console_scripts": [] if with_entry else [CONSOLE_SCRIPT]},
        cmdclass={"build_ext": BuildCore, "build_scripts": BuildEntry},
    )

"""The three layers stay apart: pure modules import neither ctypes nor rich, and the
launch path imports only what running a program needs (start-up time)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DESIGN = ROOT / "docs" / "DESIGN.md"


def _pure_modules() -> list[str]:
    """The modules docs/DESIGN.md's layer diagram puts on the pure floor."""
    diagram = DESIGN.read_text().split("```")[1]
    floor = diagram.split("\npure", 1)[1]
    return re.findall(r"(\w+)\.py", floor)


PURE = _pure_modules()


def test_the_pure_floor_is_the_one_the_design_names() -> None:
    assert {"audit", "profiles", "envhints", "xsave", "view", "errors"} <= set(PURE)


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


def test_pure_modules_need_no_system_layer() -> None:
    loaded = _modules_after("; ".join(f"import xcr0run.{m}" for m in PURE))
    assert "ctypes" not in loaded
    assert "rich" not in loaded
    assert "xcr0run._native" not in loaded
    assert "xcr0run._core" not in loaded


def test_launching_does_not_import_rich_or_psutil() -> None:
    loaded = _modules_after("import xcr0run.cli, xcr0run.launcher, xcr0run.supervisor")
    assert "rich" not in loaded and "psutil" not in loaded


def test_only_the_native_modules_use_ctypes() -> None:
    """_native.py for system calls, _core.py for the compiled core (its own module, so
    nothing loads the library unless it supervises)."""
    import pathlib

    package = pathlib.Path(__file__).parent.parent / "xcr0run"
    users = sorted(p.name for p in package.glob("*.py") if "import ctypes" in p.read_text())
    assert users == ["_core.py", "_native.py"]


# Runs xcr0run's entry point with its execve calls and os._exit wrapped to report sys.modules
# first: what the launcher had imported when it became the program, or gave up.
_LAUNCH = """
import os, sys
real_execve, real_exit = os.execve, os._exit
def report():
    sys.stderr.write("MODULES " + " ".join(sorted(sys.modules)) + chr(10))
    sys.stderr.flush()
def execve(*args):
    report()
    real_execve(*args)
def _exit(status):
    report()
    real_exit(status)
os.execve, os._exit = execve, _exit
import xcr0run._native as native  # the launch path needs it anyway: it execs through it
real_native_execve = native.execve
def native_execve(*args):
    report()
    real_native_execve(*args)
native.execve = native_execve
sys.argv[0] = "xcr0run"
from xcr0run.__main__ import main
main()
"""

# Nothing for help text, suggestions, rich, JSON, profiles, --show or the tracer: the
# standard library's heavier modules (dataclasses brings inspect, typing and re; enum,
# which signal.py imports, brings functools and collections) and ours.
NOT_FOR_LAUNCHING = {
    "click", "rich", "psutil", "json", "difflib", "textwrap", "dataclasses", "inspect",
    "typing", "re", "shutil", "threading", "argparse", "uuid", "datetime", "enum",
    "signal", "functools", "collections", "contextlib", "math",
    "xcr0run.cli", "xcr0run.completion", "xcr0run.render", "xcr0run.describe",
    "xcr0run.xstate_report", "xcr0run.profiles", "xcr0run.profile_files",
    "xcr0run.envhints", "xcr0run.supervisor", "xcr0run.sigstate", "xcr0run._core",
}  # fmt: skip


def _launch_imports(args: list[str]) -> set[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XCR0RUN_XCR0_PRCTL", None)
    result = subprocess.run(
        [sys.executable, "-c", _LAUNCH, *args], capture_output=True, text=True, env=env
    )
    reports = [line for line in result.stderr.splitlines() if line.startswith("MODULES ")]
    assert reports, result.stderr
    # Less what the interpreter had loaded before any of ours (site's .pth files).
    return {name for line in reports for name in line.split()[1:]} - _modules_after("")


@pytest.mark.parametrize(
    "args",
    [
        # The command: hidden state to trap where the CPU has it (then refused
        # here, without CPUID faulting), nothing to hide elsewhere (exec'd at once).
        ["-q", "-m", "no-avx512", "--", "true"],
        ["-q", "-m", "host", "--", "true"],  # exec'd directly
        ["-q", "-m", "host", "--audit", "--", "true"],  # the tracing helper beside it
        ["-q", "-m", "x87,sse", "--", "true"],  # hides AVX: trapped, or refused
    ],
)
def test_the_launch_path_imports_only_what_running_needs(args: list[str]) -> None:
    loaded = _launch_imports(args)
    assert "xcr0run.commands" in loaded  # it did get that far
    assert not loaded & NOT_FOR_LAUNCHING


def test_the_banner_needs_no_rich() -> None:
    loaded = _launch_imports(["-m", "host", "--", "true"])
    assert "xcr0run.render" in loaded
    assert not loaded & (NOT_FOR_LAUNCHING - {"xcr0run.render", "xcr0run.describe"})


# The tracing helper imports these before the program may start (it must have seized
# the program first): the same rule, for the tracer's own modules.
HELPER_MODULES = ["supervisor", "_core", "responder", "sigstate", "audit", "seccomp"]


def test_the_tracer_imports_nothing_heavy_before_the_program_starts() -> None:
    launch = "import xcr0run.run, xcr0run.launcher"
    helper = "; ".join(f"import xcr0run.{m}" for m in HELPER_MODULES)
    added = _modules_after(f"{launch}; {helper}") - _modules_after(launch)
    assert {f"xcr0run.{m}" for m in HELPER_MODULES} - {"xcr0run.seccomp"} <= added
    heavy = {m for m in NOT_FOR_LAUNCHING if not m.startswith("xcr0run.")}
    assert not added & heavy

"""Shared fixtures: C helper programs compiled with gcc once per session, and a way to
run xcr0run as a real process."""

from __future__ import annotations

import hashlib
import os
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest

C_DIR = Path(__file__).parent / "c"
ROOT = Path(__file__).parent.parent


def _core_library() -> str | None:
    """This checkout's compiled core, for the tests and the programs they start.

    `pip install .` builds it into the installed package, but tests import the package
    from the checkout, which has none (unless `setup.py build_ext --inplace` put a current
    one there). So it is built here with setup.py's own flags, once per version of the
    source, and XCR0RUN_CORE_LIBRARY points every process of the session at it. Without
    gcc nothing is set, and the core's tests skip (xcr0run falls back to the Python loop).
    """
    source = ROOT / "xcr0run" / "_core.c"
    in_tree = ROOT / "xcr0run" / "libxcr0run_core.so"
    if in_tree.exists() and in_tree.stat().st_mtime >= source.stat().st_mtime:
        return str(in_tree)
    if shutil.which("gcc") is None:
        return None
    flags = runpy.run_path(str(ROOT / "setup.py"), run_name="conftest")["CORE"].extra_compile_args
    digest = hashlib.sha256(source.read_bytes() + repr(flags).encode()).hexdigest()[:12]
    out = Path(tempfile.gettempdir()) / f"xcr0run-core-{digest}" / "libxcr0run_core.so"
    if not out.exists():
        out.parent.mkdir(exist_ok=True)
        partial = out.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(
            ["gcc", *flags, "-fPIC", "-shared", "-o", str(partial), str(source)],
            check=True,
            capture_output=True,
            text=True,
        )
        partial.replace(out)  # atomic: sessions running side by side share it
    return str(out)


CORE_LIBRARY = _core_library()
if CORE_LIBRARY and "XCR0RUN_CORE_LIBRARY" not in os.environ:
    os.environ["XCR0RUN_CORE_LIBRARY"] = CORE_LIBRARY


def _host_faulting() -> str | None:
    from xcr0run import host

    state = host.cpuid_faulting()
    return None if state.supported else state.detail


FAULTING_MISSING = _host_faulting()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if FAULTING_MISSING is None:
        return
    skip = pytest.mark.skip(
        reason=f"no CPUID faulting on this CPU ({FAULTING_MISSING}); "
        "tests/test_guest.py runs these in a TCG guest"
    )
    for item in items:
        if "faulting" in item.keywords:
            item.add_marker(skip)


class CBuilder:
    """Compiles a C file from tests/c with gcc, once per (source, flags) per session."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache

    def __call__(self, name: str, *flags: str) -> str:
        if shutil.which("gcc") is None:
            pytest.skip("gcc is not installed")
        source = C_DIR / name
        digest = hashlib.sha256(source.read_bytes() + repr(flags).encode()).hexdigest()[:12]
        out = self.cache / f"{source.stem}-{digest}"
        if not out.exists():
            subprocess.run(
                ["gcc", "-O1", "-g", "-Wall", "-o", str(out), str(source), *flags],
                check=True,
                capture_output=True,
                text=True,
            )
        return str(out)

    def lazy(self, width: int) -> str:
        """lazymain linked -z lazy against lazylib.so, with 128-, 256- or 512-bit vectors
        (128: SSE2 only, for an XCR0 without AVX)."""
        isa = {512: ("-mavx512f",), 256: ("-mavx2",), 128: ()}[width]
        flags = (f"-DVEC={width}", *isa, f"-I{C_DIR}")
        out = self.cache / f"lazy{width}"
        if not out.exists():
            lib = self.cache / f"liblazy{width}.so"
            run = ["gcc", "-O1", *flags]
            subprocess.run([*run, "-shared", "-fPIC", "-o", lib, C_DIR / "lazylib.c"], check=True)
            subprocess.run(
                [
                    *run,
                    "-o",
                    out,
                    C_DIR / "lazymain.c",
                    lib,
                    "-Wl,-z,lazy",
                    f"-Wl,-rpath,{self.cache}",
                ],
                check=True,
            )
        return str(out)


@pytest.fixture(scope="session")
def cbuild(tmp_path_factory: pytest.TempPathFactory) -> CBuilder:
    return CBuilder(tmp_path_factory.mktemp("cbin"))


class Wheel(NamedTuple):
    path: Path
    log: str  # what the build printed (pip -v)


@pytest.fixture(scope="session")
def checkout_wheel(tmp_path_factory: pytest.TempPathFactory) -> Wheel:
    """This checkout as `pip install .` builds it (isolated build, setup.py's probes),
    once per session."""
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (wheel,) = out.glob("xcr0run-*.whl")
    return Wheel(wheel, build.stdout + build.stderr)


def xcr0run(
    args: Sequence[str], check: bool = False, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    """Run xcr0run as its own process, as a user would."""
    env = dict(os.environ)
    env.pop("XCR0RUN_XCR0_PRCTL", None)
    env.update(kwargs.pop("env", {}) or {})  # type: ignore[arg-type]
    return subprocess.run(
        [sys.executable, "-m", "xcr0run", *args],
        capture_output=True,
        text=True,
        check=check,
        env=env,
        timeout=kwargs.pop("timeout", 120),  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


def wait_for(condition: Callable[[], object], timeout: float = 30.0) -> object:
    """Poll until `condition()` is true (its value), failing the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {condition}")
        time.sleep(0.02)


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def tracer_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0


# A finished test in pytest -v's output: "tests/x.py::test_y[z] PASSED   [ 40%]".
_FINISHED = re.compile(r"^(tests/\S+::\S+) (PASSED|SKIPPED|XFAIL|XPASS)\b", re.M)
GUEST_ATTEMPTS = 5


_FAILED = re.compile(r"^(tests/\S+::\S+) (FAILED|ERROR)\b", re.M)


def finished_tests(output: str, outcome: str | None = None) -> list[str]:
    """The node ids pytest -v reports as finished, not failed, in `output` (only those
    with `outcome`, e.g. "PASSED", if given)."""
    return [m.group(1) for m in _FINISHED.finditer(output) if outcome in (None, m.group(2))]


def run_marked_in_guest(
    marker: str, tests: str, log: Path, timeout: float, xcr0_kernel: bool = False
) -> tuple[Any, str]:
    """Run the tests marked `marker` in a guest (tests/guest). When the guest itself
    fails (it wedges now and then: nested KVM under TCG), boot again and go on from
    the first test that had not finished; a test failure is not retried. The output
    of every attempt goes to `log`; returns the guest's result (its stdout: all
    attempts') and the output's tail, for assertion messages."""
    import dataclasses

    from tests.guest import run_in_guest as guest

    argv = [sys.executable, "-m", "pytest", "-m", marker, "-p", "no:cacheprovider", "-v"]
    argv += ["-rs", "--color=no", tests]
    root = Path(__file__).parent.parent
    done: list[str] = []  # finished in attempts the guest did not survive
    earlier: list[str] = []  # those attempts' output and how each ended
    failed: list[str] = []  # failed in those attempts: not run again, and not forgotten
    timed_out = False
    for _ in range(GUEST_ATTEMPTS):
        skip = [arg for node in done + failed for arg in ("--deselect", node)]
        try:
            result = guest.run_in_guest(
                [*argv, *skip],
                cwd=root,
                timeout=timeout,
                env={"PYTHONDONTWRITEBYTECODE": "1"},
                xcr0_kernel=xcr0_kernel,
            )
            break
        except guest.GuestError as err:
            earlier.append(f"{err.output}\n[the guest failed here: {err}]\n")
            log.write_text("".join(earlier))
            print(f"guest run failed, going on in a new boot: {err}", file=sys.stderr)
            if isinstance(err, guest.GuestTimeout):
                # A wedged guest is told by the checks in run_in_guest; a run that
                # exceeds its time twice is a hang of ours.
                if timed_out:
                    raise
                timed_out = True
            done += finished_tests(err.output)
            failed += [m.group(1) for m in _FAILED.finditer(err.output)]
    else:
        pytest.fail(f"the guest failed {GUEST_ATTEMPTS} times; the last: {earlier[-1]}")
    if done and result.returncode == 5:  # pytest: every test left was deselected
        result = dataclasses.replace(result, returncode=0)
    if failed and result.returncode == 0:
        result = dataclasses.replace(result, returncode=1)
    result = dataclasses.replace(result, stdout="".join(earlier) + result.stdout)
    log.write_text(result.stdout + result.stderr)
    return result, "\n".join((result.stdout + result.stderr).splitlines()[-60:])

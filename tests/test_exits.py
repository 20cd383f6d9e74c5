"""The program's end under the audit, where the helper stops its exiting thread, samples
the others and gives the verdict: exits that must neither hang nor lose the verdict.
Each runs under the compiled core (where built) and the Python loop, bounded by timeouts
so a regression fails instead of hanging."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import pytest

FOLLOW = ["-q", "-m", "host", "--audit"]
LOOPS = {"core": {}, "python": {"XCR0RUN_CORE_LIBRARY": "/nonexistent/libxcr0run_core.so"}}


@pytest.fixture(params=sorted(LOOPS))
def loop_env(request) -> dict[str, str]:
    return LOOPS[request.param]


class Run(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def xcr0run(args: list[str], env: dict[str, str], timeout: float) -> Run:
    """xcr0run with its output in files (a hung helper would hold pipes open): on a
    hang, the helper and the program are killed and the test fails."""
    full_env = {**os.environ, **env}
    full_env.pop("XCR0RUN_XCR0_PRCTL", None)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xcr0run", *args], stdout=out, stderr=err, env=full_env
        )
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_hung(proc.pid)
            proc.wait(10)
            pytest.fail(f"xcr0run {' '.join(args)} hung for {timeout} s")
        out.seek(0)
        err.seek(0)
        return Run(proc.returncode, out.read(), err.read())


def _kill_hung(pid: int) -> None:
    """The helper first (PTRACE_O_EXITKILL then kills the program), then the program."""
    try:
        with open(f"/proc/{pid}/status") as f:
            tracer = next(int(line.split()[1]) for line in f if line.startswith("TracerPid:"))
        if tracer:
            os.kill(tracer, signal.SIGKILL)
    except (OSError, StopIteration):
        pass
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


def _direct(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def test_exit_after_pthread_exit_in_main_does_not_hang(cbuild, loop_env) -> None:
    """The leader is a zombie when the last thread exits: it never stops, and waiting
    for it held that last thread for ever."""
    prog = cbuild("pthread_exit_main.c", "-pthread")
    direct = _direct([prog])
    for options in (FOLLOW, ["-q", "-m", "host", "--expect-used", "amx"]):
        result = xcr0run([*options, "--", prog], env=loop_env, timeout=30)
        assert result.stdout == direct.stdout == "worker done\n"
        # The verdict is still given at that exit: nothing used AMX, so 124.
        expected = 124 if "--expect-used" in options else direct.returncode
        assert result.returncode == expected, result.stderr


def test_exit_while_a_thread_waits_in_vfork_does_not_hang(cbuild, loop_env) -> None:
    """A thread in vfork() stops only once its child exits, and that child's exit stops
    for the helper: the program's end must not wait for it."""
    prog = cbuild("vfork_thread_exit.c", "-pthread")
    direct = _direct([prog, "1"])
    start = time.monotonic()
    result = xcr0run([*FOLLOW, "--", prog, "15"], env=loop_env, timeout=40)
    took = time.monotonic() - start
    assert (result.returncode, result.stdout) == (direct.returncode, direct.stdout)
    assert result.stdout == "main exits\n"
    assert took < 12, f"the program's end waited {took:.1f} s for the vfork child"


def test_a_clone_untraced_child_is_followed_and_exits_as_natively(cbuild, loop_env) -> None:
    """Without CPUID faulting the filter still stops exits for the audit: a child that
    asked for CLONE_UNTRACED is traced anyway, so that its exit has a tracer to stop for."""
    prog = cbuild("clone_untraced.c")
    direct = _direct([prog])
    assert direct.stdout.endswith("child: exited=1 code=7 signal=0\n")
    report = ["--report", "/dev/null"]
    for options in (FOLLOW, ["-q", "-m", "host", *report], ["-q", "-m", "host", "--strict"]):
        result = xcr0run([*options, "--", prog], env=loop_env, timeout=30)
        assert (result.returncode, result.stdout) == (direct.returncode, direct.stdout)


def test_the_verdict_survives_threads_racing_to_exit_group(cbuild, loop_env) -> None:
    """Nine threads call exit_group(0) at once and each stops for the helper: whichever
    sets the group's status must carry the verdict's 124, not only the one that
    concluded (it lost about one run in five)."""
    prog = cbuild("racing_exit_group.c", "-pthread")
    assert _direct([prog, "8"]).returncode == 0
    statuses = []
    for _ in range(12):
        options = ["-q", "-m", "host", "--expect-used", "amx"]
        result = xcr0run([*options, "--", prog, "8"], env=loop_env, timeout=30)
        statuses.append(result.returncode)
    assert statuses == [124] * len(statuses)

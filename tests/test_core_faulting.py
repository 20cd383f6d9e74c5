"""The compiled core answering real CPUID traps, against the Python loop: the same
programs under both give the same answers, trap counts and outcomes. Needs CPUID
faulting (on a CPU without it, tests/test_guest.py runs these in a guest)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from typing import Any

import pytest

from tests.conftest import CORE_LIBRARY, xcr0run
from tests.test_core import _outcome, drive
from xcr0run import _native, cpuid, host, masks
from xcr0run.view import CpuidView

pytestmark = [
    pytest.mark.faulting,
    pytest.mark.skipif(CORE_LIBRARY is None, reason="no gcc: the core is not built"),
]

XCR0 = host.xcr0()
MASK = "no-avx512" if XCR0 & 0xE0 else "no-avx" if XCR0 & 0b100 else "host"
VIEW = CpuidView.build(masks.parse_mask(MASK, XCR0), XCR0)


def _views(out: str) -> list[str]:
    """cpuid_view's lines without the pid and tid, which differ from run to run."""
    return [re.sub(r" (pid|tid)=\d+", "", line) for line in out.splitlines() if "view " in line]


@pytest.fixture(scope="module")
def view_prog(cbuild) -> str:
    return cbuild("cpuid_view.c", "-pthread")


@pytest.mark.parametrize("tables", ["lazy", "full"])
@pytest.mark.parametrize("program", ["threads", "tree"])
def test_core_answers_as_the_python_loop_does(cbuild, view_prog, tmp_path, program, tables) -> None:
    argv = {
        "threads": [view_prog, "-t", "3"],
        "tree": [cbuild("tree.c", "-pthread"), view_prog],
    }[program]
    core, core_out = drive("core", argv, "--mask", MASK, "--tables", tables, tmp=tmp_path)
    python, python_out = drive("python", argv, "--mask", MASK, tmp=tmp_path)
    assert _outcome(core) == _outcome(python) and core["exit_code"] == 0
    assert _views(core_out) == _views(python_out) and _views(core_out)
    assert core["leaves"] == python["leaves"]
    # Faulting re-armed in every image (ARCH_GET_CPUID in each thread says so), each in
    # one stop after the exec event.
    assert all(line.endswith("cpuid_allowed=0") for line in _views(core_out))
    assert core["stats"]["arms"] == core["execs"]
    assert core["stats"]["answered"] == sum(core["leaves"].values())
    if tables == "full":
        # The core answered every trap itself, except keys the host's table lacks (past
        # a leaf's last sub-leaf, say), which Python answered once and handed down.
        table = {cpuid.cache_key(*k) for k in cpuid.read_table(_native.cpuid).entries}
        assert core["returns"].get("CPUID", 0) == len(core["misses"])
        assert not [m for m in core["misses"] if _key(m) in table]


def _key(name: str) -> tuple[int, int]:
    leaf, _, sub = name.partition(".")
    return int(leaf, 16), int(sub)


def _encodings(out: str) -> dict[str, dict[str, int]]:
    lines = {}
    for line in out.splitlines():
        if line.startswith("enc "):
            name, *fields = line.split()[1:]
            lines[name] = {k: int(v, 0) for k, v in (f.split("=") for f in fields)}
    return lines


def test_prefixed_encodings_and_page_ends_are_answered(cbuild, tmp_path) -> None:
    prog = cbuild("cpuid_encodings.c")
    native = _encodings(subprocess.run([prog], capture_output=True, text=True, check=True).stdout)
    report, out = drive("core", [prog], "--mask", MASK, tmp=tmp_path)
    seen = _encodings(out)
    assert report["exit_code"] == 0 and seen.keys() == native.keys()
    for name, regs in native.items():
        if name == "leaf1-garbage-ecx":
            _, _, ecx, edx = VIEW.answer(1, 0, (0, 0, regs["c"], regs["d"]))
            assert seen[name] == {"c": ecx, "d": edx}
        else:
            eax, ebx, ecx, edx = VIEW.answer(7, 0, (regs["a"], regs["b"], regs["c"], regs["d"]))
            assert seen[name] == {"a": eax, "b": ebx, "c": ecx, "d": edx}, name
    assert report["leaves"]["0x7.0"] >= 8
    assert not [k for k in report["leaves"] if k.startswith("0x1.") and k != "0x1.0"]


def test_a_16_byte_cpuid_is_not_answered_but_delivered(cbuild, tmp_path) -> None:
    """Longer than 15 bytes is #GP: the SIGSEGV looks like a CPUID trap but is not one."""
    prog = cbuild("cpuid_encodings.c")
    native = subprocess.run([prog, "--too-long"], capture_output=True)
    report, _ = drive("core", [prog, "--too-long"], "--mask", MASK, tmp=tmp_path)
    assert native.returncode == -signal.SIGSEGV
    assert report["signal"] == signal.SIGSEGV


def test_traps_of_threads_without_the_answer_flag_go_up_to_python(view_prog, tmp_path) -> None:
    argv = [view_prog, "-t", "2"]
    cleared, cleared_out = drive("core", argv, "--mask", MASK, "--no-answer-flag", tmp=tmp_path)
    answered, answered_out = drive("core", argv, "--mask", MASK, "--tables", "full", tmp=tmp_path)
    assert _views(cleared_out) == _views(answered_out)
    assert cleared["leaves"] == answered["leaves"]
    assert cleared["returns"]["CPUID"] == sum(cleared["leaves"].values())


# -- the supervisor itself, under each stop loop -------------------------------------------

PYTHON_LOOP = {"XCR0RUN_CORE_LIBRARY": "/nonexistent/libxcr0run_core.so"}


def _under_each_loop(argv: list[str], tmp_path, *options: str) -> dict[str, Any]:
    """xcr0run with its compiled core and with its Python loop: exit status, the
    program's output and the report's run section, per loop."""
    runs = {}
    for loop, env in (("core", {}), ("python", PYTHON_LOOP)):
        report = tmp_path / f"{loop}.json"
        result = xcr0run(
            ["-q", "-m", MASK, "--report", str(report), *options, "--", *argv], env=env
        )
        run = json.loads(report.read_text())["run"]
        runs[loop] = (result.returncode, _views(result.stdout) or result.stdout, run, result.stderr)
    return runs


# faulting_self and cpuid_paths run under the core in tests/test_view_holds.py, against
# the program run directly; here each program costs two runs in the emulated guest.
@pytest.mark.parametrize("program", ["threads", "tree", "sigstate", "shell"])
def test_xcr0run_answers_alike_with_either_loop(cbuild, view_prog, tmp_path, program) -> None:
    """The same programs under the supervisor with the core and with the Python loop:
    same exit status, same output, same CPUID traps per leaf, same tree followed."""
    argv = {
        "threads": [view_prog, "-t", "3"],
        "tree": [cbuild("tree.c", "-pthread"), view_prog],
        "sigstate": [cbuild("sigstate_trap.c", "-pthread")],
        "shell": ["sh", "-c", "for i in 1 2 3; do /bin/true; done; exit 3"],
    }[program]
    runs = _under_each_loop(argv, tmp_path)
    core, python = runs["core"], runs["python"]
    assert core[0] == python[0], (core[3], python[3])
    assert core[1] == python[1]
    keys = ("exit_code", "signal", "processes", "threads", "execs", "cpuid_leaves")
    assert {k: core[2][k] for k in keys} == {k: python[2][k] for k in keys}
    assert core[2]["cpuid_traps"] > 0
    # The first run really was the core's: the library the session built loads (a
    # missing one would make both runs the Python loop's and this test pass unseen).
    from xcr0run import _core

    assert _core.status()[0], _core.status()[1]

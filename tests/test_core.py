"""The compiled core without CPUID faulting: building it, its tables and decoder, and
following real program trees (fork, vfork, clone, exec, arch_prctl calls injected at
each exec) against today's Python loop. The trapping half is tests/test_core_faulting.py.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import CORE_LIBRARY, ROOT
from xcr0run import _native, cpuid

pytestmark = pytest.mark.skipif(CORE_LIBRARY is None, reason="no gcc: the core is not built")

DRIVER = str(ROOT / "tests" / "core_driver.py")
UNASSIGNED_ARCH_PRCTL = 0x1030  # EINVAL on every kernel (kernel-notes.md)


def drive(engine: str, argv: list[str], *options: str, tmp: Path) -> tuple[dict[str, Any], str]:
    """Run argv under tests/core_driver.py: (its report, the program's stdout)."""
    report = tmp / f"report-{engine}-{time.monotonic_ns()}.json"
    result = subprocess.run(
        [
            sys.executable,
            DRIVER,
            "--engine",
            engine,
            *options,
            "--report",
            str(report),
            "--",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.exists(), result.stderr
    return json.loads(report.read_text()), result.stdout


# -- building ----------------------------------------------------------------------------


def _build_with_setup_py(out: Path, cc: str | None = None) -> None:
    """setup.py's own extension definition, built as `pip install .` builds it."""
    code = f"""
import os, runpy
from setuptools.dist import Distribution
if {cc!r}:
    os.environ["CC"] = {cc!r}
ns = runpy.run_path("setup.py", run_name="build-test")
dist = Distribution({{"ext_modules": [ns["CORE"]], "cmdclass": {{"build_ext": ns["BuildCore"]}}}})
command = dist.get_command_obj("build_ext")
command.build_lib, command.build_temp = {str(out)!r}, {str(out / "tmp")!r}
dist.run_command("build_ext")
"""
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)


def test_setup_py_builds_a_library_ctypes_loads(tmp_path) -> None:
    _build_with_setup_py(tmp_path)
    library = tmp_path / "xcr0run" / "libxcr0run_core.so"
    code = (
        "import sys; from xcr0run import _core; ok, detail = _core.status(); "
        "print(ok, _core.Core(1).tracee_count(), detail)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "XCR0RUN_CORE_LIBRARY": str(library)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("True 0 compiled core") and str(library) in out


def test_without_a_compiler_the_build_goes_on_and_the_python_loop_is_named(tmp_path) -> None:
    _build_with_setup_py(tmp_path, cc=str(tmp_path / "no-such-cc"))
    assert not list(tmp_path.rglob("*.so"))
    code = "from xcr0run import _core; print(_core.status())"
    env = {**os.environ, "XCR0RUN_CORE_LIBRARY": str(tmp_path / "absent.so")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    ).stdout
    assert out.startswith("(False, 'Python loop (no usable compiled core:")


# -- the decoder and the tables ------------------------------------------------------------


@pytest.mark.parametrize(
    "code,is64,length",
    [
        ("0fa2", True, 2),
        ("660fa2", True, 3),
        ("f3480fa2", True, 4),
        ("48660fa2", True, 4),  # a REX before a legacy prefix is ignored, not an error
        ("480fa2", False, 0),  # 48 is `dec eax` in 32-bit code
        ("66" * 13 + "0fa2", True, 15),
        ("66" * 14 + "0fa2", True, 0),  # 16 bytes: #GP, not a CPUID to answer
        ("f00fa2", True, 0),  # LOCK CPUID is #UD
        ("0f05", True, 0),
        ("6666", True, -1),  # all prefix so far: more bytes needed
    ],
)
def test_decoder_knows_the_cpuid_encodings(code: str, is64: bool, length: int) -> None:
    from xcr0run import _core

    raw = bytes.fromhex(code)
    assert _core.insn_length(raw, is64) == length
    assert cpuid.cpuid_instruction_length(raw, is64) == length


PREFIXISH = st.sampled_from([0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF2, 0xF3, 0x48])


@given(
    st.lists(st.one_of(PREFIXISH, st.integers(0, 255)), max_size=18).map(bytes),
    st.booleans(),
)
def test_decoder_agrees_with_the_python_twin(code: bytes, is64: bool) -> None:
    from xcr0run import _core

    assert _core.insn_length(code, is64) == cpuid.cpuid_instruction_length(code, is64)


def test_leaves_that_ignore_ecx_are_looked_up_as_subleaf_0() -> None:
    from xcr0run import _core

    with _core.Core(1) as core:
        core.set_ignores_ecx(cpuid.ECX_IGNORED_LEAVES)
        core.put_answer(1, 0xDEADBEEF, (1, 2, 3, 4))  # stored under (1, 0)
        core.put_answer(7, 0, (5, 6, 7, 8))
        core.put_answer(0x40000001, 3, (9, 9, 9, 9))
        assert core.lookup(1, 0) == core.lookup(1, 12345) == (1, 2, 3, 4)
        assert core.lookup(7, 0) == (5, 6, 7, 8) and core.lookup(7, 1) is None
        assert core.lookup(0x40000001, 3) == (9, 9, 9, 9) and core.lookup(0x40000001, 0) is None
        with pytest.raises(OSError) as err:
            core.set_ignores_ecx([0x20000000])  # outside the ranges the core keeps
        assert err.value.errno == errno.EINVAL


def test_per_cpu_answers_collapse_when_every_cpu_agrees() -> None:
    from xcr0run import _core

    with _core.Core(4) as core:
        for cpu in range(4):
            core.put_cpu_answer(cpu, 4, 1, (0x121, 0x1C0003F, 0x3F, 0))  # a cache: alike
            core.put_cpu_answer(cpu, 0xB, 0, (1, 2, 0x100, cpu * 2))  # x2APIC IDs differ
        assert core.lookup(4, 1) == (0x121, 0x1C0003F, 0x3F, 0)
        assert core.lookup(0xB, 0) is None  # no CPU named: not one answer for all
        assert core.lookup(0xB, 0, cpu=3) == (1, 2, 0x100, 6)
        with pytest.raises(OSError):
            core.put_cpu_answer(4, 1, 0, (0, 0, 0, 0))


# -- following trees without trapping ------------------------------------------------------------


@pytest.fixture(scope="module")
def view_prog(cbuild) -> str:
    return cbuild("cpuid_view.c", "-pthread")


def _outcome(report: dict[str, Any]) -> tuple[Any, ...]:
    keys = ("exit_code", "signal", "execs", "processes", "threads")
    return tuple(report[k] for k in keys)


@pytest.mark.parametrize(
    "program", ["tree", "clone_process", "shell"], ids=["tree", "clone-process", "shell"]
)
def test_core_follows_trees_as_the_python_loop_does(cbuild, view_prog, tmp_path, program) -> None:
    """fork, vfork, threads, a non-leader exec, a clone() process: same exit status and
    the same processes, threads and execs counted, from the core's events alone."""
    argv = {
        "tree": [cbuild("tree.c", "-pthread"), view_prog],
        "clone_process": [cbuild("clone_process.c")],
        "shell": ["sh", "-c", "for i in 1 2 3; do /bin/true; done; exit 3"],
    }[program]
    core, core_out = drive("core", argv, "--no-trap", tmp=tmp_path)
    python, python_out = drive("python", argv, "--no-trap", tmp=tmp_path)
    assert _outcome(core) == _outcome(python)
    assert core_out.count("view ") == python_out.count("view ")
    assert core["returns"].get("ERROR") is None and core["stats"]["answered"] == 0
    if program == "tree":
        # 8 spinners + the thread that execs + one in `cpuid_view -t 1`; the tree's own
        # exec and three more, one of them from a non-leader thread
        assert core["events"]["CLONE_THREAD"] == 10 and core["execs"] == 4
    if program == "clone_process":
        assert core["events"] == {"CLONE_PROCESS": 1, "EXEC": 2}


def test_arch_prctl_calls_run_at_each_exec_in_one_stop_each(tmp_path) -> None:
    """After-exec calls cost one stop each (the int3 after the call), on top of the exec
    event; the program then runs from its untouched first instruction."""
    argv = ["sh", "-c", "/bin/true; /bin/true; echo ran"]
    calls = {
        0: [],
        1: ["--call", f"{_native.ARCH_GET_CPUID}:0:required"],
        2: [
            "--call",
            f"{_native.ARCH_GET_CPUID}:0:required",
            "--call",
            f"{UNASSIGNED_ARCH_PRCTL}:0:optional",
        ],
    }
    reports = {}
    for n_calls, options in calls.items():
        reports[n_calls], out = drive("core", argv, "--no-trap", *options, tmp=tmp_path)
        assert out == "ran\n" and reports[n_calls]["exit_code"] == 0
    execs = reports[0]["execs"]
    assert execs == 3
    assert reports[1]["stats"]["stops"] - reports[0]["stats"]["stops"] == execs
    assert reports[2]["stats"]["stops"] - reports[1]["stats"]["stops"] == execs
    assert reports[2]["stats"]["arms"] == execs
    # The optional call failed in every image, and said so with its errno.
    failed = reports[2]["failed_calls"]
    assert len(failed) == execs
    assert {(code, result) for _, code, result in failed} == {
        (UNASSIGNED_ARCH_PRCTL, -errno.EINVAL)
    }


def test_a_required_call_that_fails_stops_the_program_before_it_runs(tmp_path) -> None:
    argv = ["sh", "-c", "echo should-not-run"]
    report, out = drive(
        "core", argv, "--no-trap", "--call", f"{UNASSIGNED_ARCH_PRCTL}:0:required", tmp=tmp_path
    )
    assert out == ""
    assert report["arm_failed"] == {"code": UNASSIGNED_ARCH_PRCTL, "result": -errno.EINVAL}
    assert report["signal"] == signal.SIGKILL  # the driver's policy: kill it


# -- run() coming back to Python -----------------------------------------------------------------


def _seized_sleeper(core: Any, *prefix: str) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            os.kill(os.getpid(), signal.SIGSTOP)
            os.execvp(prefix[0] if prefix else "sleep", [*prefix, "sleep", "5"])
        finally:
            os._exit(127)
    os.waitpid(pid, os.WUNTRACED)
    core.set_options(_native.PTRACE_O_TRACEEXEC | _native.PTRACE_O_EXITKILL)
    core.seize(pid)
    os.kill(pid, signal.SIGCONT)
    return pid


def _finish(core: Any, pid: int) -> None:
    from xcr0run import _core

    os.kill(pid, signal.SIGKILL)
    while core.run().reason != _core.Reason.NO_TRACEES:
        pass


def test_run_returns_after_its_timeout_while_the_program_sleeps() -> None:
    from xcr0run import _core

    wake = signal.SIGRTMIN + 6
    before = signal.getsignal(wake)
    with _core.Core(os.cpu_count() or 1, wake_signal=wake) as core:
        pid = _seized_sleeper(core)
        reasons: list[int] = []
        start = time.monotonic()
        while len(reasons) < 2 or reasons[-1] != _core.Reason.WOKEN:
            stop = core.run(timeout=0.1)
            reasons.append(stop.reason)
            if stop.reason == _core.Reason.STATUS:  # the SIGCONT, the exec's SIGTRAP-less stops
                _native.ptrace_cont(stop.tid, os.WSTOPSIG(stop.status) & 0x7F)
        assert time.monotonic() - start < 3
        core.request_return()  # a request made before run() is seen at once
        assert core.run().reason == _core.Reason.WOKEN
        _finish(core, pid)
    assert signal.getsignal(wake) == before  # the handler is given back


def test_run_returns_eintr_so_pythons_signal_handlers_run() -> None:
    from xcr0run import _core

    seen = []
    previous = signal.signal(signal.SIGALRM, lambda s, _f: seen.append(s))
    try:
        with _core.Core(os.cpu_count() or 1) as core:
            pid = _seized_sleeper(core)
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            while (stop := core.run()).reason == _core.Reason.STATUS:
                _native.ptrace_cont(stop.tid, 0)
            assert stop.reason == _core.Reason.EINTR and seen == [signal.SIGALRM]
            _finish(core, pid)
    finally:
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
@pytest.mark.parametrize("rseq", ["1", "0"], ids=["rseq", "no-rseq"])
def test_the_cpu_of_a_stopped_thread_is_known_without_proc(rseq: str) -> None:
    """Through its rseq area where glibc registered one, else through its affinity."""
    from xcr0run import _core

    cpu = max(os.sched_getaffinity(0))
    os.environ["GLIBC_TUNABLES"] = f"glibc.pthread.rseq={rseq}"
    try:
        with _core.Core(cpu + 1) as core:
            core.set_stop_at_exec(True)
            pid = _seized_sleeper(core, "taskset", "-c", str(cpu))
            execs = 0
            while execs < 2:  # taskset, then sleep
                stop = core.run()
                execs += stop.reason == _core.Reason.EXEC
                _native.ptrace_cont(stop.tid, 0)
            time.sleep(0.3)  # let sleep register rseq and reach nanosleep
            _native.ptrace_interrupt(pid)
            stop = core.run()
            assert stop.status >> 16 == _native.PTRACE_EVENT_STOP
            assert core.thread_cpu(pid) == cpu
            _finish(core, pid)
    finally:
        del os.environ["GLIBC_TUNABLES"]


def test_flags_are_inherited_by_children(view_prog) -> None:
    """A tracee added without the answer flag passes it (cleared) to its threads; the
    core's default for unknown tids does not override that. Seen at each thread's exit
    event, while the core still follows it."""
    from xcr0run import _core

    with _core.Core(os.cpu_count() or 1, default_flags=_core.ANSWER) as core:
        pid = os.fork()
        if pid == 0:
            os.kill(os.getpid(), signal.SIGSTOP)
            os.execv(view_prog, [view_prog, "-t", "2"])
        os.waitpid(pid, os.WUNTRACED)
        options = _native.PTRACE_O_TRACECLONE | _native.PTRACE_O_TRACEEXIT
        core.set_options(options | _native.PTRACE_O_EXITKILL)
        core.seize(pid, 0)
        os.kill(pid, signal.SIGCONT)
        children, exiting = set(), {}
        while (stop := core.run()).reason != _core.Reason.NO_TRACEES:
            children |= {event.other for event in core.take_events()}
            status = stop.status
            if os.WIFSTOPPED(status):
                sig = os.WSTOPSIG(status)
                if status >> 16 == _native.PTRACE_EVENT_EXIT:
                    exiting[stop.tid] = core.flags(stop.tid)
                _native.ptrace_cont(stop.tid, 0 if sig in (signal.SIGTRAP, signal.SIGCONT) else sig)
        assert len(children) == 2
        assert exiting == dict.fromkeys({pid, *children}, 0)


@pytest.mark.parametrize("program", ["tree", "shell"])
def test_xcr0run_follows_a_tree_alike_with_either_loop(
    cbuild, view_prog, tmp_path, program
) -> None:
    """xcr0run itself, following without trapping (any machine): with the compiled core
    and with the Python loop that stands in where it is not built, the same tree."""
    from tests.conftest import xcr0run

    argv = {
        "tree": [cbuild("tree.c", "-pthread"), view_prog],
        "shell": ["sh", "-c", "/bin/true; /bin/true; exit 3"],
    }[program]
    runs = []
    for env in ({}, {"XCR0RUN_CORE_LIBRARY": str(tmp_path / "missing.so")}):
        report = tmp_path / "report.json"
        options = ["-q", "-m", "host", "--audit", "--report", str(report)]
        result = xcr0run([*options, "--", *argv], env=env)
        run = json.loads(report.read_text())["run"]
        keys = ("exit_code", "processes", "threads", "execs")
        runs.append((result.returncode, {k: run[k] for k in keys}, result.stdout.count("view ")))
    assert runs[0] == runs[1]
    assert runs[0][0] == (3 if program == "shell" else 0)
    assert runs[0][1]["execs"] >= (4 if program == "tree" else 3)


def test_show_names_the_stop_loop_in_use(tmp_path) -> None:
    from tests.conftest import xcr0run

    loops = []
    for env in ({}, {"XCR0RUN_CORE_LIBRARY": str(tmp_path / "missing.so")}):
        result = xcr0run(["--show", "--json"], env=env, check=True)
        loops.append(json.loads(result.stdout)["stop_loop"])
    assert loops[0]["compiled_core"] and loops[0]["detail"].startswith("compiled core")
    assert not loops[1]["compiled_core"]
    assert loops[1]["detail"].startswith("Python loop (no usable compiled core")
    assert "Stop loop" in xcr0run(["--show"], check=True).stdout

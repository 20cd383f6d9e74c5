"""Running programs under a masked view with CPUID faulting: the real kernel, real
ptrace, real faulting. On a CPU without faulting these run inside a TCG guest
(tests/test_guest.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from tests.conftest import xcr0run
from xcr0run import features, host, masks
from xcr0run.view import CpuidView

pytestmark = pytest.mark.faulting

XCR0 = host.xcr0()
HAS_AVX = bool(XCR0 & 0b100)
HAS_AVX512 = bool(XCR0 & 0xE0)
# The mask each test uses: the biggest step down this machine allows.
MASK = "no-avx512" if HAS_AVX512 else "no-avx" if HAS_AVX else "host"


def _views(text: str) -> list[dict[str, int]]:
    out = []
    for line in text.splitlines():
        if line.startswith("view "):
            out.append({k: int(v, 0) for k, v in re.findall(r"(\w+)=(\S+)", line)})
    return out


def _expected(mask_text: str, native: dict[str, int]) -> dict[str, int]:
    view = CpuidView.build(masks.parse_mask(mask_text, XCR0), XCR0)
    l1 = view.answer(1, 0, (0, 0, native["l1c"], native["l1d"]))
    l7 = view.answer(7, 0, (0, native["l7b"], native["l7c"], native["l7d"]))
    l71 = view.answer(7, 1, (native["l71a"], 0, 0, 0))
    d0 = view.answer(0xD, 0, (native["d0a"], native["d0b"], 0, 0))
    return {
        "l1c": l1[2],
        "l1d": l1[3],
        "l7b": l7[1],
        "l7c": l7[2],
        "l7d": l7[3],
        "l71a": l71[0],
        "d0a": d0[0],
        "d0b": d0[1],
        "xcr0": native["xcr0"],
    }


def _check(lines: list[dict[str, int]], expected: dict[str, int]) -> None:
    assert lines
    for line in lines:
        for k, v in expected.items():
            assert line[k] == v, (k, hex(line[k]), hex(v))
        assert line["cpuid_allowed"] == 1  # as natively: the faulting is ours, not its


@pytest.fixture(scope="module")
def view_prog(cbuild) -> str:
    return cbuild("cpuid_view.c", "-pthread")


@pytest.fixture(scope="module")
def native(view_prog) -> dict[str, int]:
    return _views(subprocess.run([view_prog], capture_output=True, text=True).stdout)[0]


@pytest.mark.parametrize("mask", sorted({MASK, "x87,sse", "-avx"} if HAS_AVX else {MASK}))
def test_every_thread_sees_the_masked_view(view_prog, native, mask: str) -> None:
    result = xcr0run(["-q", "-m", mask, "--", view_prog, "-t", "3"])
    assert result.returncode == 0, result.stderr
    lines = _views(result.stdout)
    assert len(lines) == 4
    _check(lines, _expected(mask, native))


def test_masked_bits_are_really_gone(view_prog) -> None:
    if not HAS_AVX:
        pytest.skip("this CPU has no AVX to hide")
    lines = _views(xcr0run(["-q", "-m", "x87,sse", "--", view_prog]).stdout)
    avx, avx2 = features.feature("avx"), features.feature("avx2")
    assert not lines[0]["l1c"] >> avx.bit & 1
    assert not lines[0]["l7b"] >> avx2.bit & 1
    assert lines[0]["xcr0"] == XCR0  # honest: the hardware XCR0 is unchanged


def test_fork_vfork_and_exec_from_a_thread_are_followed(cbuild, view_prog, native, tmp_path):
    report = tmp_path / "report.json"
    result = xcr0run(
        ["-q", "--report", str(report), "-m", MASK, "--", cbuild("tree.c", "-pthread"), view_prog]
    )
    assert result.returncode == 0, result.stderr
    lines = _views(result.stdout)
    assert len(lines) == 4  # fork child + its thread, vfork+exec, exec from a thread
    _check(lines, _expected(MASK, native))
    run = json.loads(report.read_text())["run"]
    assert run["processes"] >= 4 and run["threads"] >= 10 and run["execs"] >= 4
    assert run["cpuid_traps"] >= 8 * 200
    assert run["exit_code"] == 0


def test_exit_status_passes_through() -> None:
    assert xcr0run(["-q", "-m", MASK, "--", "sh", "-c", "exit 3"]).returncode == 3


@pytest.mark.parametrize(("how", "sig"), [("segv", signal.SIGSEGV), ("gp", signal.SIGSEGV)])
def test_genuine_faults_still_kill(cbuild, how: str, sig: int) -> None:
    result = xcr0run(["-q", "-m", MASK, "--", cbuild("faults.c"), how])
    assert result.returncode == -sig


def test_a_shell_sees_139_for_a_segfault(cbuild) -> None:
    prog = cbuild("faults.c")
    out = subprocess.run(
        ["sh", "-c", f"{sys.executable} -m xcr0run -q -m {MASK} -- {prog} segv; echo $?"],
        capture_output=True,
        text=True,
    ).stdout
    assert out.strip().endswith("139")


def test_programs_with_their_own_segv_handler_run(cbuild) -> None:
    result = xcr0run(["-q", "-m", MASK, "--", cbuild("faults.c"), "handled"])
    assert result.returncode == 0 and result.stdout == "caught 3\n"


def _started(command: str, **popen: object) -> subprocess.Popen[str]:
    """xcr0run running `command` under the mask, once the program has printed "ready"
    (so xcr0run's own start-up, slow in an emulated guest, is over)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "xcr0run", "-q", "-m", MASK, "--", "sh", "-c", command],
        stdout=subprocess.PIPE,
        text=True,
        **popen,  # type: ignore[call-overload]
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def test_sigterm_to_xcr0run_reaches_the_program() -> None:
    proc = _started("trap 'exit 42' TERM; echo ready; while :; do sleep 0.05; done")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 42


def test_sigint_to_the_process_group_kills_program_and_launcher() -> None:
    proc = _started("echo ready; exec sleep 30", start_new_session=True)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == -signal.SIGINT


def test_pipelines_stdin_and_sigpipe() -> None:
    run = f"{sys.executable} -m xcr0run -q --no-audit -m {MASK} --"
    out = subprocess.run(
        ["sh", "-c", f"seq 2000 | {run} sort -rn | {run} head -1; {run} yes | head -2"],
        capture_output=True,
        text=True,
        timeout=300,  # five start-ups, each slow in an emulated guest
    )
    assert out.stdout == "2000\ny\ny\n"
    assert out.stderr == ""


def test_lazy_binding_with_live_vector_arguments(cbuild) -> None:
    """glibc's resolver sizes its XSAVEC area from leaf 0xD: hiding features must not
    shrink it while the hardware still saves that state."""
    width = 512 if HAS_AVX512 else 256
    if not HAS_AVX:
        pytest.skip("this CPU has no AVX")
    mask = "no-avx512" if width == 512 else "x87,sse"
    result = xcr0run(["-q", "-m", mask, "--", cbuild.lazy(width)], env={"LD_BIND_NOW": ""})
    assert result.stdout == "lazy ok 400\n", result.stderr
    assert result.returncode == 0


def _ldso_levels(args: list[str]) -> set[str]:
    out = subprocess.run(
        [*args, "/lib64/ld-linux-x86-64.so.2", "--help"], capture_output=True, text=True
    ).stdout
    return {m for m in re.findall(r"(x86-64-v\d) \(supported", out)}


def test_glibc_loader_agrees(tmp_path) -> None:
    native = _ldso_levels([])
    if not native:
        pytest.skip("glibc's loader does not list ISA levels here")
    launcher = [sys.executable, "-m", "xcr0run", "-q", "--force", "-m"]
    if HAS_AVX512:
        assert "x86-64-v4" in native
        assert _ldso_levels([*launcher, "no-avx512", "--"]) == native - {"x86-64-v4"}
    if HAS_AVX:
        assert _ldso_levels([*launcher, "x87,sse", "--"]) == native - {"x86-64-v3", "x86-64-v4"}


def test_gcc_march_native_follows_the_view() -> None:
    def enabled(prefix: list[str]) -> set[str]:
        out = subprocess.run(
            [*prefix, "gcc", "-march=native", "-Q", "--help=target"], capture_output=True, text=True
        ).stdout
        return {m.group(1) for m in re.finditer(r"^\s+-m(\S+)\s+\[enabled\]", out, re.M)}

    native = enabled([])
    run = [sys.executable, "-m", "xcr0run", "-q", "-m"]
    if HAS_AVX512:
        masked = enabled([*run, "no-avx512", "--"])
        assert "avx512f" in native and not {f for f in masked if f.startswith("avx512")}
        assert "avx2" in masked
    if HAS_AVX:
        masked = enabled([*run, "x87,sse", "--"])
        assert "avx" in native and not {"avx", "avx2", "fma", "f16c"} & masked
        assert "sse4.2" in masked or "sse4_2" in masked or "sse4.2" not in native


def test_python_runs_and_nested_show_reports_the_view() -> None:
    result = xcr0run(["-q", "-m", MASK, "--", sys.executable, "-m", "xcr0run", "--show", "--json"])
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    # The program cannot tell it is trapped: ARCH_GET_CPUID answers as without xcr0run
    # (`--show -p PID` from outside says who traces it).
    assert shown["cpuid_faulting"]["enabled"] is False
    assert shown["cpuid_faulting"]["supported"] is True
    assert shown["xcr0"] == f"{XCR0:#x}"


def test_banner_says_how_and_what_not(view_prog) -> None:
    result = xcr0run(["-m", MASK, "--", view_prog])
    if MASK == "host":
        pytest.skip("nothing to hide on this CPU")
    assert "xcr0run: cpuid: hardware XCR0 unchanged" in result.stderr
    assert "not hidden: xgetbv(0) still returns" in result.stderr


def test_audit_catches_hidden_state_used_anyway(cbuild) -> None:
    """A program that uses vector state without asking CPUID is caught, and attributed."""
    if not HAS_AVX:
        pytest.skip("this CPU has no AVX")
    kind, mask = ("zmm", "no-avx512") if HAS_AVX512 else ("avx", "x87,sse")
    touch = cbuild("touch.c", "-pthread", "-mavx512f" if HAS_AVX512 else "-mavx")
    result = xcr0run(["-q", "--strict", "-m", mask, "--", touch, kind, "0"])
    toucher = result.stdout.split()[0].split("=")[1]
    assert result.returncode == 124
    assert f"tid {toucher} (touch" in result.stderr and "used hidden" in result.stderr
    tracks = subprocess.run([cbuild("inittrack.c", "-mavx")], capture_output=True, text=True)
    if tracks.stdout.strip() != "tracks":
        pytest.skip(
            "this (emulated) CPU reports every enabled XSAVE component as in use, so a "
            "clean program cannot be told apart (the violation above was still caught)"
        )
    clean = xcr0run(["--strict", "-m", mask, "--", touch, "sse", "0"])
    assert clean.returncode == 0
    assert "audit: no hidden state seen" in clean.stderr


def test_a_profile_is_what_the_program_sees(view_prog, native) -> None:
    """--profile: the program sees the profile's vendor and family and only features the
    profile has; here a psABI-level profile and a CPU-generation one. Neither takes
    long mode or NX away from a 64-bit program (both profiles have them)."""
    lm, nx = features.feature("lm").bit, features.feature("nx").bit
    result = xcr0run(["-q", "--force", "--profile", "x86-64-v2", "--", view_prog])
    assert result.returncode == 0, result.stderr
    (line,) = _views(result.stdout)
    assert not line["l7b"] >> features.feature("avx2").bit & 1
    assert not line["l1c"] >> features.feature("avx").bit & 1
    assert line["l1c"] >> features.feature("sse4_2").bit & 1 == native["l1c"] >> 20 & 1
    assert line["e1d"] >> lm & 1 and line["e1d"] >> nx & 1 == native["e1d"] >> nx & 1
    haswell = xcr0run(["-q", "--force", "--profile", "haswell", "--", view_prog])
    (line,) = _views(haswell.stdout)
    vendor = b"".join(line[r].to_bytes(4, "little") for r in ("l0b", "l0d", "l0c"))
    assert vendor == b"GenuineIntel"
    assert line["l1a"] & 0x0FFF3FFF == 0x306C3
    assert line["e1d"] >> lm & 1 and line["e1d"] >> nx & 1 == native["e1d"] >> nx & 1


def test_level_under_the_cpuid_mechanism_agrees_with_glibc() -> None:
    native = _ldso_levels([])
    if "x86-64-v3" not in native:
        pytest.skip("this CPU does not reach x86-64-v3")
    run = [sys.executable, "-m", "xcr0run", "-q", "--level", "x86-64-v2", "--"]
    assert _ldso_levels(run) == {"x86-64-v2"} & native

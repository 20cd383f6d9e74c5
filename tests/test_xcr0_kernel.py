"""The kernel path for real: ARCH_SET_XCR0 from tests/kernel/arch-set-xcr0.patch.

No released kernel has it, so the tests marked `xcr0_kernel` run where the probe finds it
and skip elsewhere; test_xcr0_kernel_tests_pass_in_the_test_kernel (unmarked) boots the
test kernel under QEMU TCG with this machine's root (tests/guest/run_in_guest.py
--xcr0-kernel) and runs them there. TCG emulates XSAVE, XGETBV/XSETBV, AVX and AVX2 and
raises #UD for AVX when XCR0 lacks it; it has no AVX-512, so the masks here drop AVX.
"""

from __future__ import annotations

import errno
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import finished_tests, run_marked_in_guest, xcr0run

ROOT = Path(__file__).parent.parent
LOG = ROOT / "tests" / "guest" / "last-xcr0-kernel-run.log"
SET, GET = 0x1014, 0x1013  # ARCH_SET_XCR0, ARCH_GET_XCR0 of the patch


def _host_xcr0() -> int:
    from xcr0run import host

    return host.xcr0()


def _has_set_xcr0() -> str | None:
    from xcr0run import host

    probe = host.probe_xcr0_prctl(SET, host.xcr0())
    return None if probe.available else probe.detail


SET_XCR0_MISSING = _has_set_xcr0()
in_test_kernel = pytest.mark.skipif(
    SET_XCR0_MISSING is not None,
    reason=f"{SET_XCR0_MISSING}; test_xcr0_kernel_tests_pass_in_the_test_kernel runs these "
    "in a guest booted with tests/kernel/arch-set-xcr0.patch",
)
marked = [pytest.mark.xcr0_kernel, in_test_kernel]


def _fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", line))


def _lines(out: str, prefix: str) -> list[dict[str, str]]:
    return [_fields(line) for line in out.splitlines() if line.startswith(prefix + " ")]


def _kernel(*args: str, mask: str = "x87,sse", extra: tuple[str, ...] = ()):
    return xcr0run(["--method", "kernel", "-q", *extra, "-m", mask, "--", *args])


# -- the program sees XCR0 = x87|SSE everywhere ------------------------------------------


@pytest.mark.xcr0_kernel
@in_test_kernel
@pytest.mark.parametrize("how", ["show", "threads", "fork", "exec"])
def test_xgetbv_reads_the_mask_in_program_threads_children_and_execs(cbuild, how) -> None:
    prog = cbuild("xcr0_facts.c", "-pthread")
    args = [prog, how, *(["3"] if how == "exec" else [])]
    result = _kernel(*args)
    assert result.returncode == 0, result.stderr
    seen = [_fields(line) for line in result.stdout.splitlines()]
    expected = {"show": 1, "threads": 3, "fork": 2, "exec": 1}[how]
    assert len(seen) == expected, result.stdout
    for fields in seen:
        assert fields["xcr0"] == "0x3", result.stdout
        assert fields["osxsave"] == "1"
    # Outside xcr0run the same program sees the host's value: the change is per process tree.
    plain = subprocess.run([prog, "show"], capture_output=True, text=True, check=True)
    assert _fields(plain.stdout)["xcr0"] == f"{_host_xcr0():#x}"


@pytest.mark.xcr0_kernel
@in_test_kernel
def test_kernel_getter_agrees(cbuild) -> None:
    prog = cbuild("xcr0_facts.c", "-pthread")
    result = _kernel(prog, "getxcr0", hex(GET))
    assert _fields(result.stdout) == {"rc": "0x3", "errno": "0", "xgetbv": "0x3"}


@pytest.mark.xcr0_kernel
@in_test_kernel
def test_an_avx_instruction_raises_sigill(cbuild) -> None:
    prog = cbuild("xcr0_facts.c", "-pthread")
    result = _kernel(prog, "avx")
    assert result.returncode == -signal.SIGILL, (result.returncode, result.stdout)
    assert "avx ran" not in result.stdout
    # The same instruction runs with AVX enabled (TCG has AVX).
    assert _kernel(prog, "avx", mask="x87,sse,avx").returncode == 0


@pytest.mark.xcr0_kernel
@in_test_kernel
def test_xsave_writes_only_the_enabled_components(cbuild) -> None:
    prog = cbuild("xcr0_facts.c", "-pthread")
    (facts,) = _lines(_kernel(prog, "xsave").stdout, "xsave")
    assert int(facts["xstate_bv"], 16) & ~0x3 == 0
    assert facts["size_enabled"] == "576"  # legacy area + header: x87 and SSE only
    beyond_untouched, beyond = facts["untouched_beyond"].split("/")
    assert beyond_untouched == beyond
    ymm_untouched, ymm_size = facts["ymm_untouched"].split("/")
    assert ymm_untouched == ymm_size == "256"


@pytest.mark.xcr0_kernel
@in_test_kernel
def test_leaf_0xd_sizes_follow_xcr0(cbuild) -> None:
    prog = cbuild("xcr0_facts.c", "-pthread")
    sizes = {}
    for mask in ("x87,sse", "x87,sse,avx"):
        (facts,) = _lines(_kernel(prog, "show", mask=mask).stdout, "main")
        sizes[mask] = int(facts["size_enabled"])
        assert int(facts["size_max"]) >= sizes[mask]
    assert sizes == {"x87,sse": 576, "x87,sse,avx": 832}


@pytest.mark.xcr0_kernel
@in_test_kernel
def test_signal_frames_and_ptrace_show_the_threads_xcr0(cbuild) -> None:
    prog = cbuild("xcr0_facts.c", "-pthread")
    out = _kernel(prog, "sigframe").stdout
    (frame,) = _lines(out, "sigframe")
    assert frame["magic1"] == "0x46505853"
    assert frame["xfeatures"] == "0x3"
    assert int(frame["xstate_bv"], 16) & ~0x3 == 0
    assert _lines(out, "after-signal")[0]["xcr0"] == "0x3"  # sigreturn kept it
    out = _kernel(prog, "ptrace").stdout
    (regset,) = _lines(out, "ptrace")
    assert regset["xcr0"] == "0x3"  # NT_X86_XSTATE byte 464
    assert int(regset["xstate_bv"], 16) & ~0x3 == 0
    assert "ptrace_set avx rc=-1 errno=22" in out  # EINVAL: AVX is not enabled


@pytest.mark.xcr0_kernel
@in_test_kernel
def test_threads_with_different_xcr0_share_the_cpus(cbuild) -> None:
    """The per-CPU cache of the loaded XCR0 must follow every switch between threads."""
    prog = cbuild("xcr0_facts.c", "-pthread")
    result = subprocess.run(
        [prog, "mixed", hex(SET), "0x3", "20000"], capture_output=True, text=True, timeout=300
    )
    (facts,) = _lines(result.stdout, "mixed")
    assert facts["rc"] == "0"
    assert facts["thread_bad"] == facts["main_bad"] == "0", result.stdout
    assert facts["after"] == f"{_host_xcr0():#x}"


# -- what programs and glibc do with it ---------------------------------------------------


def _hwcaps(out: str) -> dict[str, bool]:
    """`ld.so --help`: glibc-hwcaps levels and whether this CPU (as glibc sees it) has them."""
    return {
        m.group(1): "supported" in m.group(2)
        for m in re.finditer(r"^\s+(x86-64-v\d)(.*)$", out, re.MULTILINE)
    }


@pytest.mark.xcr0_kernel
@in_test_kernel
def test_glibc_loader_takes_non_avx_code() -> None:
    loader = "/lib64/ld-linux-x86-64.so.2"
    plain = _hwcaps(subprocess.run([loader, "--help"], capture_output=True, text=True).stdout)
    if not plain:
        pytest.skip("this glibc's loader does not list ISA levels (glibc < 2.33)")
    masked = _hwcaps(_kernel(loader, "--help").stdout)
    assert masked["x86-64-v2"] and not masked["x86-64-v3"] and not masked["x86-64-v4"]
    with_avx = _hwcaps(_kernel(loader, "--help", mask="x87,sse,avx").stdout)
    assert with_avx["x86-64-v3"] == plain["x86-64-v3"]


@pytest.mark.xcr0_kernel
@in_test_kernel
def test_400_lazily_bound_calls_keep_live_vector_arguments(cbuild) -> None:
    prog = cbuild.lazy(128)
    result = _kernel(prog)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "lazy ok 400"


# -- xcr0run: auto picks the kernel path, refusals are one line and 125 ---------------------


@pytest.mark.xcr0_kernel
@in_test_kernel
def test_auto_takes_the_kernel_path_and_says_so(cbuild) -> None:
    prog = cbuild("xcr0_facts.c", "-pthread")
    result = xcr0run(["-m", "x87,sse", "--", prog, "show"])
    assert result.returncode == 0, result.stderr
    assert _fields(result.stdout)["xcr0"] == "0x3"
    assert "ARCH_SET_XCR0" in result.stderr and "hardware XCR0 set to 0x3" in result.stderr
    assert re.search(r"^xcr0run: kernel\S*: ", result.stderr, re.MULTILINE), result.stderr
    shown = json.loads(xcr0run(["--show", "--json", "-m", "x87,sse"], check=True).stdout)
    assert shown["arch_set_xcr0"] == {
        "code": hex(SET),
        "available": True,
        "detail": f"arch_prctl({SET:#x}) sets XCR0 per thread",
    }
    assert shown["plan"]["mechanism"].startswith("kernel")
    text = xcr0run(["--show", "-m", "x87,sse"], check=True).stdout
    assert "ARCH_SET_XCR0" in text and "available" in text


@pytest.mark.xcr0_kernel
@in_test_kernel
def test_kernel_refuses_invalid_masks_and_live_state(cbuild) -> None:
    prog = cbuild("xcr0_facts.c", "-pthread")
    host_xcr0 = _host_xcr0()
    for value, why in (
        (0x2, "no x87"),
        (0x5, "AVX without SSE"),
        (host_xcr0 | 0x400, "a supervisor component"),
        (0x3 | 0xE0, "AVX-512 this CPU does not have"),
    ):
        out = subprocess.run([prog, "setxcr0", hex(SET), hex(value)], capture_output=True)
        fields = _fields(out.stdout.decode())
        assert (fields["rc"], fields["errno"]) == ("-1", str(errno.EINVAL)), why
        assert fields["xgetbv"] == f"{host_xcr0:#x}", why
    # Upper YMM halves in use: turning AVX off would lose them.
    out = subprocess.run([prog, "dirty-avx", hex(SET), "0x3"], capture_output=True, text=True)
    assert _fields(out.stdout) == {"rc": str(-errno.EPERM), "xgetbv": f"{host_xcr0:#x}"}
    # Turning components back on needs nothing.
    result = _kernel(prog, "setxcr0", hex(SET), hex(host_xcr0))
    assert _fields(result.stdout) == {"rc": "0", "errno": "0", "xgetbv": f"{host_xcr0:#x}"}


@pytest.mark.xcr0_kernel
@in_test_kernel
def test_xcr0run_refusals_are_one_line_and_125() -> None:
    # The 2020 RFC's code is ARCH_GET_XCOMP_SUPP here: the probe says so, nothing runs.
    result = xcr0run(
        ["--method", "kernel", "--xcr0-prctl", "0x1021", "-m", "x87,sse", "--", "true"]
    )
    assert result.returncode == 125
    assert result.stderr.count("\n") == 1 and "ARCH_GET_XCOMP_SUPP" in result.stderr
    # A mask this CPU cannot have (TCG has no AVX-512): xcr0run's own check, one line.
    result = xcr0run(["--method", "kernel", "-m", "x87,sse,avx,avx512", "--", "true"])
    assert result.returncode == 125 and result.stderr.count("\n") == 1, result.stderr


# -- enabled in CPUID, not by the OS -----------------------------------------------------


@pytest.mark.xcr0_kernel
@in_test_kernel
def test_xcr0_only_crashes_a_program_that_trusts_cpuid(cbuild) -> None:
    prog = cbuild("avx_dispatch.c")
    result = xcr0run(["--xcr0-only", "-m", "x87,sse", "--", prog, "cpuid-only"])
    assert "cpuid avx=1 osxsave=1" in result.stdout  # CPUID still advertises AVX
    assert result.returncode == -signal.SIGILL, (result.returncode, result.stdout)
    assert "enabled in CPUID, not by the OS" in result.stderr
    assert "hidden:" not in result.stderr


@pytest.mark.xcr0_kernel
@in_test_kernel
def test_xcr0_only_leaves_a_correct_program_on_its_fallback(cbuild) -> None:
    prog = cbuild("avx_dispatch.c")
    result = xcr0run(["--xcr0-only", "-q", "-m", "x87,sse", "--", prog, "xcr0"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["cpuid avx=1 osxsave=1", "sse path 72"]
    plain = subprocess.run([prog, "xcr0"], capture_output=True, text=True, check=True)
    assert plain.stdout.splitlines()[-1] == "avx path 72"
    facts = cbuild("xcr0_facts.c", "-pthread")
    (shown,) = _lines(xcr0run(["--xcr0-only", "-q", "-m", "x87,sse", "--", facts]).stdout, "main")
    assert (shown["xcr0"], shown["osxsave"], shown["size_enabled"]) == ("0x3", "1", "576")


# -- the host side: boot the test kernel and run all of the above in it ---------------------


def test_xcr0_kernel_tests_pass_in_the_test_kernel() -> None:
    if SET_XCR0_MISSING is None:
        pytest.skip("this kernel has ARCH_SET_XCR0: the xcr0_kernel tests ran directly")
    from tests.guest import run_in_guest as guest

    reason = guest.xcr0_kernel_available(build=True)
    if reason is not None:
        pytest.skip(f"no test kernel with ARCH_SET_XCR0: {reason}")
    result, tail = run_marked_in_guest(
        "xcr0_kernel", "tests/test_xcr0_kernel.py", LOG, timeout=1800, xcr0_kernel=True
    )
    assert result.returncode == 0, tail
    passed = finished_tests(result.stdout, "PASSED")
    assert len(passed) >= 15, tail
    # In the test kernel nothing may skip.
    assert finished_tests(result.stdout) == passed, tail
    print(
        f"test kernel: {len(passed)} passed in {result.elapsed:.0f} s "
        f"(boot {result.boot_seconds or 0:.1f} s)",
        file=sys.stderr,
    )

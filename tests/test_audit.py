"""Proving use of state: the audit, --expect-used, --show -p, and AMX enforcement.
Auditing needs no CPUID faulting (`--mask host` follows the tree without trapping), so
these run on any machine with the vector extensions they touch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import comm, tracer_of, wait_for, xcr0run
from xcr0run import host, masks, xsave

XCR0 = host.xcr0()
HAS_AVX512 = bool(XCR0 & 0x40)
HAS_AVX = bool(XCR0 & 0x4)
KIND = "zmm" if HAS_AVX512 else "avx" if HAS_AVX else None
# The component only KIND leaves in use (glibc's EVEX string functions use opmask and
# hi16_zmm in every thread, but never the upper halves of ZMM0-15).
COMPONENT = "zmm_hi256" if HAS_AVX512 else "avx"
BIT = xsave.NAMES[COMPONENT]


def _bits(decoded: str | None) -> int:
    return sum(bits for _, bits in masks.parse_components(decoded)) if decoded else 0


needs_vectors = pytest.mark.skipif(KIND is None, reason="this CPU has neither AVX nor AVX-512")


@pytest.fixture(scope="module")
def touch(cbuild) -> str:
    return cbuild("touch.c", "-pthread", "-mavx512f" if HAS_AVX512 else "-mavx")


@needs_vectors
def test_show_pid_attributes_state_to_the_right_thread(touch) -> None:
    proc = subprocess.Popen([touch, KIND, "20"], stdout=subprocess.PIPE, text=True)
    try:
        toucher, idle = (int(x.split("=")[1]) for x in proc.stdout.readline().split())
        data = json.loads(xcr0run(["--show", "-p", str(proc.pid), "--json"], check=True).stdout)
        threads = {t["tid"]: t for t in data["threads"]}
        assert data["comm"].startswith("touch") and not data["under_xcr0run"]
        assert _bits(threads[toucher]["in_use_decoded"]) & BIT
        assert not _bits(threads[idle]["in_use_decoded"]) & BIT
        assert threads[toucher]["xcr0"] == f"{XCR0:#x}"
        # Left as it was: still running, and not traced by anyone.
        assert proc.poll() is None
        with open(f"/proc/{proc.pid}/status") as f:
            assert "TracerPid:\t0" in f.read()
    finally:
        proc.kill()
        proc.wait()


def test_show_pid_errors_are_one_line() -> None:
    result = xcr0run(["--show", "-p", "999999999"])
    assert result.returncode == 125
    assert result.stderr == "xcr0run: no process with pid 999999999\n"
    assert xcr0run(["-p", "1", "--", "true"]).returncode == 125  # --pid without --show


def test_show_pid_recognises_a_program_under_xcr0run() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "xcr0run", "-q", "-m", "host", "--audit", "--", "sleep", "20"]
    )
    try:
        # xcr0run becomes the program: same pid, traced by its helper.
        wait_for(lambda: comm(proc.pid) == "sleep")
        data = json.loads(xcr0run(["--show", "-p", str(proc.pid), "--json"], check=True).stdout)
        assert data["under_xcr0run"] is True and data["tracer"] == tracer_of(proc.pid)
    finally:
        proc.kill()
        proc.wait()


@needs_vectors
def test_expect_used_passes_when_the_fast_path_ran(touch, tmp_path) -> None:
    report = tmp_path / "r.json"
    result = xcr0run(
        [
            "-q",
            "-m",
            "host",
            "--expect-used",
            COMPONENT,
            "--report",
            str(report),
            "--",
            touch,
            KIND,
            "0",
        ]
    )
    assert result.returncode == 0, result.stderr
    audit = json.loads(report.read_text())["audit"]
    toucher = int(result.stdout.split()[0].split("=")[1])
    used = {t["tid"]: t["seen"] for t in audit["threads"]}
    assert _bits(used[toucher]) & BIT


def test_expect_used_fails_when_it_did_not(touch) -> None:
    result = xcr0run(["-q", "-m", "host", "--expect-used", "amx,avx512", "--", touch, "sse", "0"])
    assert result.returncode == 124
    assert "xcr0run: audit: no use of amx" in result.stderr


def test_a_failed_audit_leaves_a_failing_programs_status_alone() -> None:
    result = xcr0run(["-q", "-m", "host", "--expect-used", "amx", "--", "sh", "-c", "exit 3"])
    assert result.returncode == 3
    assert "xcr0run: audit: no use of amx" in result.stderr


def test_expect_used_rejects_unknown_names() -> None:
    result = xcr0run(["-m", "host", "--expect-used", "avx513", "--", "true"])
    assert result.returncode == 125
    assert "did you mean 'avx512'?" in result.stderr


def test_periodic_samples_see_a_long_running_thread(touch) -> None:
    if KIND is None:
        pytest.skip("this CPU has neither AVX nor AVX-512")
    # The toucher only stops at its exit; the interval samples it while it sleeps too.
    result = xcr0run(
        [
            "-q",
            "-m",
            "host",
            "--audit-interval",
            "0.1",
            "--expect-used",
            COMPONENT,
            "--report",
            "/dev/stdout",
            "--",
            touch,
            KIND,
            "1",
        ]
    )
    assert result.returncode == 0, result.stderr
    audit = json.loads(result.stdout.split("\n", 1)[1])["audit"]
    assert audit["samples"] >= 5


# -- AMX ------------------------------------------------------------------------------------

HAS_AMX = host.xcomp().supported is not None and bool((host.xcomp().supported or 0) & (1 << 18))
needs_amx = pytest.mark.skipif(
    not HAS_AMX, reason="this CPU or kernel has no AMX (no tiledata in ARCH_GET_XCOMP_SUPP)"
)


@needs_amx
@pytest.mark.faulting
def test_no_amx_makes_the_permission_request_fail(cbuild) -> None:
    result = xcr0run(["-q", "-m", "no-amx", "--", cbuild("amx.c"), "request"])
    assert result.stdout == "request -1\n"  # EPERM from the filter


@needs_amx
@pytest.mark.faulting
def test_no_amx_tile_use_raises_sigill(cbuild) -> None:
    assert xcr0run(["-q", "-m", "no-amx", "--", cbuild("amx.c"), "tile"]).returncode == -4


@needs_amx
def test_grant_amx_lets_tiles_run_without_asking(cbuild) -> None:
    result = xcr0run(["-q", "-m", "host", "--grant-amx", "--", cbuild("amx.c"), "tile"])
    assert result.returncode == 0 and result.stdout == "tile ok\n"


def test_amx_options_fail_clearly_without_amx() -> None:
    if HAS_AMX:
        pytest.skip("this machine has AMX")
    result = xcr0run(["-m", "host", "--grant-amx", "--", "true"])
    assert result.returncode == 125
    assert result.stderr == "xcr0run: --grant-amx: this CPU and kernel have no AMX\n"


def test_a_clean_audit_is_one_short_line_that_points_at_the_limits() -> None:
    """The method's limits are said once, in the docs; each run says where."""
    from xcr0run.audit import AuditLog

    log = AuditLog(hidden=xsave.NAMES["avx512"])
    log.note(10, 10, xsave.NAMES["sse"], "prog", "/bin/prog")
    (line,) = log.summary()
    assert line.startswith("audit: no hidden state seen in 1 samples")
    assert "man xcr0run, NOTES" in line and len("xcr0run: " + line) <= 80
    log.note(11, 10, xsave.NAMES["avx512"], "prog", "/bin/prog")
    assert log.summary() == ["audit: pid 10 tid 11 (prog, /bin/prog) used hidden avx512"]

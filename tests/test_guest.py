"""The tests that need CPUID faulting (marked `faulting`), run inside a guest whose
kernel has it, on a CPU that does not: tests/guest/run_in_guest.py boots the host's own
root in QEMU (TCG, whose emulated SVM lets KVM run a nested guest; KVM emulates CPUID
faulting for its guests on any CPU). Real kernel, real ptrace, real faulting; the CPU is
emulated. Where this CPU has faulting, those tests run directly and this one skips."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.conftest import FAULTING_MISSING, finished_tests, run_marked_in_guest

ROOT = Path(__file__).parent.parent
# One guest per file of faulting tests: a guest that wedges (nested KVM under TCG does,
# now and then) costs a rerun of that file, not of the whole set, and a failure names
# its file.
FAULTING_FILES = sorted(
    path.name
    for path in (ROOT / "tests").glob("test_*.py")
    if re.search(r"^(pytestmark = \[?\s*|@)pytest\.mark\.faulting", path.read_text(), re.M)
)


def test_the_faulting_files_are_found() -> None:
    assert {"test_supervisor.py", "test_core_faulting.py", "test_view_holds.py"} <= set(
        FAULTING_FILES
    )


def test_a_resumed_run_knows_what_finished() -> None:
    output = (
        "tests/test_a.py::test_one[-avx] PASSED                      [ 10%]\n"
        "tests/test_a.py::test_two SKIPPED (no AMX)                  [ 20%]\n"
        "tests/test_a.py::test_three FAILED                          [ 30%]\n"
        "tests/test_a.py::test_four "  # in flight when the guest stopped
    )
    assert finished_tests(output) == [
        "tests/test_a.py::test_one[-avx]",
        "tests/test_a.py::test_two",
    ]
    assert finished_tests(output, "PASSED") == ["tests/test_a.py::test_one[-avx]"]


def test_a_wedged_guest_goes_on_where_it_stopped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The orchestration only, with a fake run_in_guest: a wedge cannot be had on demand."""
    from tests.guest import run_in_guest as guest

    calls: list[list[str]] = []

    def fake_run_in_guest(argv: list[str], **_: object) -> guest.GuestResult:
        calls.append(list(argv))
        if len(calls) == 1:
            partial = "tests/t.py::a PASSED [ 33%]\ntests/t.py::b FAILED [ 66%]\ntests/t.py::c "
            raise guest.GuestError("L2's kernel stopped", "", partial)
        return guest.GuestResult(0, "tests/t.py::c PASSED [100%]\n", "", "", 1.0, 1.0)

    monkeypatch.setattr(guest, "run_in_guest", fake_run_in_guest)
    result, _ = run_marked_in_guest("faulting", "tests/t.py", tmp_path / "log", timeout=10)
    assert calls[1][len(calls[0]) :] == [
        "--deselect",
        "tests/t.py::a",
        "--deselect",
        "tests/t.py::b",
    ]
    assert finished_tests(result.stdout, "PASSED") == ["tests/t.py::a", "tests/t.py::c"]
    assert result.returncode == 1  # b failed before the wedge: not forgotten
    assert "the guest failed here: L2's kernel stopped" in (tmp_path / "log").read_text()


@pytest.mark.skipif(
    FAULTING_MISSING is None, reason="this CPU has CPUID faulting: the tests ran directly"
)
@pytest.mark.parametrize("name", FAULTING_FILES)
def test_faulting_tests_pass_in_a_guest_with_cpuid_faulting(name: str) -> None:
    from tests.guest import run_in_guest as guest

    reason = guest.guest_available()
    if reason is not None:
        pytest.skip(
            f"no guest to run the CPUID-faulting tests in: {reason} "
            "(tests/guest/setup.sh installs what it needs)"
        )
    log = ROOT / "tests" / "guest" / f"last-run-{Path(name).stem}.log"
    result, tail = run_marked_in_guest("faulting", f"tests/{name}", log, timeout=3600)
    assert result.returncode == 0, tail
    passed, finished = finished_tests(result.stdout, "PASSED"), finished_tests(result.stdout)
    assert finished, tail
    # Inside the guest the faulting tests must really run, not skip for want of faulting.
    assert "no CPUID faulting" not in result.stdout, tail
    print(f"guest run of {name}: {len(passed)} of {len(finished)} passed", file=sys.stderr)

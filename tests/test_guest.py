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

from tests.conftest import FAULTING_MISSING, run_marked_in_guest

ROOT = Path(__file__).parent.parent
# One guest per file of faulting tests: a guest that wedges (nested KVM under TCG does,
# now and then) costs a rerun of that file, not of the whole set, and a failure names
# its file.
FAULTING_FILES = sorted(
    path.name
    for path in (ROOT / "tests").glob("test_*.py")
    if re.search(r"^(pytestmark = \[?\s*|@)pytest\.mark\.faulting", path.read_text(), re.M)
)

pytestmark = pytest.mark.skipif(
    FAULTING_MISSING is None, reason="this CPU has CPUID faulting: the tests ran directly"
)


def test_the_faulting_files_are_found() -> None:
    assert {"test_supervisor.py", "test_core_faulting.py", "test_view_holds.py"} <= set(
        FAULTING_FILES
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
    summary = re.search(r"(\d+) passed|(\d+) skipped", result.stdout)
    assert summary, tail
    # Inside the guest the faulting tests must really run, not skip for want of faulting.
    assert "no CPUID faulting" not in result.stdout, tail
    print(f"guest run of {name}: {summary.group(0)} in {result.elapsed:.0f} s", file=sys.stderr)

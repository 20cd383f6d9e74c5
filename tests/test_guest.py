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
LOG = ROOT / "tests" / "guest" / "last-run.log"

pytestmark = pytest.mark.skipif(
    FAULTING_MISSING is None, reason="this CPU has CPUID faulting: the tests ran directly"
)


def test_faulting_tests_pass_in_a_guest_with_cpuid_faulting() -> None:
    from tests.guest import run_in_guest as guest

    reason = guest.guest_available()
    if reason is not None:
        pytest.skip(
            f"no guest to run the CPUID-faulting tests in: {reason} "
            "(tests/guest/setup.sh installs what it needs)"
        )
    result, tail = run_marked_in_guest("faulting", "tests", LOG, timeout=2700)
    assert result.returncode == 0, tail
    summary = re.search(r"(\d+) passed", result.stdout)
    assert summary and int(summary.group(1)) >= 20, tail
    # Inside the guest the faulting tests must really run, not skip for want of faulting.
    assert "no CPUID faulting" not in result.stdout, tail
    print(f"guest run: {summary.group(0)} in {result.elapsed:.0f} s", file=sys.stderr)

"""The exit status xcr0run's caller sees: the program's own, unless the audit fails a
program that succeeded."""

from __future__ import annotations

from xcr0run.status import ExitStatus, exit_status


def test_a_failed_audit_turns_only_success_into_124() -> None:
    assert exit_status(0, audit_failed=True) == ExitStatus.HIDDEN_STATE_USED == 124
    assert exit_status(0, audit_failed=False) is None


def test_the_programs_own_failure_or_signal_stands() -> None:
    for code in (1, 3, 124, 125, 127):
        assert exit_status(code, audit_failed=True) is None
    assert exit_status(None, audit_failed=True) is None  # a signal ends it


def test_launcher_statuses_follow_coreutils() -> None:
    assert (ExitStatus.FAILURE, ExitStatus.CANNOT_EXECUTE, ExitStatus.NOT_FOUND) == (125, 126, 127)

"""Exit statuses, and the one decision about which of them xcr0run's caller sees.

Statuses follow the coreutils launchers (env, nice, timeout): 125 for xcr0run's own
failures, 126 when the command cannot be executed, 127 when it is not found, so a caller
can tell xcr0run's failure from the program's own exit 1. Past those, the status is the
program's: xcr0run becomes the program, so the kernel reports its exit or the signal
that ended it. The audit alone may change it (`exit_status`).
"""

from __future__ import annotations


class ExitStatus:
    """The statuses as plain ints: an IntEnum would import enum (with functools and
    collections), several milliseconds of a launcher's start-up."""

    OK = 0
    # --strict, --expect-used: the program ran, but the audit failed (distinct from
    # 125-127 and from the 128+N a shell reports for signals).
    HIDDEN_STATE_USED = 124
    FAILURE = 125
    CANNOT_EXECUTE = 126
    NOT_FOUND = 127


def exit_status(program: int | None, audit_failed: bool) -> int | None:
    """The status to put in place of the program's own as it exits, or None to let the
    program's stand. `program` is the status it is exiting with (None when a signal
    ends it). A failed audit turns only a success into 124: a program that failed, or
    was killed, already says something went wrong, and says more than 124 would."""
    if audit_failed and program == ExitStatus.OK:
        return ExitStatus.HIDDEN_STATE_USED
    return None

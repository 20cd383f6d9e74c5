"""Error types and exit statuses.

The library raises these; only the command-line front end (cli.py) turns them into a
message and an exit status. Statuses follow the coreutils launchers (env, nice, timeout):
125 for our own failures, 126 when the command cannot be executed, 127 when it is not
found, so a caller can tell xcr0run's failure from the program's own exit 1.
"""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    OK = 0
    # --strict: the program ran, but used state the mask hides (distinct from 125-127 and
    # from the 128+N a shell reports for signals).
    HIDDEN_STATE_USED = 124
    FAILURE = 125
    CANNOT_EXECUTE = 126
    NOT_FOUND = 127


class Xcr0runError(Exception):
    """An error of xcr0run itself; its message is one line for the user."""

    status: ExitStatus = ExitStatus.FAILURE


class MaskError(Xcr0runError, ValueError):
    """The mask text is malformed or asks for something impossible."""


class UnsupportedError(Xcr0runError):
    """The kernel or CPU lacks what the requested operation needs."""


class CommandError(Xcr0runError):
    """The command to run could not be started."""

    def __init__(self, message: str, status: ExitStatus) -> None:
        super().__init__(message)
        self.status = status

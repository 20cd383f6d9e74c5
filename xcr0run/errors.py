"""Error types.

The library raises these; only the command-line front end turns them into a message
and an exit status (status.py has the statuses).
"""

from __future__ import annotations

from xcr0run.status import ExitStatus


class Xcr0runError(Exception):
    """An error of xcr0run itself; its message is one line for the user."""

    status: int = ExitStatus.FAILURE


class UsageError(Xcr0runError):
    """Options that do not go together; said with a pointer to --help, as click does."""


class MaskError(Xcr0runError, ValueError):
    """The mask text is malformed or asks for something impossible."""


class UnsupportedError(Xcr0runError):
    """The kernel or CPU lacks what the requested operation needs."""


class CommandError(Xcr0runError):
    """The command to run could not be started."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status

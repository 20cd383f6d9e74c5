"""The audit: which threads were seen with which XSAVE components in use.

The supervisor samples each stopped thread's XSTATE_BV (NT_X86_XSTATE header) and
notes it here. A component counts as used by a thread once any sample had its bit set.
Pure module: the samples come in as numbers.
"""

from __future__ import annotations

from xcr0run import PROG, xsave
from xcr0run.masks import format_mask

TYPE_CHECKING = False  # typing's import costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from typing import Any

# What sampling cannot see is said once, in the docs (README "Proving it", xcr0run(1)
# NOTES); a clean result points there.
LIMITS = f"limits: man {PROG}, NOTES"
# Components whose in-use bit says nothing about the program: the kernel loads a default
# PKRU (not the initial value 0) into every thread of a machine with protection keys.
NOT_JUDGED = xsave.NAMES["pkru"]


# Plain classes, not dataclasses: the launcher makes an AuditLog before it starts the
# helper, and importing dataclasses (with inspect) costs start-up time.


class ThreadUse:
    __slots__ = ("comm", "exe", "pid", "samples", "seen", "tid")

    def __init__(self, tid: int, pid: int, comm: str, exe: str) -> None:
        self.tid = tid
        self.pid = pid
        self.comm = comm
        self.exe = exe
        self.seen = 0  # union of XSTATE_BV over all samples
        self.samples = 0

    def to_json(self, hidden: int) -> dict[str, Any]:
        return {
            "tid": self.tid,
            "pid": self.pid,
            "comm": self.comm,
            "exe": self.exe,
            "seen": format_mask(self.seen) if self.seen else "",
            "hidden_used": format_mask(self.seen & hidden) if self.seen & hidden else "",
            "samples": self.samples,
        }


class AuditLog:
    __slots__ = ("hidden", "threads")

    def __init__(self, hidden: int) -> None:
        self.hidden = hidden  # components the mask hides
        # Keyed by thread and program: a thread that execs is a new program to account for.
        self.threads: dict[tuple[int, str], ThreadUse] = {}

    def note(self, tid: int, pid: int, xstate_bv: int, comm: str, exe: str) -> None:
        use = self.threads.get((tid, exe))
        if use is None:
            use = self.threads[(tid, exe)] = ThreadUse(tid, pid, comm, exe)
        use.seen |= xstate_bv
        use.samples += 1

    @property
    def used(self) -> int:
        seen = 0
        for use in self.threads.values():
            seen |= use.seen
        return seen

    @property
    def judged(self) -> int:
        return self.hidden & ~NOT_JUDGED

    def violations(self) -> list[ThreadUse]:
        return [u for u in self.threads.values() if u.seen & self.judged]

    def missing(self, expected: list[tuple[str, int]]) -> list[str]:
        """The expected items (a component or a group) none of whose state was seen."""
        used = self.used
        return [name for name, bits in expected if not used & bits]

    def summary(self) -> list[str]:
        """Lines for stderr at exit: the threads that used hidden state, or that none did."""
        if not self.judged:
            return []
        bad = self.violations()
        if not bad:
            return [f"audit: no hidden state seen in {self.samples()} samples ({LIMITS})"]
        lines = [
            f"audit: pid {u.pid} tid {u.tid} ({u.comm}, {u.exe}) used hidden "
            f"{format_mask(u.seen & self.judged)}"
            for u in bad
        ]
        return lines

    def samples(self) -> int:
        return sum(u.samples for u in self.threads.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "hidden": format_mask(self.hidden) if self.hidden else "",
            "used": format_mask(self.used) if self.used else "",
            "samples": self.samples(),
            "violations": [u.to_json(self.judged) for u in self.violations()],
            "threads": [u.to_json(self.judged) for u in self.threads.values()],
            "limits": LIMITS,
        }

"""What a trapped CPUID does to the program's signal state, and how to undo it.

A faulting CPUID is delivered as a forced SIGSEGV (kernel/signal.c,
force_sig_info_to_task). When SIGSEGV is blocked in the thread, or ignored, the kernel
first sets the process's SIGSEGV handler to SIG_DFL and unblocks SIGSEGV in that thread;
the supervisor sees the stop only afterwards. To put things back it must know the state
from before, so it follows the calls that change it (the seccomp filter stops them):
rt_sigaction, rt_sigprocmask, rt_sigreturn, and the deliveries of signals to handlers.

Pure module: numbers in, decisions out. Signal masks are 64-bit sets, bit (sig - 1).
Limits: the temporary masks of sigsuspend, ppoll, pselect6 and epoll_pwait are not
followed, nor is the signal state of 32-bit (int 0x80) code.
"""

from __future__ import annotations

SIGKILL, SIGSEGV, SIGSTOP = 9, 11, 19
SIG_DFL, SIG_IGN = 0, 1
SA_NODEFER = 0x40000000
SA_RESETHAND = 0x80000000
SIG_BLOCK, SIG_UNBLOCK, SIG_SETMASK = 0, 1, 2
_UNBLOCKABLE = (1 << (SIGKILL - 1)) | (1 << (SIGSTOP - 1))
SEGV_BIT = 1 << (SIGSEGV - 1)
# struct sigaction as the kernel reads it (x86-64): handler, flags, restorer, mask.
SIGACTION_WORDS = 4
# At rt_sigreturn's entry RSP points at the ucontext (the handler's `ret` popped the
# frame's return address); uc_sigmask follows uc_flags, uc_link, uc_stack (24 bytes)
# and the 256-byte sigcontext.
UC_SIGMASK_OFFSET = 8 + 8 + 24 + 256


def bit(sig: int) -> int:
    return 1 << (sig - 1)


class Disposition:
    """A struct sigaction as the kernel keeps it. (Plain classes here, not dataclasses:
    the tracing helper imports this module before the program may start.)"""

    __slots__ = ("flags", "handler", "mask", "restorer")

    def __init__(self, handler: int = SIG_DFL, flags: int = 0, restorer: int = 0, mask: int = 0):
        self.handler, self.flags, self.restorer, self.mask = handler, flags, restorer, mask

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Disposition) and self.words() == other.words()

    def __hash__(self) -> int:
        return hash(self.words())

    def __repr__(self) -> str:
        return "Disposition(handler={:#x}, flags={:#x}, restorer={:#x}, mask={:#x})".format(
            *self.words()
        )

    @property
    def is_function(self) -> bool:
        return self.handler not in (SIG_DFL, SIG_IGN)

    def words(self) -> tuple[int, int, int, int]:
        return (self.handler, self.flags, self.restorer, self.mask)


_DEFAULT = Disposition()
_IGNORED = Disposition(SIG_IGN)


class ProcessSignals:
    """The dispositions of one process that differ from SIG_DFL."""

    def __init__(self, actions: dict[int, Disposition] | None = None) -> None:
        self.actions: dict[int, Disposition] = actions if actions is not None else {}

    def get(self, sig: int) -> Disposition:
        return self.actions.get(sig, _DEFAULT)

    def set(self, sig: int, action: Disposition) -> None:
        if action == _DEFAULT:
            self.actions.pop(sig, None)
        else:
            self.actions[sig] = action

    def copy(self) -> ProcessSignals:
        return ProcessSignals(dict(self.actions))

    def after_exec(self) -> ProcessSignals:
        """execve keeps SIG_IGN and sets handlers back to SIG_DFL, flags and masks
        cleared (flush_signal_handlers)."""
        return ProcessSignals(
            {s: _IGNORED for s, a in self.actions.items() if a.handler == SIG_IGN}
        )

    @classmethod
    def ignoring(cls, ignored: int) -> ProcessSignals:
        """From a SigIgn set (as /proc/<pid>/status shows it)."""
        return cls({s: _IGNORED for s in range(1, 65) if ignored & bit(s)})


def after_sigprocmask(current: int, how: int, new: int) -> int:
    """The mask rt_sigprocmask(how, &new) leaves (an invalid `how` changes nothing)."""
    if how == SIG_BLOCK:
        result = current | new
    elif how == SIG_UNBLOCK:
        result = current & ~new
    elif how == SIG_SETMASK:
        result = new
    else:
        result = current
    return result & ~_UNBLOCKABLE


def on_delivery(blocked: int, sig: int, action: Disposition) -> int:
    """The mask a thread runs its handler for `sig` with."""
    if not action.is_function:
        return blocked
    added = action.mask | (0 if action.flags & SA_NODEFER else bit(sig))
    return (blocked | added) & ~_UNBLOCKABLE


class TrapRepair:
    """What to put back after a CPUID trap the kernel delivered as a forced SIGSEGV."""

    __slots__ = ("action", "reblock")

    def __init__(self, action: Disposition | None, reblock: bool) -> None:
        self.action = action  # the SIGSEGV disposition to reinstall, if it was reset
        self.reblock = reblock  # SIGSEGV was blocked in the thread: block it again

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrapRepair) and (self.action, self.reblock) == (
            other.action,
            other.reblock,
        )

    def __hash__(self) -> int:
        return hash((self.action, self.reblock))

    def __repr__(self) -> str:
        return f"TrapRepair(action={self.action!r}, reblock={self.reblock})"

    @property
    def needed(self) -> bool:
        return self.action is not None or self.reblock


NO_REPAIR = TrapRepair(None, False)


def repair_after_trap(segv: Disposition, blocked: int) -> TrapRepair:
    """The kernel reset SIGSEGV to SIG_DFL if it was blocked or ignored, and unblocked it
    if it was blocked."""
    was_blocked = bool(blocked & SEGV_BIT)
    if not was_blocked and segv.handler != SIG_IGN:
        return NO_REPAIR
    return TrapRepair(None if segv.handler == SIG_DFL else segv, was_blocked)


TYPE_CHECKING = False  # typing's import costs the helper's start-up; only mypy needs it
if TYPE_CHECKING:
    from typing import Protocol

    class ThreadSignals(Protocol):
        """What the policy needs of a traced thread: its process and its signal mask."""

        tgid: int
        blocked: int


class SignalPolicy:
    """The program tree's signal state as the tracer follows it, per process (by tgid)
    and per thread (`blocked`), and what a CPUID trap would need put back."""

    def __init__(self) -> None:
        self._processes: dict[int, ProcessSignals] = {}

    def known(self, tgid: int) -> bool:
        return tgid in self._processes

    def first_image(self, tgid: int, ignored: int) -> None:
        """The program's first image: xcr0run's own state before it is not followed."""
        self._processes[tgid] = ProcessSignals.ignoring(ignored)

    def exec_done(self, old_tgid: int, tgid: int) -> None:
        before = self._processes.pop(old_tgid, None)
        if before is not None:
            self._processes[tgid] = before.after_exec()

    def forked(self, parent_tgid: int, child_tgid: int) -> None:
        signals = self._processes.get(parent_tgid)
        if signals is not None:
            self._processes[child_tgid] = signals.copy()

    def forget(self, tgid: int) -> None:
        self._processes.pop(tgid, None)

    def sigaction(self, tgid: int, sig: int, words: tuple[int, int, int, int]) -> None:
        signals = self._processes.get(tgid)
        if signals is not None and sig not in (SIGKILL, SIGSTOP):
            signals.set(sig, Disposition(*words))

    def delivering(self, thread: ThreadSignals, sig: int, forced_fault: bool) -> None:
        """A signal is about to be delivered to `thread` (its handler, if any, runs with
        a wider mask). `forced_fault`: a SIGSEGV the kernel forced (a fault), which reset
        SIGSEGV before this point if it was blocked or ignored, as it does without us."""
        signals = self._processes.get(thread.tgid)
        if signals is None:
            return
        if sig == SIGSEGV and forced_fault:
            segv = signals.get(SIGSEGV)
            if thread.blocked & SEGV_BIT or segv.handler == SIG_IGN:
                signals.set(SIGSEGV, Disposition(flags=segv.flags, mask=segv.mask))
                thread.blocked &= ~SEGV_BIT
        action = signals.get(sig)
        thread.blocked = on_delivery(thread.blocked, sig, action)
        if action.is_function and action.flags & SA_RESETHAND:
            signals.set(sig, Disposition())

    def repair(self, thread: ThreadSignals) -> TrapRepair:
        """What a CPUID trap in `thread` now would need put back."""
        signals = self._processes.get(thread.tgid)
        if signals is None:
            return NO_REPAIR
        return repair_after_trap(signals.get(SIGSEGV), thread.blocked)

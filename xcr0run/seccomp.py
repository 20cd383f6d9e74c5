"""The seccomp filter the program tree runs under, as data: which system calls stop for
the supervisor (SECCOMP_RET_TRACE, tagged so it knows why), which fail, which run.

Pure module: it builds the BPF program as a list of instructions; _native installs it.
Sources: <linux/seccomp.h>, <linux/filter.h>, <linux/audit.h>, <asm/unistd_64.h>,
<asm/unistd_32.h>, <linux/sched.h>; seccomp(2) for the precedence of actions.
"""

from __future__ import annotations

import errno

# Actions and seccomp_data offsets.
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
RET_TRACE = 0x7FF00000
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
X32_SYSCALL_BIT = 0x40000000
_NR, _ARCH, _ARG0, _ARG1 = 0, 4, 16, 24

# BPF opcodes.
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JSET_K = 0x45
_RET_K = 0x06

CLONE_UNTRACED = 0x00800000

# System call numbers, 64-bit and i386.
NR64 = {
    "rt_sigaction": 13,
    "rt_sigprocmask": 14,
    "rt_sigreturn": 15,
    "clone": 56,
    "exit": 60,
    "ptrace": 101,
    "arch_prctl": 158,
    "exit_group": 231,
    "clone3": 435,
}
NR32 = {"exit": 1, "clone": 120, "exit_group": 252, "arch_prctl": 384, "clone3": 435}

ARCH_GET_CPUID = 0x1011
ARCH_SET_CPUID = 0x1012
ARCH_REQ_XCOMP_PERM = 0x1023


class Stop:
    """SECCOMP_RET_DATA values: why a call stopped (PTRACE_GETEVENTMSG at the stop).
    The high byte marks them as ours; a program's own filter may return RET_TRACE too."""

    OURS = 0x5C00
    PTRACE = 0x5C01
    CPUID_PRCTL = 0x5C02  # ARCH_GET_CPUID / ARCH_SET_CPUID, 64-bit ABI
    CPUID_PRCTL_32 = 0x5C03  # the same through int 0x80
    CLONE_UNTRACED = 0x5C04  # clone() asking for CLONE_UNTRACED, 64-bit ABI
    CLONE_UNTRACED_32 = 0x5C05
    CLONE3 = 0x5C06  # clone3(): its flags are in memory, out of the filter's sight
    SIGACTION = 0x5C07
    SIGPROCMASK = 0x5C08
    SIGRETURN = 0x5C09
    EXIT = 0x5C0A  # exit() of a thread
    EXIT_GROUP = 0x5C0B
    EXIT_32 = 0x5C0C
    EXIT_GROUP_32 = 0x5C0D

    @staticmethod
    def is_ours(data: int) -> bool:
        return data & 0xFF00 == Stop.OURS


class FilterSpec:
    """What the filter does; each part is needed by one feature of the run. (A plain
    class: the launch path builds one, and dataclasses cost start-up time.)"""

    __slots__ = ("deny_amx", "explain_ptrace", "guard_cpuid", "stop_at_exit")

    def __init__(
        self,
        deny_amx: bool = False,  # ARCH_REQ_XCOMP_PERM fails with EPERM (the mask hides AMX)
        explain_ptrace: bool = False,  # ptrace stops first, so its failure can be explained
        guard_cpuid: bool = False,  # faulting changes, CLONE_UNTRACED and signal state stop
        stop_at_exit: bool = False,  # exit and exit_group stop (the verdict at the exit)
    ) -> None:
        self.deny_amx = deny_amx
        self.explain_ptrace = explain_ptrace
        self.guard_cpuid = guard_cpuid
        self.stop_at_exit = stop_at_exit

    @property
    def traces(self) -> bool:
        """Whether some call stops for the tracer (SECCOMP_RET_TRACE). Then CLONE_UNTRACED
        must stop too, so the flag is dropped: an untraced child would inherit the filter
        with no tracer behind it, and every traced call (its exit!) fail with ENOSYS."""
        return self.explain_ptrace or self.guard_cpuid or self.stop_at_exit

    @property
    def empty(self) -> bool:
        return not (self.deny_amx or self.explain_ptrace or self.guard_cpuid or self.stop_at_exit)


Insn = tuple[int, int, int, int]


def _ret(action: int) -> Insn:
    return (_RET_K, 0, 0, action)


def _load(offset: int) -> Insn:
    return (_LD_W_ABS, 0, 0, offset)


class _Program:
    """Blocks of "if nr == N: <body>" with relative jumps worked out at the end."""

    def __init__(self) -> None:
        self.insns: list[Insn] = []

    def syscall(self, numbers: tuple[int, ...], body: list[Insn]) -> None:
        """For any of `numbers`: run `body` (which must end in returns or fall off the
        end to the next block with the accumulator reloaded)."""
        body = [*body, _load(_NR)]
        # Each comparison jumps over the rest of the comparisons into the body, or falls
        # through; the last one jumps past the body when nothing matched.
        for i, number in enumerate(numbers):
            left = len(numbers) - 1 - i
            if left:
                self.insns.append((_JEQ_K, left, 0, number))
            else:
                self.insns.append((_JEQ_K, 0, len(body), number))
        self.insns += body


def _arg_equals(offset: int, cases: list[tuple[int, int]]) -> list[Insn]:
    """Load the low half of an argument; for each (value, action), return action."""
    out = [_load(offset)]
    for value, action in cases:
        out += [(_JEQ_K, 0, 1, value), _ret(action)]
    return out


def _arg_nonzero(offset: int, action: int) -> list[Insn]:
    """Return action when the 64-bit argument (a pointer) is not NULL."""
    return [
        _load(offset),
        (_JEQ_K, 0, 2, 0),
        _load(offset + 4),
        (_JEQ_K, 1, 0, 0),
        _ret(action),
    ]


def _flag_set(offset: int, flag: int, action: int) -> list[Insn]:
    return [_load(offset), (_JSET_K, 0, 1, flag), _ret(action)]


def _arch_prctl_cases(spec: FilterSpec, cpuid_stop: int) -> list[tuple[int, int]]:
    cases = []
    if spec.deny_amx:
        cases.append((ARCH_REQ_XCOMP_PERM, RET_ERRNO | errno.EPERM))
    if spec.guard_cpuid:
        trace = RET_TRACE | cpuid_stop
        cases += [(ARCH_GET_CPUID, trace), (ARCH_SET_CPUID, trace)]
    return cases


def build(spec: FilterSpec) -> list[Insn]:
    """The BPF program for `spec`. 64-bit, x32 (the same table with a high bit, for the
    calls that matter) and i386 system calls (int 0x80, also from 64-bit code) are each
    covered; signal state is tracked for the 64-bit ABI only."""
    i386 = _Program()
    cases32 = _arch_prctl_cases(spec, Stop.CPUID_PRCTL_32)
    if cases32:
        i386.syscall((NR32["arch_prctl"],), _arg_equals(_ARG0, cases32))
    if spec.traces:
        i386.syscall(
            (NR32["clone"],),
            _flag_set(_ARG0, CLONE_UNTRACED, RET_TRACE | Stop.CLONE_UNTRACED_32),
        )
        i386.syscall((NR32["clone3"],), [_ret(RET_TRACE | Stop.CLONE3)])
    if spec.stop_at_exit:
        i386.syscall((NR32["exit"],), [_ret(RET_TRACE | Stop.EXIT_32)])
        i386.syscall((NR32["exit_group"],), [_ret(RET_TRACE | Stop.EXIT_GROUP_32)])

    x86_64 = _Program()
    cases64 = _arch_prctl_cases(spec, Stop.CPUID_PRCTL)
    if cases64:
        x86_64.syscall(
            (NR64["arch_prctl"], NR64["arch_prctl"] | X32_SYSCALL_BIT),
            _arg_equals(_ARG0, cases64),
        )
    if spec.explain_ptrace:
        x86_64.syscall((NR64["ptrace"],), [_ret(RET_TRACE | Stop.PTRACE)])
    if spec.traces:
        x86_64.syscall(
            (NR64["clone"], NR64["clone"] | X32_SYSCALL_BIT),
            _flag_set(_ARG0, CLONE_UNTRACED, RET_TRACE | Stop.CLONE_UNTRACED),
        )
        x86_64.syscall(
            (NR64["clone3"], NR64["clone3"] | X32_SYSCALL_BIT), [_ret(RET_TRACE | Stop.CLONE3)]
        )
    if spec.guard_cpuid:
        # Changes of the program's signal state, which a trapped CPUID can undo (see
        # sigstate.py): only calls that change something stop.
        x86_64.syscall((NR64["rt_sigaction"],), _arg_nonzero(_ARG1, RET_TRACE | Stop.SIGACTION))
        x86_64.syscall((NR64["rt_sigprocmask"],), _arg_nonzero(_ARG1, RET_TRACE | Stop.SIGPROCMASK))
        x86_64.syscall((NR64["rt_sigreturn"],), [_ret(RET_TRACE | Stop.SIGRETURN)])
    if spec.stop_at_exit:
        x86_64.syscall((NR64["exit"],), [_ret(RET_TRACE | Stop.EXIT)])
        x86_64.syscall((NR64["exit_group"],), [_ret(RET_TRACE | Stop.EXIT_GROUP)])

    prog: list[Insn] = [_load(_ARCH)]
    body32 = [_load(_NR), *i386.insns, _ret(RET_ALLOW)]
    prog.append((_JEQ_K, 0, len(body32), AUDIT_ARCH_I386))
    prog += body32
    body64 = [_load(_NR), *x86_64.insns, _ret(RET_ALLOW)]
    prog.append((_JEQ_K, 0, len(body64), AUDIT_ARCH_X86_64))
    prog += body64
    prog.append(_ret(RET_ALLOW))  # other ABIs: left alone
    return prog

"""The pure parts of keeping the program unaware: which CPUID encodings trap, what the
seccomp filter decides (run through a small BPF evaluator), and the signal-state rules."""

from __future__ import annotations

import errno
import struct

import pytest

from xcr0run import seccomp, sigstate
from xcr0run.cpuid import cpuid_instruction_length
from xcr0run.seccomp import NR32, NR64, FilterSpec, Stop


@pytest.mark.parametrize(
    ("code", "compat", "length"),
    [
        (b"\x0f\xa2", False, 2),
        (b"\x66\x0f\xa2", False, 3),
        (b"\xf3\x48\x0f\xa2", False, 4),
        (b"\x2e\x3e\x26\x64\x65\x36\x67\x0f\xa2", False, 9),
        (b"\x48\x0f\xa2", True, 0),  # in 32-bit code 0x48 is DEC EAX
        (b"\xf0\x0f\xa2", False, 0),  # LOCK CPUID is #UD, not a trap
        (b"\x48\x66\x0f\xa2", False, 4),  # a REX not last is ignored, not an error
        (b"\x66" * 14 + b"\x0f\xa2", False, 0),  # longer than 15 bytes
        (b"\x66" * 13 + b"\x0f\xa2", False, 15),
        (b"\x0f\x05", False, 0),
        (b"", False, -1),  # too short to tell
    ],
)
def test_cpuid_length(code: bytes, compat: bool, length: int) -> None:
    assert cpuid_instruction_length(code, not compat) == length


def run_bpf(program: list[tuple[int, int, int, int]], arch: int, nr: int, *args: int) -> int:
    """Evaluate the loads, jumps and returns seccomp.build uses, on struct seccomp_data."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = program[pc]
        if code == 0x20:
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code == 0x15:
            pc += 1 + (jt if acc == k else jf)
        elif code == 0x45:
            pc += 1 + (jt if acc & k else jf)
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


ALL = FilterSpec(deny_amx=True, explain_ptrace=True, guard_cpuid=True, stop_at_exit=True)
X64, I386 = seccomp.AUDIT_ARCH_X86_64, seccomp.AUDIT_ARCH_I386
TRACE, ALLOW = seccomp.RET_TRACE, seccomp.RET_ALLOW


@pytest.mark.parametrize(
    ("arch", "nr", "args", "expected"),
    [
        (X64, NR64["arch_prctl"], (0x1023, 18), seccomp.RET_ERRNO | errno.EPERM),
        (X64, NR64["arch_prctl"] | seccomp.X32_SYSCALL_BIT, (0x1023,), seccomp.RET_ERRNO | 1),
        (I386, NR32["arch_prctl"], (0x1023,), seccomp.RET_ERRNO | errno.EPERM),
        (X64, NR64["arch_prctl"], (0x1011,), TRACE | Stop.CPUID_PRCTL),
        (X64, NR64["arch_prctl"], (0x1012, 1), TRACE | Stop.CPUID_PRCTL),
        (I386, NR32["arch_prctl"], (0x1012, 1), TRACE | Stop.CPUID_PRCTL_32),
        (X64, NR64["arch_prctl"], (0x1002, 0), ALLOW),  # ARCH_SET_FS
        (X64, NR64["clone"], (0x00800000 | 17,), TRACE | Stop.CLONE_UNTRACED),
        (X64, NR64["clone"], (0x003D0F00,), ALLOW),  # pthread_create's flags
        (I386, NR32["clone"], (0x00800011,), TRACE | Stop.CLONE_UNTRACED_32),
        (X64, NR64["clone3"], (0x7FFC0000, 88), TRACE | Stop.CLONE3),
        (X64, NR64["rt_sigaction"], (11, 0x7FFC1000, 0, 8), TRACE | Stop.SIGACTION),
        (X64, NR64["rt_sigaction"], (11, 0, 0x7FFC1000, 8), ALLOW),  # a query
        (X64, NR64["rt_sigaction"], (11, 1 << 40, 0, 8), TRACE | Stop.SIGACTION),
        (X64, NR64["rt_sigprocmask"], (0, 0x7FFC1000, 0, 8), TRACE | Stop.SIGPROCMASK),
        (X64, NR64["rt_sigprocmask"], (0, 0, 0x7FFC1000, 8), ALLOW),
        (X64, NR64["rt_sigreturn"], (), TRACE | Stop.SIGRETURN),
        (X64, NR64["exit_group"], (0,), TRACE | Stop.EXIT_GROUP),
        (I386, NR32["exit_group"], (0,), TRACE | Stop.EXIT_GROUP_32),
        (X64, NR64["ptrace"], (16, 1), TRACE | Stop.PTRACE),
        (X64, 0, (0,), ALLOW),  # read
        (I386, 3, (0,), ALLOW),
        (0xC00000B7, 158, (0x1023,), ALLOW),  # another architecture: left alone
    ],
)
def test_the_filter_decides(arch: int, nr: int, args: tuple[int, ...], expected: int) -> None:
    assert run_bpf(seccomp.build(ALL), arch, nr, *args) == expected


def test_only_what_is_asked_for_stops() -> None:
    amx_only = seccomp.build(FilterSpec(deny_amx=True))
    assert run_bpf(amx_only, X64, NR64["arch_prctl"], 0x1012, 0) == ALLOW
    assert run_bpf(amx_only, X64, NR64["rt_sigreturn"]) == ALLOW
    assert run_bpf(amx_only, X64, NR64["exit_group"], 0) == ALLOW
    # Nothing traced, nothing to drop: clone3 and CLONE_UNTRACED run (no tracer to stop for).
    assert run_bpf(amx_only, X64, NR64["clone3"], 0x7FFC0000, 88) == ALLOW
    assert run_bpf(amx_only, X64, NR64["clone"], 0x00800000 | 17) == ALLOW
    assert FilterSpec().empty and not FilterSpec(stop_at_exit=True).empty
    assert all(Stop.is_ours(v) for k, v in vars(Stop).items() if k.isupper())


@pytest.mark.parametrize(
    "spec",
    [FilterSpec(stop_at_exit=True), FilterSpec(explain_ptrace=True), FilterSpec(guard_cpuid=True)],
)
def test_clone_untraced_stops_whenever_a_call_stops_for_the_tracer(spec: FilterSpec) -> None:
    """An untraced child would keep a filter whose RET_TRACE has no tracer behind it (its
    exit fails with ENOSYS): the flag must stop to be dropped, with or without faulting."""
    prog = seccomp.build(spec)
    assert run_bpf(prog, X64, NR64["clone"], 0x00800000 | 17) == TRACE | Stop.CLONE_UNTRACED
    assert run_bpf(prog, I386, NR32["clone"], 0x00800011) == TRACE | Stop.CLONE_UNTRACED_32
    assert run_bpf(prog, X64, NR64["clone3"], 0x7FFC0000, 88) == TRACE | Stop.CLONE3
    assert run_bpf(prog, X64, NR64["clone"], 0x003D0F00) == ALLOW
    # Signal state is followed for the CPUID guard only.
    expected = TRACE | Stop.SIGRETURN if spec.guard_cpuid else ALLOW
    assert run_bpf(prog, X64, NR64["rt_sigreturn"]) == expected


SEGV = sigstate.SEGV_BIT
HANDLER = sigstate.Disposition(0x401000, 0x04000000, 0x401800, 0)


def test_sigprocmask_rules() -> None:
    assert sigstate.after_sigprocmask(0, sigstate.SIG_BLOCK, SEGV) == SEGV
    assert sigstate.after_sigprocmask(SEGV | 1, sigstate.SIG_UNBLOCK, SEGV) == 1
    assert sigstate.after_sigprocmask(SEGV, sigstate.SIG_SETMASK, 2) == 2
    assert sigstate.after_sigprocmask(SEGV, 7, 0) == SEGV  # EINVAL: unchanged
    everything = (1 << 64) - 1
    blocked = sigstate.after_sigprocmask(0, sigstate.SIG_SETMASK, everything)
    assert not blocked & (sigstate.bit(9) | sigstate.bit(19))  # SIGKILL, SIGSTOP


def test_a_handler_runs_with_its_mask_and_its_signal() -> None:
    usr1 = sigstate.Disposition(0x401000, 0, 0, SEGV)
    assert sigstate.on_delivery(0, 10, usr1) == SEGV | sigstate.bit(10)
    nodefer = sigstate.Disposition(0x401000, sigstate.SA_NODEFER, 0, 0)
    assert sigstate.on_delivery(0, 11, nodefer) == 0
    assert sigstate.on_delivery(0, 11, sigstate.Disposition()) == 0  # default action


@pytest.mark.parametrize(
    ("segv", "blocked", "action", "reblock"),
    [
        (sigstate.Disposition(), 0, None, False),
        (HANDLER, 0, None, False),
        (sigstate.Disposition(sigstate.SIG_IGN), 0, sigstate.Disposition(sigstate.SIG_IGN), False),
        (HANDLER, SEGV, HANDLER, True),
        (sigstate.Disposition(), SEGV, None, True),
    ],
)
def test_what_a_trap_undoes(segv, blocked: int, action, reblock: bool) -> None:
    repair = sigstate.repair_after_trap(segv, blocked)
    assert (repair.action, repair.reblock) == (action, reblock)


def test_exec_keeps_ignored_and_forgets_handlers() -> None:
    signals = sigstate.ProcessSignals.ignoring(sigstate.bit(1) | sigstate.bit(13))
    signals.set(11, HANDLER)
    after = signals.after_exec()
    assert after.get(1).handler == after.get(13).handler == sigstate.SIG_IGN
    assert after.get(11) == sigstate.Disposition()
    assert signals.copy().actions == signals.actions

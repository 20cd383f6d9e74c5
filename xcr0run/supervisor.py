"""The ptrace loop: follow a program tree, keep CPUID faulting armed in every program
image, and answer each trapped CPUID from a CpuidView. Everything else runs natively.

The kernel resets CPUID faulting on execve, so after each exec the supervisor injects
arch_prctl(ARCH_SET_CPUID, 0) into the new image before its first instruction: it lets
execve finish (the syscall-exit stop; at the exec event itself the tracee is still inside
execve and an injected call silently does nothing), runs one `syscall` placed at the
entry point, and puts bytes and registers back. Threads and fork/vfork children inherit
faulting, so only exec needs this.

Speaks to the kernel only through _native. Never prints; returns an Outcome.
"""

from __future__ import annotations

import enum
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

from xcr0run import _native as n
from xcr0run.cpuid import PER_CPU_LEAVES, Registers, key
from xcr0run.view import CpuidView

_CPUID_BYTES = 0xA20F  # 0f a2, as the low half of a little-endian word
_SYSCALL_BYTES = 0x050F  # 0f 05
_INT80_BYTES = 0x80CD  # cd 80
_USER32_CS = 0x23  # a 32-bit program (ia32): arch_prctl is int 0x80, number 384
_SYS_ARCH_PRCTL_32 = 384
_STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
_OPTIONS = (
    n.PTRACE_O_TRACESYSGOOD
    | n.PTRACE_O_TRACEFORK
    | n.PTRACE_O_TRACEVFORK
    | n.PTRACE_O_TRACECLONE
    | n.PTRACE_O_TRACEEXEC
    | n.PTRACE_O_EXITKILL  # if we die, nothing keeps running with nobody to answer
)


class Phase(enum.Enum):
    RUNNING = 0
    NEW = 1  # auto-attached, first stop not seen yet
    EXECED = 2  # exec event seen, waiting for execve's syscall-exit stop
    INJECT_ENTER = 3  # our arch_prctl is about to enter
    INJECT_EXIT = 4  # our arch_prctl is about to return


@dataclass
class Tracee:
    tid: int
    tgid: int
    phase: Phase = Phase.RUNNING
    saved_regs: n.UserRegs | None = None
    saved_word: int = 0


@dataclass
class Outcome:
    """How the program ended, and what the supervisor did on the way."""

    pid: int
    exit_code: int | None = None
    signal: int | None = None
    core_dumped: bool = False
    processes: int = 0
    threads: int = 0
    execs: int = 0
    cpuid_traps: int = 0
    exec_error: int | None = None  # errno when the command itself could not be executed
    leaves: dict[str, int] = field(default_factory=dict)  # "leaf.subleaf" -> traps


class SupervisorError(Exception):
    pass


class Supervisor:
    """Supervises one program started with `spawn` under `view`."""

    def __init__(
        self,
        view: CpuidView,
        native_cpuid: Callable[[int, int], Registers] = n.cpuid,
        on_group_stop: Callable[[], None] | None = None,
    ) -> None:
        self.view = view
        self._native_cpuid = native_cpuid
        self._answers: dict[tuple[int, int], Registers] = {}
        self._per_cpu: dict[tuple[int, int, int], Registers] = {}
        self._tracees: dict[int, Tracee] = {}
        self._regs = n.UserRegs()
        self._siginfo = n.SigInfo()
        self._on_group_stop = on_group_stop
        self.outcome = Outcome(pid=0)

    # -- starting ---------------------------------------------------------------------------

    def attach_stopped_child(self, pid: int) -> None:
        """Take over a child that stopped itself (SIGSTOP) before exec."""
        _, status = os.waitpid(pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            raise SupervisorError(f"child {pid} ended before it could be traced")
        n.ptrace_seize(pid, _OPTIONS)
        self.outcome = Outcome(pid=pid, processes=1, threads=1)
        self._tracees[pid] = Tracee(pid, pid, Phase.NEW)
        os.kill(pid, signal.SIGCONT)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> Outcome:
        waitpid, wall = os.waitpid, n.WALL
        while self._tracees:
            try:
                tid, status = waitpid(-1, wall)
            except ChildProcessError:
                break
            if os.WIFSTOPPED(status):
                self._stopped(tid, status)
            else:
                self._gone(tid, status)
        return self.outcome

    def forward_signal(self, sig: int) -> None:
        """Pass a signal sent to xcr0run on to the program."""
        if self.outcome.pid and self.outcome.pid in self._tracees:
            os.kill(self.outcome.pid, sig)

    def _gone(self, tid: int, status: int) -> None:
        self._tracees.pop(tid, None)
        if tid != self.outcome.pid:
            return
        if os.WIFEXITED(status):
            self.outcome.exit_code = os.WEXITSTATUS(status)
        elif os.WIFSIGNALED(status):
            self.outcome.signal = os.WTERMSIG(status)
            self.outcome.core_dumped = os.WCOREDUMP(status)

    def _stopped(self, tid: int, status: int) -> None:
        sig = os.WSTOPSIG(status)
        event = status >> 16
        tracee = self._tracees.get(tid)
        if tracee is None:
            # A new child's first stop can arrive before its parent's fork event.
            tracee = self._tracees[tid] = Tracee(tid, tid, Phase.NEW)
        if sig == signal.SIGSEGV and event == 0:
            if tracee.phase is Phase.RUNNING and self._emulate_cpuid(tid):
                return
            self._resume(tracee, sig)
        elif sig == (signal.SIGTRAP | 0x80):
            self._syscall_stop(tracee)
        elif event:
            self._event(tracee, event, sig)
        else:
            self._resume(tracee, sig)  # an ordinary signal: deliver it

    def _resume(self, tracee: Tracee, sig: int = 0) -> None:
        try:
            if tracee.phase is Phase.RUNNING or tracee.phase is Phase.NEW:
                n.ptrace_cont(tracee.tid, sig)
            else:
                n.ptrace_syscall(tracee.tid, sig)
        except n.NativeError as err:
            if err.errno != 3:  # ESRCH: it died meanwhile (SIGKILL); its exit follows
                raise

    # -- events -------------------------------------------------------------------------------

    def _event(self, tracee: Tracee, event: int, sig: int) -> None:
        tid = tracee.tid
        if event in (n.PTRACE_EVENT_FORK, n.PTRACE_EVENT_VFORK, n.PTRACE_EVENT_CLONE):
            child = n.ptrace_geteventmsg(tid)
            tgid = tracee.tgid if event == n.PTRACE_EVENT_CLONE else child
            known = self._tracees.get(child)
            if known is None:
                self._tracees[child] = Tracee(child, tgid, Phase.NEW)
            else:
                known.tgid = tgid
            if event == n.PTRACE_EVENT_CLONE:
                self.outcome.threads += 1
            else:
                self.outcome.processes += 1
            self._resume(tracee)
        elif event == n.PTRACE_EVENT_EXEC:
            former = n.ptrace_geteventmsg(tid)
            # Every other thread of the process is gone now (exec from a non-leader thread
            # even took over the leader's tid).
            for other in [t for t in self._tracees.values() if t.tgid == tracee.tgid]:
                if other.tid != tid:
                    del self._tracees[other.tid]
            if former != tid:
                self._tracees.pop(former, None)
            tracee.tgid = tid
            tracee.phase = Phase.EXECED
            self.outcome.execs += 1
            n.ptrace_syscall(tid)
        elif event == n.PTRACE_EVENT_STOP:
            if tracee.phase is Phase.NEW:
                tracee.phase = Phase.RUNNING
                self._resume(tracee)
            elif sig in _STOP_SIGNALS:
                # Group-stop (Ctrl-Z, SIGSTOP): stay stopped until SIGCONT, as without us.
                n.ptrace_listen(tid)
                if tid == self.outcome.pid and self._on_group_stop:
                    self._on_group_stop()
            else:
                self._resume(tracee)
        else:
            self._resume(tracee)

    # -- re-arming faulting after exec ------------------------------------------------------------

    def _syscall_stop(self, tracee: Tracee) -> None:
        tid = tracee.tid
        regs = n.ptrace_getregs(tid, self._regs)
        if tracee.phase is Phase.EXECED:
            self._inject_arch_prctl(tracee, regs)
        elif tracee.phase is Phase.INJECT_ENTER:
            tracee.phase = Phase.INJECT_EXIT
            n.ptrace_syscall(tid)
        elif tracee.phase is Phase.INJECT_EXIT:
            result = regs.rax if regs.rax < 1 << 63 else regs.rax - (1 << 64)
            assert tracee.saved_regs is not None
            n.ptrace_poke(tid, tracee.saved_regs.rip, tracee.saved_word)
            n.ptrace_setregs(tid, tracee.saved_regs)
            tracee.saved_regs = None
            tracee.phase = Phase.RUNNING
            if result != 0:
                os.kill(tid, signal.SIGKILL)
                raise SupervisorError(
                    f"could not enable CPUID faulting in pid {tid}: {os.strerror(-result)}"
                )
            n.ptrace_cont(tid)
        else:
            n.ptrace_cont(tid)  # a syscall stop we did not ask for

    def _inject_arch_prctl(self, tracee: Tracee, regs: n.UserRegs) -> None:
        tid = tracee.tid
        saved = n.UserRegs.from_buffer_copy(regs)
        word = n.ptrace_peek(tid, regs.rip)
        if regs.cs == _USER32_CS:
            insn, number, a0, a1 = _INT80_BYTES, _SYS_ARCH_PRCTL_32, "rbx", "rcx"
        else:
            insn, number, a0, a1 = _SYSCALL_BYTES, n.SYS_arch_prctl, "rdi", "rsi"
        n.ptrace_poke(tid, regs.rip, (word & ~0xFFFF) | insn)
        regs.rax = number
        setattr(regs, a0, n.ARCH_SET_CPUID)
        setattr(regs, a1, 0)
        n.ptrace_setregs(tid, regs)
        tracee.saved_regs, tracee.saved_word = saved, word
        tracee.phase = Phase.INJECT_ENTER
        n.ptrace_syscall(tid)

    # -- the CPUID trap ----------------------------------------------------------------------------

    def _emulate_cpuid(self, tid: int) -> bool:
        """Answer a faulting CPUID; False if this SIGSEGV is anything else."""
        info = n.ptrace_getsiginfo(tid, self._siginfo)
        if info.si_code != n.SI_KERNEL or info.si_addr != 0:
            return False
        regs = n.ptrace_getregs(tid, self._regs)
        if n.ptrace_peek(tid, regs.rip) & 0xFFFF != _CPUID_BYTES:
            return False
        leaf, subleaf = regs.rax & 0xFFFFFFFF, regs.rcx & 0xFFFFFFFF
        regs.rax, regs.rbx, regs.rcx, regs.rdx = self.answer(tid, leaf, subleaf)
        regs.rip += 2
        n.ptrace_setregs(tid, regs)
        n.ptrace_cont(tid)
        self.outcome.cpuid_traps += 1
        name = f"{leaf:#x}.{subleaf}"
        self.outcome.leaves[name] = self.outcome.leaves.get(name, 0) + 1
        return True

    def answer(self, tid: int, leaf: int, subleaf: int) -> Registers:
        k = key(leaf, subleaf)
        if leaf in PER_CPU_LEAVES:
            cpu = _current_cpu(tid)
            cached = self._per_cpu.get((cpu, *k))
            if cached is None:
                raw = _on_cpu(cpu, lambda: self._native_cpuid(leaf, subleaf))
                cached = self._per_cpu[(cpu, *k)] = self.view.answer(leaf, subleaf, raw)
            return cached
        cached = self._answers.get(k)
        if cached is None:
            raw = self._native_cpuid(leaf, subleaf)
            cached = self._answers[k] = self.view.answer(leaf, subleaf, raw)
        return cached


def _current_cpu(tid: int) -> int:
    """The CPU a stopped thread last ran on (/proc/<tid>/stat field 39)."""
    try:
        with open(f"/proc/{tid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[36])
    except (OSError, IndexError, ValueError):
        return -1


def _on_cpu(cpu: int, run: Callable[[], Registers]) -> Registers:
    """Run `run` on `cpu` (the answer names that CPU's APIC ID)."""
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError:
        return run()  # unknown or forbidden CPU: answer from where we are
    try:
        return run()
    finally:
        os.sched_setaffinity(0, before)

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

import contextlib
import enum
import errno
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from xcr0run import _native as n
from xcr0run.audit import AuditLog
from xcr0run.cpuid import PER_CPU_LEAVES, Registers
from xcr0run.errors import Xcr0runError
from xcr0run.view import CpuidView

_CPUID_BYTES = 0xA20F  # 0f a2, as the low half of a little-endian word
_SYSCALL_BYTES = 0x050F  # 0f 05
_INT80_BYTES = 0x80CD  # cd 80
_USER32_CS = 0x23  # a 32-bit program (ia32): arch_prctl is int 0x80, number 384
_SYS_ARCH_PRCTL_32 = 384
_STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
# Stops the terminal causes, which reach xcr0run's whole process group: mirrored, so the
# shell sees the job stopped. A SIGSTOP sent to the program alone is not (nobody would
# continue xcr0run).
_TERMINAL_STOPS = frozenset({signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
_OPTIONS = (
    n.PTRACE_O_TRACESYSGOOD
    | n.PTRACE_O_TRACEFORK
    | n.PTRACE_O_TRACEVFORK
    | n.PTRACE_O_TRACECLONE
    | n.PTRACE_O_TRACEEXEC
    | n.PTRACE_O_TRACESECCOMP  # the filter's ptrace stops (see Supervisor.on_ptrace)
    | n.PTRACE_O_EXITKILL  # if we die, nothing keeps running with nobody to answer
)
_XFEATURE_TILEDATA = 18
# A forwarded signal waits this long for the program's own delivery of it...
_FORWARD_DELAY = 0.05
# ...and counts as delivered if the program got it this recently.
_SAME_SIGNAL_WINDOW = 0.5
_PTRACE_ATTACHING = {n.PTRACE_TRACEME, n.PTRACE_ATTACH, n.PTRACE_SEIZE}


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
    names: tuple[str, str] | None = None  # comm and exe, read at the first audit sample
    pending: list[tuple[int, int, bool]] = field(default_factory=list)  # calls to inject


@dataclass
class Outcome:
    """How the program ended, and what the supervisor did on the way."""

    pid: int
    exit_code: int | None = None
    signal: int | None = None
    processes: int = 0
    threads: int = 0
    execs: int = 0
    cpuid_traps: int = 0
    leaves: dict[str, int] = field(default_factory=dict)  # "leaf.subleaf" -> traps
    warnings: list[str] = field(default_factory=list)


class SupervisorError(Xcr0runError):
    """The supervisor could not do its job; the program tree has been killed."""


class Supervisor:
    """Supervises one program tree: answers CPUID from `view` when `trap_cpuid`, and
    samples each stopped thread's XSAVE state into `audit` when given."""

    def __init__(
        self,
        view: CpuidView,
        *,
        trap_cpuid: bool = True,
        audit: AuditLog | None = None,
        on_group_stop: Callable[[], None] | None = None,
        on_ptrace: Callable[[int, str], None] | None = None,
        grant_amx: bool = False,
        forwarded: frozenset[int] = frozenset(),
        wake_after: Callable[[float], None] | None = None,
    ) -> None:
        self.view = view
        self.trap_cpuid = trap_cpuid
        self.audit = audit
        self._answers: dict[tuple[int, int], Registers] = {}
        self._per_cpu: dict[tuple[int, int, int], Registers] = {}
        self._tracees: dict[int, Tracee] = {}
        self._regs = n.UserRegs()
        self._siginfo = n.SigInfo()
        self._xstate = n.XStateHeadReader()
        self._leaf_counts: dict[tuple[int, int], int] = {}
        self._on_group_stop = on_group_stop
        self._on_ptrace = on_ptrace  # (pid, program name): a traced program tried to trace
        # Signals sent to xcr0run that are passed on; a signal sent to the whole process
        # group reaches the program directly, and must not arrive twice. So forwarding
        # waits a moment (wake_after calls on_wakeup) for the program's own delivery.
        self._forwarded = forwarded
        self._wake_after = wake_after
        self._pending: dict[int, float] = {}
        self._delivered: dict[int, float] = {}
        self.sample_due = False
        self._options = _OPTIONS | (n.PTRACE_O_TRACEEXIT if audit else 0)
        # arch_prctl calls every new program image needs, since execve resets both:
        # (code, argument, required).
        self._after_exec: list[tuple[int, int, bool]] = []
        if trap_cpuid:
            self._after_exec.append((n.ARCH_SET_CPUID, 0, True))
        if grant_amx:
            self._after_exec.append((n.ARCH_REQ_XCOMP_PERM, _XFEATURE_TILEDATA, False))
        self.outcome = Outcome(pid=0)

    # -- starting ---------------------------------------------------------------------------

    def attach_stopped_child(self, pid: int) -> None:
        """Take over a child that stopped itself (SIGSTOP) before exec."""
        _, status = os.waitpid(pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            raise SupervisorError(f"child {pid} ended before it could be traced")
        try:
            n.ptrace_seize(pid, self._options)
        except n.NativeError as err:
            if err.errno != errno.EPERM:
                raise
            raise SupervisorError(
                "cannot trace the program: it is already traced (xcr0run itself runs under "
                "a tracer or another xcr0run, and a process has one tracer)"
            ) from err
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
            if not os.WIFSTOPPED(status):
                self._gone(tid, status)
                continue
            try:
                self._stopped(tid, status)
            except n.NativeError as err:
                # A thread killed while stopped (SIGKILL, exit_group in another thread)
                # makes its pending ptrace calls fail with ESRCH; its exit report follows.
                if err.errno != errno.ESRCH:
                    raise
        counts = self._leaf_counts
        self.outcome.cpuid_traps = sum(counts.values())
        self.outcome.leaves = {
            f"{leaf:#x}.{sub}": counts[leaf, sub] for leaf, sub in sorted(counts)
        }
        return self.outcome

    def interrupt_all(self) -> None:
        """Stop every thread briefly (PTRACE_INTERRUPT), for a periodic audit sample."""
        for tid in list(self._tracees):
            with contextlib.suppress(n.NativeError):  # exiting meanwhile
                n.ptrace_interrupt(tid)

    def forward_signal(self, sig: int) -> None:
        """A signal sent to xcr0run: pass it on, unless the program got it as well."""
        pid = self.outcome.pid
        if not pid or pid not in self._tracees:
            return
        now = time.monotonic()
        if self._delivered.get(sig, -1.0) > now - _SAME_SIGNAL_WINDOW:
            return
        if self._wake_after is None:
            os.kill(pid, sig)
            return
        self._pending[sig] = now
        self._wake_after(_FORWARD_DELAY)

    def on_wakeup(self) -> None:
        """Called (from a signal handler in the tracer thread) when a timer fires."""
        if self.sample_due:
            self.sample_due = False
            self.interrupt_all()
        now = time.monotonic()
        for sig, since in list(self._pending.items()):
            if now - since < _FORWARD_DELAY * 0.9:
                continue
            del self._pending[sig]
            pid = self.outcome.pid
            if (
                self._delivered.get(sig, -1.0) <= since - _SAME_SIGNAL_WINDOW
                and pid in self._tracees
            ):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

    def _gone(self, tid: int, status: int) -> None:
        self._tracees.pop(tid, None)
        if tid != self.outcome.pid:
            return
        if os.WIFEXITED(status):
            self.outcome.exit_code = os.WEXITSTATUS(status)
        elif os.WIFSIGNALED(status):
            self.outcome.signal = os.WTERMSIG(status)

    def _stopped(self, tid: int, status: int) -> None:
        sig = os.WSTOPSIG(status)
        event = status >> 16
        tracee = self._tracees.get(tid)
        if tracee is None:
            # A new child's first stop can arrive before its parent's fork event.
            tracee = self._tracees[tid] = Tracee(tid, tid, Phase.NEW)
        if self.audit is not None and self.outcome.execs and sig != (signal.SIGTRAP | 0x80):
            self._sample(tracee)  # from the first exec on: before it, the thread is ours
        if sig == signal.SIGSEGV and event == 0:
            if self.trap_cpuid and tracee.phase is Phase.RUNNING and self._emulate_cpuid(tid):
                return
            self._resume(tracee, sig)
        elif sig == (signal.SIGTRAP | 0x80):
            self._syscall_stop(tracee)
        elif event:
            self._event(tracee, event, sig)
        else:
            if sig in self._forwarded and tracee.tgid == self.outcome.pid:
                self._delivered[sig] = time.monotonic()
                self._pending.pop(sig, None)  # it came to the program directly
            self._resume(tracee, sig)  # an ordinary signal: deliver it

    def _resume(self, tracee: Tracee, sig: int = 0) -> None:
        if tracee.phase is Phase.RUNNING or tracee.phase is Phase.NEW:
            n.ptrace_cont(tracee.tid, sig)
        else:
            n.ptrace_syscall(tracee.tid, sig)

    # -- events -------------------------------------------------------------------------------

    def _event(self, tracee: Tracee, event: int, sig: int) -> None:
        tid = tracee.tid
        if event in (n.PTRACE_EVENT_FORK, n.PTRACE_EVENT_VFORK, n.PTRACE_EVENT_CLONE):
            child = n.ptrace_geteventmsg(tid)
            # clone() without CLONE_THREAD makes a process, reported as a clone event too.
            tgid = _tgid(child) if event == n.PTRACE_EVENT_CLONE else child
            known = self._tracees.get(child)
            if known is None:
                self._tracees[child] = Tracee(child, tgid, Phase.NEW)
            else:
                known.tgid = tgid
            if tgid == tracee.tgid:
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
            tracee.names = None
            self.outcome.execs += 1
            if self._after_exec:
                tracee.phase = Phase.EXECED  # set the new image up once execve returns
                n.ptrace_syscall(tid)
            else:
                self._resume(tracee)
        elif event == n.PTRACE_EVENT_SECCOMP:
            self._ptrace_attempt(tracee)
            self._resume(tracee)
        elif event == n.PTRACE_EVENT_STOP:
            if tracee.phase is Phase.NEW:
                tracee.phase = Phase.RUNNING
                self._resume(tracee)
            elif sig in _STOP_SIGNALS:
                # Group-stop (Ctrl-Z, SIGSTOP): stay stopped until SIGCONT, as without us.
                n.ptrace_listen(tid)
                if tid == self.outcome.pid and sig in _TERMINAL_STOPS and self._on_group_stop:
                    self._on_group_stop()
            else:
                self._resume(tracee)
        else:
            self._resume(tracee)

    # -- audit ---------------------------------------------------------------------------------

    def _sample(self, tracee: Tracee) -> None:
        assert self.audit is not None
        try:
            _, xstate_bv = self._xstate.read(tracee.tid)
        except n.NativeError:
            return  # not in a ptrace-stop we can read (e.g. already gone)
        if tracee.names is None:
            tracee.names = _names(tracee.tid, tracee.tgid)
        self.audit.note(tracee.tid, tracee.tgid, xstate_bv, *tracee.names)

    def _ptrace_attempt(self, tracee: Tracee) -> None:
        """A traced program called ptrace (the filter stopped it): say why attaching to
        its own children, or PTRACE_TRACEME, is going to fail."""
        regs = n.ptrace_getregs(tracee.tid, self._regs)
        request, target = regs.rdi, regs.rsi
        if (
            self._on_ptrace
            and request in _PTRACE_ATTACHING
            and (request == n.PTRACE_TRACEME or target in self._tracees)
        ):
            self._on_ptrace(tracee.tgid, _names(tracee.tid, tracee.tgid)[0])

    # -- setting up each new program image ----------------------------------------------------

    def _syscall_stop(self, tracee: Tracee) -> None:
        tid = tracee.tid
        regs = n.ptrace_getregs(tid, self._regs)
        if tracee.phase is Phase.EXECED:
            # execve has returned into the new image, whose first instruction has not run.
            tracee.saved_regs = n.UserRegs.from_buffer_copy(regs)
            tracee.saved_word = n.ptrace_peek(tid, regs.rip)
            tracee.pending = list(self._after_exec)
            self._inject_next(tracee, regs)
        elif tracee.phase is Phase.INJECT_ENTER:
            tracee.phase = Phase.INJECT_EXIT
            n.ptrace_syscall(tid)
        elif tracee.phase is Phase.INJECT_EXIT:
            result = regs.rax if regs.rax < 1 << 63 else regs.rax - (1 << 64)
            call = tracee.pending.pop(0)
            if result != 0:
                self._injection_failed(tracee, call, result)
            if tracee.pending:
                self._inject_next(tracee, regs)
                return
            saved = tracee.saved_regs
            assert saved is not None
            n.ptrace_poke(tid, saved.rip, tracee.saved_word)
            n.ptrace_setregs(tid, saved)
            tracee.saved_regs = None
            tracee.phase = Phase.RUNNING
            n.ptrace_cont(tid)
        else:
            n.ptrace_cont(tid)  # a syscall stop we did not ask for

    def _inject_next(self, tracee: Tracee, regs: n.UserRegs) -> None:
        """Run arch_prctl(code, arg) in the tracee: a `syscall` (int 0x80 for 32-bit code)
        placed at the saved RIP, restored once every pending call has run."""
        code, arg, _ = tracee.pending[0]
        saved = tracee.saved_regs
        assert saved is not None
        if saved.cs == _USER32_CS:
            insn, number, a0, a1 = _INT80_BYTES, _SYS_ARCH_PRCTL_32, "rbx", "rcx"
        else:
            insn, number, a0, a1 = _SYSCALL_BYTES, n.SYS_arch_prctl, "rdi", "rsi"
        n.ptrace_poke(tracee.tid, saved.rip, (tracee.saved_word & ~0xFFFF) | insn)
        regs_in = n.UserRegs.from_buffer_copy(saved)
        regs_in.rax = number
        setattr(regs_in, a0, code)
        setattr(regs_in, a1, arg)
        n.ptrace_setregs(tracee.tid, regs_in)
        tracee.phase = Phase.INJECT_ENTER
        n.ptrace_syscall(tracee.tid)

    def _injection_failed(self, tracee: Tracee, call: tuple[int, int, bool], result: int) -> None:
        code, arg, required = call
        what = (
            "enable CPUID faulting"
            if code == n.ARCH_SET_CPUID
            else f"run arch_prctl({code:#x}, {arg})"
        )
        why = os.strerror(-result) if result < 0 else f"it returned {result}"
        message = f"could not {what} in pid {tracee.tid}: {why}"
        if required:
            os.kill(tracee.tid, signal.SIGKILL)
            raise SupervisorError(message)
        self.outcome.warnings.append(message)

    # -- the CPUID trap ----------------------------------------------------------------------------

    def _emulate_cpuid(self, tid: int) -> bool:
        """Answer a faulting CPUID; False if this SIGSEGV is anything else."""
        info = n.ptrace_getsiginfo(tid, self._siginfo)
        if info.si_code != n.SI_KERNEL or info.si_addr != 0:
            return False
        regs = n.ptrace_getregs(tid, self._regs)
        if _instruction_bytes(tid, regs.rip) != _CPUID_BYTES:
            return False
        leaf, subleaf = regs.rax & 0xFFFFFFFF, regs.rcx & 0xFFFFFFFF
        regs.rax, regs.rbx, regs.rcx, regs.rdx = self.answer(tid, leaf, subleaf)
        regs.rip += 2
        n.ptrace_setregs(tid, regs)
        n.ptrace_cont(tid)
        counts = self._leaf_counts
        counts[leaf, subleaf] = counts.get((leaf, subleaf), 0) + 1
        return True

    def answer(self, tid: int, leaf: int, subleaf: int) -> Registers:
        # Cached on the exact (leaf, sub-leaf): a leaf the tables think ignores ECX might
        # not (new leaves, hypervisor ranges).
        k = (leaf, subleaf)
        if leaf in PER_CPU_LEAVES:
            cpu = _current_cpu(tid)
            cached = self._per_cpu.get((cpu, *k))
            if cached is None:
                raw = _on_cpu(cpu, lambda: n.cpuid(leaf, subleaf))
                cached = self._per_cpu[(cpu, *k)] = self.view.answer(leaf, subleaf, raw)
            return cached
        cached = self._answers.get(k)
        if cached is None:
            raw = n.cpuid(leaf, subleaf)
            cached = self._answers[k] = self.view.answer(leaf, subleaf, raw)
        return cached


def _tgid(tid: int) -> int:
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return tid


def _instruction_bytes(tid: int, rip: int) -> int:
    """The two bytes at `rip`. A word read there fails with EIO when the instruction ends
    a page with nothing mapped after it; then read the word ending at rip + 2."""
    try:
        return n.ptrace_peek(tid, rip) & 0xFFFF
    except n.NativeError as err:
        if err.errno != errno.EIO:
            raise
        return n.ptrace_peek(tid, rip - 6) >> 48


def _names(tid: int, tgid: int) -> tuple[str, str]:
    """A thread's comm and its process's executable, for reports."""
    try:
        with open(f"/proc/{tid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        comm = "?"
    try:
        exe = os.readlink(f"/proc/{tgid}/exe")
    except OSError:
        exe = "?"
    return comm, exe


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
    if cpu < 0:
        return run()  # /proc unreadable: answer from where we are
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError:
        return run()  # a CPU we may not use: answer from where we are
    try:
        return run()
    finally:
        os.sched_setaffinity(0, before)

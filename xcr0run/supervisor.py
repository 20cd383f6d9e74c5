"""The tracer: follow a program tree, keep CPUID faulting armed in every program image,
answer each trapped CPUID from a CpuidView, and leave the program nothing else to notice.

It runs in a detached helper process beside the program (launcher.py), so the program
keeps its pid, parent, process group and exit status; every stop of every thread comes
here first (waitpid on tracees that are not our children).

Two stop loops, one set of handlers: where the compiled core loads (_core.py), it waits
for stops and answers traps, follows forks and re-arms after exec in C, and hands the
rest up here; elsewhere the Python loop does it all. Answers are decided by the
CpuidResponder (responder.py), signal state by the SignalPolicy (sigstate.py), which
also says per thread whether the core may answer alone.

- After each exec the kernel has reset CPUID faulting. The Python loop lets execve
  finish (at the exec event itself the tracee is still inside execve and an injected
  call silently does nothing), runs one `syscall` placed at the entry point, and puts
  bytes and registers back; the core needs two stops instead of four (DESIGN.md). Threads and
  fork/vfork children inherit faulting.
- A trapped CPUID is a forced SIGSEGV; the kernel may have reset the program's SIGSEGV
  disposition and mask on the way (sigstate.py), which is put back.
- The seccomp filter (seccomp.py) stops the calls through which the program could see or
  escape the supervision: ARCH_GET/SET_CPUID (emulated per thread), clone with
  CLONE_UNTRACED (the flag is dropped), the calls that change its signal state, and with
  an audit, its exit (where the verdict is given).

Speaks to the kernel only through _native. Never prints; reports through callbacks and
an Outcome.
"""

from __future__ import annotations

import errno
import os
import time

from xcr0run import _native as n
from xcr0run import sigstate
from xcr0run.audit import AuditLog
from xcr0run.cpuid import Registers, cpuid_instruction_length
from xcr0run.errors import Xcr0runError
from xcr0run.responder import CpuidResponder, Key
from xcr0run.seccomp import CLONE_UNTRACED, Stop
from xcr0run.view import CpuidView

# The helper imports this before the program may start: no dataclasses, enum, typing,
# contextlib or signal.py (whose enums pull in functools and collections), only what runs.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable

    from xcr0run import _core
else:
    try:
        import _signal as signal
    except ImportError:  # not CPython's layout
        import signal

_SYSCALL_BYTES = 0x050F  # 0f 05
_INT80_BYTES = 0x80CD  # cd 80
_USER32_CS = 0x23  # a 32-bit program (ia32): system calls are int 0x80
_SYS_ARCH_PRCTL_32 = 384
_SYS_RT_SIGACTION = 13
_SIGTRAP_SYSCALL = signal.SIGTRAP | 0x80
_STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
_OPTIONS = (
    n.PTRACE_O_TRACESYSGOOD
    | n.PTRACE_O_TRACEFORK
    | n.PTRACE_O_TRACEVFORK
    | n.PTRACE_O_TRACECLONE
    | n.PTRACE_O_TRACEEXEC
    | n.PTRACE_O_TRACESECCOMP
    | n.PTRACE_O_EXITKILL  # if the tracer dies, nothing keeps running with nobody to answer
)
_XFEATURE_TILEDATA = 18
_PTRACE_ATTACHING = {n.PTRACE_TRACEME, n.PTRACE_ATTACH, n.PTRACE_SEIZE}
_SKIPPED = (1 << 64) - 1  # orig_rax -1: the kernel skips the call, rax is its result
_ENOSYS = (1 << 64) - errno.ENOSYS
# Below the red zone, for a struct the tracer hands an injected call.
_SCRATCH_BELOW_SP = 512
# How long the program's exit waits for its other threads to stop for a last sample.
_SAMPLE_WAIT = 1.0


class Phase:
    RUNNING = 0
    NEW = 1  # auto-attached, first stop not seen yet
    EXECED = 2  # exec event seen, waiting for execve's syscall-exit stop
    INJECT_ENTER = 3  # an injected call is about to enter
    INJECT_EXIT = 4  # an injected call is about to return


class Injection:
    """A system call run in the tracee: (number, arguments), 64-bit ABI unless `i386`."""

    __slots__ = ("args", "number", "required", "what")

    def __init__(self, number: int, args: tuple[int, ...], what: str, required: bool = True):
        self.number, self.args, self.what, self.required = number, args, what, required


class Tracee:
    __slots__ = (
        "announced",
        "blocked",
        "core_flags",
        "held",
        "names",
        "pending",
        "phase",
        "program_faulting",
        "reblock_segv",
        "resume_regs",
        "saved_at",
        "saved_word",
        "tgid",
        "tid",
    )  # fmt: skip

    def __init__(
        self,
        tid: int,
        tgid: int,
        phase: int = Phase.RUNNING,
        announced: bool = False,
        core_flags: int = 0,
    ) -> None:
        self.tid = tid
        self.tgid = tgid
        self.phase = phase
        self.announced = announced  # its parent's fork/clone event has been seen
        self.held = False  # its first stop came first: kept stopped until the event
        self.resume_regs: n.UserRegs | None = None  # registers to restore after injections
        self.saved_word = 0
        self.saved_at = 0
        self.pending: list[Injection] = []
        self.reblock_segv = False  # after the injections, block SIGSEGV again
        self.names: tuple[str, str] | None = None  # comm and exe, read at the first sample
        self.blocked = 0  # the signal mask as the program set it (sigstate.py)
        self.program_faulting = False  # the program itself asked for ARCH_SET_CPUID(0)
        self.core_flags = core_flags  # the compiled core's flags for it, as last set


class Outcome:
    """How the program ended, and what the supervisor did on the way."""

    def __init__(self, pid: int, processes: int = 0, threads: int = 0) -> None:
        self.pid = pid
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.processes = processes
        self.threads = threads
        self.execs = 0
        self.cpuid_traps = 0
        self.leaves: dict[str, int] = {}  # "leaf.subleaf" -> traps
        self.warnings: list[str] = []

    def count_leaves(self, counts: dict[tuple[int, int], int]) -> None:
        self.cpuid_traps = sum(counts.values())
        self.leaves = {f"{leaf:#x}.{sub}": counts[leaf, sub] for leaf, sub in sorted(counts)}


class SupervisorError(Xcr0runError):
    """The supervisor could not do its job; the program tree has been killed."""


if TYPE_CHECKING:
    # Called once, when the program (the process the shell started) is about to end: with
    # its exit code, or None when a signal ends it. May return another exit code (the
    # audit's 124), which replaces the program's where the exit is still a system call.
    ProgramExit = Callable[["Outcome", "int | None"], "int | None"]


class Supervisor:
    """Supervises one program tree: answers CPUID from `view` when `trap_cpuid`, and
    samples threads' XSAVE state into `audit` when given."""

    def __init__(
        self,
        view: CpuidView,
        *,
        trap_cpuid: bool = True,
        audit: AuditLog | None = None,
        on_ptrace: Callable[[int, str], None] | None = None,
        on_exec: Callable[[int, str], None] | None = None,
        on_program_exit: ProgramExit | None = None,
        grant_amx: bool = False,
        use_core: bool = True,
    ) -> None:
        self.view = view
        self.trap_cpuid = trap_cpuid
        self.audit = audit
        self.responder = CpuidResponder(view, on_answer=self._hand_down)
        self.signals = sigstate.SignalPolicy()
        self._tracees: dict[int, Tracee] = {}
        self._live: dict[int, int] = {}  # tgid -> threads traced
        self._regs = n.UserRegs()
        self._siginfo = n.SigInfo()
        self._xstate = n.XStateHeadReader()
        self._on_ptrace = on_ptrace  # (pid, program name): a traced program tried to trace
        self._on_exec = on_exec  # (pid, path): every new program image
        self._on_program_exit = on_program_exit
        self._program_exit_done = on_program_exit is None
        self._exit_rewrite: dict[int, int] = {}  # the program's exit code -> the verdict's
        self._queue: list[tuple[int, int]] = []  # stops collected, not yet handled
        self.sample_due = False
        wants_exit_stops = audit is not None or on_program_exit is not None
        self._options = _OPTIONS | (n.PTRACE_O_TRACEEXIT if wants_exit_stops else 0)
        # arch_prctl calls every new program image needs, since execve resets both.
        self._after_exec: list[tuple[int, int, str, bool]] = []
        if trap_cpuid:
            self._after_exec.append((n.ARCH_SET_CPUID, 0, "enable CPUID faulting", True))
        if grant_amx:
            self._after_exec.append(
                (n.ARCH_REQ_XCOMP_PERM, _XFEATURE_TILEDATA, "request AMX permission", False)
            )
        self.outcome = Outcome(pid=0)
        self._core: _core.Core | None = self._start_core() if use_core else None

    def _start_core(self) -> _core.Core | None:
        """The compiled core, set up with the same options, calls and answers as this
        loop; None where it is not built (the Python loop runs, as --show says)."""
        from xcr0run import _core

        if not _core.status()[0]:
            return None
        cpus = os.sched_getaffinity(0)
        core = _core.Core(max(max(cpus) + 1, os.cpu_count() or 1), self._answer_flag)
        core.set_options(self._options)
        core.set_ignores_ecx(self.responder.ignores_ecx)
        for code, arg, _what, required in self._after_exec:
            core.add_exec_call(code, arg, required)
        # Python looks at the first image (its signal state) and, when asked to, at each.
        core.set_stop_at_exec(True)
        return core

    @property
    def engine(self) -> str:
        return "compiled core" if self._core is not None else "Python loop"

    @property
    def _answer_flag(self) -> int:
        return 1 if self.trap_cpuid else 0  # _core.ANSWER, without importing it here

    # -- starting ---------------------------------------------------------------------------

    def seize(self, pid: int) -> None:
        """Trace `pid` (the program, still xcr0run until it execs) and what it starts."""
        try:
            if self._core is not None:
                self._core.seize(pid, self._answer_flag)
            else:
                n.ptrace_seize(pid, self._options)
        except n.NativeError as err:
            if err.errno != errno.EPERM:
                raise
            raise SupervisorError(
                "cannot trace the program: it is already traced (xcr0run itself runs under "
                "a tracer or another xcr0run, and a process has one tracer)"
            ) from err
        self.outcome = Outcome(pid=pid, processes=1, threads=1)
        self._add(Tracee(pid, pid, announced=True, core_flags=self._answer_flag))

    def _add(self, tracee: Tracee) -> Tracee:
        self._tracees[tracee.tid] = tracee
        self._live[tracee.tgid] = self._live.get(tracee.tgid, 0) + 1
        return tracee

    def _remove(self, tid: int) -> Tracee | None:
        tracee = self._tracees.pop(tid, None)
        if tracee is not None:
            left = self._live[tracee.tgid] - 1
            if left:
                self._live[tracee.tgid] = left
            else:
                del self._live[tracee.tgid]
                self.signals.forget(tracee.tgid)
        return tracee

    def _retag(self, tracee: Tracee, tgid: int) -> None:
        if tracee.tgid != tgid:
            self._remove(tracee.tid)
            tracee.tgid = tgid
            self._add(tracee)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> Outcome:
        try:
            if self._core is not None:
                self._run_core(self._core)
            else:
                self._run_python()
            self.outcome.count_leaves(self._counts())
            if not self._program_exit_done:
                self._program_ending(None, None)
        finally:
            if self._core is not None:
                self._core.close()
        return self.outcome

    def _counts(self) -> dict[Key, int]:
        counts = dict(self.responder.counts)
        if self._core is not None and self._core.open:
            for k, traps in self._core.counts().items():
                counts[k] = counts.get(k, 0) + traps
        return counts

    def _run_python(self) -> None:
        waitpid, wall, nohang = os.waitpid, n.WALL, n.WALL | os.WNOHANG
        queue = self._queue
        while self._tracees:
            if not queue:
                # waitpid(-1) reports the newest tracees first: a tree that keeps making
                # threads would starve the oldest (the program's main thread). So take
                # every stop pending now, and handle them in turn.
                try:
                    queue.append(waitpid(-1, wall))
                    while True:
                        stop = waitpid(-1, nohang)
                        if not stop[0]:
                            break
                        queue.append(stop)
                except ChildProcessError:
                    if not queue:
                        break
            tid, status = queue.pop(0)
            self._handle(tid, status)

    def _run_core(self, core: _core.Core) -> None:
        """The compiled core answers, follows forks and re-arms; what it returns is
        dealt with here, with the same handlers as the Python loop."""
        from xcr0run._core import Reason

        while True:
            stop = core.run()
            reason, tid = stop.reason, stop.tid
            self._take_events(core)
            if reason == Reason.NO_TRACEES:
                return
            try:
                if reason == Reason.STATUS:
                    self._handle(tid, stop.status)
                elif reason == Reason.CPUID:
                    self._core_trap(core, tid, stop.leaf, stop.subleaf)
                elif reason == Reason.EXEC:
                    # Python has looked (the exec event, taken above); from now on only
                    # if it must see every image.
                    core.set_stop_at_exec(self._on_exec is not None)
                    n.ptrace_cont(tid)
                elif reason == Reason.ARM_FAILED:
                    what = next(w for c, _a, w, _r in self._after_exec if c == stop.code)
                    os.kill(tid, signal.SIGKILL)
                    raise SupervisorError(
                        f"could not {what} in pid {tid}: {os.strerror(-stop.result)}"
                    )
                elif reason == Reason.ERROR:
                    raise SupervisorError(f"tracing pid {tid} failed: {os.strerror(stop.err)}")
                # WOKEN, EINTR: Python's signal handlers (the audit's ticker) have run.
            except n.NativeError as err:
                if err.errno != errno.ESRCH:
                    raise

    def _take_events(self, core: _core.Core) -> None:
        """What the core did since Python last looked, in order."""

        for event in core.take_events():
            try:
                self._core_event(event)
            except n.NativeError as err:
                if err.errno != errno.ESRCH:  # killed meanwhile: its exit report follows
                    raise

    def _core_event(self, event: _core.Event) -> None:
        from xcr0run._core import EventKind

        kind, tid, other = event.kind, event.tid, event.other
        if kind == EventKind.EXEC:
            tracee = self._tracees.get(tid) or self._stranger(tid)
            self._exec_done(tracee, other)
        elif kind == EventKind.CALL_FAILED:
            what = next(w for c, _a, w, _r in self._after_exec if c == event.code)
            self.outcome.warnings.append(
                f"could not {what} in pid {tid}: {os.strerror(-event.result)}"
            )
        else:
            parent = self._tracees.get(tid) or self._stranger(tid)
            tgid = parent.tgid if kind == EventKind.CLONE_THREAD else other
            self._new_child(parent, other, tgid)

    def _stranger(self, tid: int) -> Tracee:
        """A thread the core follows that this side has not heard of (cannot happen
        while events are taken in order; kept safe regardless)."""
        return self._add(Tracee(tid, _tgid(tid), announced=True))

    def _hand_down(self, k: Key, answer: Registers | dict[int, Registers]) -> None:
        """A new answer from the responder: the core answers it from now on."""
        core = self._core
        if core is None or not core.open:
            return
        if isinstance(answer, dict):
            for cpu, regs in answer.items():
                try:  # a CPU number beyond its table
                    core.put_cpu_answer(cpu, k[0], k[1], regs)
                except n.NativeError:
                    pass
        else:
            core.put_answer(k[0], k[1], answer)

    def _core_trap(self, core: _core.Core, tid: int, leaf: int, subleaf: int) -> None:
        """A CPUID trap the core did not answer: no answer in its table yet, or this
        thread's flag is clear (its signal state needs repair, or it armed faulting
        itself)."""
        tracee = self._tracees.get(tid) or self._stranger(tid)
        if not self.trap_cpuid or tracee.program_faulting or tracee.phase != Phase.RUNNING:
            self._signal_stop(tracee, signal.SIGSEGV)  # its own SIGSEGV, as natively
            return
        answer = self.responder.answer(leaf, subleaf, lambda: core.thread_cpu(tid))
        repair = self.signals.repair(tracee)
        if repair.needed:
            regs = n.ptrace_getregs(tid, self._regs)
            if regs.cs != _USER32_CS:
                regs.rax, regs.rbx, regs.rcx, regs.rdx = answer
                length = _cpuid_at(tid, regs.rip, False)
                self.responder.count(leaf, subleaf)
                self._answer_and_repair(tracee, regs, length, repair)
                return
        core.complete_cpuid(tid, answer)

    def _sync(self, tracee: Tracee) -> None:
        """Tell the core whether it may answer this thread's traps itself: not when a
        trap would need its signal state repaired, nor when it armed faulting itself."""
        core = self._core
        if core is None:
            return
        flags = self._answer_flag
        if tracee.program_faulting or self.signals.repair(tracee).needed:
            flags = 0
        if flags != tracee.core_flags:
            tracee.core_flags = flags
            try:
                core.set_flags(tracee.tid, flags)
            except n.NativeError:
                pass

    def _sync_process(self, tgid: int) -> None:
        for tracee in [t for t in self._tracees.values() if t.tgid == tgid]:
            self._sync(tracee)

    def _handle(self, tid: int, status: int) -> None:
        if not os.WIFSTOPPED(status):
            self._gone(tid, status)
            return
        try:
            self._stopped(tid, status)
        except n.NativeError as err:
            # A thread killed while stopped (SIGKILL, exit_group in another thread)
            # makes its pending ptrace calls fail with ESRCH; its exit report follows.
            if err.errno != errno.ESRCH:
                raise

    def interrupt_all(self) -> None:
        """Stop every thread briefly (PTRACE_INTERRUPT), for a periodic audit sample."""
        for tid in list(self._tracees):
            try:  # exiting meanwhile
                n.ptrace_interrupt(tid)
            except n.NativeError:
                pass

    def on_wakeup(self) -> None:
        """Called (from a signal handler in the tracer thread) when a timer fires."""
        if self.sample_due:
            self.sample_due = False
            self.interrupt_all()

    def _gone(self, tid: int, status: int) -> None:
        self._remove(tid)
        if tid != self.outcome.pid:
            return
        if os.WIFEXITED(status):
            self.outcome.exit_code = os.WEXITSTATUS(status)
        elif os.WIFSIGNALED(status):
            self.outcome.signal = os.WTERMSIG(status)
        if not self._program_exit_done:
            self._program_ending(self.outcome.exit_code, None)

    def _stopped(self, tid: int, status: int) -> None:
        sig = os.WSTOPSIG(status)
        event = status >> 16
        tracee = self._tracees.get(tid)
        if tracee is None:
            if self._core is not None:
                tracee = self._stranger(tid)
            else:
                # A new child's first stop can arrive before its parent's fork event.
                tracee = self._add(Tracee(tid, tid, Phase.NEW))
        if sig == _SIGTRAP_SYSCALL:
            self._syscall_stop(tracee)
        elif event == n.PTRACE_EVENT_SECCOMP:
            self._seccomp_stop(tracee)
        elif event:
            if self.audit is not None and self.outcome.execs and event != n.PTRACE_EVENT_EXEC:
                self._sample(tracee)
            self._event(tracee, event, sig)
        elif sig == signal.SIGSEGV and self._core is None and self._cpuid_trap(tracee):
            return
        else:
            self._signal_stop(tracee, sig)

    def _signal_stop(self, tracee: Tracee, sig: int) -> None:
        if self.audit is not None and self.outcome.execs:
            self._sample(tracee)
        self._deliver(tracee, sig)

    def _resume(self, tracee: Tracee, sig: int = 0) -> None:
        if tracee.phase in (Phase.RUNNING, Phase.NEW):
            n.ptrace_cont(tracee.tid, sig)
        else:
            n.ptrace_syscall(tracee.tid, sig)

    def _deliver(self, tracee: Tracee, sig: int) -> None:
        """An ordinary signal: deliver it, noting the mask its handler will run with."""
        if self.signals.known(tracee.tgid):
            forced = False
            if sig == signal.SIGSEGV:
                # A fault's SIGSEGV, not one sent by a process (si_code <= 0).
                info = n.ptrace_getsiginfo(tracee.tid, self._siginfo)
                forced = info.si_code > 0 or info.si_code == n.SI_KERNEL
            self.signals.delivering(tracee, sig, forced)
            if sig == signal.SIGSEGV:
                self._sync_process(tracee.tgid)
            else:
                self._sync(tracee)
        self._resume(tracee, sig)

    # -- events -------------------------------------------------------------------------------

    def _event(self, tracee: Tracee, event: int, sig: int) -> None:
        tid = tracee.tid
        if event in (n.PTRACE_EVENT_FORK, n.PTRACE_EVENT_VFORK, n.PTRACE_EVENT_CLONE):
            child = n.ptrace_geteventmsg(tid)
            # clone() without CLONE_THREAD makes a process, reported as a clone event too.
            self._new_child(tracee, child, _tgid(child) if event == n.PTRACE_EVENT_CLONE else child)
            self._resume(tracee)
        elif event == n.PTRACE_EVENT_EXEC:
            self._exec_event(tracee)
        elif event == n.PTRACE_EVENT_EXIT:
            self._exit_event(tracee)
            self._resume(tracee)
        elif event == n.PTRACE_EVENT_STOP:
            if tracee.phase == Phase.NEW:
                if tracee.announced:
                    tracee.phase = Phase.RUNNING
                    self._resume(tracee)
                else:
                    tracee.held = True  # resumed when its parent's event says what it is
            elif sig in _STOP_SIGNALS:
                # Group-stop (Ctrl-Z, SIGSTOP): stay stopped until SIGCONT, as without us;
                # the shell is told by the kernel, since we are not the parent.
                n.ptrace_listen(tid)
            else:
                self._resume(tracee)
        else:
            self._resume(tracee)

    def _new_child(self, parent: Tracee, child: int, tgid: int) -> None:
        tracee = self._tracees.get(child)
        if tracee is None:
            # The core has resumed it already; the Python loop sees its first stop.
            phase = Phase.RUNNING if self._core is not None else Phase.NEW
            tracee = self._add(Tracee(child, tgid, phase))
        self._retag(tracee, tgid)
        tracee.announced = True
        # A new thread or process starts with its creator's mask and faulting state.
        tracee.blocked = parent.blocked
        tracee.program_faulting = parent.program_faulting
        tracee.core_flags = parent.core_flags  # the core copies them too
        if tgid == parent.tgid:
            self.outcome.threads += 1
        else:
            self.outcome.processes += 1
            self.signals.forked(parent.tgid, tgid)
        if tracee.held:
            tracee.held = False
            tracee.phase = Phase.RUNNING
            self._resume(tracee)

    def _exec_event(self, tracee: Tracee) -> None:
        self._exec_done(tracee, n.ptrace_geteventmsg(tracee.tid))
        if self._after_exec:
            tracee.phase = Phase.EXECED  # set the new image up once execve returns
            n.ptrace_syscall(tracee.tid)
        else:
            self._resume(tracee)

    def _exec_done(self, tracee: Tracee, former: int) -> None:
        """Bookkeeping of an exec (the thread stopped at it if the image is the
        program's first)."""
        tid = tracee.tid
        old_tgid = tracee.tgid
        # Every other thread of the process is gone now (exec from a non-leader thread
        # even took over the leader's tid).
        first = not self.signals.known(old_tgid)
        # A thread other than the leader may have exec'd and taken over the leader's tid:
        # the mask is that thread's.
        execing = self._tracees.get(former) if former != tid else None
        for other in [t for t in self._tracees.values() if t.tgid == old_tgid]:
            if other.tid != tid:
                self._remove(other.tid)
        if former != tid:
            self._remove(former)
        if execing is not None:
            tracee.blocked = execing.blocked
        if first:
            # The program's first image: xcr0run's own state before it is not followed.
            self.signals.first_image(tid, _ignored_signals(tid))
            tracee.blocked = n.ptrace_getsigmask(tid)
        else:
            self.signals.exec_done(old_tgid, tid)
        self._retag(tracee, tid)
        tracee.names = None
        tracee.program_faulting = False  # execve resets faulting
        self._sync(tracee)
        self.outcome.execs += 1
        if self._on_exec is not None:
            self._on_exec(tid, _exe(tid))

    def _exit_event(self, tracee: Tracee) -> None:
        """A thread is exiting (PTRACE_EVENT_EXIT; sampled already). A fatal signal ends
        the whole process: if it is the program, that is its end."""
        if self._program_exit_done or tracee.tgid != self.outcome.pid:
            return
        status = n.ptrace_geteventmsg(tracee.tid)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) != signal.SIGKILL:
            self.outcome.signal = os.WTERMSIG(status)
            self._program_ending(None, tracee)

    # -- the audit and the program's end -------------------------------------------------------

    def _sample(self, tracee: Tracee) -> None:
        assert self.audit is not None
        try:
            _, xstate_bv = self._xstate.read(tracee.tid)
        except n.NativeError:
            return  # not in a ptrace-stop we can read (e.g. already gone)
        if tracee.names is None:
            tracee.names = _names(tracee.tid, tracee.tgid)
        self.audit.note(tracee.tid, tracee.tgid, xstate_bv, *tracee.names)

    def _program_ending(self, code: int | None, caller: Tracee | None) -> int | None:
        """The program is ending: sample its threads (the one ending it is stopped), then
        let the front end conclude. Returns a replacement exit code, if any."""
        self._program_exit_done = True
        if self.audit is not None and caller is not None:
            self._sample(caller)
            self._sample_others(caller)
        assert self._on_program_exit is not None
        self.outcome.count_leaves(self._counts())
        return self._on_program_exit(self.outcome, code)

    def _sample_others(self, caller: Tracee) -> None:
        """Stop and sample the program's other threads before its exit kills them (they
        do not stop at their exit: a fatal signal is pending).

        Never waits for one thread alone, nor for ever: a thread that has exited (the
        zombie leader after pthread_exit in main) never reports a stop, and one inside
        vfork() stops only once its child execs or exits, which may need this helper
        running. Such threads are left unsampled; an interrupt still pending when they
        do stop is resumed by whichever loop runs."""
        core = self._core
        stopped = {tid for tid, _ in self._queue}
        waiting: list[Tracee] = []
        for other in [t for t in self._tracees.values() if t.tgid == caller.tgid]:
            if other is caller:
                continue
            if (
                other.held
                or other.tid in stopped
                or (core is not None and core.is_queued(other.tid))
            ):
                self._sample(other)  # stopped already, its stop waiting in the queue
                continue
            if _thread_state(other.tid) in "ZX":
                continue  # exited: nothing to stop or sample
            try:
                n.ptrace_interrupt(other.tid)
            except n.NativeError:
                continue
            waiting.append(other)
        delay, deadline = 0.0005, time.monotonic() + _SAMPLE_WAIT
        while waiting:
            for other in list(waiting):
                try:
                    tid, status = os.waitpid(other.tid, n.WALL | os.WNOHANG)
                except ChildProcessError:
                    waiting.remove(other)
                    continue
                if not tid:
                    continue
                waiting.remove(other)
                self._took_stop(other, tid, status)
            if not waiting or time.monotonic() > deadline:
                break
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def _took_stop(self, other: Tracee, tid: int, status: int) -> None:
        """A stop `_sample_others` collected itself: sample it, resume it if it is our
        interrupt, else hand it to the loop that runs."""
        if os.WIFSTOPPED(status):
            self._sample(other)
            if status >> 16 == n.PTRACE_EVENT_STOP and os.WSTOPSIG(status) == signal.SIGTRAP:
                try:
                    self._resume(other)  # our interrupt
                except n.NativeError:
                    pass  # killed meanwhile: its exit report follows
                return
        # An exit, or a stop of its own: handled in turn by whichever loop runs.
        if self._core is not None:
            self._core.requeue(tid, status)
        else:
            self._queue.append((tid, status))

    # -- stops the seccomp filter asked for ------------------------------------------------------

    def _seccomp_stop(self, tracee: Tracee) -> None:
        tid = tracee.tid
        if tracee.phase != Phase.RUNNING:
            # One of our injected calls (they pass the filter too), or the program's first
            # steps before exec: nothing to follow.
            self._resume(tracee)
            return
        why = n.ptrace_geteventmsg(tid)
        regs = n.ptrace_getregs(tid, self._regs)
        if not Stop.is_ours(why):
            # The program's own filter asked for a tracer; without us there is none, and
            # the kernel fails the call with ENOSYS.
            self._skip_call(tid, regs, _ENOSYS)
            return
        if why in (Stop.CPUID_PRCTL, Stop.CPUID_PRCTL_32):
            code, arg = (regs.rbx, regs.rcx) if why == Stop.CPUID_PRCTL_32 else (regs.rdi, regs.rsi)
            self._emulate_faulting_call(tracee, regs, code & 0xFFFFFFFF, arg)
            return
        if why in (Stop.CLONE_UNTRACED, Stop.CLONE_UNTRACED_32):
            # A child the tracer would not see, with faulting armed: traced like any other.
            if why == Stop.CLONE_UNTRACED_32:
                regs.rbx &= ~CLONE_UNTRACED
            else:
                regs.rdi &= ~CLONE_UNTRACED
            n.ptrace_setregs(tid, regs)
        elif why == Stop.CLONE3:
            try:  # a bad pointer: clone3 says EFAULT
                flags = n.ptrace_peek(tid, regs.rdi)
                if flags & CLONE_UNTRACED:
                    n.ptrace_poke(tid, regs.rdi, flags & ~CLONE_UNTRACED)
            except n.NativeError:
                pass
        elif why == Stop.SIGACTION:
            self._follow_sigaction(tracee, regs)
            self._sync_process(tracee.tgid)
        elif why == Stop.SIGPROCMASK:
            self._follow_sigprocmask(tracee, regs)
            self._sync(tracee)
        elif why == Stop.SIGRETURN:
            try:
                mask = n.ptrace_peek(tid, regs.rsp + sigstate.UC_SIGMASK_OFFSET)
                tracee.blocked = sigstate.after_sigprocmask(0, sigstate.SIG_SETMASK, mask)
            except n.NativeError:
                pass
            self._sync(tracee)
        elif why in (Stop.EXIT, Stop.EXIT_GROUP, Stop.EXIT_32, Stop.EXIT_GROUP_32):
            self._exit_call(tracee, regs, why)
        elif why == Stop.PTRACE:
            self._ptrace_attempt(tracee, regs)
        n.ptrace_cont(tid)

    def _skip_call(self, tid: int, regs: n.UserRegs, result: int) -> None:
        regs.orig_rax = _SKIPPED
        regs.rax = result & 0xFFFFFFFFFFFFFFFF
        n.ptrace_setregs(tid, regs)
        n.ptrace_cont(tid)

    def _emulate_faulting_call(self, tracee: Tracee, regs: n.UserRegs, code: int, arg: int) -> None:
        """ARCH_GET_CPUID / ARCH_SET_CPUID made by the program: answered as the kernel
        would without us, per thread; the real faulting stays armed."""
        if code == n.ARCH_GET_CPUID:
            result = 0 if tracee.program_faulting else 1
        else:
            tracee.program_faulting = arg == 0
            self._sync(tracee)
            result = 0
        self._skip_call(tracee.tid, regs, result)

    def _follow_sigaction(self, tracee: Tracee, regs: n.UserRegs) -> None:
        sig, act, size = regs.rdi & 0xFFFFFFFF, regs.rsi, regs.r10
        if not self.signals.known(tracee.tgid) or size != 8 or not 1 <= sig <= 64 or not act:
            return
        try:
            handler, flags, restorer, mask = (
                n.ptrace_peek(tracee.tid, act + 8 * i) for i in range(4)
            )
        except n.NativeError:
            return  # the call fails with EFAULT
        self.signals.sigaction(tracee.tgid, sig, (handler, flags, restorer, mask))

    def _follow_sigprocmask(self, tracee: Tracee, regs: n.UserRegs) -> None:
        how, new, size = regs.rdi & 0xFFFFFFFF, regs.rsi, regs.r10
        if size != 8:
            return
        try:
            value = n.ptrace_peek(tracee.tid, new)
        except n.NativeError:
            return
        current = n.ptrace_getsigmask(tracee.tid)
        tracee.blocked = sigstate.after_sigprocmask(current, how, value)

    def _exit_call(self, tracee: Tracee, regs: n.UserRegs, why: int) -> None:
        """exit or exit_group: if it ends the program, conclude now, while the exit code
        can still change."""
        if tracee.tgid != self.outcome.pid:
            return
        group = why in (Stop.EXIT_GROUP, Stop.EXIT_GROUP_32)
        i386 = why in (Stop.EXIT_32, Stop.EXIT_GROUP_32)
        code = (regs.rbx if i386 else regs.rdi) & 0xFF
        if self._program_exit_done:
            # Another thread's exit concluded, but threads that called exit_group at
            # the same time race to set the group's status: whichever gets there first
            # must carry the same replacement.
            replaced = self._exit_rewrite.get(code) if group else None
        elif not group and self._live.get(tracee.tgid, 0) > 1:
            return  # one thread of several
        else:
            replaced = self._program_ending(code, tracee)
            if replaced is not None:
                self._exit_rewrite[code] = replaced
        if replaced is not None and replaced != code:
            if i386:
                regs.rbx = replaced
            else:
                regs.rdi = replaced
            n.ptrace_setregs(tracee.tid, regs)

    def _ptrace_attempt(self, tracee: Tracee, regs: n.UserRegs) -> None:
        """A traced program called ptrace (the filter stopped it): say why attaching to
        its own children, or PTRACE_TRACEME, is going to fail."""
        request, target = regs.rdi, regs.rsi
        if (
            self._on_ptrace
            and request in _PTRACE_ATTACHING
            and (request == n.PTRACE_TRACEME or target in self._tracees)
        ):
            self._on_ptrace(tracee.tgid, _names(tracee.tid, tracee.tgid)[0])

    # -- running system calls in the tracee ----------------------------------------------------

    def _syscall_stop(self, tracee: Tracee) -> None:
        tid = tracee.tid
        regs = n.ptrace_getregs(tid, self._regs)
        if tracee.phase == Phase.EXECED:
            # execve has returned into the new image, whose first instruction has not run.
            tracee.resume_regs = n.UserRegs.from_buffer_copy(regs)
            tracee.saved_at, tracee.saved_word = regs.rip, n.ptrace_peek(tid, regs.rip)
            tracee.pending = [
                self._arch_prctl(regs, code, arg, what, required)
                for code, arg, what, required in self._after_exec
            ]
            self._inject_next(tracee)
        elif tracee.phase == Phase.INJECT_ENTER:
            tracee.phase = Phase.INJECT_EXIT
            n.ptrace_syscall(tid)
        elif tracee.phase == Phase.INJECT_EXIT:
            result = regs.rax if regs.rax < 1 << 63 else regs.rax - (1 << 64)
            call = tracee.pending.pop(0)
            if result < 0:
                self._injection_failed(tracee, call, result)
            if tracee.pending:
                self._inject_next(tracee)
                return
            self._injections_done(tracee)
        else:
            n.ptrace_cont(tid)  # a syscall stop we did not ask for

    @staticmethod
    def _arch_prctl(regs: n.UserRegs, code: int, arg: int, what: str, required: bool) -> Injection:
        number = _SYS_ARCH_PRCTL_32 if regs.cs == _USER32_CS else n.SYS_arch_prctl
        return Injection(number, (code, arg), what, required)

    def _inject_next(self, tracee: Tracee) -> None:
        """Run the next pending call: a `syscall` (int 0x80 for 32-bit code) placed at
        `saved_at` (whose word the caller saved); bytes and registers are put back once
        every pending call has run."""
        call = tracee.pending[0]
        saved = tracee.resume_regs
        assert saved is not None
        compat = saved.cs == _USER32_CS
        insn = _INT80_BYTES if compat else _SYSCALL_BYTES
        n.ptrace_poke(tracee.tid, tracee.saved_at, (tracee.saved_word & ~0xFFFF) | insn)
        regs_in = n.UserRegs.from_buffer_copy(saved)
        regs_in.rip = tracee.saved_at
        regs_in.rax = call.number
        names = ("rbx", "rcx", "rdx", "rsi") if compat else ("rdi", "rsi", "rdx", "r10")
        for name, value in zip(names, call.args):
            setattr(regs_in, name, value)
        n.ptrace_setregs(tracee.tid, regs_in)
        tracee.phase = Phase.INJECT_ENTER
        n.ptrace_syscall(tracee.tid)

    def _injections_done(self, tracee: Tracee) -> None:
        tid = tracee.tid
        resume = tracee.resume_regs
        assert resume is not None
        n.ptrace_poke(tid, tracee.saved_at, tracee.saved_word)
        n.ptrace_setregs(tid, resume)
        if tracee.reblock_segv:
            n.ptrace_setsigmask(tid, n.ptrace_getsigmask(tid) | sigstate.SEGV_BIT)
            tracee.reblock_segv = False
        tracee.resume_regs = None
        tracee.phase = Phase.RUNNING
        n.ptrace_cont(tid)

    def _injection_failed(self, tracee: Tracee, call: Injection, result: int) -> None:
        message = f"could not {call.what} in pid {tracee.tid}: {os.strerror(-result)}"
        if call.required:
            os.kill(tracee.tid, signal.SIGKILL)
            raise SupervisorError(message)
        self.outcome.warnings.append(message)

    # -- the CPUID trap ----------------------------------------------------------------------------

    def _cpuid_trap(self, tracee: Tracee) -> bool:
        """Answer a faulting CPUID; False if this SIGSEGV is anything else."""
        if not self.trap_cpuid or tracee.phase != Phase.RUNNING:
            return False
        tid = tracee.tid
        info = n.ptrace_getsiginfo(tid, self._siginfo)
        if info.si_code != n.SI_KERNEL or info.si_addr != 0:
            return False
        regs = n.ptrace_getregs(tid, self._regs)
        compat = regs.cs == _USER32_CS
        length = _cpuid_at(tid, regs.rip, compat)
        if not length:
            return False
        if tracee.program_faulting:
            return False  # the program armed faulting itself: its SIGSEGV, as natively
        leaf, subleaf = regs.rax & 0xFFFFFFFF, regs.rcx & 0xFFFFFFFF
        answer = self.responder.answer(leaf, subleaf, lambda: _current_cpu(tid))
        regs.rax, regs.rbx, regs.rcx, regs.rdx = answer
        self.responder.count(leaf, subleaf)
        repair = sigstate.NO_REPAIR if compat else self.signals.repair(tracee)
        if not repair.needed:
            regs.rip += length
            n.ptrace_setregs(tid, regs)
            n.ptrace_cont(tid)
            return True
        return self._answer_and_repair(tracee, regs, length, repair)

    def _answer_and_repair(
        self, tracee: Tracee, regs: n.UserRegs, length: int, repair: sigstate.TrapRepair
    ) -> bool:
        tid = tracee.tid
        regs.rip += length
        if repair.action is None:
            n.ptrace_setregs(tid, regs)
            if repair.reblock:
                n.ptrace_setsigmask(tid, n.ptrace_getsigmask(tid) | sigstate.SEGV_BIT)
            n.ptrace_cont(tid)
            return True
        # The kernel reset the SIGSEGV handler on its way here: reinstall the program's
        # (rt_sigaction with the struct below the red zone), then resume answered.
        tracee.reblock_segv = repair.reblock
        tracee.resume_regs = n.UserRegs.from_buffer_copy(regs)
        at = regs.rip - length
        scratch = (regs.rsp - _SCRATCH_BELOW_SP) & ~15
        for i, word in enumerate(repair.action.words()):
            n.ptrace_poke(tid, scratch + 8 * i, word)
        tracee.saved_at, tracee.saved_word = at, n.ptrace_peek(tid, at)
        tracee.pending = [
            Injection(_SYS_RT_SIGACTION, (signal.SIGSEGV, scratch, 0, 8), "restore SIGSEGV")
        ]
        self._inject_next(tracee)
        return True


def _cpuid_at(tid: int, rip: int, compat: bool) -> int:
    """The length of the CPUID instruction at `rip`, or 0. Reads aligned words, which
    never cross into an unmapped page."""
    base, offset = rip & ~7, rip & 7
    word = n.ptrace_peek(tid, base)
    if offset <= 6 and (word >> (offset * 8)) & 0xFFFF == 0xA20F:
        return 2  # the plain encoding: one read
    code = word.to_bytes(8, "little")
    for extra in (8, 16):
        try:
            code += n.ptrace_peek(tid, base + extra).to_bytes(8, "little")
        except n.NativeError:
            break
    return max(cpuid_instruction_length(code[offset : offset + 15], not compat), 0)


def _tgid(tid: int) -> int:
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return tid


def _ignored_signals(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigIgn:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return "?"


def _names(tid: int, tgid: int) -> tuple[str, str]:
    """A thread's comm and its process's executable, for reports."""
    try:
        with open(f"/proc/{tid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        comm = "?"
    return comm, _exe(tgid)


def _thread_state(tid: int) -> str:
    """The state letter of /proc/<tid>/stat (R, S, D, t, Z, X...), or "X" if gone."""
    try:
        with open(f"/proc/{tid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return "X"


def _current_cpu(tid: int) -> int:
    """The CPU a stopped thread last ran on (/proc/<tid>/stat field 39)."""
    try:
        with open(f"/proc/{tid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[36])
    except (OSError, IndexError, ValueError):
        return -1

"""Running a program: plan -> banner -> become the program, with a tracing helper beside
it where the plan needs one. What the helper says at the program's exit (the audit, the
report, exit status 124) is decided here too.

The process that runs this becomes the program (launcher.exec_direct or
exec_supervised) and so never returns; the helper runs `ProgramTracer` and ends with
the traced tree.
"""

from __future__ import annotations

import os

from xcr0run import PROG, host, launcher
from xcr0run.errors import Xcr0runError
from xcr0run.seccomp import FilterSpec
from xcr0run.status import exit_status

# The tracer (supervisor.py, with the audit and threads) is imported only where a helper
# runs, and typing and dataclasses not at all: a program exec'd without a helper should
# not pay for them at start-up.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any, NoReturn

    from xcr0run.audit import AuditLog
    from xcr0run.plan import Plan
    from xcr0run.supervisor import Outcome, Supervisor


class AuditChoice:
    __slots__ = ("enabled", "expect_used", "interval", "strict")

    def __init__(
        self,
        enabled: bool | None,  # --audit/--no-audit; None: on with the cpuid mechanism
        interval: float | None,
        expect_used: list[tuple[str, int]],
        strict: bool,
    ) -> None:
        self.enabled = enabled
        self.interval = interval
        self.expect_used = expect_used
        self.strict = strict

    def wanted(self, trap_cpuid: bool) -> bool:
        if self.enabled is False:
            return False
        return bool(self.enabled or trap_cpuid or self.interval or self.expect_used)


class RunRequest:
    """Everything a run needs, decided before anything starts."""

    __slots__ = (
        "argv",
        "checks",
        "described",
        "env",
        "path",
        "plan",
        "quiet",
        "report",
        "xcr0_prctl",
    )

    def __init__(
        self,
        path: str,
        argv: Sequence[str],
        plan: Plan,
        xcr0_prctl: int,
        env: list[bytes],
        described: dict[str, Any],  # the plan as --report and the banner show it
        checks: AuditChoice,
        quiet: bool,
        report: str | None,
    ) -> None:
        self.path = path
        self.argv = argv
        self.plan = plan
        self.xcr0_prctl = xcr0_prctl
        self.env = env
        self.described = described
        self.checks = checks
        self.quiet = quiet
        self.report = report


def open_report(path: str) -> int:
    """Open --report's file now, so a bad path is an error before the program runs."""
    if not path:
        raise Xcr0runError("cannot write report '': an empty file name")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        return launcher.above_stdio(fd)
    except OSError as err:
        raise Xcr0runError(f"cannot write report {path}: {err.strerror}") from err


class RunResult:
    """What a run came to, as --report tells it: the plan as shown, how the program
    ended (with the exit status its caller sees) and what the audit saw."""

    def __init__(
        self, described: dict[str, Any], outcome: Outcome | None, audit: AuditLog | None
    ) -> None:
        self.described = described
        self.outcome = outcome
        self.audit = audit

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"plan": self.described}
        if self.audit is not None:
            data["audit"] = self.audit.to_json()
        outcome = self.outcome
        if outcome is not None:
            data["run"] = {
                "started": bool(outcome.execs),  # False: its exec failed (126, 127)
                "pid": outcome.pid,
                "exit_code": outcome.exit_code,
                "signal": outcome.signal,
                "processes": outcome.processes,
                "threads": outcome.threads,
                "execs": outcome.execs,
                "cpuid_traps": outcome.cpuid_traps,
                "cpuid_leaves": outcome.leaves,
            }
        return data


def write_report(fd: int, result: RunResult) -> None:
    import contextlib

    from xcr0run import render

    with contextlib.suppress(OSError), os.fdopen(fd, "w") as f:
        f.write(render.to_json(result.to_json()) + "\n")


def become_program(request: RunRequest) -> NoReturn:
    """Exec the program, with a tracing helper if the plan or the audit needs one."""
    plan = request.plan
    audit = None
    if request.checks.wanted(plan.trap_cpuid):
        from xcr0run.audit import AuditLog

        audit = AuditLog(plan.view.host_xcr0 & ~plan.mask)
    report_fd = open_report(request.report) if request.report is not None else -1
    # --report alone also starts the helper: only a process beside the program hears how
    # it ended, and the report promises the exit status.
    if not plan.supervised and audit is None and report_fd < 0:
        launcher.exec_direct(request.path, request.argv, plan, request.xcr0_prctl, request.env)
    guard = FilterSpec(
        deny_amx=plan.deny_amx,
        # Without CAP_SYS_ADMIN a filter needs no_new_privs, a price the explanation alone
        # is not worth; with the CPUID guard there is a filter anyway.
        explain_ptrace=os.geteuid() == 0 or plan.trap_cpuid,
        guard_cpuid=plan.trap_cpuid,
        stop_at_exit=audit is not None or report_fd >= 0,
    )
    if not os.path.isdir("/proc/self"):
        raise Xcr0runError(
            "/proc is not mounted, and the tracing helper needs it (mount -t proc proc "
            "/proc; without the cpuid mechanism, --no-audit runs without a helper)"
        )
    if os.getpid() == 1:
        # PID 1 of a namespace reaps every orphan, the helper included: it becomes the
        # program's child. Said, not refused: most programs never wait for children they
        # did not start, and a container's main use is to run the program at all.
        _warn(
            f"running as PID 1: the tracing helper will be the program's child, so a "
            f"program that waits for all its children waits for {PROG} too (start "
            f"{PROG} under an init, e.g. docker run --init)"
        )
    tracer = ProgramTracer(request, audit, report_fd)
    keep = frozenset({report_fd} if report_fd >= 0 else ())
    launcher.exec_supervised(
        request.path, request.argv, plan, request.xcr0_prctl, request.env, guard, tracer, keep
    )


def _warn(line: str) -> None:
    import contextlib

    with contextlib.suppress(OSError):
        os.write(2, f"{PROG}: {line}\n".encode())


class ProgramTracer:
    """The helper's work: trace the program's tree, and speak once at its exit."""

    def __init__(self, request: RunRequest, audit: AuditLog | None, report_fd: int) -> None:
        self.request = request
        self.audit = audit
        self.report_fd = report_fd
        self.stderr = -1
        self.warned_ptrace: set[int] = set()
        self.warned_exec: set[str] = set()

    def __call__(self, program: int, attached: launcher.Attached, stderr: int) -> int:
        from xcr0run.supervisor import Supervisor, SupervisorError

        self.stderr = stderr
        plan = self.request.plan
        supervisor = Supervisor(
            plan.view,
            trap_cpuid=plan.trap_cpuid,
            grant_amx=plan.grant_amx,
            audit=self.audit,
            on_ptrace=self.explain_ptrace,
            # Only a tracer without root withholds privileges (the core then shows every
            # exec to Python; as root it re-arms new images without asking).
            on_exec=self.check_privileges if os.geteuid() != 0 else None,
            on_program_exit=self.conclude,
        )
        try:
            supervisor.seize(program)
        except (Xcr0runError, OSError) as err:
            attached(str(err))
            return 1
        attached(None)
        ticker = None
        if self.audit is not None and self.request.checks.interval:
            ticker = _Ticker(self.request.checks.interval, supervisor)
        try:
            if ticker:
                ticker.start()
            supervisor.run()
        except SupervisorError as err:
            self.say(str(err))
            return 1
        finally:
            if ticker:
                ticker.stop()
        return 0

    def say(self, line: str) -> None:
        import contextlib  # the helper's: an import less for a start without one

        if self.stderr >= 0:
            with contextlib.suppress(OSError):
                os.write(self.stderr, f"{PROG}: {line}\n".encode())

    def explain_ptrace(self, pid: int, name: str) -> None:
        if pid not in self.warned_ptrace:
            self.warned_ptrace.add(pid)
            self.say(
                f"{name} (pid {pid}) tries to trace a process that {PROG} traces; a "
                f"process has one tracer, so run debuggers outside {PROG}"
            )

    def check_privileges(self, pid: int, path: str) -> None:
        what = host.privileges_lost_under_trace(path)
        if what and path not in self.warned_exec:
            self.warned_exec.add(path)
            self.say(
                f"{path} is {what}, but runs without those privileges: the kernel does not "
                f"grant them to a traced program (run it outside {PROG}, or as root)"
            )

    def conclude(self, outcome: Outcome, code: int | None) -> int | None:
        """At the program's exit, before its parent hears of it: the audit's lines, the
        report, and the status the audit asks for. Then let go of stderr and the report,
        which the program's caller may be waiting on."""
        if not outcome.execs:
            # It never became the program: xcr0run reported the exec failure on stderr;
            # the report says the program did not start, and the status it ended with.
            self._report(outcome, code, None)
            return None
        checks, audit = self.request.checks, self.audit
        for warning in outcome.warnings:
            self.say(warning)
        failed = False
        if audit is not None:
            if audit.violations() or not self.request.quiet:
                for line in audit.summary():
                    self.say(line)
            missing = audit.missing(checks.expect_used)
            if missing:
                self.say(f"audit: no use of {', '.join(missing)} was seen")
            failed = bool(missing) or (checks.strict and bool(audit.violations()))
        status = exit_status(code, failed)
        # The report's exit code is the one the shell sees: 124 where the audit put it.
        self._report(outcome, code if status is None else status, audit)
        if self.stderr >= 0:
            os.close(self.stderr)
            self.stderr = -1
        return status

    def _report(self, outcome: Outcome, code: int | None, audit: AuditLog | None) -> None:
        if self.report_fd < 0:
            return
        if code is not None:
            outcome.exit_code = code
        write_report(self.report_fd, RunResult(self.request.described, outcome, audit))
        self.report_fd = -1


class _Ticker:
    """Periodic audit samples (--audit-interval), from a thread of their own."""

    def __init__(self, interval: float, supervisor: Supervisor) -> None:
        import signal
        import threading

        self.thread = threading.Thread(target=self.run, daemon=True, name="xcr0run-audit")
        self.interval = interval
        self.supervisor = supervisor
        self.main = threading.main_thread().ident or 0
        self.done = threading.Event()
        # The tracer sleeps in waitpid; this wakes it with a signal whose default action
        # is to ignore it, aimed at the main thread, whose handler then does the work.
        self.wake = launcher.WAKE_SIGNAL  # which the helper did not set to SIG_IGN
        signal.signal(self.wake, lambda _s, _f: supervisor.on_wakeup())

    def start(self) -> None:
        self.thread.start()

    def run(self) -> None:
        import signal

        while not self.done.wait(self.interval):
            self.supervisor.sample_due = True
            signal.pthread_kill(self.main, self.wake)

    def stop(self) -> None:
        self.done.set()

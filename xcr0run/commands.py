"""What each form of the command line does, once its options are parsed: run a program,
--show (this thread, or another process with -p), --dump-cpuid, --print-rr-flags; and
how a failure of any of them reaches the user (`finish`).

Both parsers end here: click's (cli.py) and the one for a plain run (runargs.py), which
keeps click off the launch path. So this module imports nothing at the top that running
a program does not need; --show and the rest import what they need when called.
"""

from __future__ import annotations

import os
import sys

from xcr0run import PROG, host
from xcr0run.errors import UsageError, Xcr0runError
from xcr0run.status import ExitStatus

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn

    from xcr0run.cpuid import CpuidTable
    from xcr0run.envhints import EnvHint
    from xcr0run.plan import ViewSpec
    from xcr0run.profiles import CpuidProfile


class CommandLine:
    """Every option's value after conversion, as the click command's callback receives
    them: `mask` and `expect_used` keep the text they were given for messages."""

    __slots__ = (
        "as_json",
        "audit",
        "audit_interval",
        "command",
        "dump_cpuid",
        "env_hints",
        "expect_used",
        "force",
        "grant_amx",
        "level",
        "mask",
        "method",
        "pid",
        "print_rr_flags",
        "profiles",
        "quiet",
        "report",
        "show",
        "strict",
        "xcr0_only",
        "xcr0_prctl",
    )

    def __init__(
        self,
        *,
        mask: tuple[str, int] | None = None,
        level: str | None = None,
        profiles: tuple[CpuidProfile, ...] = (),
        show: bool = False,
        as_json: bool = False,
        pid: int | None = None,
        method: str = "auto",  # plan.Method.AUTO
        env_hints: bool = False,
        dump_cpuid: str | None = None,
        print_rr_flags: bool = False,
        quiet: bool = False,
        report: str | None = None,
        force: bool = False,
        audit: bool | None = None,
        audit_interval: float | None = None,
        expect_used: tuple[str, list[tuple[str, int]]] | None = None,
        strict: bool = False,
        grant_amx: bool = False,
        xcr0_prctl: int | None = None,
        xcr0_only: bool = False,
        command: tuple[str, ...] = (),
    ) -> None:
        self.mask = mask
        self.level = level
        self.profiles = profiles
        self.show = show
        self.as_json = as_json
        self.pid = pid
        self.method = method
        self.env_hints = env_hints
        self.dump_cpuid = dump_cpuid
        self.print_rr_flags = print_rr_flags
        self.quiet = quiet
        self.report = report
        self.force = force
        self.audit = audit
        self.audit_interval = audit_interval
        self.expect_used = expect_used
        self.strict = strict
        self.grant_amx = grant_amx
        self.xcr0_prctl = xcr0_prctl
        self.xcr0_only = xcr0_only
        self.command = command


def dispatch(line: CommandLine) -> int:
    """Do what `line` asks; the exit status, unless it runs a program (never returns)."""
    code = host.xcr0_prctl_code(line.xcr0_prctl)
    if line.dump_cpuid is not None:
        if line.command or line.show:
            raise UsageError("--dump-cpuid takes no command and no --show")
        return _dump(line.dump_cpuid)
    wanted = Wanted(line.mask, line.level, line.profiles, line.force)
    if line.show:
        if line.command:
            raise UsageError("--show takes no command")
        if line.pid is not None:
            if wanted.given:
                raise UsageError("--pid does not go with --mask, --level or --profile")
            return _show_process(line.pid, line.as_json)
        return _show(wanted, line.method, code, line.as_json, line.env_hints, line.xcr0_only)
    if line.pid is not None:
        raise UsageError("--pid goes with --show")
    if line.as_json:
        raise UsageError("--json goes with --show")
    if line.print_rr_flags:
        if not wanted.given:
            raise UsageError("--print-rr-flags needs --mask, --level or --profile")
        return _print_rr_flags(wanted)
    if not line.command:
        raise UsageError("no command given")
    if not wanted.given:
        raise UsageError("missing --mask (or --level, --profile)")
    return _run(wanted, line.method, code, line)


class Wanted:
    """The view asked for on the command line."""

    __slots__ = ("force", "level", "mask", "profiles")

    def __init__(
        self,
        mask: tuple[str, int] | None,
        level: str | None,
        profiles: tuple[CpuidProfile, ...],
        force: bool,
    ) -> None:
        self.mask = mask
        self.level = level
        self.profiles = profiles
        self.force = force

    @property
    def given(self) -> bool:
        return self.mask is not None or self.level is not None or bool(self.profiles)

    def shape(self, host_xcr0: int, table: CpuidTable) -> ViewSpec:
        from xcr0run.plan import shape_view

        profile = None
        if self.profiles:
            from xcr0run.profiles import common

            profile = common(self.profiles)
        return shape_view(host_xcr0, table, self.mask, self.level, profile, self.force)


def _echo(text: str) -> None:
    """A line on stdout; none when stdout is closed (`>&-`), as click.echo does."""
    out = sys.stdout
    if out is not None:
        out.write(text + "\n")
        out.flush()


def _dump(target: str) -> int:
    from xcr0run import profile_files, render

    text = render.to_json(profile_files.dump_cpuid())
    if target == "-":
        _echo(text)
        return 0
    try:
        with open(target, "w") as f:
            f.write(text + "\n")
    except OSError as err:
        raise Xcr0runError(f"cannot write {target}: {err.strerror}") from err
    return 0


def _print_rr_flags(wanted: Wanted) -> int:
    from xcr0run.view import CpuidView, rr_record_flags

    host_xcr0, table = host.xcr0(), host.cpuid_table()
    spec = wanted.shape(host_xcr0, table)
    view = CpuidView.build(spec.mask, host_xcr0, False, spec.extra_hidden)
    flags, uncovered = rr_record_flags(view, table)
    _echo(" ".join(flags))
    if uncovered:
        to_stderr(
            f"{PROG}: rr cannot mask these (leaves other than 1, 7.0 and 0xD.1): "
            f"{' '.join(uncovered)}"
        )
    return 0


def _show(
    wanted: Wanted, method: str, code: int, as_json: bool, env_hints: bool, xcr0_only: bool
) -> int:
    from xcr0run import describe, render, xstate_report

    caps = host.capabilities(code)
    table = host.cpuid_table()
    report = xstate_report.gather(caps, code, table)
    if wanted.given:
        spec = wanted.shape(caps.xcr0, table)
        report.plan = describe.describe_spec(spec, caps, method, table, env_hints, xcr0_only)
    if as_json:
        _echo(render.to_json(report.to_json()))
    else:
        render.show(report, sys.stdout)
    return 0


def _show_process(pid: int, as_json: bool) -> int:
    from xcr0run import render, xstate_report

    data = xstate_report.process_report(pid)
    if as_json:
        _echo(render.to_json(data))
    else:
        render.show_process(data, sys.stdout)
    return 0


def _run(wanted: Wanted, method: str, code: int, line: CommandLine) -> NoReturn:
    """Decide everything about the run, say it (unless -q), become the program."""
    from xcr0run import launcher, procfs, run
    from xcr0run.plan import plan_for
    from xcr0run.view import psabi_level

    expected = line.expect_used[1] if line.expect_used else []
    checks = run.AuditChoice(line.audit, line.audit_interval, expected, line.strict)
    if checks.enabled is False and (checks.expect_used or checks.strict):
        raise UsageError("--no-audit contradicts --expect-used and --strict")
    command = line.command
    path = launcher.find_command(command[0])
    caps = host.capabilities(code)
    table = host.cpuid_table()
    spec = wanted.shape(caps.xcr0, table)
    plan = plan_for(spec, caps, method, line.grant_amx, line.xcr0_only)
    if not wanted.force:
        launcher.check_isa_level(path, psabi_level(plan.view.apply(table), plan.mask, glibc=True))
    hints: list[EnvHint] = []
    if line.env_hints or plan.env_only:
        from xcr0run import describe

        hints = describe.env_hints(plan)
    env = procfs.original_environment()
    if hints:
        from xcr0run import envhints

        env = envhints.with_values(env, {h.name: h.value for h in hints})
    described: dict[str, Any] = {}  # only the banner and --report say it: worked out for them
    if not line.quiet or line.report:
        from xcr0run import describe

        described = describe.describe_plan(plan, spec, table, hints)
    if not line.quiet:
        from xcr0run import render

        to_stderr(render.banner(described, caps.xcr0))
    run.become_program(
        run.RunRequest(path, command, plan, code, env, described, checks, line.quiet, line.report)
    )


# -- how it ends ----------------------------------------------------------------------------


def to_stderr(text: str) -> None:
    """Our messages must not stop the program from running: a closed or broken stderr
    (`2>&-`, `2>&1 | true`) loses them, as it would the program's own."""
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


def fail(message: str, status: int, usage: bool = False) -> NoReturn:
    to_stderr(f"{PROG}: {message}")
    if usage:
        to_stderr(f"Try '{PROG} --help' for more information.")
    exit_now(status)


def finish(action: Callable[[], int | None]) -> NoReturn:
    """Run `action` and exit with its status; our errors become one line and a status,
    never a traceback. The only place, with cli.main for click's own errors, that
    exits."""
    try:
        result = action()
    except KeyboardInterrupt:
        interrupted()
    except UsageError as err:
        fail(str(err), ExitStatus.FAILURE, usage=True)
    except Xcr0runError as err:
        fail(str(err), err.status)
    except OSError as err:
        fail(os_error_text(err), ExitStatus.FAILURE)
    except Exception as err:  # a bug of ours: one line, not a traceback, unless debugging
        if os.environ.get("XCR0RUN_DEBUG"):
            raise
        fail(f"internal error: {err!r} (set XCR0RUN_DEBUG=1 for details)", ExitStatus.FAILURE)
    exit_now(result or 0)


def os_error_text(err: OSError) -> str:
    """An OSError in words, as coreutils says them ("/proc/self/fd: Too many open
    files"), not Python's "[Errno 24] ..."."""
    if err.strerror is None:
        return str(err)
    return f"{err.filename}: {err.strerror}" if err.filename is not None else err.strerror


def interrupted() -> NoReturn:
    """Ctrl-C before the program started: die of SIGINT, as the program would have."""
    import contextlib
    import signal

    with contextlib.suppress(OSError, ValueError, AttributeError):
        sys.stderr.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    sys.exit(128 + signal.SIGINT)


def exit_now(status: int) -> NoReturn:
    """Exit, even where stdout is closed or its reader gone (flushing it would fail)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)

"""The command line: click definitions, messages, exit statuses. The only module that
prints or exits; everything it does goes through the library.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import click
from click.shell_completion import CompletionItem

if TYPE_CHECKING:
    from xcr0run.profiles import CpuidProfile

import xcr0run.completion  # noqa: F401  (its completion classes know mask edits)
from xcr0run import PROG, __version__, host, masks
from xcr0run.cpuid import CpuidTable
from xcr0run.errors import MaskError, Xcr0runError
from xcr0run.plan import Method, ViewSpec, shape_view
from xcr0run.run import AuditChoice
from xcr0run.status import ExitStatus
from xcr0run.view import LEVELS

# Help lines fit 80 columns: click indents the epilog by 2, the text column is at 19.
_PRESETS = textwrap.wrap("a preset: " + ", ".join(masks.PRESETS), 59, break_on_hyphens=False)

EPILOG = f"""\b
Mask syntax (see man {PROG}):
  x87,sse,avx      exactly these XSAVE components (groups: avx512, amx, mpx)
  0x7              a raw XCR0 value
  no-avx512        {(chr(10) + " " * 19).join(_PRESETS)}
  -avx512,-pkru    the host set minus these (and what needs them)

\b
Examples:
  {PROG} --show                      this thread's XCR0, decoded
  {PROG} --show --mask no-avx512     what the mask hides here, dry run
  {PROG} --mask no-avx512 -- ./test  run as on a CPU without AVX-512
  {PROG} -q --mask x87,sse,avx -- make check
  {PROG} --report run.json -m -avx -- ./bench

\b
Exit status: the command's own; 124 if the audit failed (--strict,
--expect-used); 125 if {PROG} itself fails; 126 if the command cannot be
executed; 127 if it is not found. {PROG} becomes the command: its pid,
signals and exit status are the command's own.
"""


class MaskParam(click.ParamType):
    """A --mask value: parsed against this machine's XCR0; keeps the text for messages.
    With `rules=False` (--expect-used), components named as in a mask, without the XCR0
    rules or presets."""

    def __init__(self, rules: bool = True) -> None:
        self.rules = rules
        self.name = "MASK" if rules else "COMPONENTS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        try:
            if self.rules:
                return (value, masks.parse_mask(value, host.xcr0()))
            return (value, masks.parse_components(value))
        except MaskError as err:
            self.fail(str(err), param, ctx)

    def shell_complete(
        self, ctx: click.Context, param: click.Parameter, incomplete: str
    ) -> list[CompletionItem]:
        return [
            CompletionItem(value, help=text)
            for value, text in masks.complete(incomplete, host.xcr0(), presets=self.rules)
        ]


class ProfileParam(click.ParamType):
    """A --profile value: a file (xcr0run dump, SDE cpuid file, `cpuid -1 -r`) or the
    name of a reference profile shipped with xcr0run."""

    name = "PROFILE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from xcr0run import inspect
        from xcr0run.profiles import CpuidProfile

        if isinstance(value, CpuidProfile):
            return value
        try:
            return inspect.load_profile(value)
        except Xcr0runError as err:
            self.fail(str(err), param, ctx)

    def shell_complete(
        self, ctx: click.Context, param: click.Parameter, incomplete: str
    ) -> list[CompletionItem]:
        from xcr0run import inspect

        names = [n for n in inspect.reference_profiles() if n.startswith(incomplete)]
        return [CompletionItem(n) for n in names] + [CompletionItem(incomplete, type="file")]


class Seconds(click.ParamType):
    """A positive, finite time in seconds."""

    name = "SECONDS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, float):
            return value
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds >= 0.001):
            self.fail(f"not a time of at least 0.001 seconds: {value!r}", param, ctx)
        return seconds


class PrctlCode(click.ParamType):
    name = "CODE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int):
            return value
        try:
            return int(value, 0)
        except ValueError:
            self.fail(f"not a number: {value!r} (try 0x1014)", param, ctx)


@click.command(
    context_settings={"allow_interspersed_args": False, "help_option_names": ["-h", "--help"]},
    epilog=EPILOG,
    no_args_is_help=False,
)
@click.option("-m", "--mask", "mask", type=MaskParam(), help="XSAVE components the program sees.")
@click.option(
    "--level",
    type=click.Choice(LEVELS),
    help="The view of an x86-64 psABI level: every feature above it hidden.",
)
@click.option(
    "--profile",
    "profiles",
    type=ProfileParam(),
    multiple=True,
    metavar="FILE|NAME",
    help="Present another machine's CPUID (a dump or a reference profile); several: "
    "their common subset.",
)
@click.option("--show", is_flag=True, help="Show this thread's XCR0 and what the kernel offers.")
@click.option("--json", "as_json", is_flag=True, help="With --show: print JSON.")
@click.option(
    "-p",
    "--pid",
    type=click.IntRange(min=1),
    metavar="PID",
    help="With --show: another process, per thread.",
)
@click.option(
    "--method",
    type=click.Choice([m.value for m in Method]),
    default=Method.AUTO.value,
    show_default=True,
    help="kernel: ARCH_SET_XCR0; cpuid: CPUID faulting under ptrace; env: library knobs "
    "only; auto: best available.",
)
@click.option(
    "--env-hints",
    is_flag=True,
    help="Also set the knobs libraries read (glibc, NumPy, OpenSSL, MKL, oneDNN, Go, .NET).",
)
@click.option(
    "--dump-cpuid",
    is_flag=False,
    flag_value="-",
    default=None,
    metavar="[FILE]",
    help="Write this machine's CPUID table and XCR0 as a JSON profile (stdout: -).",
)
@click.option(
    "--print-rr-flags", is_flag=True, help="Print the `rr record` options for the same view."
)
@click.option("-q", "--quiet", is_flag=True, help="Do not print the state before starting.")
@click.option(
    "--report",
    type=click.Path(dir_okay=False, writable=True),
    help="Write a JSON summary of the run to this file at exit.",
)
@click.option("--force", is_flag=True, help="Run even if the program's ISA level is not met.")
@click.option(
    "--audit/--no-audit",
    default=None,
    help="Report hidden XSAVE state the program used anyway [default: on with cpuid].",
)
@click.option(
    "--audit-interval",
    type=Seconds(),
    metavar="SECONDS",
    help="Also sample every thread's XSAVE state this often.",
)
@click.option(
    "--expect-used",
    type=MaskParam(rules=False),
    metavar="COMPONENTS",
    help="Fail (status 124) unless these components were seen in use, e.g. avx512.",
)
@click.option("--strict", is_flag=True, help="Fail (status 124) when hidden state was used.")
@click.option(
    "--grant-amx", is_flag=True, help="Request AMX permission for the program in every image."
)
@click.option(
    "--xcr0-prctl",
    type=PrctlCode(),
    envvar=host.XCR0_PRCTL_ENV,
    help=f"arch_prctl code of ARCH_SET_XCR0 [default: 0x1014; env {host.XCR0_PRCTL_ENV}].",
)
@click.option(
    "--xcr0-only",
    is_flag=True,
    help="Change XCR0 only (ARCH_SET_XCR0); CPUID keeps the host's feature bits: "
    "enabled in CPUID, not by the OS.",
)
@click.version_option(__version__, "-V", "--version", prog_name=PROG)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def cli(
    mask: tuple[str, int] | None,
    level: str | None,
    profiles: tuple[CpuidProfile, ...],
    show: bool,
    as_json: bool,
    pid: int | None,
    method: str,
    env_hints: bool,
    dump_cpuid: str | None,
    print_rr_flags: bool,
    quiet: bool,
    report: str | None,
    force: bool,
    audit: bool | None,
    audit_interval: float | None,
    expect_used: tuple[str, list[tuple[str, int]]] | None,
    strict: bool,
    grant_amx: bool,
    xcr0_prctl: int | None,
    xcr0_only: bool,
    command: tuple[str, ...],
) -> Any:
    """Run COMMAND so that it sees only the chosen XSAVE state components and the
    CPU features that depend on them, or show what this thread's XCR0 really is."""
    code = host.xcr0_prctl_code(xcr0_prctl)
    if dump_cpuid is not None:
        if command or show:
            raise click.UsageError("--dump-cpuid takes no command and no --show")
        return _dump(dump_cpuid)
    wanted = Wanted(mask, level, profiles, force)
    if show:
        if command:
            raise click.UsageError("--show takes no command")
        if pid is not None:
            if wanted.given:
                raise click.UsageError("--pid does not go with --mask, --level or --profile")
            return _show_process(pid, as_json)
        return _show(wanted, Method(method), code, as_json, env_hints, xcr0_only)
    if pid is not None:
        raise click.UsageError("--pid goes with --show")
    if as_json:
        raise click.UsageError("--json goes with --show")
    if print_rr_flags:
        if not wanted.given:
            raise click.UsageError("--print-rr-flags needs --mask, --level or --profile")
        return _print_rr_flags(wanted)
    if not command:
        raise click.UsageError("no command given")
    if not wanted.given:
        raise click.UsageError("missing --mask (or --level, --profile)")
    checks = AuditChoice(audit, audit_interval, expect_used[1] if expect_used else [], strict)
    return _run(
        wanted,
        Method(method),
        code,
        command,
        quiet,
        report,
        checks,
        grant_amx,
        env_hints,
        xcr0_only,
    )


@dataclass(frozen=True)
class Wanted:
    """The view asked for on the command line."""

    mask: tuple[str, int] | None
    level: str | None
    profiles: tuple[CpuidProfile, ...]
    force: bool

    @property
    def given(self) -> bool:
        return self.mask is not None or self.level is not None or bool(self.profiles)

    def shape(self, host_xcr0: int, table: CpuidTable) -> ViewSpec:
        profile = None
        if self.profiles:
            from xcr0run.profiles import common

            profile = common(self.profiles)
        return shape_view(host_xcr0, table, self.mask, self.level, profile, self.force)


def _dump(target: str) -> int:
    from xcr0run import inspect, render

    text = render.to_json(inspect.dump_cpuid()) + "\n"
    if target == "-":
        click.echo(text, nl=False)
        return 0
    try:
        with open(target, "w") as f:
            f.write(text)
    except OSError as err:
        raise Xcr0runError(f"cannot write {target}: {err.strerror}") from err
    return 0


def _print_rr_flags(wanted: Wanted) -> int:
    from xcr0run.view import CpuidView, rr_record_flags

    host_xcr0, table = host.xcr0(), host.cpuid_table()
    spec = wanted.shape(host_xcr0, table)
    view = CpuidView.build(spec.mask, host_xcr0, False, spec.extra_hidden)
    flags, uncovered = rr_record_flags(view, table)
    click.echo(" ".join(flags))
    if uncovered:
        click.echo(
            f"{PROG}: rr cannot mask these (leaves other than 1, 7.0 and 0xD.1): "
            f"{' '.join(uncovered)}",
            err=True,
        )
    return 0


def _show(
    wanted: Wanted, method: Method, code: int, as_json: bool, env_hints: bool, xcr0_only: bool
) -> int:
    from xcr0run import inspect, render

    caps = inspect.capabilities(code)
    table = host.cpuid_table()
    report = inspect.gather(caps, code, table)
    if wanted.given:
        spec = wanted.shape(caps.xcr0, table)
        report.plan = inspect.describe_spec(spec, caps, method, table, env_hints, xcr0_only)
    if as_json:
        click.echo(render.to_json(report.to_json()))
    else:
        render.show(report, sys.stdout)
    return 0


def _show_process(pid: int, as_json: bool) -> int:
    from xcr0run import inspect, render

    data = inspect.process_report(pid)
    if as_json:
        click.echo(render.to_json(data))
    else:
        render.show_process(data, sys.stdout)
    return 0


def _run(
    wanted: Wanted,
    method: Method,
    code: int,
    command: Sequence[str],
    quiet: bool,
    report: str | None,
    checks: AuditChoice,
    grant_amx: bool,
    env_hints: bool,
    xcr0_only: bool = False,
) -> NoReturn:
    from xcr0run import inspect, launcher, procfs, render, run
    from xcr0run.view import psabi_level

    if checks.enabled is False and (checks.expect_used or checks.strict):
        raise click.UsageError("--no-audit contradicts --expect-used and --strict")
    path = launcher.find_command(command[0])
    caps = inspect.capabilities(code)
    table = host.cpuid_table()
    spec = wanted.shape(caps.xcr0, table)
    plan = inspect.plan_for(spec, caps, method, grant_amx, xcr0_only)
    if not wanted.force:
        launcher.check_isa_level(path, psabi_level(plan.view.apply(table), plan.mask, glibc=True))
    hints = inspect.env_hints(plan) if env_hints or plan.env_only else []
    env = procfs.original_environment()
    env.update((h.name.encode(), h.value.encode()) for h in hints)
    described = inspect.describe_plan(plan, spec, table, hints)
    if not quiet:
        _to_stderr(render.banner(described, caps.xcr0))
    run.become_program(
        run.RunRequest(path, command, plan, code, env, described, checks, quiet, report)
    )


def _to_stderr(text: str) -> None:
    """Our messages must not stop the program from running: a closed or broken stderr
    (`2>&-`, `2>&1 | true`) loses them, as it would the program's own."""
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


def _fail(message: str, status: int, usage: bool = False) -> NoReturn:
    _to_stderr(f"{PROG}: {message}")
    if usage:
        _to_stderr(f"Try '{PROG} --help' for more information.")
    _exit(status)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    try:
        result = cli.main(args=argv, prog_name=PROG, standalone_mode=False)
    except click.BadParameter as err:
        name = err.param.opts[-1] if err.param is not None and err.param.opts else "argument"
        _fail(f"{name}: {err.message}", ExitStatus.FAILURE)
    except click.UsageError as err:
        _fail(err.format_message(), ExitStatus.FAILURE, usage=True)
    except click.ClickException as err:
        _fail(err.format_message(), ExitStatus.FAILURE)
    except (click.Abort, KeyboardInterrupt):
        # Ctrl-C before the program started: die of SIGINT, as the program would have.
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        sys.exit(128 + signal.SIGINT)
    except Xcr0runError as err:
        _fail(str(err), err.status)
    except OSError as err:
        _fail(str(err), ExitStatus.FAILURE)
    except Exception as err:  # a bug of ours: one line, not a traceback, unless debugging
        if os.environ.get("XCR0RUN_DEBUG"):
            raise
        _fail(f"internal error: {err!r} (set XCR0RUN_DEBUG=1 for details)", ExitStatus.FAILURE)
    _exit(result or 0)


def _exit(status: int) -> NoReturn:
    """Exit, even where stdout is closed or its reader gone (flushing it would fail)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)

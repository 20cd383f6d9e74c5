"""The command line as click defines it: options, their types, help, completion, and
`main`, which maps click's errors to messages and statuses. What each form of the
command line does is in commands.py; a plain run is parsed without click (runargs.py,
through __main__.py), so this module is imported only when click is needed.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import click
from click.shell_completion import CompletionItem

if TYPE_CHECKING:
    from xcr0run.profiles import CpuidProfile

import xcr0run.completion  # noqa: F401  (its completion classes know mask edits)
from xcr0run import PROG, __version__, commands, host, masks, runargs
from xcr0run.errors import MaskError, Xcr0runError
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
            return runargs.mask_value(value) if self.rules else runargs.components_value(value)
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
        from xcr0run import profile_files
        from xcr0run.profiles import CpuidProfile

        if isinstance(value, CpuidProfile):
            return value
        try:
            return profile_files.load_profile(value)
        except Xcr0runError as err:
            self.fail(str(err), param, ctx)

    def shell_complete(
        self, ctx: click.Context, param: click.Parameter, incomplete: str
    ) -> list[CompletionItem]:
        from xcr0run import profile_files

        names = [n for n in profile_files.reference_profiles() if n.startswith(incomplete)]
        return [CompletionItem(n) for n in names] + [CompletionItem(incomplete, type="file")]


class Seconds(click.ParamType):
    """A positive, finite time in seconds."""

    name = "SECONDS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, float):
            return value
        try:
            return runargs.seconds(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


class PrctlCode(click.ParamType):
    name = "CODE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int):
            return value
        try:
            return runargs.prctl_code(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


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
    type=click.Choice(runargs.METHODS),
    default="auto",
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
    return commands.dispatch(
        commands.CommandLine(
            mask=mask,
            level=level,
            profiles=profiles,
            show=show,
            as_json=as_json,
            pid=pid,
            method=method,
            env_hints=env_hints,
            dump_cpuid=dump_cpuid,
            print_rr_flags=print_rr_flags,
            quiet=quiet,
            report=report,
            force=force,
            audit=audit,
            audit_interval=audit_interval,
            expect_used=expect_used,
            strict=strict,
            grant_amx=grant_amx,
            xcr0_prctl=xcr0_prctl,
            xcr0_only=xcr0_only,
            command=command,
        )
    )


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Parse with click and do what the command line asks; click's errors here, ours in
    commands.finish."""

    def parsed() -> int | None:
        try:
            result: int | None = cli.main(args=argv, prog_name=PROG, standalone_mode=False)
            return result
        except click.BadParameter as err:
            name = err.param.opts[-1] if err.param is not None and err.param.opts else "argument"
            commands.fail(f"{name}: {err.message}", ExitStatus.FAILURE)
        except click.UsageError as err:
            commands.fail(err.format_message(), ExitStatus.FAILURE, usage=True)
        except click.ClickException as err:
            commands.fail(err.format_message(), ExitStatus.FAILURE)
        except click.Abort:
            commands.interrupted()

    commands.finish(parsed)

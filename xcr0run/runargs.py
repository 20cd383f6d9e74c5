"""The command line of a plain run (`xcr0run -q -m no-avx512 -- ./test`), parsed without
click, and the option values' converters both parsers share.

Starting a program must not pay for importing click (more than the whole start-up
budget). `parse` takes the forms a run is written in and returns the CommandLine
click's command would build from them; for anything else (help, --show, a mistake, an
option it does not know, bundled short options such as -qm) it returns None and click
parses from the start, so every message is still click's. Its one rule: accept only
what click accepts, and with the same values.
"""

from __future__ import annotations

import os
import stat

from xcr0run import host
from xcr0run.commands import CommandLine
from xcr0run.errors import MaskError
from xcr0run.plan import Method

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

METHODS = Method.ALL  # --method's choices, for click's definition too
COMPLETE_ENV = "_XCR0RUN_COMPLETE"  # click's shell-completion request for prog "xcr0run"

# Options a run is written with: flags (name -> value) and options taking one value.
_FLAGS: dict[str, tuple[str, bool]] = {
    "-q": ("quiet", True),
    "--quiet": ("quiet", True),
    "--force": ("force", True),
    "--strict": ("strict", True),
    "--grant-amx": ("grant_amx", True),
    "--xcr0-only": ("xcr0_only", True),
    "--env-hints": ("env_hints", True),
    "--audit": ("audit", True),
    "--no-audit": ("audit", False),
}
_VALUED: dict[str, str] = {
    "-m": "mask",
    "--mask": "mask",
    "--level": "level",
    "--method": "method",
    "--report": "report",
    "--audit-interval": "audit_interval",
    "--expect-used": "expect_used",
    "--xcr0-prctl": "xcr0_prctl",
}


# -- converters: click's ParamTypes call these too ----------------------------------------


def mask_value(text: str) -> tuple[str, int]:
    """--mask: the text (for messages) and the XCR0 value it means here; MaskError."""
    from xcr0run import masks

    return (text, masks.parse_mask(text, host.xcr0()))


def components_value(text: str) -> tuple[str, list[tuple[str, int]]]:
    """--expect-used: components named as in a mask, without the XCR0 rules; MaskError."""
    from xcr0run import masks

    return (text, masks.parse_components(text))


def seconds(text: str) -> float:
    """A positive, finite time in seconds; ValueError with the message for the user."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    # Comparisons, not the math module (one import less at start-up): NaN fails both.
    if not 0.001 <= value < float("inf"):
        raise ValueError(f"not a time of at least 0.001 seconds: {text!r}")
    return value


def prctl_code(text: str) -> int:
    """An arch_prctl code, in any base Python reads (0x1014); ValueError."""
    try:
        return int(text, 0)
    except ValueError:
        raise ValueError(f"not a number: {text!r} (try 0x1014)") from None


def report_path_accepted(path: str) -> bool:
    """Whether click.Path(dir_okay=False, writable=True), --report's type, takes `path`:
    anything that does not exist yet, else a readable and writable non-directory."""
    try:
        st = os.stat(path)
    except OSError:
        return True
    return not stat.S_ISDIR(st.st_mode) and os.access(path, os.R_OK) and os.access(path, os.W_OK)


# -- the parser ---------------------------------------------------------------------------


def parse(argv: Sequence[str], environ: Mapping[str, str]) -> CommandLine | None:
    """The run `argv` asks for, or None where click must parse it."""
    if environ.get(COMPLETE_ENV):
        return None
    given: dict[str, str | bool] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not (arg[:1] == "-" and len(arg) > 1):
            break  # the command: options end here (click's allow_interspersed_args=False)
        i += 1
        name, eq, value = arg.partition("=") if arg[:2] == "--" else (arg, "", "")
        if name in _FLAGS and not eq:
            key, flag = _FLAGS[name]
            given[key] = flag
        elif name in _VALUED:
            if not eq:
                if i == len(argv):
                    return None
                value = argv[i]
                i += 1
            given[_VALUED[name]] = value  # the last one given wins, as in click
        else:
            return None
    command = tuple(argv[i:])
    if not command or not ("mask" in given or "level" in given):
        return None
    return _converted(given, command, environ)


def _converted(
    given: dict[str, str | bool], command: tuple[str, ...], environ: Mapping[str, str]
) -> CommandLine | None:
    def text(key: str) -> str | None:
        value = given.get(key)
        return value if isinstance(value, str) else None

    def flag(key: str) -> bool:
        return given.get(key) is True

    from xcr0run.view import LEVELS

    mask, level, method = text("mask"), text("level"), text("method")
    report, interval, expected = text("report"), text("audit_interval"), text("expect_used")
    if method is None:
        method = Method.AUTO
    prctl = text("xcr0_prctl")
    if prctl is None:  # click reads the variable only when the option is absent, and empty is unset
        prctl = environ.get(host.XCR0_PRCTL_ENV) or None
    audit = given.get("audit")
    if (level is not None and level not in LEVELS) or method not in METHODS:
        return None
    if report is not None and not report_path_accepted(report):
        return None
    try:
        return CommandLine(
            mask=None if mask is None else mask_value(mask),
            level=level,
            method=method,
            quiet=flag("quiet"),
            report=report,
            force=flag("force"),
            audit=audit if isinstance(audit, bool) else None,
            audit_interval=None if interval is None else seconds(interval),
            expect_used=None if expected is None else components_value(expected),
            strict=flag("strict"),
            grant_amx=flag("grant_amx"),
            xcr0_prctl=None if prctl is None else prctl_code(prctl),
            xcr0_only=flag("xcr0_only"),
            env_hints=flag("env_hints"),
            command=command,
        )
    except (MaskError, ValueError):
        return None  # click says what is wrong, as it would have anyway

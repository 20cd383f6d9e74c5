"""The parser for a plain run (runargs.py) must agree with click: whatever it accepts,
click accepts with the same values; everything else it leaves to click."""

from __future__ import annotations

import os
from typing import Any

import click
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xcr0run import PROG, host, runargs
from xcr0run.cli import cli
from xcr0run.commands import CommandLine
from xcr0run.plan import Method


def _click(argv: list[str]) -> dict[str, Any] | None:
    """What click's command would be called with, or None if click refuses argv."""
    try:
        with cli.make_context(PROG, list(argv)) as ctx:
            return dict(ctx.params)
    except (click.ClickException, click.exceptions.Exit):
        return None


def _ours(argv: list[str]) -> dict[str, Any] | None:
    line = runargs.parse(argv, os.environ)
    return None if line is None else {name: getattr(line, name) for name in CommandLine.__slots__}


def _agree(argv: list[str]) -> None:
    ours = _ours(argv)
    if ours is not None:
        assert ours == _click(argv), argv


@pytest.mark.parametrize(
    "argv",
    [
        ["-q", "-m", "host", "--", "true"],
        ["-m", "host", "true", "-q", "--", "x"],
        ["--mask=-avx512,-pkru", "--audit", "--report", "/tmp/xcr0run-r.json", "--", "sh"],
        ["--level", "x86-64-v2", "--method", "env", "--env-hints", "true"],
        ["-m", "bogus", "-m", "host", "--no-audit", "--audit", "--", "true"],
        ["-m", "host", "--audit-interval", "0.5", "--expect-used", "sse", "--strict", "true"],
        ["-m", "x87,sse", "--xcr0-prctl", "0x1021", "--xcr0-only", "--grant-amx", "true"],
        ["-m", "host", "--", "--", "true"],
        ["-m", "host", "-"],
    ],
)
def test_the_forms_of_a_run_parse_as_click_parses_them(argv: list[str]) -> None:
    assert _ours(argv) is not None
    _agree(argv)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["-m", "host"],  # no command: click says so
        ["--", "true"],  # no mask: the command's own error
        ["-qm", "host", "true"],  # bundled short options
        ["-mhost", "true"],
        ["-m=host", "true"],  # click's value here is "=host"
        ["--quiet=yes", "-m", "host", "true"],
        ["--help"],
        ["-m", "host", "--show"],
        ["--mask", "avx521", "true"],  # click's message, with its suggestion
        ["-m", "host", "--level", "v2", "true"],
        ["-m", "host", "--method", "", "true"],
        ["-m", "host", "--audit-interval", "inf", "true"],
        ["-m", "host", "--report", "/", "true"],  # a directory
        ["-m", "host", "--xcr0-prctl", "", "true"],
        ["-m", "host", "--profile", "haswell", "true"],
        ["-m"],
    ],
)
def test_everything_else_is_left_to_click(argv: list[str]) -> None:
    assert runargs.parse(argv, os.environ) is None


def test_the_xcr0_prctl_variable_is_read_as_click_reads_it(monkeypatch) -> None:
    argv = ["-m", "host", "true"]
    for value, expected in (("0x1021", 0x1021), ("", None)):
        monkeypatch.setenv(host.XCR0_PRCTL_ENV, value)
        line = runargs.parse(argv, os.environ)
        assert line is not None and line.xcr0_prctl == expected
        _agree(argv)
    monkeypatch.setenv(host.XCR0_PRCTL_ENV, "bogus")
    assert runargs.parse(argv, os.environ) is None and _click(argv) is None
    assert runargs.parse(["--xcr0-prctl", "0x1014", *argv], os.environ) is not None


def test_a_completion_request_goes_to_click(monkeypatch) -> None:
    monkeypatch.setenv(runargs.COMPLETE_ENV, "bash_complete")
    assert runargs.parse(["-m", "host", "true"], os.environ) is None


def test_the_option_tables_are_clicks() -> None:
    options = {name: p for p in cli.params for name in [*p.opts, *p.secondary_opts]}
    for name, (dest, _) in runargs._FLAGS.items():
        assert options[name].name == dest and getattr(options[name], "is_flag", False)
    for name, dest in runargs._VALUED.items():
        assert options[name].name == dest and not getattr(options[name], "is_flag", True)
    assert options["--method"].default == Method.AUTO


_TOKENS = [
    "-q", "--quiet", "-m", "--mask", "--mask=host", "--level", "--method", "--report",
    "--audit", "--no-audit", "--audit-interval", "--expect-used", "--strict", "--force",
    "--grant-amx", "--xcr0-only", "--env-hints", "--xcr0-prctl", "--", "-", "-x",
    "host", "no-avx512", "-avx", "x87,sse", "bogus", "x86-64-v2", "env", "auto", "0.5",
    "0", "nan", "0x1014", "sse", "/tmp/xcr0run-r.json", "/", "true", "", "=", "--show",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=8))
def test_whatever_it_accepts_click_accepts_alike(argv: list[str]) -> None:
    _agree(argv)

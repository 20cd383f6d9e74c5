"""The command line: help, usage errors, exit statuses, completion."""

from __future__ import annotations

import os
import subprocess

import pytest
from click.testing import CliRunner

from tests.conftest import xcr0run
from xcr0run import __version__
from xcr0run.cli import cli


def test_help_shows_mask_syntax_and_examples() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for text in ("--mask", "no-avx512", "-avx512,-pkru", "Examples:", "127", "--show"):
        assert text in result.output


def test_version() -> None:
    result = xcr0run(["--version"])
    assert result.returncode == 0 and __version__ in result.stdout


def test_bad_mask_is_one_line_and_125() -> None:
    result = xcr0run(["--mask", "avx521", "--", "true"])
    assert result.returncode == 125
    assert result.stderr == "xcr0run: --mask: unknown component 'avx521', did you mean 'avx512'?\n"
    assert result.stdout == ""


def test_unknown_option_is_a_usage_error() -> None:
    result = xcr0run(["--bogus"])
    assert result.returncode == 125
    assert result.stderr.splitlines() == [
        "xcr0run: No such option '--bogus'.",
        "Try 'xcr0run --help' for more information.",
    ]


def test_missing_command_and_missing_mask() -> None:
    assert "no command given" in xcr0run(["--mask", "host"]).stderr
    result = xcr0run(["--", "true"])
    assert result.returncode == 125 and "missing --mask" in result.stderr


def test_command_not_found_is_127_and_not_executable_126(tmp_path) -> None:
    result = xcr0run(["-q", "--mask", "host", "--", "no-such-command-xyz"])
    assert result.returncode == 127
    assert result.stderr == (
        "xcr0run: failed to run command 'no-such-command-xyz': No such file or directory\n"
    )
    script = tmp_path / "plain.txt"
    script.write_text("not a program\n")
    assert xcr0run(["-q", "--mask", "host", "--", str(script)]).returncode == 126
    assert xcr0run(["-q", "--mask", "host", "--", str(tmp_path)]).returncode == 126


def test_options_after_the_command_belong_to_it() -> None:
    result = xcr0run(["-q", "-m", "host", "sh", "-c", 'echo "$0" "$@"', "--mask", "x"])
    assert result.returncode == 0
    assert result.stdout == "--mask x\n"


def test_exit_status_and_signals_pass_through_with_nothing_to_hide() -> None:
    assert xcr0run(["-q", "-m", "host", "--", "sh", "-c", "exit 7"]).returncode == 7
    killed = subprocess.run(
        [
            "sh",
            "-c",
            f"{os.sys.executable} -m xcr0run -q -m host -- sh -c 'kill -SEGV $$'; echo $?",
        ],
        capture_output=True,
        text=True,
    )
    assert killed.stdout.strip() == "139"


def test_no_mechanism_is_one_clear_line(tmp_path) -> None:
    """Where neither CPUID faulting nor ARCH_SET_XCR0 exists, nothing runs unmasked."""
    from xcr0run import host

    if host.cpuid_faulting().supported:
        pytest.skip("CPUID faulting exists here: the supervised path is tested instead")
    marker = tmp_path / "ran"
    result = xcr0run(["-m", "x87,sse", "--", "touch", str(marker)])
    assert result.returncode == 125
    assert result.stderr.startswith("xcr0run: cannot present this mask here: no CPUID faulting")
    assert len(result.stderr.splitlines()) == 1
    assert not marker.exists()


def test_method_kernel_without_the_prctl_says_so() -> None:
    result = xcr0run(["--method", "kernel", "-m", "x87,sse", "--", "true"])
    assert result.returncode == 125
    assert result.stderr.startswith("xcr0run: --method kernel: no ARCH_SET_XCR0")


def test_xcr0_only_without_the_prctl_says_so(tmp_path) -> None:
    from xcr0run import host

    if host.probe_xcr0_prctl(host.xcr0_prctl_code(), host.xcr0()).available:
        pytest.skip("this kernel has ARCH_SET_XCR0 (tests/test_xcr0_kernel.py covers it)")
    marker = tmp_path / "ran"
    result = xcr0run(["--xcr0-only", "-m", "x87,sse", "--", "touch", str(marker)])
    assert result.returncode == 125
    assert result.stderr.startswith("xcr0run: --xcr0-only needs ARCH_SET_XCR0: no ARCH_SET")
    assert len(result.stderr.splitlines()) == 1
    assert not marker.exists()


def test_mask_completion_through_click() -> None:
    env = {
        "_XCR0RUN_COMPLETE": "bash_complete",
        "COMP_WORDS": "xcr0run --mask x87,s",
        "COMP_CWORD": "2",
    }
    result = xcr0run([], env=env)
    assert "plain,x87,sse" in result.stdout.split()


def test_the_banner_and_show_name_the_option_that_was_given() -> None:
    """A level is not a mask, nor a profile: each is named as given."""
    run = xcr0run(["--method", "env", "--level", "x86-64-v2", "--", "true"])
    assert run.returncode == 0, run.stderr
    assert run.stderr.startswith("xcr0run: --level x86-64-v2 -> XCR0 0x3 (x87,sse), host ")
    for args in (["--profile", "haswell", "--force"], ["--mask", "x87,sse"]):
        shown = xcr0run(["--show", *args], check=True).stdout
        assert f"With {' '.join(a for a in args if a != '--force')}\n" in shown

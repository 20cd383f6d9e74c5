"""The man page renders cleanly and documents every option; the wheel installs it and
the completion files where the system looks for them."""

from __future__ import annotations

import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import Wheel
from xcr0run.cli import cli

ROOT = Path(__file__).parent.parent
MAN = ROOT / "man" / "xcr0run.1"


def test_man_page_has_the_sections() -> None:
    text = MAN.read_text()
    for section in (
        "NAME",
        "SYNOPSIS",
        "DESCRIPTION",
        "OPTIONS",
        "MASK SYNTAX",
        "EXIT STATUS",
        "ENVIRONMENT",
        "EXAMPLES",
        "NOTES",
        "SEE ALSO",
    ):
        assert f".SH {section}\n" in text or f'.SH "{section}"\n' in text, section
    assert "taskset (1)" in text and "arch_prctl (2)" in text and "rr (1)" in text


def test_every_option_in_help_is_in_the_man_page() -> None:
    help_text = CliRunner().invoke(cli, ["--help"]).output
    options = set(
        re.findall(
            r"(?<![\w-])(--?[a-z][a-z0-9-]*)",
            help_text.split("Options:")[1].split("Mask syntax")[0],
        )
    )
    rendered = MAN.read_text().replace("\\-", "-")
    missing = sorted(o for o in options if o not in rendered)
    assert missing == []
    assert len(options) > 15


def test_groff_renders_without_warnings() -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed (.ci/run installs it)")
    out = subprocess.run(["groff", "-man", "-ww", "-z", str(MAN)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr == ""


def test_mandoc_lint_is_clean() -> None:
    if shutil.which("mandoc") is None:
        pytest.skip("mandoc is not installed (.ci/run installs it)")
    out = subprocess.run(["mandoc", "-T", "lint", str(MAN)], capture_output=True, text=True)
    assert out.stdout + out.stderr == ""


def test_wheel_installs_man_page_and_completions(checkout_wheel: Wheel) -> None:
    assert "absent from the `packages` configuration" not in checkout_wheel.log
    names = set(zipfile.ZipFile(checkout_wheel.path).namelist())
    assert "xcr0run/profiles/haswell.json" in names
    data = "xcr0run-0.1.0.data/data/share/"
    for path in (
        "man/man1/xcr0run.1",
        "bash-completion/completions/xcr0run",
        "zsh/site-functions/_xcr0run",
        "fish/vendor_completions.d/xcr0run.fish",
    ):
        assert data + path in names

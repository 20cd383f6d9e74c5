"""Shell completion, run in the real shells (bash with bash-completion, zsh, fish)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xcr0run import completion
from xcr0run.cli import cli

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("shell", completion.SHELLS)
def test_files_are_in_sync_with_the_cli(shell: str) -> None:
    path = ROOT / "completions" / completion.FILES[shell]
    assert path.read_text() == completion.script(shell, cli), (
        f"regenerate: python -m xcr0run.completion {shell} > {path}"
    )


def test_every_value_option_is_known_to_the_scripts() -> None:
    options = completion.value_options(cli)
    assert {"-m", "--mask", "--method", "--report", "--expect-used"} <= set(options)
    assert "--show" not in options and "--force" not in options


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """PATH with an `xcr0run` that runs this checkout, as the scripts call it by name."""
    bin_dir = tmp_path_factory.mktemp("bin")
    shim = bin_dir / "xcr0run"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m xcr0run "$@"\n')
    shim.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}


def _shell(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (.ci/run installs it)")
    return path


BASH_DRIVER = r"""
BC=/usr/share/bash-completion/bash_completion
[ -f $BC ] && source $BC
source completions/bash/xcr0run
COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
_xcr0run xcr0run 2>/dev/null
printf '%s\n' "${COMPREPLY[@]}"
"""


def _run(argv: list[str], env: dict[str, str]) -> list[str]:
    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    return [line for line in out.stdout.splitlines() if line]


def bash(env: dict[str, str], *words: str) -> list[str]:
    return _run([_shell("bash"), "-c", BASH_DRIVER, "bash", *words], env)


ZSH_DRIVER = r"""
compdef() { : }
compadd() { print -rl -- ${plain} }
_describe() { local d; for d in ${described}; do print -r -- ${d%%:*}; done }
_normal() { print -r -- "NORMAL ${words[*]}" }
_path_files() { print -r -- FILES }
compset() { [[ $1 == -P ]] && print -r -- "IPREFIX ${words[CURRENT]%%=*}=" }
source completions/zsh/_xcr0run
words=("$@"); CURRENT=$#words
_xcr0run
"""


def zsh(env: dict[str, str], *words: str) -> list[str]:
    return _run([_shell("zsh"), "-f", "-c", ZSH_DRIVER, "zsh", *words], env)


def fish(env: dict[str, str], line: str) -> list[str]:
    script = f"source completions/fish/xcr0run.fish; complete -C {line!r}"
    out = subprocess.run(
        [_shell("fish"), "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return [row.split("\t")[0] for row in out.stdout.splitlines() if row]


def test_bash_completes_the_mask_language(env) -> None:
    assert bash(env, "xcr0run", "--mask", "x87,s") == ["x87,sse"]
    assert set(bash(env, "xcr0run", "-m", "no-a")) >= {"no-avx", "no-avx512"}
    assert bash(env, "xcr0run", "--method", "") == ["auto", "kernel", "cpuid", "env"]
    assert "--mask" in bash(env, "xcr0run", "--ma")


def test_bash_hands_over_to_the_command(env) -> None:
    assert "echo" in bash(env, "xcr0run", "-m", "host", "--", "ech")
    assert "echo" in bash(env, "xcr0run", "-m", "host", "ech")
    if Path("/usr/share/bash-completion/completions/ls").exists() or shutil.which("ls"):
        after = bash(env, "xcr0run", "-m", "host", "--", "ls", "--colo")
        assert after == [] or any(x.startswith("--color") for x in after)


def test_zsh_completes_the_mask_and_hands_over(env) -> None:
    assert zsh(env, "xcr0run", "--mask", "x87,s") == ["x87,sse"]
    assert zsh(env, "xcr0run", "-m", "host", "--", "ls", "-l") == ["NORMAL ls -l"]
    assert zsh(env, "xcr0run", "-m", "host", "ech") == ["NORMAL ech"]
    assert zsh(env, "xcr0run", "--report", "") == ["FILES"]


def test_fish_completes_the_mask_and_hands_over(env) -> None:
    assert fish(env, "xcr0run --mask x87,s") == ["x87,sse"]
    assert {"no-avx", "no-avx512"} <= set(fish(env, "xcr0run -m no-a"))
    assert "echo" in fish(env, "xcr0run -m host -- ech")
    assert "--color" in fish(env, "xcr0run -m host ls --colo")
    assert fish(env, "xcr0run --method ") == ["auto", "cpuid", "env", "kernel"]


# -- values that start with '-', "--opt=value", profile names ----------------------------
# Bash splits "--mask=x87" at "=" (COMP_WORDBREAKS): its words are given as bash has them.


def test_bash_completes_edits_joined_values_and_profile_names(env) -> None:
    edits = bash(env, "xcr0run", "--mask", "-")
    assert "-sse" in edits and "-x87" not in edits and not any(e.startswith("--") for e in edits)
    assert bash(env, "xcr0run", "-m", "-ss") == ["-sse"]
    assert bash(env, "xcr0run", "--mask", "=", "x87,s") == ["x87,sse"]
    assert bash(env, "xcr0run", "--mask", "=", "-ss") == ["-sse"]
    assert "=host" in bash(env, "xcr0run", "--mask", "=")
    assert bash(env, "xcr0run", "--profile", "has") == ["haswell"]
    offered = bash(env, "xcr0run", "--profile", "")
    assert {"haswell", "skylake-server", "x86-64-v3", "README.md"} <= set(offered)


def test_zsh_completes_edits_joined_values_and_profile_names(env) -> None:
    edits = zsh(env, "xcr0run", "--mask", "-")
    assert "-sse" in edits and not any(e.startswith("--") for e in edits)
    assert zsh(env, "xcr0run", "--mask=x87,s") == ["IPREFIX --mask=", "x87,sse"]
    assert zsh(env, "xcr0run", "--mask=-ss") == ["IPREFIX --mask=", "-sse"]
    assert "haswell" in zsh(env, "xcr0run", "--profile", "has")
    assert {"haswell", "FILES"} <= set(zsh(env, "xcr0run", "--profile", ""))


def test_fish_completes_edits_joined_values_and_profile_names(env) -> None:
    edits = fish(env, "xcr0run --mask -")
    assert "-sse" in edits and not any(e.startswith("--") for e in edits)
    assert fish(env, "xcr0run --mask -ss") == ["-sse"]
    assert fish(env, "xcr0run --mask=x87,s") == ["--mask=x87,sse"]
    assert fish(env, "xcr0run --profile has") == ["haswell"]
    assert fish(env, "xcr0run --profile ./RE") == ["./README.md"]

"""The `xcr0run` command as `pip install .` makes it: a C first image (xcr0run/_entry.c)
that records the signal dispositions Python destroys at start-up, then runs xcr0run in
the interpreter beside it. The checkout's wheel is installed into a fresh virtual
environment, as CI installs it, and each test compares a program run directly with the
same program run through that command."""

from __future__ import annotations

import os
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import Wheel
from xcr0run import launcher

MODES = {
    "exec": ["-q", "-m", "host"],  # nothing to trap or audit: xcr0run execs the program
    "helper": ["-q", "-m", "host", "--audit"],  # with the tracing helper beside it
}
STATUS = "sh -c 'grep -E \"SigIgn|SigBlk\" /proc/self/status'"


def _scripts(wheel: Path) -> list[str]:
    return [n for n in zipfile.ZipFile(wheel).namelist() if ".data/scripts/" in n]


@pytest.fixture(scope="module")
def venv(checkout_wheel: Wheel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment with the checkout's wheel installed: its bin directory."""
    if not any(n.endswith("/xcr0run") for n in _scripts(checkout_wheel.path)):
        why = [line.strip() for line in checkout_wheel.log.splitlines() if "no C entry" in line]
        pytest.skip(
            "the wheel's xcr0run is pip's console script: setup.py could not compile the "
            f"C entry when it was built ({why[0] if why else 'no C compiler'})"
        )
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-index",
        "--ignore-installed",
    ]
    subprocess.run(
        [*pip, "--prefix", str(root), str(checkout_wheel.path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # The dependencies (click, rich, psutil) from this interpreter's site-packages.
    purelib = sysconfig.get_path("purelib", vars={"base": str(root), "platbase": str(root)})
    Path(purelib, "outer.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return root / "bin"


@pytest.fixture(scope="module")
def entry(venv: Path) -> str:
    return str(venv / "xcr0run")


def in_shell(command: str, under: list[str], **kw: object) -> tuple[str, str]:
    """`command` run by bash with PROG standing for nothing, then for `under`: what it
    prints each time."""
    outs = []
    for prefix in ("", " ".join(under) + " "):
        result = subprocess.run(
            ["bash", "-c", command.replace("PROG ", prefix)],
            capture_output=True,
            text=True,
            timeout=60,
            **kw,  # type: ignore[call-overload]
        )
        assert result.stderr == ""
        outs.append(result.stdout)
    return outs[0], outs[1]


def ignored(status: str) -> int:
    return int(status.split("SigIgn:")[1].split()[0], 16)


def test_the_installed_command_is_the_c_entry(entry: str) -> None:
    with open(entry, "rb") as f:
        assert f.read(4) == b"\x7fELF"
    direct = subprocess.run([sys.executable, "-m", "xcr0run", "--version"], capture_output=True)
    assert subprocess.run([entry, "--version"], capture_output=True).stdout == direct.stdout


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "trap",
    ["", "trap '' PIPE XFSZ", "trap '' PIPE", "trap '' XFSZ", "trap '' PIPE XFSZ INT HUP"],
)
def test_inherited_dispositions_reach_the_program(entry: str, trap: str, mode: str) -> None:
    native, under = in_shell(f"{trap}\nPROG {STATUS}", [entry, *MODES[mode], "--"])
    assert under == native
    for name in ("PIPE", "XFSZ", "INT", "HUP"):  # the comparison is not of two defaults
        sig = signal.Signals[f"SIG{name}"]
        assert bool(ignored(native) >> (sig - 1) & 1) == (name in trap)


@pytest.mark.parametrize("mode", MODES)
def test_python_s_own_handlers_do_not_reach_the_program(entry: str, mode: str) -> None:
    """PYTHONFAULTHANDLER makes the interpreter put handlers over SIGBUS, SIGFPE, SIGILL
    and SIGABRT (and SIGSEGV, which bash does not pass on ignored), ignored or not."""
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    command = f"trap '' BUS FPE ILL ABRT\nPROG {STATUS}"
    native, under = in_shell(command, [entry, *MODES[mode], "--"], env=env)
    assert under == native
    assert ignored(native) == sum(1 << (s - 1) for s in (7, 8, 4, 6))  # BUS FPE ILL ABRT


@pytest.mark.parametrize("mode", MODES)
def test_the_program_s_environment_is_the_caller_s(entry: str, mode: str) -> None:
    odd = {"WITH_EQUALS": "a=b=c", "EMPTY": "", "SPACES": " x y "}
    for env in (
        dict(os.environ, **odd),
        # Python coerces a C locale (it sets LC_CTYPE in its own environment).
        {"PATH": os.environ["PATH"], "LANG": "C", **odd},
    ):
        direct = subprocess.run(["env", "-0"], capture_output=True, env=env, timeout=60)
        under = subprocess.run(
            [entry, *MODES[mode], "--", "env", "-0"], capture_output=True, env=env, timeout=60
        )
        assert under.stderr == b""
        assert under.stdout == direct.stdout


def test_a_record_of_another_process_is_not_trusted_and_passes(entry: str) -> None:
    """python3 -m xcr0run with XCR0RUN_ENTRY set (by hand, or left over): today's
    behaviour, and the variable is the program's like any other."""
    env = dict(os.environ, XCR0RUN_ENTRY="1:1001000")
    command = [sys.executable, "-m", "xcr0run", *MODES["exec"], "--"]
    out = subprocess.run([*command, "env"], capture_output=True, text=True, env=env).stdout
    assert "XCR0RUN_ENTRY=1:1001000\n" in out
    status = subprocess.run(
        ["bash", "-c", f"trap '' HUP; {' '.join(command)} {STATUS}"],
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    assert ignored(status) == 1 << (signal.SIGHUP - 1)


def test_python_m_cannot_pass_on_an_ignored_sigpipe(entry: str) -> None:
    """The limit README states: with Python as the first image, SIGPIPE and SIGXFSZ
    reach the program as SIG_DFL whatever the caller left."""
    under = [sys.executable, "-m", "xcr0run", *MODES["exec"], "--"]
    native, python_m = in_shell(f"trap '' PIPE XFSZ INT\nPROG {STATUS}", under)
    assert ignored(native) == ignored(python_m) | (1 << 12) | (1 << 24)


def test_modules_in_the_current_directory_are_not_imported(entry: str, tmp_path: Path) -> None:
    for name in ("click", "xcr0run", "rich", "psutil"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise SystemExit('imported from cwd')\n")
    result = subprocess.run([entry, "-q", "-m", "host", "--", "true"], cwd=tmp_path)
    assert result.returncode == 0
    # python3 -m does import them: what the entry avoids.
    assert subprocess.run([sys.executable, "-m", "xcr0run"], cwd=tmp_path).returncode != 0


@pytest.mark.parametrize("safe_path", ["", "1"])
def test_pythonpath_comes_first_as_for_a_console_script(
    entry: str, tmp_path: Path, safe_path: str
) -> None:
    """Only the current directory's place on sys.path is removed: with PYTHONSAFEPATH
    (3.11+) there is none, and the first entry is PYTHONPATH's, which must stay."""
    fake = tmp_path / "path" / "xcr0run"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text("import sys\ndef main():\n    print(sys.argv)\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "path"), PYTHONSAFEPATH=safe_path)
    result = subprocess.run([entry, "-x", "y"], capture_output=True, text=True, env=env)
    assert result.stdout == f"{[entry, '-x', 'y']}\n"


def test_an_interpreter_on_path_serves_a_command_installed_apart(
    entry: str, venv: Path, tmp_path: Path
) -> None:
    """`pip install --user` puts the command in ~/.local/bin, away from the interpreter."""
    (tmp_path / "bin").mkdir()
    lone = tmp_path / "bin" / "xcr0run"
    shutil.copy(entry, lone)
    env = dict(os.environ, PATH=f"{venv}:/usr/bin:/bin")
    native, under = in_shell(
        f"trap '' PIPE\nPROG {STATUS}", [str(lone), "-q", "-m", "host", "--"], env=env
    )
    assert under == native


def test_a_symlink_to_the_command_finds_the_interpreter_of_its_target(
    entry: str, tmp_path: Path
) -> None:
    """pipx links ~/.local/bin/xcr0run to the command in its own environment."""
    link = tmp_path / "xcr0run"
    link.symlink_to(entry)
    env = dict(os.environ, PATH="/nonexistent")
    result = subprocess.run([str(link), "--version"], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.startswith("xcr0run")


def test_no_interpreter_is_one_line_and_125(entry: str, tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    lone = tmp_path / "bin" / "xcr0run"
    shutil.copy(entry, lone)
    # Not from the current directory either, even where PATH names it.
    marker = tmp_path / "ran"
    python = tmp_path / "python3"
    python.write_text(f"#!/bin/sh\ntouch {marker}\n")
    python.chmod(0o755)
    for path in ("/nonexistent", ".", ":", "", "bin/.."):
        env = dict(os.environ, PATH=path)
        result = subprocess.run(
            [str(lone), "--version"], capture_output=True, text=True, env=env, cwd=tmp_path
        )
        assert result.returncode == 125 and result.stdout == ""
        assert result.stderr.startswith("xcr0run: no Python interpreter found:")
        assert result.stderr.count("\n") == 1
    assert not marker.exists()


def test_an_interpreter_without_xcr0run_is_one_line_and_125(entry: str, tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    lone = tmp_path / "bin" / "xcr0run"
    shutil.copy(entry, lone)
    other = tmp_path / "other"
    other.mkdir()
    python = other / "python3"
    # An interpreter with no site-packages: the wrong one, found on PATH.
    python.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = str(other)
    result = subprocess.run([str(lone), "--version"], capture_output=True, text=True, env=env)
    assert result.returncode == 125 and result.stdout == ""
    assert result.stderr.startswith("xcr0run: ") and "cannot import xcr0run" in result.stderr
    assert result.stderr.count("\n") == 1


def test_without_a_compiler_the_command_is_pip_s_console_script(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"))
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels)]
    subprocess.run(
        [*pip, str(Path(__file__).parent.parent)],
        check=True,
        capture_output=True,
        env=env,
        timeout=300,
    )
    (wheel,) = wheels.glob("xcr0run-*.whl")
    assert _scripts(wheel) == []
    names = zipfile.ZipFile(wheel).namelist()
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[console_scripts]\nxcr0run = xcr0run.__main__:main" in text


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("4242:1001000", 0x1001000),
        ("4242:0", 0),
        ("4243:1001000", None),  # another process's
        (None, None),
        ("", None),
        ("4242", None),
        ("4242:", None),
        ("4242:xyz", None),
        ("4242:-1", None),
        (":1001000", None),
        ("4242:10000000000000000", None),
    ],
)
def test_the_record_is_read_for_its_own_process(value: str | None, expected: int | None) -> None:
    assert launcher.parse_entry_record(value, 4242) == expected


@pytest.mark.parametrize("after", [0.0, 0.01, 0.03, 0.06, 0.1])
def test_ctrl_c_during_the_interpreter_s_start_kills_with_sigint(entry: str, after: float) -> None:
    """The entry holds SIGINT back while Python starts (site, the .pth files), and
    xcr0run's first lines let it in at SIG_DFL: a death by SIGINT, as the program's."""
    import time

    proc = subprocess.Popen(
        [entry, *MODES["helper"], "--", "sleep", "5"], stderr=subprocess.PIPE, text=True
    )
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


@pytest.mark.parametrize("blocked", [False, True])
def test_the_program_gets_the_caller_s_blocked_mask(entry: str, blocked: bool) -> None:
    """SIGINT, held back only during the interpreter's start, is not blocked in the
    program unless the caller had it blocked."""

    def block() -> None:
        if blocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])

    status = ["grep", "SigBlk", "/proc/self/status"]
    native, under = (
        subprocess.run(prefix + status, capture_output=True, text=True, preexec_fn=block)
        for prefix in ([], [entry, *MODES["helper"], "--"])
    )
    assert under.stdout == native.stdout
    assert native.stdout.strip().endswith("2" if blocked else "0")

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


# -- odd limits and inputs: one line and 125 where xcr0run fails, the program's own
# result where it can run it, never a traceback or an internal error ------------------

_HOST = ["-q", "-m", "host"]
_FOLLOW = [*_HOST, "--audit"]
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_line(result: subprocess.CompletedProcess[str], status: int = 125) -> str:
    assert result.returncode == status, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("xcr0run: "), lines
    assert "internal error" not in lines[0] and "Errno" not in lines[0], lines
    return lines[0]


def test_too_few_descriptors_for_the_helper_is_one_line() -> None:
    import sys

    for limit in (5, 6, 7):
        argv = [sys.executable, "-m", "xcr0run", *_FOLLOW, "--", "true"]
        result = subprocess.run(
            ["bash", "-c", f'ulimit -n {limit}; exec "$@"', "-", *argv],
            capture_output=True,
            text=True,
            timeout=60,
        )
        _one_line(result)


def test_an_empty_path_means_the_current_directory_as_for_env(tmp_path) -> None:
    import sys

    tool = tmp_path / "ltool"
    tool.write_text("#!/bin/sh\necho local tool\n")
    tool.chmod(0o755)
    env = {"PATH": "", "PYTHONPATH": _ROOT}
    native, under = (
        subprocess.run(
            [*prefix, "ltool"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60
        )
        for prefix in (["/usr/bin/env"], [sys.executable, "-m", "xcr0run", *_FOLLOW, "--"])
    )
    assert native.stdout == "local tool\n"
    assert (under.returncode, under.stdout) == (native.returncode, native.stdout)


def _elf_with_interp(interp: bytes) -> bytes:
    """A 64-bit x86 ELF header and one PT_INTERP program header naming `interp`."""
    import struct

    phoff, interp_at = 64, 64 + 56
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x401000, phoff, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 3, 4, interp_at, 0, 0, len(interp), len(interp), 1)
    return header + phdr + interp


def test_a_loader_path_with_a_nul_byte_runs_as_directly(tmp_path) -> None:
    import sys

    program = tmp_path / "corrupt"
    program.write_bytes(_elf_with_interp(b"/lib64/ld\0-linux.so.2\0"))
    program.chmod(0o755)
    native, under = (
        subprocess.run([*prefix, str(program)], capture_output=True, text=True, timeout=60)
        for prefix in (["/usr/bin/env"], [sys.executable, "-m", "xcr0run", *_HOST, "--"])
    )
    assert "internal error" not in under.stderr and "Traceback" not in under.stderr
    assert under.returncode == native.returncode


def test_an_endless_profile_is_one_line() -> None:
    line = _one_line(xcr0run(["-q", "--profile", "/dev/zero", "--", "true"]))
    assert "not a profile" in line


@pytest.mark.parametrize("follow", [False, True], ids=["exec", "helper"])
def test_the_environment_reaches_the_program_entry_for_entry(follow: bool) -> None:
    """Entries only a raw execve makes (no '=', an empty name, a name given twice, bytes
    that are no UTF-8) reach the program as they reach it run directly, in order."""
    import sys

    raw = (
        "import ctypes, sys\n"
        "i = sys.argv.index('--'); env, argv = sys.argv[1:i], sys.argv[i + 1:]\n"
        "enc = lambda x: x.encode('utf-8', 'surrogateescape')\n"
        "arr = lambda xs: (ctypes.c_char_p * (len(xs) + 1))(*[enc(x) for x in xs], None)\n"
        "ctypes.CDLL(None).execve(enc(argv[0]), arr(argv), arr(env))\n"
    )
    # The block the kernel keeps, and libc's environ array: glibc's loader rewrites
    # GLIBC_TUNABLES in the block (a NUL for each ':'), so only the array tells a
    # variable received whole from one received cut into pieces.
    show = (
        "import ctypes\n"
        "print(open('/proc/self/environ', 'rb').read())\n"
        "a, i = ctypes.POINTER(ctypes.c_char_p).in_dll(ctypes.CDLL(None), 'environ'), 0\n"
        "while a[i] is not None:\n"
        "    print(a[i])\n"
        "    i += 1\n"
    )
    entries = ["=empty", "NOEQUALS", "A=1", "A=2", "B=\udcff", f"PYTHONPATH={_ROOT}", "Z="]
    entries += ["GLIBC_TUNABLES=glibc.malloc.check=0:glibc.malloc.tcache_count=5:junk"]
    entries += ["GLIBC_TUNABLES=glibc.malloc.check=0:", "C=3"]
    program = [sys.executable, "-c", show]
    ours = [sys.executable, "-m", "xcr0run", *(_FOLLOW if follow else _HOST), "--"]
    outcomes = []
    for argv in (program, [*ours, *program]):
        result = subprocess.run(
            [sys.executable, "-c", raw, *entries, "--", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        )
        outcomes.append((result.returncode, result.stdout, result.stderr))
    assert outcomes[1] == outcomes[0]
    assert outcomes[0][0] == 0 and "NOEQUALS" in outcomes[0][1], outcomes


@pytest.mark.skipif(os.geteuid() != 0, reason="unmounts /proc in a mount namespace: needs root")
def test_without_proc_what_is_missing_is_said() -> None:
    import sys

    run = f"{sys.executable} -m xcr0run"
    script = (
        f"umount -l /proc; {run} -q -m host -- true; echo plain=$?; "
        f"{run} -q -m host --audit -- true; echo audit=$?"
    )
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=_ROOT),
    )
    assert result.stdout == "plain=0\naudit=125\n", result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "/proc is not mounted" in lines[0], lines


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"),
    reason="becomes nobody with setpriv (root does not meet RLIMIT_NPROC)",
)
def test_at_the_process_limit_the_helper_s_need_is_said() -> None:
    # The system's Python: nobody may not enter the test's own interpreter's directory.
    argv = ["/usr/bin/python3", "-m", "xcr0run", *_FOLLOW, "--", "true"]
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    result = subprocess.run(
        ["prlimit", "--nproc=1", *nobody, "env", f"PYTHONPATH={_ROOT}", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert "too many processes" in _one_line(result)

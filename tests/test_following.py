"""Following a program tree with ptrace, which needs no CPUID faulting: `--mask host
--audit` supervises without trapping. These run on any machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import comm, wait_for, xcr0run

FOLLOW = ["-q", "-m", "host", "--audit"]


def test_clone_without_clone_thread_is_a_process(cbuild) -> None:
    result = xcr0run([*FOLLOW, "--", cbuild("clone_process.c")])
    assert result.returncode == 0, result.stderr
    assert result.stdout == "parent done, child status 0\n"


def test_threads_dying_in_our_hands_do_not_end_the_run(cbuild) -> None:
    prog = cbuild("churn.c", "-pthread")
    for _ in range(15):
        result = xcr0run([*FOLLOW, "--", prog])
        assert (result.returncode, result.stderr) == (0, "")


def test_a_signal_to_the_whole_group_arrives_once(tmp_path) -> None:
    script = (
        "n=0; trap 'n=$((n+1))' TERM; echo ready; i=0; while [ $i -lt 20 ]; do sleep 0.05; "
        "i=$((i+1)); done; echo $n"
    )
    for send, name in ((os.killpg, "group"), (os.kill, "the program's pid")):
        proc = subprocess.Popen(
            [sys.executable, "-m", "xcr0run", *FOLLOW, "--", "sh", "-c", script],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=os.setpgrp,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"  # the trap is set
        send(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert out.strip() == "1", name


def test_nested_xcr0run_fails_cleanly_instead_of_hanging() -> None:
    result = xcr0run(
        [*FOLLOW, "--", sys.executable, "-m", "xcr0run", *FOLLOW, "--", "true"], timeout=60
    )
    assert result.returncode == 125
    assert "already traced" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_debugger_under_xcr0run_gets_an_explanation() -> None:
    if os.geteuid() != 0:
        pytest.skip("the explanation needs a seccomp filter without no_new_privs: root only")
    gdb = subprocess.run(["which", "gdb"], capture_output=True, text=True).stdout.strip()
    if not gdb:
        pytest.skip("gdb is not installed")
    result = xcr0run(
        [*FOLLOW, "--", gdb, "-batch", "-ex", "run", "--args", "/bin/true"], timeout=120
    )
    assert "tries to trace a process that xcr0run traces" in result.stderr


def test_environment_is_passed_untouched() -> None:
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.getcwd(), "ODD": "a=b=c"}
    out = subprocess.run(
        [sys.executable, "-m", "xcr0run", "-q", "-m", "host", "--", "env"],
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    assert sorted(out.splitlines()) == sorted(f"{k}={v}" for k, v in env.items())


def test_a_script_without_a_shebang_runs_through_sh(tmp_path) -> None:
    script = tmp_path / "plain-script"
    script.write_text("echo from sh\n")
    script.chmod(0o755)
    for args in (["-q", "-m", "host"], FOLLOW):
        result = xcr0run([*args, "--", str(script)])
        assert (result.returncode, result.stdout) == (0, "from sh\n")


def test_a_truncated_elf_file_is_not_a_crash(tmp_path) -> None:
    bad = tmp_path / "trunc"
    bad.write_bytes(b"\x7fELF\x02\x01\x01")
    bad.chmod(0o755)
    result = xcr0run(["-q", "-m", "host", "--", str(bad)])
    # As with env(1): execve says ENOEXEC, so /bin/sh is tried, and finds no command.
    assert result.returncode in (126, 127)
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr


def test_ctrl_z_and_fg_stop_and_continue_xcr0run_with_the_program() -> None:
    """Ctrl-Z sends SIGTSTP to the foreground group, fg sends SIGCONT: the program (which
    xcr0run became) stops, and its parent sees it stopped. (A new process group, not a
    new session: an orphaned group ignores SIGTSTP.)"""
    proc = subprocess.Popen(
        [sys.executable, "-m", "xcr0run", *FOLLOW, "--", "sh", "-c", "sleep 1; echo done"],
        preexec_fn=os.setpgrp,
        stdout=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: comm(proc.pid) == "sh")  # xcr0run has become the program
    os.killpg(proc.pid, signal.SIGTSTP)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status)
    time.sleep(1.5)
    os.killpg(proc.pid, signal.SIGCONT)
    assert proc.communicate(timeout=30)[0] == "done\n"

"""xcr0run becomes the program: nothing the program or its shell can notice but the view.
Every test runs the same thing directly and under xcr0run and compares. These follow the
tree without trapping (`--mask host --audit`, the same helper, seize and filter), so they
run on any machine; tests/test_supervisor.py repeats the trapping-specific ones."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import comm, tracer_of, wait_for, xcr0run

FOLLOW = ["-q", "-m", "host", "--audit"]
UNDER = [sys.executable, "-m", "xcr0run", *FOLLOW, "--"]


def both(argv: list[str], **kw: object) -> tuple[subprocess.CompletedProcess[str], ...]:
    """Run argv directly, then under xcr0run."""
    return tuple(
        subprocess.run(prefix + argv, capture_output=True, text=True, timeout=60, **kw)  # type: ignore[call-overload]
        for prefix in ([], UNDER)
    )


def in_shell(command: str) -> tuple[str, str]:
    """`command` run by sh, with PROG standing for the program directly and under
    xcr0run: what the shell prints."""
    outs = []
    for prefix in ("", " ".join(UNDER) + " "):
        script = command.replace("PROG ", prefix)
        result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
        outs.append(result.stdout)
    return outs[0], outs[1]


@pytest.mark.parametrize(
    "command",
    [
        "PROG sh -c 'exit 3'; echo $?",
        "PROG sh -c 'kill -KILL $$'; echo $?",
        "ulimit -c 0; PROG sh -c 'kill -SEGV $$'; echo $?",
        "PROG sh -c 'echo to-closed-stdout' >&-; echo $?",
        "PROG sh -c 'echo to-nothing; ls -l /proc/self/fd' <&- >&- 2>&-; echo $?",
        "PROG sh -c 'ls /proc/self/fd' <&- 2>&-; echo $?",
        "PROG sh -c 'echo out; echo err >&2; exit 4' 2>&-; echo $?",
        "PROG sh -c 'echo ran' 2>&1 | cat; echo ${PIPESTATUS[0]}",
        "PROG sh -c 'sleep 0.5; echo ran; exit 5' 2>&1 | true; echo ${PIPESTATUS[0]}",
        "x=$(PROG sh -c 'echo captured'); echo \"$x\"",
    ],
)
def test_the_shell_sees_the_program_itself(command: str) -> None:
    native, under = in_shell(command)
    assert under == native


def test_same_pid_parent_and_process_group(tmp_path) -> None:
    script = "echo $$ $PPID; ps -o pgid= -p $$"
    for prefix in ([], UNDER):
        proc = subprocess.Popen([*prefix, "sh", "-c", script], stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate(timeout=60)
        pid, ppid, pgid = (int(x) for x in out.split())
        assert (pid, ppid, pgid) == (proc.pid, os.getpid(), os.getpgid(0))


COUNTER = (
    "n=0; trap 'n=$((n+1))' USR1; trap 'echo int; exit 0' INT; echo ready; "
    "while [ $n -lt 4 ]; do sleep 0.05; done; echo got $n"
)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signals_sent_to_the_pid_are_the_programs(sig: int) -> None:
    """Signals to the pid reach the program once each and end it as they would (4 x
    SIGUSR1 0.2 s apart; SIGINT caught; SIGTERM and SIGHUP fatal)."""
    results = []
    for prefix in ([], UNDER):
        proc = subprocess.Popen([*prefix, "bash", "-c", COUNTER], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        try:
            assert proc.stdout.readline() == "ready\n"
            for _ in range(4 if sig == signal.SIGUSR1 else 1):
                os.kill(proc.pid, sig)
                time.sleep(0.2)
            out, _ = proc.communicate(timeout=60)
        finally:
            proc.kill()
            proc.wait()
        results.append((out, proc.returncode))
    assert results[1] == results[0]


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGTSTP])
def test_a_stopped_program_is_stopped_for_its_parent(sig: int) -> None:
    for prefix in ([], UNDER):
        proc = subprocess.Popen(
            [*prefix, "sh", "-c", "echo ready; read x; echo done"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "ready\n"
        os.kill(proc.pid, sig)
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == sig
        os.kill(proc.pid, signal.SIGCONT)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.read() == "done\n"
        proc.wait(timeout=30)
        assert proc.returncode == 0


class Terminal:
    """An interactive bash on a pseudo-terminal, for job control as a user sees it."""

    def __init__(self) -> None:
        env = dict(os.environ, PS1="$ ", TERM="dumb", PYTHONPATH=os.getcwd())
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # pragma: no cover - the child
            os.execve("/bin/bash", ["bash", "--norc", "--noprofile", "-i"], env)
        self.read_until("$ ")

    def read_until(self, marker: str, timeout: float = 30.0) -> str:
        out = ""
        deadline = time.monotonic() + timeout
        while marker not in out:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {marker!r} in {out!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    out += os.read(self.fd, 4096).decode(errors="replace")
                except OSError:
                    break
        return out

    def run(self, line: str, until: str = "$ ") -> str:
        os.write(self.fd, line.encode() + b"\n")
        return self.read_until(until)

    def close(self) -> None:
        os.write(self.fd, b"exit\nexit\n")
        os.waitpid(self.pid, 0)
        os.close(self.fd)


def _job_control(prefix: str) -> list[str]:
    term = Terminal()
    try:
        seen = []
        term.run(f"{prefix}sleep 30", until="sleep 30\r\n")
        time.sleep(1.0)
        os.write(term.fd, b"\x1a")  # Ctrl-Z
        seen.append(term.read_until("$ "))
        seen.append(term.run("echo status=$?"))
        seen.append(term.run("jobs"))
        term.run("fg", until="sleep 30\r\n")
        time.sleep(1.0)
        os.write(term.fd, b"\x03")  # Ctrl-C
        seen.append(term.read_until("$ "))
        seen.append(term.run("echo status=$?"))
        term.run(f"{prefix}cat &")
        time.sleep(2.0)
        seen.append(term.run("jobs"))
        killed = term.run("kill -9 %1; wait %1 2>/dev/null; echo status=$?")
        killed += term.run("sleep 1; echo end")
        # When bash prints "Killed" (before or after a prompt) depends on when its
        # SIGCHLD arrives, natively too: that it says so is compared, not where.
        notice = re.search(r"\[1\]\+ +Killed +[^\r\n]*cat\s*\r\n", killed)
        seen.append(killed.replace(notice.group(0), "") if notice else killed)
        # What the shell said, without the echo of the command line and pids.
        said = [re.sub(r"\b\d{4,}\b", "PID", " ".join(s.split("\r\n")[1:-1])) for s in seen]
        return [*said, f"killed notice: {bool(notice)}"]
    finally:
        term.close()


def test_job_control_in_an_interactive_shell(tmp_path) -> None:
    native = _job_control("")
    launcher = tmp_path / "xcr0run"
    launcher.write_text(f'#!/bin/sh\nexec {sys.executable} -m xcr0run "$@"\n')
    launcher.chmod(0o755)
    under = _job_control(f"{launcher} {' '.join(FOLLOW)} -- ")
    # The command text differs; what the shell reports about the job must not.
    strip = [s.replace(f"{launcher} {' '.join(FOLLOW)} -- ", "") for s in under]
    assert strip == native
    assert "Stopped" in native[0] and "status=148" in native[1]
    assert "status=130" in native[4] and "Stopped" in native[5]


def test_a_daemon_outlives_the_program_and_nobody_waits_for_it(tmp_path) -> None:
    marker = tmp_path / "daemon-pid"
    daemon_script = tmp_path / "daemon.sh"
    daemon_script.write_text(f"echo $$ > {marker}; exec sleep 10\n")
    script = f"setsid sh {daemon_script} </dev/null >/dev/null 2>&1 & echo started"
    start = time.monotonic()
    out = subprocess.run(
        ["bash", "-c", 'x=$("$@"); echo "$x"', "-", *UNDER, "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    elapsed = time.monotonic() - start
    assert out == "started\n"
    assert elapsed < 8, f"the caller waited {elapsed:.1f} s for the daemon (10 s)"
    daemon = int(wait_for(lambda: marker.exists() and marker.read_text().strip()))  # type: ignore[arg-type]
    helper = tracer_of(daemon)
    assert helper, "the daemon is still followed"
    os.kill(daemon, signal.SIGTERM)
    wait_for(lambda: not os.path.exists(f"/proc/{daemon}"), timeout=30)
    # The helper ends with the last process it follows.
    wait_for(lambda: not os.path.exists(f"/proc/{helper}") or comm(helper) == "", timeout=10)


def test_inherited_ignored_signals_reach_the_program() -> None:
    status = "grep -E 'SigIgn|SigBlk' /proc/self/status"
    native, under = in_shell(f"trap '' HUP INT TERM USR2 ALRM; PROG {status}")
    assert under == native
    native, under = in_shell(f"PROG {status}")
    assert under == native  # and the defaults, with nothing ignored


def test_the_helper_is_gone_when_the_program_is() -> None:
    before = set(_helpers())
    assert xcr0run([*FOLLOW, "--", "true"]).returncode == 0
    wait_for(lambda: not (set(_helpers()) - before), timeout=10)


def _helpers() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "xcr0run"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if int(p) != os.getpid()]


def test_a_report_that_cannot_be_written_stops_before_the_program(tmp_path) -> None:
    marker = tmp_path / "ran"
    result = xcr0run(
        [*FOLLOW, "--report", str(tmp_path / "no" / "such" / "r.json"), "--", "touch", str(marker)]
    )
    assert result.returncode == 125
    assert result.stderr.count("\n") == 1 and "cannot write report" in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0"])
def test_audit_interval_must_be_a_finite_positive_time(value: str) -> None:
    result = xcr0run([*FOLLOW, "--audit-interval", value, "--", "true"])
    assert result.returncode == 125
    assert result.stderr.startswith("xcr0run: --audit-interval:") and result.stderr.count("\n") == 1


def test_show_pid_of_a_zombie_says_so() -> None:
    child = subprocess.Popen(["true"])
    wait_for(lambda: _state(child.pid) == "Z")
    try:
        result = xcr0run(["--show", "-p", str(child.pid)])
    finally:
        child.wait()
    assert result.returncode == 125
    assert result.stderr == f"xcr0run: process {child.pid} has exited (a zombie, not yet reaped)\n"


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _as_nobody(argv: list[str]) -> list[str]:
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]


@pytest.mark.skipif(os.geteuid() != 0, reason="becomes another user with setpriv: needs root")
def test_without_root_a_setuid_program_is_named_and_runs() -> None:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    argv = [sys.executable, "-m", "xcr0run", *FOLLOW, "--", "/usr/bin/su", "--version"]
    result = subprocess.run(_as_nobody(argv), capture_output=True, text=True, env=env, timeout=60)
    native = subprocess.run(
        _as_nobody(["/usr/bin/su", "--version"]), capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout) == (native.returncode, native.stdout)
    assert "xcr0run: /usr/bin/su is set-user-ID, but runs without those privileges" in result.stderr


def test_if_the_helper_dies_nothing_it_traced_keeps_running() -> None:
    """Killing the helper takes the traced tree with it (PTRACE_O_EXITKILL): nothing may
    run on with faulting armed and nobody to answer."""
    proc = subprocess.Popen([*UNDER, "sh", "-c", "sleep 30 & wait"])
    try:
        wait_for(lambda: comm(proc.pid) == "sh")
        helper = wait_for(lambda: tracer_of(proc.pid))
        os.kill(helper, signal.SIGKILL)  # type: ignore[arg-type]
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()

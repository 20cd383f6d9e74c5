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


def _wait_stopped(pid: int, timeout: float = 30.0) -> int:
    """waitpid(WUNTRACED), bounded: a stop that never comes fails the test, not the run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got, status = os.waitpid(pid, os.WUNTRACED | os.WNOHANG)
        if got:
            return status
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"process {pid} did not stop in {timeout:g} s")


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGTSTP])
def test_a_stopped_program_is_stopped_for_its_parent(sig: int) -> None:
    for prefix in ([], UNDER):
        # A process group of its own, as a shell gives a job: in an orphaned group (the
        # test run's own may be one, under setsid) the kernel discards SIGTSTP.
        proc = subprocess.Popen(
            [*prefix, "sh", "-c", "echo ready; read x; echo done"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            process_group=0,
        )
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "ready\n"
        os.kill(proc.pid, sig)
        status = _wait_stopped(proc.pid)
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


def test_an_inherited_ignored_sigchld_reaches_the_program() -> None:
    """With SIGCHLD ignored the kernel reaps our middle process itself; the helper must
    start anyway, and the program see SIGCHLD ignored."""
    status = "grep -E 'SigIgn|SigBlk|SigPnd|ShdPnd' /proc/self/status; echo rc=$?"
    native, under = in_shell(f"trap '' CHLD; PROG sh -c \"{status}\"")
    assert "rc=0" in native
    assert under == native


def test_a_blocked_sigchld_is_not_left_pending_by_our_own_child() -> None:
    status = ["grep", "-E", "SigBlk|SigPnd|ShdPnd", "/proc/self/status"]

    def blocked() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])

    native, under = (
        subprocess.run(
            prefix + status, capture_output=True, text=True, timeout=60, preexec_fn=blocked
        )
        for prefix in ([], UNDER)
    )
    assert "SigBlk:\t0000000000010000" in native.stdout
    assert (under.returncode, under.stdout) == (native.returncode, native.stdout)


# Sets PR_SET_CHILD_SUBREAPER (which survives execve) and execs its arguments.
SUBREAPER = (
    "import ctypes, os, sys; ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0); "
    "os.execvp(sys.argv[1], sys.argv[1:])"
)
# Forks a child, then waits until it has no children left, as an init-like program does.
WAIT_ALL = (
    "import ctypes, os\n"
    "if os.fork() == 0: os._exit(0)\n"
    "n = 0\n"
    "try:\n"
    "    while True: os.wait(); n += 1\n"
    "except ChildProcessError: pass\n"
    "v = ctypes.c_int(); ctypes.CDLL(None).prctl(37, ctypes.byref(v), 0, 0, 0)\n"
    "print('reaped', n, 'subreaper', v.value)\n"
)


def test_under_a_child_subreaper_the_helper_is_not_the_program_s_child() -> None:
    argv = [sys.executable, "-c", SUBREAPER]
    program = [sys.executable, "-c", WAIT_ALL]
    native, under = (
        subprocess.run(argv + prefix + program, capture_output=True, text=True, timeout=30)
        for prefix in ([], UNDER)
    )
    assert native.stdout == "reaped 1 subreaper 1\n"
    assert (under.returncode, under.stdout) == (native.returncode, native.stdout)


def _signal_set(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


@pytest.mark.parametrize("after", [0.0, 0.01, 0.03, 0.1])
def test_ctrl_c_while_starting_kills_with_sigint_and_no_traceback(after: float) -> None:
    """From xcr0run's first line on (before that, it is the interpreter's own start),
    Ctrl-C kills it with SIGINT as it would the program: no KeyboardInterrupt."""
    proc = subprocess.Popen([*UNDER, "sleep", "5"], stderr=subprocess.PIPE, text=True)
    # Python has started (it ignores SIGPIPE) and xcr0run's first line has taken its
    # SIGINT handler away again.
    wait_for(
        lambda: (
            _signal_set(proc.pid, "SigIgn") & 1 << (signal.SIGPIPE - 1)
            and not _signal_set(proc.pid, "SigCgt") & 1 << (signal.SIGINT - 1)
        ),
        timeout=30,
    )
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGINT, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_signals_meant_for_the_program_do_not_kill_the_helper() -> None:
    """pkill -f (the helper's command line is a copy of xcr0run's), pkill python, or a
    SIGTERM to the whole cgroup reach the helper too: the program must get and handle its
    own. The helper has a name of its own and keeps no directory busy."""
    script = "trap 'echo graceful; exit 0' TERM; echo ready; while :; do sleep 0.05; done"
    proc = subprocess.Popen([*UNDER, "sh", "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        helper: int = wait_for(lambda: tracer_of(proc.pid))  # type: ignore[assignment]
        assert comm(helper) == "xcr0run-helper"
        assert os.readlink(f"/proc/{helper}/cwd") == "/"
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
            os.kill(helper, sig)
        time.sleep(0.2)
        assert tracer_of(proc.pid) == helper
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert (proc.returncode, out) == (0, "graceful\n")
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="a PID namespace of its own needs root")
def test_as_pid_1_the_helper_s_parentage_is_said_in_one_line() -> None:
    """PID 1 adopts every orphan, the helper too: that cannot be avoided, so it is said."""
    argv = ["unshare", "-pf", "--mount-proc", *UNDER, "sh", "-c", "echo $$"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, "1\n")
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("xcr0run: running as PID 1:"), lines


def test_a_report_without_the_audit_records_the_exit_status(tmp_path) -> None:
    import json

    path = tmp_path / "r.json"
    native = subprocess.run(["sh", "-c", "exit 3"], timeout=60).returncode
    result = xcr0run(["-q", "-m", "host", "--report", str(path), "--", "sh", "-c", "exit 3"])
    run = json.loads(path.read_text())["run"]
    assert result.returncode == native == 3
    assert (run["started"], run["exit_code"], run["signal"]) == (True, 3, None)


def test_a_report_records_the_status_the_audit_put_in_place(tmp_path) -> None:
    import json

    path = tmp_path / "r.json"
    result = xcr0run(
        ["-q", "-m", "host", "--expect-used", "avx512", "--report", str(path), "--", "true"]
    )
    assert result.returncode == 124
    assert json.loads(path.read_text())["run"]["exit_code"] == 124


def test_a_report_says_when_the_exec_failed(tmp_path) -> None:
    import json

    program = tmp_path / "badinterp"
    program.write_text("#!/no/such/interpreter\n")
    program.chmod(0o755)
    path = tmp_path / "r.json"
    native = subprocess.run(["/usr/bin/env", str(program)], capture_output=True, timeout=60)
    result = xcr0run([*FOLLOW, "--report", str(path), "--", str(program)])
    assert result.returncode == native.returncode == 127
    run = json.loads(path.read_text())["run"]
    assert (run["started"], run["exit_code"]) == (False, 127)


def test_an_empty_report_path_is_an_error_before_the_program(tmp_path) -> None:
    marker = tmp_path / "ran"
    result = xcr0run([*FOLLOW, "--report", "", "--", "touch", str(marker)])
    assert result.returncode == 125
    assert result.stderr == "xcr0run: cannot write report '': an empty file name\n"
    assert not marker.exists()

"""Starting the command: find it, check it can run under the view, set up the child
(XCR0, AMX permission filter), and either exec it directly or supervise it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from xcr0run import _native, host, isalevel
from xcr0run.audit import AuditLog
from xcr0run.errors import CommandError, ExitStatus, UnsupportedError
from xcr0run.plan import Plan
from xcr0run.supervisor import Outcome, Supervisor

# Signals a shell or terminal sends the whole foreground group: the program gets them
# directly, so the supervisor stays out of the way.
_GROUP_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
# Signals sent to xcr0run alone are passed on to the program, as `timeout` does.
_FORWARDED = (signal.SIGHUP, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)


def find_command(name: str) -> str:
    """The file execvp would run, or CommandError with status 127/126 as env(1) gives."""
    if "/" in name:
        path = name
        if not os.path.exists(path):
            raise CommandError(
                f"failed to run command '{name}': No such file or directory", ExitStatus.NOT_FOUND
            )
    else:
        found = shutil.which(name)
        if found is None:
            # An existing but non-executable match is 126, as execvp reports EACCES.
            dirs = os.environ.get("PATH", os.defpath).split(os.pathsep)
            if any(os.path.isfile(os.path.join(d or ".", name)) for d in dirs):
                raise CommandError(
                    f"failed to run command '{name}': Permission denied", ExitStatus.CANNOT_EXECUTE
                )
            raise CommandError(
                f"failed to run command '{name}': No such file or directory", ExitStatus.NOT_FOUND
            )
        path = found
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        raise CommandError(
            f"failed to run command '{name}': Permission denied", ExitStatus.CANNOT_EXECUTE
        )
    return path


@dataclass(frozen=True)
class IsaNeed:
    path: str
    level: str


def isa_needs(path: str) -> list[IsaNeed]:
    """ISA levels marked as needed by the program, its loader and the loader's libc."""
    out: list[IsaNeed] = []
    seen: set[str] = set()
    todo = [path]
    while todo:
        current = os.path.realpath(todo.pop())
        if current in seen:
            continue
        seen.add(current)
        try:
            with open(current, "rb") as f:
                # Headers and notes sit at the start; read further only if they do not.
                data = f.read(4 << 10)
                end = isalevel.headers_end(data)
                if end > len(data):
                    data += f.read(min(end, 16 << 20) - len(data))
        except OSError:
            continue
        level = isalevel.needed_level(data)
        if level:
            out.append(IsaNeed(current, level))
        interp = isalevel.interpreter(data)
        if interp:
            todo.append(interp)
            libc = os.path.join(os.path.dirname(os.path.realpath(interp)), "libc.so.6")
            todo.append(libc)
            # Debian-style multiarch: the loader sits in /lib64, libc in lib/<triplet>.
            todo.append(os.path.join("/lib", "x86_64-linux-gnu", "libc.so.6"))
    return out


def check_isa_level(path: str, view_level: str | None) -> None:
    """Refuse a view below a level the program's objects need (glibc would abort)."""
    for need in isa_needs(path):
        if view_level is None or _rank(need.level) > _rank(view_level):
            shown = view_level or "below x86-64-v1"
            raise UnsupportedError(
                f"{need.path} needs {need.level} but the view is {shown}; glibc would abort "
                "with 'CPU ISA level is lower than required' (use --force to run anyway)"
            )


def _rank(level: str) -> int:
    return isalevel.LEVEL_NAMES.index(level)


def _prepare_child(plan: Plan, supervised: bool) -> None:
    """In the process about to exec: seccomp filter, default signal dispositions (XCR0
    is set by _execve, in the same breath as the execve)."""
    # Under supervision, ptrace calls stop for us first so we can explain their failure;
    # only as root, since without CAP_SYS_ADMIN a filter needs no_new_privs, which would
    # take setuid programs their privileges.
    explain_ptrace = supervised and os.geteuid() == 0
    if plan.deny_amx or explain_ptrace:
        _native.install_filter(
            _native.ARCH_REQ_XCOMP_PERM if plan.deny_amx else None, explain_ptrace
        )
    # Python ignores SIGPIPE and SIGXFSZ; the program must start with the defaults.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)


Environment = Mapping[bytes, bytes]


class Xcr0SetupError(OSError):
    """ARCH_SET_XCR0 refused the mask (or XCR0 did not read back); nothing was run."""


def _execve(path: str, argv: Sequence[str], env: Environment, xcr0: tuple[Plan, int]) -> None:
    """execve, and like execvp a file without a #! line runs through /bin/sh."""
    try:
        _execve_xcr0(path, argv, env, *xcr0)
    except OSError as err:
        if err.errno != errno.ENOEXEC:
            raise
        _execve_xcr0("/bin/sh", ["/bin/sh", path, *argv[1:]], env, *xcr0)


def _execve_xcr0(
    path: str, argv: Sequence[str], env: Environment, plan: Plan, xcr0_prctl: int
) -> None:
    if not plan.set_xcr0:
        os.execve(path, list(argv), env)
        return
    # From ARCH_SET_XCR0 to execve no code of ours, Python's or libc's may run: libc chose
    # AVX string functions at start-up. The components being disabled must be in their
    # initial state; XFD-armed ones (AMX tile data) are left out, since XRSTOR of them
    # faults without permission.
    to_init = plan.view.host_xcr0 & ~plan.mask & 0x3FC
    stage, result = _native.exec_with_xcr0(
        xcr0_prctl,
        plan.mask,
        to_init,
        plan.view.host_xcr0,
        os.fsencode(path),
        [os.fsencode(a) for a in argv],
        [k + b"=" + v for k, v in env.items()],
    )
    if stage == _native.XCR0_NOT_SET:
        raise Xcr0SetupError(-result, host.set_xcr0_failure(-result, plan.mask))
    if stage == _native.XCR0_READ_BACK:
        raise Xcr0SetupError(errno.EIO, f"XCR0 reads {result:#x} after ARCH_SET_XCR0")
    raise OSError(-result, os.strerror(-result), path)


def exec_direct(
    path: str, argv: Sequence[str], plan: Plan, xcr0_prctl: int, env: Environment
) -> None:
    """Replace xcr0run by the program (no supervision needed). Returns only on error."""
    try:
        _prepare_child(plan, supervised=False)
    except OSError as err:
        raise UnsupportedError(str(err)) from err
    try:
        _execve(path, argv, env, (plan, xcr0_prctl))
    except Xcr0SetupError as err:
        raise UnsupportedError(err.strerror) from err
    except OSError as err:
        raise _exec_error(argv[0], err.errno) from err


def _exec_error(name: str, err: int) -> CommandError:
    status = ExitStatus.NOT_FOUND if err == errno.ENOENT else ExitStatus.CANNOT_EXECUTE
    return CommandError(f"failed to run command '{name}': {os.strerror(err)}", status)


def supervise(
    path: str,
    argv: Sequence[str],
    plan: Plan,
    xcr0_prctl: int,
    env: Environment,
    audit: AuditLog | None = None,
    audit_interval: float | None = None,
    on_ptrace: Callable[[int, str], None] | None = None,
) -> Outcome:
    """Run the program under the supervisor and wait for its whole tree."""
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # child: set up, wait to be seized, exec
        os.close(report_r)
        try:
            try:
                _prepare_child(plan, supervised=True)
            except OSError as err:
                os.write(report_w, f"setup:{err}".encode())
                os._exit(ExitStatus.FAILURE)
            os.kill(os.getpid(), signal.SIGSTOP)
            try:
                _execve(path, argv, env, (plan, xcr0_prctl))
            except Xcr0SetupError as err:
                os.write(report_w, f"setup:{err.strerror}".encode())
                os._exit(ExitStatus.FAILURE)
            except OSError as err:
                os.write(report_w, f"exec:{err.errno}".encode())
                os._exit(_exec_error(argv[0], err.errno).status)
        finally:
            os._exit(ExitStatus.FAILURE)
    os.close(report_w)
    waker = _Waker()
    supervisor = Supervisor(
        plan.view,
        trap_cpuid=plan.trap_cpuid,
        grant_amx=plan.grant_amx,
        audit=audit,
        on_group_stop=_stop_with_program,
        on_ptrace=on_ptrace,
        forwarded=frozenset(_FORWARDED),
        wake_after=waker.after,
    )
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _GROUP_SIGNALS}
    previous.update(
        {sig: signal.signal(sig, lambda s, _f: supervisor.forward_signal(s)) for sig in _FORWARDED}
    )
    previous[_WAKE_SIGNAL] = signal.signal(_WAKE_SIGNAL, lambda _s, _f: supervisor.on_wakeup())
    ticker = (
        _Ticker(audit_interval, supervisor, waker) if audit is not None and audit_interval else None
    )
    try:
        supervisor.attach_stopped_child(pid)
        if ticker:
            ticker.start()
        outcome = supervisor.run()
    except BaseException:
        # Whatever went wrong, leave no stopped or traced child behind.
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        _raise_child_report(report_r, argv[0])
        raise
    finally:
        if ticker:
            ticker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _raise_child_report(report_r, argv[0])
    return outcome


def _raise_child_report(report_r: int, name: str) -> None:
    """Raise what the child wrote before it could exec, if anything."""
    try:
        report = os.read(report_r, 512).decode(errors="replace")
    finally:
        os.close(report_r)
    kind, _, detail = report.partition(":")
    if kind == "setup":
        raise UnsupportedError(detail)
    if kind == "exec":
        raise _exec_error(name, int(detail))


# The supervisor sleeps in waitpid; timers wake it with a signal whose default action is
# to ignore it, aimed at the main thread (the tracer), whose handler then does the work.
_WAKE_SIGNAL = signal.SIGURG


class _Waker:
    def __init__(self) -> None:
        self.main = threading.main_thread().ident or 0

    def now(self) -> None:
        signal.pthread_kill(self.main, _WAKE_SIGNAL)

    def after(self, delay: float) -> None:
        timer = threading.Timer(delay, self.now)
        timer.daemon = True
        timer.start()


class _Ticker(threading.Thread):
    """Periodic audit samples (--audit-interval)."""

    def __init__(self, interval: float, supervisor: Supervisor, waker: _Waker) -> None:
        super().__init__(daemon=True, name="xcr0run-audit")
        self.interval = interval
        self.supervisor = supervisor
        self.waker = waker
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.supervisor.sample_due = True
            self.waker.now()

    def stop(self) -> None:
        self.done.set()


def _stop_with_program() -> None:
    """The program stopped (Ctrl-Z): stop too, so the shell sees the job stopped."""
    os.kill(os.getpid(), signal.SIGSTOP)

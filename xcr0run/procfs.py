"""Processes as /proc shows them: the one place xcr0run reads it, and the one place its
OS errors are translated.

This process's own entries (the environment it started with, its descriptors, its
mappings) are read directly: they are on the launch path, which must stay cheap. Other
processes (`--show -p`) are read through psutil, imported only for them, and through
/proc for the two fields psutil does not give (a thread's comm, the tracer). Either
way an error leaves here as ProcessGone, ZombieProcess or AccessDenied naming the pid
(psutil's `wrap_exceptions` is the model), so no caller looks at an errno.

The tracer's own reads of its tracees stay in supervisor.py, beside the loop that
needs them.
"""

from __future__ import annotations

import os
import sys

from xcr0run.errors import Xcr0runError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import TracebackType

    import psutil  # type: ignore[import-untyped]  # no stubs: its objects are Any to mypy


class ProcessError(Xcr0runError):
    """Another process could not be read; the message names it."""

    def __init__(self, pid: int, message: str) -> None:
        super().__init__(message)
        self.pid = pid


class ProcessGone(ProcessError):
    def __init__(self, pid: int) -> None:
        super().__init__(pid, f"no process with pid {pid}")


class ZombieProcess(ProcessError):
    def __init__(self, pid: int) -> None:
        super().__init__(pid, f"process {pid} has exited (a zombie, not yet reaped)")


class AccessDenied(ProcessError):
    def __init__(self, pid: int) -> None:
        super().__init__(pid, f"cannot read process {pid}: permission denied")


def _translate(err: BaseException, pid: int) -> ProcessError | None:
    """Ours for an OS or psutil error about `pid`; None for anything else."""
    ps = sys.modules.get("psutil")  # its errors can only come from where it was imported
    if ps is not None:
        if isinstance(err, ps.ZombieProcess):  # a kind of NoSuchProcess: test it first
            return ZombieProcess(pid)
        if isinstance(err, ps.NoSuchProcess):
            return ProcessGone(pid)
        if isinstance(err, ps.AccessDenied):
            return AccessDenied(pid)
    if isinstance(err, (FileNotFoundError, ProcessLookupError)):
        return ProcessGone(pid)
    if isinstance(err, PermissionError):
        return AccessDenied(pid)
    return None


class _Reading:
    """`with _Reading(pid):` lets ProcessError out instead of OSError or psutil.Error."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        err: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        ours = None if err is None else _translate(err, self.pid)
        if ours is not None:
            raise ours from err


# -- this process -------------------------------------------------------------------------


def original_environment() -> list[bytes]:
    """The environment this process started with, entry for entry as execve received
    it: Python itself may have changed os.environ (locale coercion sets LC_CTYPE), and
    a mapping would lose what only a raw execve makes (an entry without "=", an empty
    name, a name given twice); the program must get it untouched."""
    try:
        with open("/proc/self/environ", "rb") as f:
            block = f.read()
    except OSError:  # /proc not mounted: the nearest we know
        return [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in os.environ.items()]
    if _TUNABLES in block:
        return _mended(block)
    return block.split(b"\0")[:-1] if block else []


_TUNABLES = b"GLIBC_TUNABLES="


def _mended(block: bytes) -> list[bytes]:
    """The environment block with each GLIBC_TUNABLES entry whole again. glibc's loader
    (2.36 here) parses that variable in place, writing a NUL over every ':' of it in
    the block /proc shows, and points environ at an intact copy; the copy says where
    the entry really ends."""
    from xcr0run import _native

    intact = [e for e in _native.environ_entries() if e.startswith(_TUNABLES)]
    entries: list[bytes] = []
    pos = 0
    while pos < len(block):
        end = block.find(b"\0", pos)
        end = len(block) if end < 0 else end
        entry = block[pos:end]
        if entry.startswith(_TUNABLES) and intact:
            whole = intact[0]
            if block[pos : pos + len(whole)].replace(b"\0", b":") == whole:
                intact.pop(0)
                entries.append(whole)
                pos += len(whole) + 1
                continue
        entries.append(entry)
        pos = end + 1
    return entries


def open_descriptors() -> list[int]:
    """This process's open file descriptors (the listing's own one included)."""
    return [int(name) for name in os.listdir("/proc/self/fd")]


def address_mapped(address: int, length: int = 8) -> bool:
    """Whether [address, address+length) touches a mapping of this process."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split(None, 1)[0].split("-"))
            if lo < address + length and address < hi:
                return True
    return False


# -- other processes ------------------------------------------------------------------------


class ProcessIdentity:
    """Who a process is: its comm, executable and tracer (0: none)."""

    __slots__ = ("comm", "exe", "tracer")

    def __init__(self, comm: str, exe: str, tracer: int) -> None:
        self.comm = comm
        self.exe = exe
        self.tracer = tracer


def _process(pid: int) -> psutil.Process:
    import psutil  # type: ignore[import-untyped]

    with _Reading(pid):
        return psutil.Process(pid)


def identity(pid: int) -> ProcessIdentity:
    """ProcessGone, or ZombieProcess for one that has exited and not been reaped (it has
    no threads, state or executable left to read)."""
    import psutil  # type: ignore[import-untyped]

    process = _process(pid)
    with _Reading(pid):
        if process.status() == psutil.STATUS_ZOMBIE:
            raise ZombieProcess(pid)
        tracer = tracer_of(pid)
        try:
            exe = process.exe() or "?"  # "" for kernel threads
        except psutil.AccessDenied:
            exe = "?"  # another user's process: still worth naming by its comm
        return ProcessIdentity(thread_name(pid, pid), exe, tracer)


def command_line(pid: int) -> list[str]:
    with _Reading(pid):
        return list(_process(pid).cmdline())


def thread_ids(pid: int) -> list[int]:
    """The process's threads, lowest id first."""
    with _Reading(pid):
        return sorted(t.id for t in _process(pid).threads())


def thread_name(pid: int, tid: int) -> str:
    """A thread's comm ("?" once it is gone): psutil names only whole processes."""
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def tracer_of(pid: int) -> int:
    """The pid tracing `pid` (TracerPid), 0 if none: psutil does not tell."""
    with _Reading(pid), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0

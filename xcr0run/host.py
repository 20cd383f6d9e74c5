"""What this machine and kernel offer: XCR0, CPUID, CPUID faulting, the XSAVE
permissions, and whether an ARCH_SET_XCR0 exists. System layer over _native.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass

from xcr0run import _native
from xcr0run.cpuid import CpuidTable, read_table

XCR0_PRCTL_ENV = "XCR0RUN_XCR0_PRCTL"


def xcr0() -> int:
    return _native.xgetbv(0)


def xgetbv1_supported() -> bool:
    return bool(_native.cpuid(0xD, 1)[0] & 0b100)


def xinuse() -> int | None:
    """XINUSE & XCR0 for this thread, when the CPU has XGETBV with ECX=1."""
    return _native.xgetbv(1) if xgetbv1_supported() else None


def cpuid_table() -> CpuidTable:
    return read_table(_native.cpuid)


@dataclass(frozen=True)
class Faulting:
    supported: bool
    enabled_here: bool  # this thread's CPUID already faults (e.g. under xcr0run)
    detail: str


def cpuid_faulting() -> Faulting:
    # ARCH_SET_CPUID(1) ("cpuid allowed") is a harmless probe: the kernel refuses it
    # with ENODEV exactly when the CPU cannot fault. Skip it if we already fault, so a
    # program under xcr0run does not switch its own faulting off.
    try:
        enabled_here = _native.arch_prctl(_native.ARCH_GET_CPUID) == 0
    except _native.NativeError as err:
        return Faulting(False, False, f"ARCH_GET_CPUID: {os.strerror(err.errno)}")
    if enabled_here:
        return Faulting(True, True, "this thread's CPUID already faults")
    result = _native.arch_prctl_raw(_native.ARCH_SET_CPUID, 1)
    if result == 0:
        return Faulting(True, False, "ARCH_SET_CPUID available")
    return Faulting(False, False, f"ARCH_SET_CPUID: {os.strerror(-result)}")


@dataclass(frozen=True)
class XComp:
    """The kernel's dynamic XSAVE features (AMX): ARCH_GET_XCOMP_*; None if unknown."""

    supported: int | None
    permitted: int | None
    guest_permitted: int | None


def xcomp() -> XComp:
    def get(code: int) -> int | None:
        try:
            return _native.arch_prctl_get(code)
        except _native.NativeError:
            return None  # kernels before 5.16 know none of these

    return XComp(
        get(_native.ARCH_GET_XCOMP_SUPP),
        get(_native.ARCH_GET_XCOMP_PERM),
        get(_native.ARCH_GET_XCOMP_GUEST_PERM),
    )


def request_xcomp_perm(component: int) -> int:
    """ARCH_REQ_XCOMP_PERM for this process; returns 0 or -errno."""
    return _native.arch_prctl_raw(_native.ARCH_REQ_XCOMP_PERM, component)


# -- ARCH_SET_XCR0 ---------------------------------------------------------------------------


def xcr0_prctl_code(override: int | None = None) -> int:
    """The arch_prctl code to try for ARCH_SET_XCR0: option, environment, or the patch's."""
    if override is not None:
        return override
    text = os.environ.get(XCR0_PRCTL_ENV)
    return int(text, 0) if text else _native.ARCH_SET_XCR0_PATCH_CODE


@dataclass(frozen=True)
class Xcr0Prctl:
    code: int
    available: bool
    detail: str


# The 2020 patch refuses components from bit 10 up (no AMX).
_PATCH_MAX_BITS = 0x3FF


def probe_xcr0_prctl(code: int, current: int) -> Xcr0Prctl:
    """Does arch_prctl(code) set XCR0 here? Probed without side effects.

    The probe asks for the current XCR0, a no-op for a real ARCH_SET_XCR0. Elsewhere the
    code is unassigned (EINVAL) or, as mainline's ARCH_GET_XCOMP_SUPP at 0x1021, a getter
    that takes the value as a pointer (EFAULT) — so the value must never be an address
    this process has mapped.
    """
    value = current & _PATCH_MAX_BITS
    if value >= _native.mmap_min_addr() and _native.address_mapped(value):
        return Xcr0Prctl(code, False, f"not probed: {value:#x} is a mapped address here")
    if value == current:
        result = _native.arch_prctl_raw(code, value)
        if result == 0 and xcr0() != current:
            return Xcr0Prctl(code, False, f"arch_prctl({code:#x}) changed XCR0 unexpectedly")
    else:
        # Asking for less than the current set would change this thread: ask in a child.
        result = _probe_in_child(code, value)
    return Xcr0Prctl(code, result == 0, _describe_probe(code, result))


def _probe_in_child(code: int, value: int) -> int:
    pid = os.fork()
    if pid == 0:
        result = _native.arch_prctl_raw(code, value)
        ok = result == 0 and _native.xgetbv(0) == value
        os._exit(0 if ok else min(-result if result < 0 else 255, 255))
    _, status = os.waitpid(pid, 0)
    code_ = os.waitstatus_to_exitcode(status)
    return 0 if code_ == 0 else -code_


def _describe_probe(code: int, result: int) -> str:
    if result == 0:
        return f"arch_prctl({code:#x}) sets XCR0 per thread"
    err = -result
    if err == errno.EINVAL:
        return f"no ARCH_SET_XCR0 at code {code:#x} (unassigned on this kernel)"
    if err == errno.EFAULT:
        what = " (ARCH_GET_XCOMP_SUPP)" if code == _native.ARCH_GET_XCOMP_SUPP else ""
        return f"no ARCH_SET_XCR0: code {code:#x} is a getter here{what}"
    return f"no ARCH_SET_XCR0 at code {code:#x}: {os.strerror(err)}"


# -- another process ------------------------------------------------------------------------


@dataclass(frozen=True)
class ThreadState:
    tid: int
    comm: str
    xcr0: int | None
    xstate_bv: int | None
    error: str | None = None


def _status_field(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    return ""


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def process_identity(pid: int) -> tuple[str, str, int]:
    """(comm, exe, tracer pid) of a process; OSError if it does not exist."""
    comm = _comm(pid)
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = "?"
    return comm, exe, int(_status_field(pid, "TracerPid") or 0)


def command_line(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def thread_states(pid: int) -> list[ThreadState]:
    """Each thread's XCR0 and in-use components, read through ptrace (NT_X86_XSTATE).

    Each thread is seized, interrupted, read and detached in turn: it is stopped for
    the length of one register read and left as it was.
    """
    states = []
    for name in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
        tid = int(name)
        try:
            _native.ptrace_seize(tid, 0)
        except _native.NativeError as err:
            states.append(ThreadState(tid, _comm(tid), None, None, os.strerror(err.errno)))
            continue
        try:
            _native.ptrace_interrupt(tid)
            os.waitpid(tid, _native.WALL)
            head = _native.ptrace_getregset(tid, _native.NT_X86_XSTATE, 576)
            xcr0_value, xstate_bv = _native.xstate_header(head)
            states.append(ThreadState(tid, _comm(tid), xcr0_value, xstate_bv))
        except (_native.NativeError, ChildProcessError) as err:
            states.append(ThreadState(tid, _comm(tid), None, None, str(err)))
        finally:
            with contextlib.suppress(_native.NativeError):
                _native.ptrace_detach(tid)
    return states

"""What this machine and kernel offer: XCR0, CPUID, CPUID faulting, the XSAVE
permissions, and whether an ARCH_SET_XCR0 exists. System layer over _native.
"""

from __future__ import annotations

import errno
import os
import stat

from xcr0run import _native, procfs
from xcr0run.cpuid import XSAVE_LEAF, CpuidTable, read_table
from xcr0run.plan import PATCH_XCR0_BITS, Capabilities
from xcr0run.xsave import NAMES as _XSAVE_NAMES

XCR0_PRCTL_ENV = "XCR0RUN_XCR0_PRCTL"
_AMX_TILE_DATA = _XSAVE_NAMES["tiledata"]  # ARCH_GET_XCOMP_SUPP bit 18: the kernel supports AMX


def xcr0() -> int:
    return _native.xgetbv(0)


def xgetbv1_supported() -> bool:
    return bool(_native.cpuid(XSAVE_LEAF, 1)[0] & 0b100)


def xinuse() -> int | None:
    """XINUSE & XCR0 for this thread, when the CPU has XGETBV with ECX=1."""
    return _native.xgetbv(1) if xgetbv1_supported() else None


def cpuid_table() -> CpuidTable:
    """This CPU's answers, read as they are asked for."""
    return CpuidTable(source=_native.cpuid)


def full_cpuid_table() -> CpuidTable:
    """Every leaf and sub-leaf this CPU reports (for dumps)."""
    return read_table(_native.cpuid)


# The records here are plain classes: probing is on the launch path, and importing
# dataclasses (with inspect) costs more than the probes.


class Faulting:
    __slots__ = ("detail", "enabled_here", "supported")

    def __init__(self, supported: bool, enabled_here: bool, detail: str) -> None:
        self.supported = supported
        self.enabled_here = enabled_here  # this thread's CPUID already faults (under xcr0run)
        self.detail = detail


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


class XComp:
    """The kernel's dynamic XSAVE features (AMX): ARCH_GET_XCOMP_*; None if unknown."""

    __slots__ = ("guest_permitted", "permitted", "supported")

    def __init__(
        self, supported: int | None, permitted: int | None, guest_permitted: int | None
    ) -> None:
        self.supported = supported
        self.permitted = permitted
        self.guest_permitted = guest_permitted


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


# -- ARCH_SET_XCR0 ---------------------------------------------------------------------------


def xcr0_prctl_code(override: int | None = None) -> int:
    """The arch_prctl code to try for ARCH_SET_XCR0: option, environment, or ours."""
    if override is not None:
        return override
    text = os.environ.get(XCR0_PRCTL_ENV)
    return int(text, 0) if text else _native.ARCH_SET_XCR0


class Xcr0Prctl:
    __slots__ = ("available", "code", "detail")

    def __init__(self, code: int, available: bool, detail: str) -> None:
        self.code = code
        self.available = available
        self.detail = detail


# The 2020 RFC patch refuses components from bit 10 up (no AMX, PATCH_XCR0_BITS); ours
# takes any user component the kernel enabled.
_ALL_BITS = (1 << 64) - 1


def xcr0_prctl_limit(code: int) -> int:
    """The XCR0 bits ARCH_SET_XCR0 at `code` can keep (the RFC patch: bits 0-9)."""
    return PATCH_XCR0_BITS if code == _native.ARCH_SET_XCR0_RFC_CODE else _ALL_BITS


def set_xcr0_failure(err: int, mask: int) -> str:
    """One line for a refused ARCH_SET_XCR0."""
    if err == errno.EPERM:
        why = "a component being turned off is in use (not in its initial state)"
    elif err == errno.EINVAL:
        why = "the kernel does not accept this XCR0 (unsupported or invalid combination)"
    else:
        why = os.strerror(err)
    return f"ARCH_SET_XCR0({mask:#x}) refused: {why}"


# Codes mainline Linux assigns (asm/prctl.h): never ARCH_SET_XCR0, and some of them
# (ARCH_SET_FS, ...) would wreck the probing process. 0x1021 is ARCH_GET_XCOMP_SUPP too,
# but it is the 2020 RFC patch's own code and its probe value can never be a mapped
# address. Ours (0x1014) is unassigned in mainline: EINVAL there, nothing else.
_MAINLINE_CODES = {
    0x1001: "ARCH_SET_GS", 0x1002: "ARCH_SET_FS", 0x1003: "ARCH_GET_FS",
    0x1004: "ARCH_GET_GS", 0x1011: "ARCH_GET_CPUID", 0x1012: "ARCH_SET_CPUID",
    0x1022: "ARCH_GET_XCOMP_PERM", 0x1023: "ARCH_REQ_XCOMP_PERM",
    0x1024: "ARCH_GET_XCOMP_GUEST_PERM", 0x1025: "ARCH_REQ_XCOMP_GUEST_PERM",
    0x1026: "ARCH_XCOMP_TILECFG", 0x1027: "ARCH_XCOMP_TILERELEASE",
    0x2001: "ARCH_MAP_VDSO_X32", 0x2002: "ARCH_MAP_VDSO_32", 0x2003: "ARCH_MAP_VDSO_64",
    0x4001: "ARCH_GET_UNTAG_MASK", 0x4002: "ARCH_ENABLE_TAGGED_ADDR",
    0x4003: "ARCH_GET_MAX_TAG_BITS", 0x4004: "ARCH_FORCE_TAGGED_SVA",
    0x5001: "ARCH_SHSTK_ENABLE", 0x5002: "ARCH_SHSTK_DISABLE", 0x5003: "ARCH_SHSTK_LOCK",
    0x5004: "ARCH_SHSTK_UNLOCK", 0x5005: "ARCH_SHSTK_STATUS",
}  # fmt: skip


def probe_xcr0_prctl(code: int, current: int) -> Xcr0Prctl:
    """Does arch_prctl(code) set XCR0 here? Probed without side effects.

    The probe asks for the current XCR0, a no-op for a real ARCH_SET_XCR0. Elsewhere the
    code is unassigned (EINVAL) or, as mainline's ARCH_GET_XCOMP_SUPP at 0x1021, a getter
    that takes the value as a pointer (EFAULT) — so the value must never be an address
    this process has mapped. Codes other than the patch's are probed in a child process.
    """
    if code in _MAINLINE_CODES:
        name = _MAINLINE_CODES[code]
        return Xcr0Prctl(code, False, f"no ARCH_SET_XCR0: code {code:#x} is {name} on Linux")
    value = current & xcr0_prctl_limit(code)
    try:
        mapped = procfs.address_mapped(value)
    except OSError:
        return Xcr0Prctl(
            code, False, "not probed: /proc/self/maps is unreadable (is /proc mounted?)"
        )
    if mapped:
        return Xcr0Prctl(code, False, f"not probed: {value:#x} is a mapped address here")
    if value == current and code in (_native.ARCH_SET_XCR0, _native.ARCH_SET_XCR0_RFC_CODE):
        result = _native.arch_prctl_raw(code, value)
        if result == 0 and xcr0() != current:
            return Xcr0Prctl(code, False, f"arch_prctl({code:#x}) changed XCR0 unexpectedly")
    else:
        # Another code could mean anything, and asking for less than the current set
        # would change this thread: ask in a child.
        result = _probe_in_child(code, value)
    return Xcr0Prctl(code, result == 0, _describe_probe(code, result))


def _probe_in_child(code: int, value: int) -> int:
    """0, -errno, or 1 when the call succeeded without setting XCR0 (or killed the child)."""
    pid = os.fork()
    if pid == 0:
        result = _native.arch_prctl_raw(code, value)
        if result == 0 and _native.xgetbv(0) == value:
            os._exit(0)
        os._exit(min(-result, 254) if result < 0 else 255)
    _, status = os.waitpid(pid, 0)
    exit_code = os.waitstatus_to_exitcode(status)
    if exit_code == 0:
        return 0
    return -exit_code if 0 < exit_code < 255 else 1


def _describe_probe(code: int, result: int) -> str:
    if result == 0:
        return f"arch_prctl({code:#x}) sets XCR0 per thread"
    if result > 0:
        return f"no ARCH_SET_XCR0 at code {code:#x}: the call does something else"
    err = -result
    if err == errno.EINVAL:
        return f"no ARCH_SET_XCR0 at code {code:#x} (unassigned on this kernel)"
    if err == errno.EFAULT:
        what = " (ARCH_GET_XCOMP_SUPP)" if code == _native.ARCH_GET_XCOMP_SUPP else ""
        return f"no ARCH_SET_XCR0: code {code:#x} is a getter here{what}"
    return f"no ARCH_SET_XCR0 at code {code:#x}: {os.strerror(err)}"


def capabilities(xcr0_prctl_code: int) -> Capabilities:
    """What this machine and kernel offer for presenting a view (plan.make_plan's input)."""
    xcr0_value = xcr0()
    faulting = cpuid_faulting()
    probe = probe_xcr0_prctl(xcr0_prctl_code, xcr0_value)
    supported = xcomp().supported
    return Capabilities(
        xcr0=xcr0_value,
        faulting=faulting.supported,
        faulting_detail=faulting.detail,
        set_xcr0=probe.available,
        set_xcr0_detail=probe.detail,
        amx_supported=bool((supported or 0) & _AMX_TILE_DATA),
        faulting_enabled=faulting.enabled_here,
        set_xcr0_limit=xcr0_prctl_limit(xcr0_prctl_code),
    )


# -- another process ------------------------------------------------------------------------


class ThreadState:
    __slots__ = ("comm", "error", "tid", "xcr0", "xstate_bv")

    def __init__(
        self,
        tid: int,
        comm: str,
        xcr0: int | None,
        xstate_bv: int | None,
        error: str | None = None,
    ) -> None:
        self.tid = tid
        self.comm = comm
        self.xcr0 = xcr0
        self.xstate_bv = xstate_bv
        self.error = error


def thread_states(pid: int) -> list[ThreadState]:
    """Each thread's XCR0 and in-use components, read through ptrace (NT_X86_XSTATE).

    Each thread is seized, interrupted, read and detached in turn: it is stopped for
    the length of one register read and left as it was.
    """
    import contextlib  # here, not at the top: --show -p is off the launch path

    states = []
    reader = _native.XStateHeadReader()
    for tid in procfs.thread_ids(pid):
        try:
            _native.ptrace_seize(tid, 0)
        except _native.NativeError as err:
            states.append(
                ThreadState(tid, procfs.thread_name(pid, tid), None, None, os.strerror(err.errno))
            )
            continue
        pending = 0  # a signal that arrived meanwhile: handed back at detach
        try:
            _native.ptrace_interrupt(tid)
            _, status = os.waitpid(tid, _native.WALL)
            if os.WIFSTOPPED(status) and status >> 16 == 0:
                pending = os.WSTOPSIG(status)  # a signal-delivery stop, not ours
            xcr0_value, xstate_bv = reader.read(tid)
            states.append(ThreadState(tid, procfs.thread_name(pid, tid), xcr0_value, xstate_bv))
        except (_native.NativeError, ChildProcessError) as err:
            states.append(ThreadState(tid, procfs.thread_name(pid, tid), None, None, str(err)))
        finally:
            with contextlib.suppress(_native.NativeError):
                _native.ptrace_detach(tid, pending)
    return states


def privileges_lost_under_trace(path: str) -> str | None:
    """What `path` would be given at exec that a traced program is not: "set-user-ID",
    "set-group-ID" or "file-capability", or None. The kernel withholds them from a
    program whose tracer lacks CAP_SYS_PTRACE (taken here as: we are not root)."""
    if os.geteuid() == 0:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    if st.st_mode & stat.S_ISUID and st.st_uid != os.geteuid():
        return "set-user-ID"
    if st.st_mode & stat.S_ISGID and st.st_gid != os.getegid():
        return "set-group-ID"
    try:
        os.getxattr(path, "security.capability")
    except OSError:
        return None
    return "file-capability"

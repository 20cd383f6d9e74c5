"""The native layer against the real kernel: in-process cpuid/xgetbv, the seccomp filter."""

from __future__ import annotations

import errno
import os
import subprocess

from xcr0run import _native, host, seccomp


def test_cpuid_and_xgetbv_agree_with_each_other() -> None:
    eax, ebx, ecx, edx = _native.cpuid(0)
    assert eax >= 0xD and ebx and ecx and edx  # a vendor string and leaf 0xD exist
    osxsave = _native.cpuid(1)[2] >> 27 & 1
    assert osxsave == 1
    xcr0 = _native.xgetbv(0)
    assert xcr0 & 0b11 == 0b11
    assert _native.cpuid(0xD, 0)[0] & xcr0 == xcr0 & 0xFFFFFFFF


def test_filter_denies_amx_requests_through_both_system_call_abis(cbuild) -> None:
    """The AMX filter must also catch int 0x80, where arch_prctl is number 384."""
    prog = cbuild("amx_request_both.c")
    native = subprocess.run([prog], capture_output=True, text=True, check=True).stdout
    pid = os.fork()
    if pid == 0:
        try:
            _native.install_filter(seccomp.build(seccomp.FilterSpec(deny_amx=True)))
            fd = os.open("/tmp/xcr0run-filter-test.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.execv(prog, [prog])
        finally:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with open("/tmp/xcr0run-filter-test.out") as f:
        filtered = f.read()
    assert filtered == f"64={-errno.EPERM} 32={-errno.EPERM}\n"
    assert filtered != native  # without the filter the kernel answers for itself


def test_set_xcr0_trampoline_runs_the_call_after_xrstor() -> None:
    """The ARCH_SET_XCR0 path's machine code (init the state, the system call, and only
    if it returned 0 the check and execve) runs here with harmless codes: ARCH_GET_CPUID
    reports 1 (cpuid not faulting), an unassigned code EINVAL; neither gets to execve.
    tests/test_xcr0_kernel.py runs the rest in the test kernel."""
    xcr0 = host.xcr0()

    def attempt(code: int) -> tuple[int, int]:
        return _native.exec_with_xcr0(code, 0, 0xE0 & xcr0, xcr0, b"/nonexistent", [b"x"], [])

    assert attempt(_native.ARCH_GET_CPUID) == (_native.XCR0_NOT_SET, 1)
    assert attempt(0x1030) == (_native.XCR0_NOT_SET, -errno.EINVAL)
    assert host.xcr0() == xcr0

"""Every foreign call xcr0run makes: syscalls, ptrace, seccomp, and in-process
`cpuid`/`xgetbv`. Nothing else in the package imports ctypes.

Each wrapper is a few lines and goes through `_check`, which raises NativeError
carrying the errno, the call and the pid. Constants and structures keep the kernel's
names and cite the header they mirror. x86-64 Linux only.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os

TYPE_CHECKING = False  # typing's import costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)

# <asm/unistd_64.h>
SYS_ptrace = 101
SYS_prctl = 157
SYS_arch_prctl = 158
SYS_seccomp = 317

# <asm/prctl.h>
ARCH_GET_CPUID = 0x1011
ARCH_SET_CPUID = 0x1012
ARCH_GET_XCOMP_SUPP = 0x1021
ARCH_GET_XCOMP_PERM = 0x1022
ARCH_REQ_XCOMP_PERM = 0x1023
ARCH_GET_XCOMP_GUEST_PERM = 0x1024
# Not in mainline: the per-thread XCR0 of tests/kernel/arch-set-xcr0.patch (codes no
# mainline kernel assigns; set takes the value itself), and the 2020 RFC patch's code,
# which mainline (5.16+) gives to ARCH_GET_XCOMP_SUPP. Callers pass the code they try.
ARCH_GET_XCR0 = 0x1013
ARCH_SET_XCR0 = 0x1014
ARCH_SET_XCR0_RFC_CODE = 0x1021

# <linux/ptrace.h>
PTRACE_TRACEME = 0
PTRACE_PEEKTEXT = 1
PTRACE_POKETEXT = 4
PTRACE_CONT = 7
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_ATTACH = 16
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202
PTRACE_GETREGSET = 0x4204
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B

PTRACE_O_TRACESYSGOOD = 0x01
PTRACE_O_TRACEFORK = 0x02
PTRACE_O_TRACEVFORK = 0x04
PTRACE_O_TRACECLONE = 0x08
PTRACE_O_TRACEEXEC = 0x10
PTRACE_O_TRACEEXIT = 0x40
PTRACE_O_TRACESECCOMP = 0x80
PTRACE_O_EXITKILL = 0x100000

PTRACE_EVENT_FORK = 1
PTRACE_EVENT_VFORK = 2
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_EXIT = 6
PTRACE_EVENT_SECCOMP = 7
PTRACE_EVENT_STOP = 128

# <elf.h>
NT_X86_XSTATE = 0x202

# <linux/wait.h>
WALL = 0x40000000

# <asm-generic/siginfo.h>
SI_KERNEL = 0x80

# <linux/prctl.h>, <linux/seccomp.h> (the filter itself: seccomp.py)
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
PR_SET_NO_NEW_PRIVS = 38
PR_SET_PTRACER = 0x59616D61  # Yama: who may attach to this process
SECCOMP_SET_MODE_FILTER = 1


class NativeError(OSError):
    """A failed system call: errno, the call's name and the pid it was about."""

    errno: int  # always set, unlike a plain OSError's

    def __init__(self, err: int, call: str, pid: int | None = None) -> None:
        where = f" (pid {pid})" if pid is not None else ""
        super().__init__(err, f"{call}{where}: {os.strerror(err)}")
        self.call = call
        self.pid = pid


def _check(result: int, call: str, pid: int | None = None) -> int:
    if result == -1:
        raise NativeError(ctypes.get_errno(), call, pid)
    return result


# -- structures --------------------------------------------------------------------------


_USER_REGS = (
    "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax "
    "rip cs eflags rsp ss fs_base gs_base ds es fs gs"
)


class UserRegs(ctypes.Structure):
    """struct user_regs_struct, <sys/user.h> (x86-64)."""

    _fields_ = [(name, ctypes.c_uint64) for name in _USER_REGS.split()]


class SigInfo(ctypes.Structure):
    """The head of siginfo_t, <asm-generic/siginfo.h>: enough for SIGSEGV and kill()."""

    _fields_ = [
        ("si_signo", ctypes.c_int),
        ("si_errno", ctypes.c_int),
        ("si_code", ctypes.c_int),
        ("_pad", ctypes.c_int),
        ("si_addr", ctypes.c_uint64),  # also si_pid/si_uid for signals sent by kill()
        ("_rest", ctypes.c_byte * 104),
    ]


class IoVec(ctypes.Structure):
    """struct iovec, <sys/uio.h>."""

    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class SockFilter(ctypes.Structure):
    """struct sock_filter, <linux/filter.h>."""

    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class SockFprog(ctypes.Structure):
    """struct sock_fprog, <linux/filter.h>."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


# -- in-process cpuid / xgetbv ------------------------------------------------------------
# A page of our own machine code, because Python cannot execute these instructions.
# cpuid(leaf=edi, subleaf=esi, out=rdx): push rbx; mov r8,rdx; mov eax,edi; mov ecx,esi;
#   cpuid; mov [r8],eax; mov [r8+4],ebx; mov [r8+8],ecx; mov [r8+12],edx; pop rbx; ret
_CPUID_CODE = bytes.fromhex("534989d089f889f10fa241890041895804418948084189500c5bc3")
# xgetbv(index=edi) -> rax: mov ecx,edi; xgetbv; shl rdx,32; or rax,rdx; ret
_XGETBV_CODE = bytes.fromhex("89f90f01d048c1e2204809d0c3")
# exec_with_xcr0(job=rdi) -> rax: put the components in job.rfbm in their initial state
# (xrstor from a header with XSTATE_BV=0), arch_prctl(job.code, job.mask), check xgetbv(0),
# then execve(job.path, job.argv, job.envp) -- all without returning to Python, whose
# libc picked AVX string functions at start-up and would die of SIGILL under the new
# XCR0. If the check or execve fails, arch_prctl(job.code, job.restore) puts XCR0 back
# before returning. job.stage says how far it got (see exec_with_xcr0).
#   push rbx; mov rbx,rdi; mov rax,[rbx+24]; mov rdx,rax; shr rdx,32; mov r10,[rbx+16]
#   xrstor [r10]; mov eax,158; mov rdi,[rbx]; mov rsi,[rbx+8]; syscall; test rax,rax
#   jnz out; mov qword [rbx+64],1; xor ecx,ecx; xgetbv; shl rdx,32; or rax,rdx
#   mov [rbx+72],rax; cmp rax,[rbx+8]; jne back; mov qword [rbx+64],2; mov eax,59
#   mov rdi,[rbx+32]; mov rsi,[rbx+40]; mov rdx,[rbx+48]; syscall
#   back: push rax; mov eax,158; mov rdi,[rbx]; mov rsi,[rbx+56]; syscall; pop rax
#   out: pop rbx; ret
_EXEC_XCR0_CODE = bytes.fromhex(
    "534889fb488b43184889c248c1ea204c8b5310410fae2ab89e000000488b3b488b73080f054885c075"
    "4948c743400100000031c90f01d048c1e2204809d048894348483b4308751b48c7434002000000b83b"
    "000000488b7b20488b7328488b53300f0550b89e000000488b3b488b73380f05585bc3"
)


class Xcr0ExecJob(ctypes.Structure):
    """The argument block of _EXEC_XCR0_CODE (offsets are in the machine code)."""

    _fields_ = [
        ("code", ctypes.c_uint64),
        ("mask", ctypes.c_uint64),
        ("area", ctypes.c_void_p),
        ("rfbm", ctypes.c_uint64),
        ("path", ctypes.c_char_p),
        ("argv", ctypes.c_void_p),
        ("envp", ctypes.c_void_p),
        ("restore", ctypes.c_uint64),
        ("stage", ctypes.c_uint64),
        ("readback", ctypes.c_uint64),
    ]


_PROT_READ, _PROT_WRITE, _PROT_EXEC = 1, 2, 4
_MAP_PRIVATE, _MAP_ANONYMOUS = 0x02, 0x20

_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


def _load_code() -> tuple[int, int, int]:
    page = _libc.mmap(None, 4096, _PROT_READ | _PROT_WRITE, _MAP_PRIVATE | _MAP_ANONYMOUS, -1, 0)
    if page in (None, ctypes.c_void_p(-1).value):
        raise NativeError(ctypes.get_errno(), "mmap")
    offsets = []
    at = 0
    for code in (_CPUID_CODE, _XGETBV_CODE, _EXEC_XCR0_CODE):
        ctypes.memmove(page + at, code, len(code))
        offsets.append(page + at)
        at += (len(code) + 15) & ~15
    _check(_libc.mprotect(page, 4096, _PROT_READ | _PROT_EXEC), "mprotect")
    return offsets[0], offsets[1], offsets[2]


_code_cache: list[tuple[Callable[..., Any], ...]] = []


def _functions() -> tuple[Callable[..., Any], ...]:
    if not _code_cache:
        cpuid_at, xgetbv_at, exec_xcr0_at = _load_code()
        _code_cache.append(
            (
                ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p)(cpuid_at),
                ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint32)(xgetbv_at),
                ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_void_p)(exec_xcr0_at),
            )
        )
    return _code_cache[0]


def cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    """Execute CPUID in this thread: (eax, ebx, ecx, edx)."""
    out = (ctypes.c_uint32 * 4)()
    _functions()[0](leaf, subleaf, ctypes.addressof(out))
    return out[0], out[1], out[2], out[3]


def xgetbv(index: int = 0) -> int:
    """Execute XGETBV in this thread (index 0: XCR0, index 1: XINUSE & XCR0)."""
    return int(_functions()[1](index))


# exec_with_xcr0 stages: how far the machine code got.
XCR0_NOT_SET = 0  # arch_prctl failed (result: -errno); nothing changed
XCR0_READ_BACK = 1  # arch_prctl returned 0 but xgetbv(0) read `result`; XCR0 restored
XCR0_EXEC_FAILED = 2  # XCR0 was set, execve failed (result: -errno); XCR0 restored


def exec_with_xcr0(
    code: int,
    mask: int,
    init_components: int,
    restore: int,
    path: bytes,
    argv: Sequence[bytes],
    envp: Sequence[bytes],
) -> tuple[int, int]:
    """Set this thread's XCR0 with arch_prctl(code, mask) right after putting
    `init_components` in their initial state, then execve. Returns only on failure:
    (stage, result), see the XCR0_* stages."""
    area = (ctypes.c_uint8 * (4096 + 64))()
    aligned = (ctypes.addressof(area) + 63) & ~63  # XRSTOR needs 64-byte alignment
    c_argv = (ctypes.c_char_p * (len(argv) + 1))(*argv, None)
    c_envp = (ctypes.c_char_p * (len(envp) + 1))(*envp, None)
    job = Xcr0ExecJob(
        code, mask, aligned, init_components, path,
        ctypes.addressof(c_argv), ctypes.addressof(c_envp), restore, 0, 0,
    )  # fmt: skip
    result = int(_functions()[2](ctypes.addressof(job)))
    return int(job.stage), result if job.stage != XCR0_READ_BACK else int(job.readback)


def environ_entries() -> list[bytes]:
    """libc's environ array as it is now (a copy of each entry's bytes)."""
    array = ctypes.POINTER(ctypes.c_char_p).in_dll(_libc, "environ")
    entries: list[bytes] = []
    while array[len(entries)] is not None:
        entries.append(array[len(entries)])
    return entries


def execve(path: bytes, argv: Sequence[bytes], envp: Sequence[bytes]) -> None:
    """execve(2) with the environment as a list of raw entries. Returns only on failure,
    raising OSError."""
    c_argv = (ctypes.c_char_p * (len(argv) + 1))(*argv, None)
    c_envp = (ctypes.c_char_p * (len(envp) + 1))(*envp, None)
    _libc.execve(path, c_argv, c_envp)
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), os.fsdecode(path))


# -- arch_prctl -----------------------------------------------------------------------------


def arch_prctl(code: int, arg: int = 0) -> int:
    return _check(
        _libc.syscall(SYS_arch_prctl, ctypes.c_ulong(code), ctypes.c_ulong(arg)), "arch_prctl"
    )


def arch_prctl_get(code: int) -> int:
    """An ARCH_GET_* call that stores a u64 through its argument."""
    value = ctypes.c_uint64(0)
    _check(_libc.syscall(SYS_arch_prctl, ctypes.c_ulong(code), ctypes.byref(value)), "arch_prctl")
    return value.value


def arch_prctl_raw(code: int, arg: int) -> int:
    """arch_prctl without raising: the result, or -errno."""
    result = _libc.syscall(SYS_arch_prctl, ctypes.c_ulong(code), ctypes.c_ulong(arg))
    return -ctypes.get_errno() if result == -1 else result


# -- seccomp ----------------------------------------------------------------------------------


def install_filter(program: list[tuple[int, int, int, int]]) -> None:
    """Install a seccomp filter (seccomp.build's instructions) in this process and all
    it starts: filters survive fork and execve. Without CAP_SYS_ADMIN the kernel asks
    for no_new_privs first."""
    filters = (SockFilter * len(program))(*(SockFilter(*insn) for insn in program))
    fprog = SockFprog(len(program), filters)
    if os.geteuid() != 0:
        _check(_libc.syscall(SYS_prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl")
    _check(_libc.syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, ctypes.byref(fprog)), "seccomp")


def set_ptracer(pid: int) -> bool:
    """Let `pid` attach to this process where Yama restricts ptrace to ancestors (0:
    nobody extra). False where Yama is absent (EINVAL), as nothing needs allowing."""
    result = _libc.syscall(SYS_prctl, PR_SET_PTRACER, ctypes.c_ulong(pid), 0, 0, 0)
    if result == -1 and ctypes.get_errno() == _errno.EINVAL:
        return False
    _check(result, "prctl(PR_SET_PTRACER)")
    return True


def set_name(name: bytes) -> None:
    """This thread's comm (what ps, top and pkill without -f see), cut at 15 bytes."""
    buf = ctypes.create_string_buffer(name[:15])
    _check(_libc.syscall(SYS_prctl, PR_SET_NAME, buf, 0, 0, 0), "prctl(PR_SET_NAME)")


def child_subreaper() -> bool:
    """Whether orphaned descendants are reparented to this process (the attribute
    survives execve, so a parent may have left it set)."""
    value = ctypes.c_int(0)
    _check(
        _libc.syscall(SYS_prctl, PR_GET_CHILD_SUBREAPER, ctypes.byref(value), 0, 0, 0),
        "prctl(PR_GET_CHILD_SUBREAPER)",
    )
    return bool(value.value)


def set_child_subreaper(on: bool) -> None:
    _check(
        _libc.syscall(SYS_prctl, PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(int(on)), 0, 0, 0),
        "prctl(PR_SET_CHILD_SUBREAPER)",
    )


# -- ptrace -----------------------------------------------------------------------------------


def _ptrace(request: int, pid: int, addr: int, data: int | ctypes.c_void_p | None) -> int:
    return _check(_libc.ptrace(request, pid, addr, data), "ptrace", pid)


def ptrace_seize(pid: int, options: int) -> None:
    _ptrace(PTRACE_SEIZE, pid, 0, options)


def ptrace_cont(pid: int, sig: int = 0) -> None:
    _ptrace(PTRACE_CONT, pid, 0, sig)


def ptrace_syscall(pid: int, sig: int = 0) -> None:
    _ptrace(PTRACE_SYSCALL, pid, 0, sig)


def ptrace_listen(pid: int) -> None:
    _ptrace(PTRACE_LISTEN, pid, 0, 0)


def ptrace_interrupt(pid: int) -> None:
    _ptrace(PTRACE_INTERRUPT, pid, 0, 0)


def ptrace_detach(pid: int, sig: int = 0) -> None:
    _ptrace(PTRACE_DETACH, pid, 0, sig)


def ptrace_geteventmsg(pid: int) -> int:
    msg = ctypes.c_ulong(0)
    _ptrace(PTRACE_GETEVENTMSG, pid, 0, ctypes.addressof(msg))
    return msg.value


def ptrace_getsiginfo(pid: int, info: SigInfo) -> SigInfo:
    _ptrace(PTRACE_GETSIGINFO, pid, 0, ctypes.addressof(info))
    return info


def ptrace_getregs(pid: int, regs: UserRegs) -> UserRegs:
    _ptrace(PTRACE_GETREGS, pid, 0, ctypes.addressof(regs))
    return regs


def ptrace_setregs(pid: int, regs: UserRegs) -> None:
    _ptrace(PTRACE_SETREGS, pid, 0, ctypes.addressof(regs))


def ptrace_peek(pid: int, address: int) -> int:
    """One word of the tracee's memory."""
    ctypes.set_errno(0)
    word = _libc.ptrace(PTRACE_PEEKTEXT, pid, address, 0)
    if word == -1 and ctypes.get_errno():
        raise NativeError(ctypes.get_errno(), "ptrace(PEEKTEXT)", pid)
    return word & 0xFFFFFFFFFFFFFFFF


def ptrace_poke(pid: int, address: int, word: int) -> None:
    _ptrace(PTRACE_POKETEXT, pid, address, ctypes.c_uint64(word).value)


def ptrace_getsigmask(pid: int) -> int:
    mask = ctypes.c_uint64(0)
    _ptrace(PTRACE_GETSIGMASK, pid, 8, ctypes.addressof(mask))
    return mask.value


def ptrace_setsigmask(pid: int, mask: int) -> None:
    value = ctypes.c_uint64(mask)
    _ptrace(PTRACE_SETSIGMASK, pid, 8, ctypes.addressof(value))


class XStateHeadReader:
    """Reads the XSAVE legacy area and header (576 bytes of NT_X86_XSTATE) into one
    buffer kept for reuse: the audit does this at every stop."""

    SIZE = 576

    def __init__(self) -> None:
        self._buf = ctypes.create_string_buffer(self.SIZE)
        self._iov = IoVec(ctypes.addressof(self._buf), self.SIZE)
        self._iov_at = ctypes.addressof(self._iov)
        self._xcr0 = ctypes.c_uint64.from_buffer(self._buf, 464)
        self._xstate_bv = ctypes.c_uint64.from_buffer(self._buf, 512)

    def read(self, pid: int) -> tuple[int, int]:
        """(XCR0, XSTATE_BV) of a stopped tracee."""
        self._iov.iov_len = self.SIZE
        _ptrace(PTRACE_GETREGSET, pid, NT_X86_XSTATE, self._iov_at)
        return self._xcr0.value, self._xstate_bv.value

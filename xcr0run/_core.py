"""The compiled core (xcr0run/_core.c, built into libxcr0run_core.so) through ctypes.

The core waits for ptrace stops and deals with the frequent ones itself: CPUID traps
answered from a table Python hands down, fork/vfork/clone bookkeeping, re-arming after
exec. Every other stop comes back from `Core.run` untouched, and Python keeps the policy.
Structures and constants mirror _core.c (XC_ABI_VERSION guards the pair). Only the
supervisor imports this module; `status()` says whether the library is usable, and why
not (then the Python stop loop stands in).
"""

from __future__ import annotations

import ctypes
import os

from xcr0run._native import NativeError

# Loaded by the tracing helper before the program may start: no enum, typing or
# collections (their imports cost milliseconds), plain constants instead.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

LIBRARY = "libxcr0run_core.so"
# A library built elsewhere: the test suite builds one from the source of a checkout.
LIBRARY_ENV = "XCR0RUN_CORE_LIBRARY"
ABI_VERSION = 2

ANSWER = 1  # per-tid flag: the core may answer this thread's CPUID traps


class _Names:
    @classmethod
    def name_of(cls, value: int) -> str:
        """The constant's name, for reports."""
        for name, number in vars(cls).items():
            if number == value and name.isupper():
                return name
        return str(value)


class Reason(_Names):
    """Why Core.run returned (enum xc_reason)."""

    STATUS = 1  # a stop or exit the core does not handle: `status` as waitpid gave it
    CPUID = 2  # a CPUID trap not answered (flag clear or no answer): leaf, subleaf, insn_len
    EXEC = 3  # with stop_at_exec: an exec event, re-arming prepared; resume with PTRACE_CONT
    ARM_FAILED = 4  # a required after-exec call failed (code, result); image restored
    NO_TRACEES = 5  # nothing left to wait for (ECHILD)
    WOKEN = 6  # the timeout passed, or request_return()
    EINTR = 7  # waitpid was interrupted by a signal: Python's handlers run now
    ERROR = 8  # a call failed with `err` (not ESRCH); the tracee is still stopped


class EventKind(_Names):
    FORK = 1
    VFORK = 2
    CLONE_THREAD = 3
    CLONE_PROCESS = 4
    EXEC = 5  # other: the tid the exec'ing thread had before (a non-leader exec)
    CALL_FAILED = 6  # an optional after-exec call failed: code, result


class Stop(ctypes.Structure):
    """struct xc_stop."""

    _fields_ = [
        ("reason", ctypes.c_int32),
        ("tid", ctypes.c_int32),
        ("status", ctypes.c_int32),
        ("err", ctypes.c_int32),
        ("leaf", ctypes.c_uint32),
        ("subleaf", ctypes.c_uint32),
        ("insn_len", ctypes.c_int32),
        ("cpu", ctypes.c_int32),
        ("result", ctypes.c_int64),
        ("code", ctypes.c_uint64),
    ]


class _Event(ctypes.Structure):
    """struct xc_event."""

    _fields_ = [
        ("kind", ctypes.c_int32),
        ("tid", ctypes.c_int32),
        ("other", ctypes.c_int32),
        ("pad", ctypes.c_int32),
        ("code", ctypes.c_uint64),
        ("result", ctypes.c_int64),
    ]


class _Count(ctypes.Structure):
    """struct xc_count."""

    _fields_ = [("leaf", ctypes.c_uint32), ("subleaf", ctypes.c_uint32), ("traps", ctypes.c_uint64)]


_STATS = ("stops", "answered", "returned", "arms", "vanished")


class _Stats(ctypes.Structure):
    """struct xc_stats."""

    _fields_ = [(name, ctypes.c_uint64) for name in _STATS]


class Event:
    """One entry of the core's event log (struct xc_event)."""

    __slots__ = ("code", "kind", "other", "result", "tid")

    def __init__(self, kind: int, tid: int, other: int, code: int = 0, result: int = 0) -> None:
        self.kind = kind  # an EventKind
        self.tid = tid
        self.other = other  # the new tid (fork, vfork, clone) or the former tid (exec)
        self.code = code  # CALL_FAILED: the arch_prctl code
        self.result = result  # CALL_FAILED: -errno

    def __repr__(self) -> str:
        kind = EventKind.name_of(self.kind)
        return f"Event({kind}, tid={self.tid}, other={self.other}, {self.code:#x}, {self.result})"


Regs4 = ctypes.c_uint32 * 4
_P = ctypes.c_void_p
_I, _U32, _U64, _SZ = ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_size_t
_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "xc_abi_version": (_I, []),
    "xc_new": (_P, [_I, _U32, _I]),
    "xc_free": (None, [_P]),
    "xc_set_options": (None, [_P, ctypes.c_ulong]),
    "xc_set_stop_at_exec": (None, [_P, _I]),
    "xc_add_exec_call": (_I, [_P, _U64, _U64, _I]),
    "xc_set_ignores_ecx": (_I, [_P, _U32]),
    "xc_put_answer": (_I, [_P, _U32, _U32, Regs4]),
    "xc_put_cpu_answer": (_I, [_P, _I, _U32, _U32, Regs4]),
    "xc_lookup": (_I, [_P, _U32, _U32, _I, Regs4]),
    "xc_thread_cpu": (_I, [_P, _I]),
    "xc_add_tracee": (_I, [_P, _I, _U32]),
    "xc_seize": (_I, [_P, _I, _U32]),
    "xc_set_flags": (_I, [_P, _I, _U32]),
    "xc_get_flags": (_I, [_P, _I]),
    "xc_forget": (None, [_P, _I]),
    "xc_tracee_count": (_I, [_P]),
    "xc_take_events": (_SZ, [_P, _P, _SZ]),
    "xc_counts": (_SZ, [_P, _P, _SZ]),
    "xc_stats": (None, [_P, _P]),
    "xc_request_return": (None, [_P]),
    "xc_insn_length": (_I, [ctypes.c_char_p, _SZ, _I]),
    "xc_complete_cpuid": (_I, [_P, _I, Regs4]),
    "xc_run": (_I, [_P, _I, _P]),
    "xc_requeue": (_I, [_P, _I, _I]),
    "xc_is_queued": (_I, [_P, _I]),
}

_loaded: list[tuple[ctypes.CDLL | None, str]] = []


def library_path() -> str:
    return os.environ.get(LIBRARY_ENV) or os.path.join(os.path.dirname(__file__), LIBRARY)


def _load() -> tuple[ctypes.CDLL | None, str]:
    if not _loaded:
        path = library_path()
        try:
            lib = ctypes.CDLL(path, use_errno=True)
            for name, (restype, argtypes) in _SIGNATURES.items():
                function = getattr(lib, name)
                function.restype = restype
                function.argtypes = argtypes
            if lib.xc_abi_version() != ABI_VERSION:
                raise OSError(f"ABI {lib.xc_abi_version()}, this module needs {ABI_VERSION}")
            _loaded.append((lib, f"compiled core ({path})"))
        except (OSError, AttributeError) as err:
            _loaded.append((None, f"Python loop (no usable compiled core: {err})"))
    return _loaded[0]


def status() -> tuple[bool, str]:
    """(whether the compiled core is usable, a line saying which stop loop runs)."""
    lib, detail = _load()
    return lib is not None, detail


def _lib() -> ctypes.CDLL:
    lib, detail = _load()
    if lib is None:
        raise RuntimeError(detail)
    return lib


def _check(result: int, call: str, tid: int | None = None) -> int:
    if result < 0:
        raise NativeError(-result, call, tid)
    return result


def insn_length(code: bytes, is64: bool = True) -> int:
    """The core's decoder: length of the CPUID instruction `code` starts with, 0 if none,
    -1 if `code` is all prefix (the twin of cpuid.cpuid_instruction_length)."""
    return int(_lib().xc_insn_length(code, len(code), int(is64)))


class Core:
    """One program tree's stop loop. Create it, hand down answers and after-exec calls,
    seize or add the first tracee from the thread that will call `run`, then call `run`
    until it says NO_TRACEES, dealing with what it returns."""

    def __init__(self, ncpus: int, default_flags: int = ANSWER, wake_signal: int = 0) -> None:
        """`ncpus`: CPU numbers below it may have per-CPU answers. `default_flags`: for a
        child whose first stop comes before its parent's fork event (it gets its parent's
        flags once that event arrives). `wake_signal`: a signal the core may own (handler
        installed now, restored by close) for `run`'s timeout; 0 for none."""
        self._lib = _lib()
        handle = self._lib.xc_new(ncpus, default_flags, wake_signal)
        if not handle:
            raise NativeError(ctypes.get_errno(), "xc_new")
        self._handle: int | None = handle
        self._stop = Stop()
        self._stop_at = ctypes.addressof(self._stop)
        self._regs = Regs4()

    def close(self) -> None:
        if self._handle:
            self._lib.xc_free(self._handle)
            self._handle = None

    @property
    def open(self) -> bool:
        return self._handle is not None

    def __enter__(self) -> Core:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- configuration ---------------------------------------------------------------------

    def set_options(self, options: int) -> None:
        """The PTRACE_O_* options `seize` uses."""
        self._lib.xc_set_options(self._handle, options)

    def set_stop_at_exec(self, yes: bool) -> None:
        """Return Reason.EXEC at every exec event (after preparing the re-arming), so
        Python can look at the new image before it runs; resume it with PTRACE_CONT."""
        self._lib.xc_set_stop_at_exec(self._handle, int(yes))

    def add_exec_call(self, code: int, arg: int, required: bool) -> None:
        """arch_prctl(code, arg) in every new program image, in the order added."""
        result = self._lib.xc_add_exec_call(self._handle, code, arg, int(required))
        _check(result, "xc_add_exec_call")

    def set_ignores_ecx(self, leaves: Iterable[int]) -> None:
        for leaf in leaves:
            _check(self._lib.xc_set_ignores_ecx(self._handle, leaf), "xc_set_ignores_ecx")

    def put_answer(self, leaf: int, subleaf: int, regs: Iterable[int]) -> None:
        _check(self._lib.xc_put_answer(self._handle, leaf, subleaf, Regs4(*regs)), "xc_put_answer")

    def put_cpu_answer(self, cpu: int, leaf: int, subleaf: int, regs: Iterable[int]) -> None:
        result = self._lib.xc_put_cpu_answer(self._handle, cpu, leaf, subleaf, Regs4(*regs))
        _check(result, "xc_put_cpu_answer")

    def put_answers(
        self,
        flat: Mapping[tuple[int, int], tuple[int, int, int, int]],
        per_cpu: Mapping[int, Mapping[tuple[int, int], tuple[int, int, int, int]]] | None = None,
    ) -> None:
        """Answers for every CPU, and per CPU for leaves whose answer depends on it."""
        for (leaf, subleaf), regs in flat.items():
            self.put_answer(leaf, subleaf, regs)
        for cpu, answers in (per_cpu or {}).items():
            for (leaf, subleaf), regs in answers.items():
                self.put_cpu_answer(cpu, leaf, subleaf, regs)

    def lookup(self, leaf: int, subleaf: int, cpu: int = -1) -> tuple[int, int, int, int] | None:
        """The table's answer (normalised key; per-CPU entries on `cpu`, or the one all
        CPUs agree on), or None."""
        if not self._lib.xc_lookup(self._handle, leaf, subleaf, cpu, self._regs):
            return None
        r = self._regs
        return (r[0], r[1], r[2], r[3])

    # -- tracees -----------------------------------------------------------------------------

    def seize(self, tid: int, flags: int = ANSWER) -> None:
        """PTRACE_SEIZE with the options, then follow it (from the thread calling run)."""
        _check(self._lib.xc_seize(self._handle, tid, flags), "ptrace(SEIZE)", tid)

    def add_tracee(self, tid: int, flags: int = ANSWER) -> None:
        """Follow a thread Python already traces."""
        _check(self._lib.xc_add_tracee(self._handle, tid, flags), "xc_add_tracee", tid)

    def set_flags(self, tid: int, flags: int) -> None:
        _check(self._lib.xc_set_flags(self._handle, tid, flags), "xc_set_flags", tid)

    def flags(self, tid: int) -> int | None:
        value = self._lib.xc_get_flags(self._handle, tid)
        return None if value < 0 else int(value)

    def forget(self, tid: int) -> None:
        self._lib.xc_forget(self._handle, tid)

    def tracee_count(self) -> int:
        return int(self._lib.xc_tracee_count(self._handle))

    def thread_cpu(self, tid: int) -> int:
        """The CPU the core would answer a per-CPU leaf for, for a stopped tracee."""
        return _check(self._lib.xc_thread_cpu(self._handle, tid), "xc_thread_cpu", tid)

    # -- the loop ----------------------------------------------------------------------------

    def run(self, timeout: float | None = None) -> Stop:
        """Handle stops until one needs Python; the returned Stop is reused by the next
        call. `timeout` (seconds, needs a wake_signal): return WOKEN after it at most."""
        ms = -1 if timeout is None else max(0, int(timeout * 1000))
        self._lib.xc_run(self._handle, ms, self._stop_at)
        return self._stop

    def requeue(self, tid: int, status: int) -> None:
        """A stop Python took with its own waitpid: the next `run` handles it in turn."""
        _check(self._lib.xc_requeue(self._handle, tid, status), "xc_requeue", tid)

    def is_queued(self, tid: int) -> bool:
        """Whether a stop of `tid` is collected but not handled (it is stopped, and a
        waitpid on it would block)."""
        return bool(self._lib.xc_is_queued(self._handle, tid))

    def complete_cpuid(self, tid: int, regs: Iterable[int]) -> None:
        """Answer the trap that came back as Reason.CPUID with `regs`, step over the
        instruction, count it and resume the thread."""
        result = self._lib.xc_complete_cpuid(self._handle, tid, Regs4(*regs))
        _check(result, "xc_complete_cpuid", tid)

    def request_return(self) -> None:
        """Make run() return WOKEN at its next stop (any thread, signal handlers too)."""
        self._lib.xc_request_return(self._handle)

    def take_events(self) -> list[Event]:
        """Drain the event log: forks, clones, execs, failed optional calls, in order."""
        out = []
        buf = (_Event * 256)()
        while True:
            n = self._lib.xc_take_events(self._handle, ctypes.addressof(buf), 256)
            out += [Event(e.kind, e.tid, e.other, e.code, e.result) for e in buf[:n]]
            if n < 256:
                return out

    def counts(self) -> dict[tuple[int, int], int]:
        """CPUID traps answered per (leaf, normalised sub-leaf)."""
        n = self._lib.xc_counts(self._handle, None, 0)
        buf = (_Count * max(n, 1))()
        n = min(n, self._lib.xc_counts(self._handle, ctypes.addressof(buf), n))
        return {(c.leaf, c.subleaf): c.traps for c in buf[:n]}

    def stats(self) -> dict[str, int]:
        stats = _Stats()
        self._lib.xc_stats(self._handle, ctypes.addressof(stats))
        return {name: getattr(stats, name) for name in _STATS}

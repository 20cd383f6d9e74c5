"""The facts `xcr0run --show` reports: this thread's XCR0 and XSAVE state, what CPUID
and the kernel offer (`gather`), and another process's state per thread
(`process_report`, for --show -p).

The result is plain data (`XStateReport`), with `to_json()` giving the stable key names
documented in the README; render.py draws it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from xcr0run import _core, cpuid, host, procfs, xsave
from xcr0run.cpuid import XSAVE_LEAF, CpuidTable
from xcr0run.errors import Xcr0runError
from xcr0run.masks import format_mask
from xcr0run.plan import Capabilities
from xcr0run.view import psabi_level

# The legacy region of every XSAVE area (SDM vol. 1, 13.4.1): x87 and SSE state live at
# fixed places in its first 512 bytes; CPUID leaf 0xD does not report them.
_LEGACY = {0: (0, 160), 1: (160, 256)}


@dataclass(frozen=True)
class ComponentRow:
    number: int
    name: str
    title: str
    scope: str
    supported: bool
    enabled: bool | None  # None for supervisor state: IA32_XSS is not visible from here
    in_use: bool | None  # None without XGETBV1
    size: int
    offset: int | None  # standard-format offset; None for supervisor components
    align64: bool
    xfd: bool

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class XStateReport:
    xcr0: int
    xinuse: int | None
    components: list[ComponentRow]
    xsave_size_enabled: int  # CPUID.(0xD,0).EBX: standard format, current XCR0
    xsave_size_supported: int  # CPUID.(0xD,0).ECX: every supported user component
    xsave_size_compacted: int  # CPUID.(0xD,1).EBX: XSAVES, XCR0 | IA32_XSS
    xcomp: host.XComp
    caps: Capabilities
    xcr0_prctl_code: int
    psabi_level: str | None
    vendor: str
    brand: str
    stop_loop: tuple[bool, str]  # the compiled core loads, and which loop supervises
    plan: dict[str, Any] | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        def hexed(value: int | None) -> str | None:
            return None if value is None else f"{value:#x}"

        amx = xsave.NAMES["tiledata"]
        return {
            "xcr0": hexed(self.xcr0),
            "xcr0_decoded": [c.name for c in xsave.components(self.xcr0)],
            "xinuse": hexed(self.xinuse),
            "components": [row.to_json() for row in self.components],
            "xsave_size": {
                "enabled": self.xsave_size_enabled,
                "supported": self.xsave_size_supported,
                "compacted": self.xsave_size_compacted,
            },
            "kernel": {
                "xcomp_supported": hexed(self.xcomp.supported),
                "xcomp_permitted": hexed(self.xcomp.permitted),
                "xcomp_guest_permitted": hexed(self.xcomp.guest_permitted),
                "amx_supported": bool((self.xcomp.supported or 0) & amx),
                "amx_permitted": bool((self.xcomp.permitted or 0) & amx),
            },
            "cpuid_faulting": {
                "supported": self.caps.faulting,
                "enabled": self.caps.faulting_enabled,
                "detail": self.caps.faulting_detail,
            },
            "arch_set_xcr0": {
                "code": hexed(self.xcr0_prctl_code),
                "available": self.caps.set_xcr0,
                "detail": self.caps.set_xcr0_detail,
            },
            "psabi_level": self.psabi_level,
            "stop_loop": {"compiled_core": self.stop_loop[0], "detail": self.stop_loop[1]},
            "cpu": {"vendor": self.vendor, "brand": self.brand},
            "plan": self.plan,
        }


def component_rows(table: CpuidTable, xcr0: int, xinuse: int | None) -> list[ComponentRow]:
    eax0, _, _, edx0 = table[(XSAVE_LEAF, 0)]
    _, _, ecx1, edx1 = table[(XSAVE_LEAF, 1)]
    user_supported = eax0 | edx0 << 32
    supervisor_supported = ecx1 | edx1 << 32
    rows = []
    for c in xsave.COMPONENTS:
        user = c.scope == xsave.Scope.USER
        supported = bool((user_supported if user else supervisor_supported) & c.bit)
        offset: int | None
        if c.number in _LEGACY:
            offset, size = _LEGACY[c.number]
            align, xfd = False, False
        else:
            size, offset_, ecx, _ = table[(XSAVE_LEAF, c.number)]
            offset = offset_ if user else None
            align, xfd = bool(ecx & 0b10), bool(ecx & 0b100)
        rows.append(
            ComponentRow(
                number=c.number,
                name=c.name,
                title=c.title,
                scope=c.scope,
                supported=supported,
                enabled=bool(xcr0 & c.bit) if user else None,
                in_use=None if xinuse is None or not user else bool(xinuse & c.bit),
                size=size,
                offset=offset,
                align64=align,
                xfd=xfd,
            )
        )
    return rows


def gather(caps: Capabilities, xcr0_prctl_code: int, table: CpuidTable) -> XStateReport:
    xinuse = host.xinuse()
    _, ebx0, ecx0, _ = table[(XSAVE_LEAF, 0)]
    _, ebx1, _, _ = table[(XSAVE_LEAF, 1)]
    return XStateReport(
        xcr0=caps.xcr0,
        xinuse=xinuse,
        components=component_rows(table, caps.xcr0, xinuse),
        xsave_size_enabled=ebx0,
        xsave_size_supported=ecx0,
        xsave_size_compacted=ebx1,
        xcomp=host.xcomp(),
        caps=caps,
        xcr0_prctl_code=xcr0_prctl_code,
        psabi_level=psabi_level(table, caps.xcr0),
        vendor=cpuid.vendor(table),
        brand=cpuid.brand(table),
        stop_loop=_core.status(),
    )


def process_report(pid: int) -> dict[str, Any]:
    """Another process's XCR0 and in-use components per thread, for --show -p."""
    who = procfs.identity(pid)
    comm, exe, tracer = who.comm, who.exe, who.tracer
    tracer_cmd = _command_line(tracer) if tracer else []
    under = any("xcr0run" in arg for arg in tracer_cmd[:3])
    threads = host.thread_states(pid)
    if all(t.error for t in threads) and not under:
        why = threads[0].error if threads else "no threads"
        held = f" (traced by pid {tracer}: {' '.join(tracer_cmd[:4])})" if tracer else ""
        raise Xcr0runError(f"cannot read the XSAVE state of pid {pid}: {why}{held}")
    return {
        "pid": pid,
        "comm": comm,
        "exe": exe,
        "tracer": tracer or None,
        "under_xcr0run": under,
        "threads": [
            {
                "tid": t.tid,
                "comm": t.comm,
                "xcr0": None if t.xcr0 is None else f"{t.xcr0:#x}",
                "xcr0_decoded": None if t.xcr0 is None else format_mask(t.xcr0),
                "in_use": None if t.xstate_bv is None else f"{t.xstate_bv:#x}",
                "in_use_decoded": None if t.xstate_bv is None else format_mask(t.xstate_bv),
                "error": t.error,
            }
            for t in threads
        ],
    }


def _command_line(pid: int) -> list[str]:
    try:
        return procfs.command_line(pid)
    except procfs.ProcessError:
        return []  # the tracer is gone or not ours to read: it is named by pid anyway

"""The XSAVE state components: the one table everything else derives from.

Sources: Intel SDM vol. 1, ch. 13 ("Managing State Using the XSAVE Feature Set"),
table 13-1 and section 13.3 (XCR0 rules); Intel APX architecture specification
(component 19); the Linux kernel's xstate tables (arch/x86/kernel/fpu/xstate.c) for
names. Sizes and offsets are not here: they vary by CPU and are read from CPUID leaf 0xD.

Pure module: no ctypes, no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


class Scope(str, enum.Enum):
    USER = "user"  # enabled through XCR0
    SUPERVISOR = "supervisor"  # enabled through IA32_XSS, never in XCR0


@dataclass(frozen=True)
class XSaveComponent:
    number: int
    name: str
    title: str
    scope: Scope
    feature: str  # the CPUID feature (features.py) that enumerates it
    aliases: tuple[str, ...] = ()

    @property
    def bit(self) -> int:
        return 1 << self.number


_U, _S = Scope.USER, Scope.SUPERVISOR

COMPONENTS: tuple[XSaveComponent, ...] = (
    XSaveComponent(0, "x87", "x87 FPU registers", _U, "fpu", ("fpu",)),
    XSaveComponent(1, "sse", "SSE registers XMM0-15 and MXCSR", _U, "sse", ("xmm",)),
    XSaveComponent(2, "avx", "upper halves of YMM0-15", _U, "avx", ("ymm", "ymm_hi128")),
    XSaveComponent(3, "bndregs", "MPX bounds registers BND0-3", _U, "mpx"),
    XSaveComponent(4, "bndcsr", "MPX BNDCFGU and BNDSTATUS", _U, "mpx"),
    XSaveComponent(5, "opmask", "AVX-512 opmask registers k0-k7", _U, "avx512f", ("kregs",)),
    XSaveComponent(6, "zmm_hi256", "upper halves of ZMM0-15", _U, "avx512f"),
    XSaveComponent(7, "hi16_zmm", "AVX-512 registers ZMM16-31", _U, "avx512f", ("zmm_hi16",)),
    XSaveComponent(8, "pt", "Processor Trace", _S, "intel_pt"),
    XSaveComponent(9, "pkru", "protection-key rights register", _U, "pku", ("pku",)),
    XSaveComponent(10, "pasid", "PASID for ENQCMD", _S, "enqcmd"),
    XSaveComponent(11, "cet_u", "CET user state", _S, "shstk"),
    XSaveComponent(12, "cet_s", "CET supervisor shadow-stack pointers", _S, "shstk"),
    XSaveComponent(13, "hdc", "hardware duty cycling", _S, "hdc"),
    XSaveComponent(14, "uintr", "user interrupts", _S, "uintr"),
    XSaveComponent(15, "lbr", "architectural last-branch records", _S, "arch_lbr"),
    XSaveComponent(16, "hwp", "hardware P-states", _S, "hwp"),
    XSaveComponent(17, "tilecfg", "AMX tile configuration", _U, "amx_tile", ("xtilecfg",)),
    XSaveComponent(18, "tiledata", "AMX tile data TMM0-7", _U, "amx_tile", ("xtiledata",)),
    XSaveComponent(19, "apx", "APX extended registers R16-R31", _U, "apx_f", ("egpr",)),
)

BY_NUMBER: dict[int, XSaveComponent] = {c.number: c for c in COMPONENTS}

# Named sets of components that the architecture enables together (see RULES).
GROUPS: dict[str, tuple[str, ...]] = {
    "mpx": ("bndregs", "bndcsr"),
    "avx512": ("opmask", "zmm_hi256", "hi16_zmm"),
    "cet": ("cet_u", "cet_s"),
    "amx": ("tilecfg", "tiledata"),
}

USER_BITS: int = sum(c.bit for c in COMPONENTS if c.scope is Scope.USER)
SUPERVISOR_BITS: int = sum(c.bit for c in COMPONENTS if c.scope is Scope.SUPERVISOR)


def _build_names() -> dict[str, int]:
    names: dict[str, int] = {}
    for c in COMPONENTS:
        names[c.name] = c.bit
        for alias in c.aliases:
            names.setdefault(alias, c.bit)
    for group, members in GROUPS.items():
        names[group] = mask_of(members, {c.name: c.bit for c in COMPONENTS})
    return names


def mask_of(names: Iterable[str], table: dict[str, int] | None = None) -> int:
    table = NAMES if table is None else table
    mask = 0
    for name in names:
        mask |= table[name]
    return mask


NAMES: dict[str, int] = _build_names()  # component names, aliases and groups -> bits


def components(mask: int) -> Iterator[XSaveComponent]:
    """The known components whose bits are set in `mask`, lowest first."""
    return (c for c in COMPONENTS if mask & c.bit)


def bits(mask: int) -> Iterator[int]:
    n = 0
    while mask >> n:
        if (mask >> n) & 1:
            yield n
        n += 1


def component_name(number: int) -> str:
    c = BY_NUMBER.get(number)
    return c.name if c else f"bit{number}"


# -- architectural rules ----------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    rule: str
    message: str


@dataclass(frozen=True)
class Rule:
    """One XCR0 rule: `check(mask, supported)` returns the message when it is broken."""

    name: str
    explanation: str

    def check(self, mask: int, supported: int | None) -> str | None:
        return _CHECKS[self.name](mask, supported)


def _needs(mask: int, need: int, have: int) -> bool:
    """True when some of `need` is set but not all of `have`."""
    return bool(mask & need) and (mask & have) != have


def _check_x87(mask: int, _: int | None) -> str | None:
    return None if mask & 1 else "x87 must be set (XCR0 bit 0 can never be cleared)"


def _check_avx_needs_sse(mask: int, _: int | None) -> str | None:
    return "avx needs sse" if _needs(mask, NAMES["avx"], NAMES["sse"]) else None


def _check_avx512_together(mask: int, _: int | None) -> str | None:
    part = mask & NAMES["avx512"]
    if part and part != NAMES["avx512"]:
        return "opmask, zmm_hi256 and hi16_zmm go together: use 'avx512'"
    return None


def _check_avx512_needs_avx(mask: int, _: int | None) -> str | None:
    return "AVX-512 needs avx" if _needs(mask, NAMES["avx512"], NAMES["avx"]) else None


def _check_mpx_together(mask: int, _: int | None) -> str | None:
    part = mask & NAMES["mpx"]
    return "bndregs and bndcsr go together: use 'mpx'" if part and part != NAMES["mpx"] else None


def _check_amx_together(mask: int, _: int | None) -> str | None:
    part = mask & NAMES["amx"]
    return "tilecfg and tiledata go together: use 'amx'" if part and part != NAMES["amx"] else None


def _check_apx_excludes_mpx(mask: int, _: int | None) -> str | None:
    if mask & NAMES["apx"] and mask & NAMES["mpx"]:
        return "apx and mpx share one save area and cannot both be enabled"
    return None


def _check_supervisor(mask: int, _: int | None) -> str | None:
    sup = ", ".join(c.name for c in components(mask & SUPERVISOR_BITS))
    return f"{sup}: supervisor state, enabled through IA32_XSS and never in XCR0" if sup else None


def _check_defined(mask: int, _: int | None) -> str | None:
    unknown = [n for n in bits(mask) if n not in BY_NUMBER]
    if unknown:
        return f"bit {unknown[0]} is not a defined XSAVE state component"
    return None


def _check_supported(mask: int, supported: int | None) -> str | None:
    if supported is None:
        return None
    missing = [component_name(n) for n in bits(mask & ~supported & USER_BITS)]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        return f"{', '.join(missing)} {verb} not supported by this CPU and kernel"
    return None


_CHECKS = {
    "defined": _check_defined,
    "x87-required": _check_x87,
    "no-supervisor": _check_supervisor,
    "avx-needs-sse": _check_avx_needs_sse,
    "avx512-together": _check_avx512_together,
    "avx512-needs-avx": _check_avx512_needs_avx,
    "mpx-together": _check_mpx_together,
    "amx-together": _check_amx_together,
    "apx-excludes-mpx": _check_apx_excludes_mpx,
    "supported": _check_supported,
}

RULES: tuple[Rule, ...] = (
    Rule("defined", "every bit must name an architecturally defined state component"),
    Rule("x87-required", "XCR0 bit 0 (x87) must always be set"),
    Rule("no-supervisor", "supervisor components are enabled through IA32_XSS, not XCR0"),
    Rule("avx-needs-sse", "AVX state (bit 2) needs SSE state (bit 1)"),
    Rule("avx512-together", "the three AVX-512 components (bits 5-7) are enabled together"),
    Rule("avx512-needs-avx", "AVX-512 state (bits 5-7) needs AVX state (bit 2)"),
    Rule("mpx-together", "the two MPX components (bits 3-4) are enabled together"),
    Rule("amx-together", "the two AMX components (bits 17-18) are enabled together"),
    Rule("apx-excludes-mpx", "APX state (bit 19) reuses the MPX area: not both"),
    Rule("supported", "a component the CPU or kernel does not support cannot be requested"),
)


def violations(mask: int, supported: int | None = None) -> list[Violation]:
    """Every rule `mask` breaks, in RULES order. `supported` None skips the host check."""
    found = []
    for rule in RULES:
        message = rule.check(mask, supported)
        if message:
            found.append(Violation(rule.name, message))
    return found


def dependents(mask: int) -> int:
    """Components that cannot stay enabled once every bit of `mask` is cleared."""
    lost = mask
    # Iterate to a fixed point over the "needs" rules (sse -> avx -> avx512).
    chain = ((NAMES["sse"], NAMES["avx"]), (NAMES["avx"], NAMES["avx512"]))
    changed = True
    while changed:
        changed = False
        for need, needer in chain:
            if lost & need and needer & ~lost:
                lost |= needer
                changed = True
    # A group loses all its members when one goes.
    for group in GROUPS.values():
        gmask = mask_of(group)
        if lost & gmask:
            lost |= gmask
    return lost

"""The XSAVE state components: the one table everything else derives from.

Sources: Intel SDM vol. 1, ch. 13 ("Managing State Using the XSAVE Feature Set"),
table 13-1 and section 13.3 (XCR0 rules); Intel APX architecture specification
(component 19); the Linux kernel's xstate tables (arch/x86/kernel/fpu/xstate.c) for
names. Sizes and offsets are not here: they vary by CPU and are read from CPUID leaf 0xD.

Pure module: no ctypes, no I/O.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing and collections.abc cost start-up time; only mypy needs them
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

# Plain classes, not dataclasses: this module is on the launch path, and importing
# dataclasses (with inspect) costs more than everything here.


class Scope:
    """Where a component is enabled (strings, not an enum: see ExitStatus in status.py)."""

    USER = "user"  # enabled through XCR0
    SUPERVISOR = "supervisor"  # enabled through IA32_XSS, never in XCR0


class XSaveComponent:
    __slots__ = ("aliases", "feature", "name", "number", "scope", "title")

    def __init__(
        self,
        number: int,
        name: str,
        title: str,
        scope: str,  # Scope.USER or Scope.SUPERVISOR
        feature: str,  # the CPUID feature (features.py) that enumerates it
        aliases: tuple[str, ...] = (),
    ) -> None:
        self.number = number
        self.name = name
        self.title = title
        self.scope = scope
        self.feature = feature
        self.aliases = aliases

    def __repr__(self) -> str:
        return f"XSaveComponent({self.number}, {self.name!r})"

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

USER_BITS: int = sum(c.bit for c in COMPONENTS if c.scope == Scope.USER)
SUPERVISOR_BITS: int = sum(c.bit for c in COMPONENTS if c.scope == Scope.SUPERVISOR)


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

# Components XCR0 can enable only together with another (SDM vol. 1, 13.3): needer ->
# needed. Both the "needs" rules and `dependents` come from here.
NEEDS: dict[str, str] = {"avx": "sse", "avx512": "avx"}


class Violation:
    """A rule `mask` breaks, and the message saying how."""

    __slots__ = ("message", "rule")

    def __init__(self, rule: str, message: str) -> None:
        self.rule = rule
        self.message = message

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Violation) and (self.rule, self.message) == (
            other.rule,
            other.message,
        )

    def __hash__(self) -> int:
        return hash((self.rule, self.message))

    def __repr__(self) -> str:
        return f"Violation({self.rule!r}, {self.message!r})"


class Rule:
    """One XCR0 rule: `check(mask, supported)` returns the message when it is broken."""

    __slots__ = ("_check", "explanation", "name")

    def __init__(
        self, name: str, explanation: str, check: Callable[[int, int | None], str | None]
    ) -> None:
        self.name = name
        self.explanation = explanation
        self._check = check

    def __repr__(self) -> str:
        return f"Rule({self.name!r})"

    def check(self, mask: int, supported: int | None) -> str | None:
        return self._check(mask, supported)


def _bit_span(mask: int) -> str:
    numbers = list(bits(mask))
    if len(numbers) == 1:
        return f"bit {numbers[0]}"
    return f"bits {numbers[0]}-{numbers[-1]}"


def _needs_rule(needer: str, needed: str) -> Rule:
    def check(mask: int, _: int | None) -> str | None:
        need, have = NAMES[needer], NAMES[needed]
        broken = bool(mask & need) and (mask & have) != have
        return f"{needer} needs {needed}" if broken else None

    explanation = (
        f"{needer} state ({_bit_span(NAMES[needer])}) needs {needed} state "
        f"({_bit_span(NAMES[needed])})"
    )
    return Rule(f"{needer}-needs-{needed}", explanation, check)


def _together_rule(group: str) -> Rule:
    members = GROUPS[group]
    listed = f"{', '.join(members[:-1])} and {members[-1]}"

    def check(mask: int, _: int | None) -> str | None:
        part = mask & NAMES[group]
        return f"{listed} go together: use '{group}'" if part and part != NAMES[group] else None

    explanation = f"the {group} components ({_bit_span(NAMES[group])}) are enabled together"
    return Rule(f"{group}-together", explanation, check)


def _check_x87(mask: int, _: int | None) -> str | None:
    return None if mask & 1 else "x87 must be set (XCR0 bit 0 can never be cleared)"


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


RULES: tuple[Rule, ...] = (
    Rule(
        "defined",
        "every bit must name an architecturally defined state component",
        _check_defined,
    ),
    Rule("x87-required", "XCR0 bit 0 (x87) must always be set", _check_x87),
    Rule(
        "no-supervisor",
        "supervisor components are enabled through IA32_XSS, not XCR0",
        _check_supervisor,
    ),
    _needs_rule("avx", NEEDS["avx"]),
    _together_rule("avx512"),
    _needs_rule("avx512", NEEDS["avx512"]),
    _together_rule("mpx"),
    _together_rule("amx"),
    Rule(
        "apx-excludes-mpx",
        "APX state (bit 19) reuses the MPX area: not both",
        _check_apx_excludes_mpx,
    ),
    Rule(
        "supported",
        "a component the CPU or kernel does not support cannot be requested",
        _check_supported,
    ),
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
    # Iterate to a fixed point over NEEDS (sse -> avx -> avx512).
    changed = True
    while changed:
        changed = False
        for needer, needed in NEEDS.items():
            if lost & NAMES[needed] and NAMES[needer] & ~lost:
                lost |= NAMES[needer]
                changed = True
    # A group loses all its members when one goes.
    for group in GROUPS.values():
        gmask = mask_of(group)
        if lost & gmask:
            lost |= gmask
    return lost

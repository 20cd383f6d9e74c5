"""The emulation policy: from the host's CPUID answers and a mask, the answers a
program sees.

Hiding a state component hides the CPUID feature that enumerates it and, through the
dependency graph in features.py, every feature that needs it, in every leaf. Whole
leaves that describe a hidden feature (AMX 0x1D/0x1E, AVX10 0x24) read as zero.

Leaf 0xD is the exception. While the hardware XCR0 is unchanged, XSAVE and XSAVEC still
write every enabled component, and glibc sizes the save area of its lazy-binding
trampoline from leaf 0xD: reporting smaller sizes there corrupts its stack. So leaf 0xD
stays truthful unless the kernel really changed XCR0. Pure module.
"""

from __future__ import annotations

from xcr0run import features, xsave
from xcr0run.cpuid import REGISTERS, XSAVE_LEAF, CpuidTable, Registers, key

TYPE_CHECKING = False  # typing's import costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from collections.abc import Iterable


def hidden_features(mask: int, host_xcr0: int, extra: Iterable[str] = ()) -> frozenset[str]:
    """Every feature a program must not see when XCR0 is cut from host_xcr0 to mask."""
    lost = xsave.dependents(host_xcr0 & ~mask)
    roots = {c.feature for c in xsave.components(lost) if c.scope == xsave.Scope.USER}
    return features.dependents(features.hideable(roots | set(extra)))


def usable_features(
    table: CpuidTable, xcr0: int, among: Iterable[str] | None = None
) -> frozenset[str]:
    """Features present in `table` whose state XCR0 enables (what glibc calls usable);
    only those `among` (canonical names) when given."""
    disabled = {
        c.feature for c in xsave.COMPONENTS if c.scope == xsave.Scope.USER and not xcr0 & c.bit
    }
    present = features.present_in(table, among)
    return present - features.dependents(features.hideable(disabled))


def psabi_level(table: CpuidTable, xcr0: int, glibc: bool = False) -> str | None:
    """The highest x86-64 psABI level whose features are all usable, or None; with
    `glibc`, judged by the features glibc's loader checks."""
    levels = features.GLIBC_ISA_LEVELS if glibc else features.PSABI_LEVELS
    # Only the levels' own features are looked up: this runs before every launch.
    named = {name for names in levels.values() for name in names}
    return features.psabi_level(usable_features(table, xcr0, named), levels)


# Per (leaf, sub-leaf): four AND masks then four OR values, applied register by register.
Ops = tuple[int, int, int, int, int, int, int, int]
_KEEP: Ops = (0xFFFFFFFF,) * 4 + (0,) * 4


LEVELS = features.LEVEL_NAMES


def level_restriction(level: str) -> tuple[int, frozenset[str]]:
    """(XCR0 components, features to hide) for the view of an x86-64 psABI level: every
    feature the higher levels add is hidden, with all that depends on it, and only the
    state components the level uses stay (x87 and SSE; AVX from v3; AVX-512 from v4)."""
    if level not in features.PSABI_LEVELS:
        raise KeyError(level)
    have = set(features.PSABI_LEVELS[level])
    above = set(features.PSABI_LEVELS[LEVELS[-1]]) - have
    mask = xsave.NAMES["x87"] | xsave.NAMES["sse"]
    if "avx" in have:
        mask |= xsave.NAMES["avx"]
    if "avx512f" in have:
        mask |= xsave.NAMES["avx512"]
    return mask, features.dependents(above)


class CpuidView:
    """What CPUID answers under a mask. `answer` is the per-trap hot path: one dict
    lookup, four ANDs and four ORs. (A plain class: dataclasses cost start-up time.)"""

    __slots__ = ("_ops", "_zero_leaves", "added", "hidden", "host_xcr0", "mask", "xcr0_changed")

    def __init__(
        self,
        mask: int,  # the XCR0 the program is meant to see
        host_xcr0: int,
        xcr0_changed: bool,  # the hardware XCR0 really is `mask` (ARCH_SET_XCR0)
        hidden: frozenset[str],
        added: frozenset[str] = frozenset(),  # features shown although the host lacks them
        _ops: dict[tuple[int, int], Ops] | None = None,
        _zero_leaves: frozenset[int] = frozenset(),
    ) -> None:
        self.mask = mask
        self.host_xcr0 = host_xcr0
        self.xcr0_changed = xcr0_changed
        self.hidden = hidden
        self.added = added
        self._ops: dict[tuple[int, int], Ops] = {} if _ops is None else _ops
        self._zero_leaves = _zero_leaves

    def __repr__(self) -> str:
        return (
            f"CpuidView(mask={self.mask:#x}, host_xcr0={self.host_xcr0:#x}, "
            f"xcr0_changed={self.xcr0_changed}, hidden={sorted(self.hidden)})"
        )

    @classmethod
    def build(
        cls,
        mask: int,
        host_xcr0: int,
        xcr0_changed: bool = False,
        extra_hidden: Iterable[str] = (),
        added: Iterable[str] = (),
        identity: dict[tuple[int, int], tuple[Registers, Registers]] | None = None,
    ) -> CpuidView:
        """`extra_hidden`: features to hide beyond the mask's (levels, profiles);
        `added`: features to show anyway; `identity`: (which bits, values) replaced per
        leaf, for another machine's vendor, family and brand."""
        hidden = hidden_features(mask, host_xcr0, extra_hidden)
        shown = frozenset(features.canonical(n) for n in added) - hidden
        ops: dict[tuple[int, int], list[int]] = {}

        def entry(k: tuple[int, int]) -> list[int]:
            return ops.setdefault(k, list(_KEEP))

        for k, (which, values) in (identity or {}).items():
            op = entry(key(*k))
            for i in range(4):
                op[i] &= ~which[i] & 0xFFFFFFFF
                op[4 + i] |= values[i] & which[i]
        for (leaf, subleaf, register), bits in features.register_masks(hidden).items():
            op = entry(key(leaf, subleaf))
            i = REGISTERS.index(register)
            op[i] &= ~bits & 0xFFFFFFFF
            op[4 + i] &= ~bits
        for (leaf, subleaf, register), bits in features.register_masks(shown).items():
            entry(key(leaf, subleaf))[4 + REGISTERS.index(register)] |= bits
        if xcr0_changed:
            # XSAVE really sizes its area from the new XCR0: leaf 0xD may follow it.
            low = entry((XSAVE_LEAF, 0))
            low[0] &= mask & 0xFFFFFFFF
            low[3] &= mask >> 32 & 0xFFFFFFFF
            for c in xsave.components(host_xcr0 & ~mask):
                if c.number >= 2:
                    ops[(XSAVE_LEAF, c.number)] = [0] * 8
        return cls(
            mask,
            host_xcr0,
            xcr0_changed,
            hidden,
            shown,
            {k: (v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]) for k, v in ops.items()},
            features.owned_leaves(hidden),
        )

    def answer(self, leaf: int, subleaf: int, regs: Registers) -> Registers:
        if leaf in self._zero_leaves:
            return (0, 0, 0, 0)
        op = self._ops.get(key(leaf, subleaf))
        if op is None:
            return regs
        return (
            regs[0] & op[0] | op[4],
            regs[1] & op[1] | op[5],
            regs[2] & op[2] | op[6],
            regs[3] & op[3] | op[7],
        )

    def cleared(self, leaf: int, subleaf: int) -> Registers:
        """The bits of (leaf, subleaf) this view turns off (for rr and OpenSSL flags)."""
        op = self._ops.get(key(leaf, subleaf))
        if leaf in self._zero_leaves:
            return (0xFFFFFFFF,) * 4
        if op is None:
            return (0, 0, 0, 0)
        return (
            ~op[0] & ~op[4] & 0xFFFFFFFF,
            ~op[1] & ~op[5] & 0xFFFFFFFF,
            ~op[2] & ~op[6] & 0xFFFFFFFF,
            ~op[3] & ~op[7] & 0xFFFFFFFF,
        )

    def apply(self, table: CpuidTable) -> CpuidTable:
        """The whole table as the program would see it (lazy if `table` is)."""
        seen = CpuidTable({k: self.answer(k[0], k[1], regs) for k, regs in table.entries.items()})
        if table.source is not None:
            seen.source = lambda leaf, subleaf: self.answer(leaf, subleaf, table[(leaf, subleaf)])
        return seen

    def hidden_present(self, table: CpuidTable) -> list[str]:
        """Hidden features the host really has, in table order: what the mask takes away."""
        taken = self.hidden & features.present_in(table)
        return [f.name for f in features.FEATURES if f.name in taken]

    def limits(self) -> list[str]:
        """What this view cannot hide, for honest output."""
        if self.xcr0_changed or self.mask == self.host_xcr0:
            return []
        lost = ",".join(c.name for c in xsave.components(self.host_xcr0 & ~self.mask))
        return [
            f"xgetbv(0) still returns {self.host_xcr0:#x}, and XSAVE still writes {lost}",
            f"CPUID leaf 0xD stays truthful (XSAVE area sizes include {lost})",
            "instructions of hidden features still execute if a program uses them anyway",
        ]


def rr_record_flags(view: CpuidView, host: CpuidTable) -> tuple[list[str], list[str]]:
    """`rr record` options that mask what this view masks, and the host features rr
    cannot mask (its --disable-cpuid-features* cover leaf 1, 7.0 and 0xD.1 EAX)."""
    flags = []
    _, _, ecx1, edx1 = view.cleared(1, 0)
    _, ebx7, ecx7, edx7 = view.cleared(7, 0)
    xsave_eax = view.cleared(XSAVE_LEAF, 1)[0]
    if ecx1 or edx1:
        flags.append(f"--disable-cpuid-features {ecx1:#x},{edx1:#x}")
    if ebx7 or ecx7 or edx7:
        flags.append(f"--disable-cpuid-features-ext {ebx7:#x},{ecx7:#x},{edx7:#x}")
    if xsave_eax:
        flags.append(f"--disable-cpuid-features-xsave {xsave_eax:#x}")
    covered = {(1, 0), (7, 0), (XSAVE_LEAF, 1)}
    uncovered = sorted(
        name
        for name in view.hidden & features.present_in(host)
        if (features.feature(name).leaf, features.feature(name).subleaf) not in covered
    )
    return flags, uncovered

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

from collections.abc import Iterable
from dataclasses import dataclass, field

from xcr0run import features, xsave
from xcr0run.cpuid import REGISTER_NAMES, CpuidTable, Registers, key

_XSAVE_LEAF = 0xD


def hidden_features(mask: int, host_xcr0: int, extra: Iterable[str] = ()) -> frozenset[str]:
    """Every feature a program must not see when XCR0 is cut from host_xcr0 to mask."""
    lost = xsave.dependents(host_xcr0 & ~mask)
    roots = {c.feature for c in xsave.components(lost) if c.scope is xsave.Scope.USER}
    return features.dependents(roots | set(extra))


def usable_features(table: CpuidTable, xcr0: int) -> frozenset[str]:
    """Features present in `table` whose state XCR0 enables (what glibc calls usable)."""
    present = {
        f.name for f in features.FEATURES if table.has_bit(f.leaf, f.subleaf, f.register, f.bit)
    }
    disabled = {
        c.feature for c in xsave.COMPONENTS if c.scope is xsave.Scope.USER and not xcr0 & c.bit
    }
    return frozenset(present - features.dependents(disabled))


def psabi_level(table: CpuidTable, xcr0: int, glibc: bool = False) -> str | None:
    """The highest x86-64 psABI level whose features are all usable, or None; with
    `glibc`, judged by the features glibc's loader checks."""
    levels = features.GLIBC_ISA_LEVELS if glibc else features.PSABI_LEVELS
    return features.psabi_level(usable_features(table, xcr0), levels)


@dataclass(frozen=True)
class CpuidView:
    """What CPUID answers under a mask. `answer` is the per-trap hot path: one dict
    lookup and four ANDs."""

    mask: int  # the XCR0 the program is meant to see
    host_xcr0: int
    xcr0_changed: bool  # the hardware XCR0 really is `mask` (ARCH_SET_XCR0)
    hidden: frozenset[str]
    _clear: dict[tuple[int, int], Registers] = field(repr=False)
    _zero_leaves: frozenset[int] = field(repr=False)

    @classmethod
    def build(
        cls,
        mask: int,
        host_xcr0: int,
        xcr0_changed: bool = False,
        extra_hidden: Iterable[str] = (),
    ) -> CpuidView:
        hidden = hidden_features(mask, host_xcr0, extra_hidden)
        clear: dict[tuple[int, int], list[int]] = {}
        for (leaf, subleaf, register), bits in features.register_masks(hidden).items():
            regs = clear.setdefault(key(leaf, subleaf), [0, 0, 0, 0])
            regs[REGISTER_NAMES.index(register)] |= bits
        if xcr0_changed:
            # XSAVE really sizes its area from the new XCR0: leaf 0xD may follow it.
            low = clear.setdefault((_XSAVE_LEAF, 0), [0, 0, 0, 0])
            low[0] |= ~mask & 0xFFFFFFFF
            low[3] |= ~(mask >> 32) & 0xFFFFFFFF
            for c in xsave.components(host_xcr0 & ~mask):
                if c.number >= 2:
                    clear[(_XSAVE_LEAF, c.number)] = [0xFFFFFFFF] * 4
        zero = features.owned_leaves(hidden)
        return cls(
            mask,
            host_xcr0,
            xcr0_changed,
            hidden,
            {k: (v[0], v[1], v[2], v[3]) for k, v in clear.items()},
            zero,
        )

    def answer(self, leaf: int, subleaf: int, regs: Registers) -> Registers:
        if leaf in self._zero_leaves:
            return (0, 0, 0, 0)
        clear = self._clear.get(key(leaf, subleaf))
        if clear is None:
            return regs
        return (
            regs[0] & ~clear[0],
            regs[1] & ~clear[1],
            regs[2] & ~clear[2],
            regs[3] & ~clear[3],
        )

    def apply(self, table: CpuidTable) -> CpuidTable:
        """The whole table as the program would see it."""
        return CpuidTable({k: self.answer(k[0], k[1], regs) for k, regs in table.entries.items()})

    def hidden_present(self, table: CpuidTable) -> list[str]:
        """Hidden features the host really has, in table order: what the mask takes away."""
        return [
            f.name
            for f in features.FEATURES
            if f.name in self.hidden and table.has_bit(f.leaf, f.subleaf, f.register, f.bit)
        ]

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

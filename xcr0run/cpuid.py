"""A CPUID table: the answers one CPU gives, leaf by leaf, as plain data.

Which leaves take a sub-leaf in ECX, and how far each enumeration runs, follow the
Intel SDM vol. 2A (CPUID) and the AMD APM vol. 3 (appendix E). Pure module: the table is
filled by the system layer (host.py) or loaded from a file.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's own import costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping
    from typing import Literal

    Register = Literal["eax", "ebx", "ecx", "edx"]

REGISTERS: tuple[Register, ...] = ("eax", "ebx", "ecx", "edx")  # the order of Registers
Registers = tuple[int, int, int, int]

HYPERVISOR_BASE = 0x40000000
EXTENDED_BASE = 0x80000000
XSAVE_LEAF = 0xD  # XSAVE features, state components and their sizes


def _until_cache_type(_n: int, regs: Registers) -> bool:
    return regs[0] & 0x1F != 0  # EAX[4:0] cache type, 0 = no more caches


def _until_level_type(_n: int, regs: Registers) -> bool:
    return (regs[2] >> 8) & 0xFF != 0  # ECX[15:8] level type, 0 = invalid


# Sub-leaf enumeration: leaf -> (how the count is known, fixed upper bound).
# "max_in_eax": sub-leaf 0 EAX holds the highest valid sub-leaf.
_MAX_IN_EAX = {0x7, 0x14, 0x17, 0x18, 0x1D, 0x20, 0x24}
_WHILE: dict[int, Callable[[int, Registers], bool]] = {
    0x4: _until_cache_type,
    0xB: _until_level_type,
    0x1F: _until_level_type,
    0x12: lambda n, regs: n < 2 or regs[0] & 0xF != 0,
    0x8000001D: _until_cache_type,
    0x80000026: _until_level_type,
}
_FIXED: dict[int, int] = {XSAVE_LEAF: 64, 0xF: 4, 0x10: 4, 0x1E: 2, 0x23: 4, 0x80000020: 4}
SUBLEAF_LEAVES = frozenset(_MAX_IN_EAX | set(_WHILE) | set(_FIXED))

# Leaves whose answer depends on the CPU asking: APIC and topology IDs, and on hybrid
# CPUs the core type (0x1A) and the caches (4).
PER_CPU_LEAVES = frozenset({0x1, 0x4, 0xB, 0x1A, 0x1F, 0x8000001E, 0x80000026})


# Leaves the Intel SDM and AMD APM define without sub-leaves: the hardware ignores ECX,
# which programs often leave holding garbage (glibc's leaves 0 and 1). A cache of answers
# looks these up as sub-leaf 0; a leaf missing here (a new leaf, a hypervisor range) is
# cached on the exact ECX, which is never wrong, only slower.
ECX_IGNORED_LEAVES = frozenset(
    {0x0, 0x1, 0x2, 0x3, 0x5, 0x6, 0x9, 0xA, 0x15, 0x16, 0x19, 0x1A, 0x1C}
    | set(range(EXTENDED_BASE, EXTENDED_BASE + 9))
    | {0x8000000A, 0x80000019, 0x8000001A, 0x8000001E}
)

# The encodings of CPUID: legacy prefixes (segment overrides, operand and address size,
# REP/REPNE; LOCK is none of them: it makes CPUID #UD) and, in 64-bit code, REX
# prefixes, in any order (a REX not right before the opcode is ignored, not an error),
# then 0f a2; at most 15 bytes, the architectural limit (longer raises #GP).
_LEGACY_PREFIXES = frozenset((0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF2, 0xF3))
MAX_INSTRUCTION_LENGTH = 15


def cpuid_instruction_length(code: bytes, is64: bool) -> int:
    """Length of the CPUID instruction `code` starts with; 0 if it is not one; -1 if
    `code` is all prefix and too short to tell."""
    i = 0
    limit = min(len(code), MAX_INSTRUCTION_LENGTH)
    while i < limit and (code[i] in _LEGACY_PREFIXES or (is64 and code[i] & 0xF0 == 0x40)):
        i += 1
    if i + 2 > MAX_INSTRUCTION_LENGTH:
        return 0
    if i + 2 > len(code):
        return -1 if len(code) < MAX_INSTRUCTION_LENGTH else 0
    return i + 2 if code[i : i + 2] == b"\x0f\xa2" else 0


def cache_key(leaf: int, subleaf: int) -> tuple[int, int]:
    """The key a cache of trapped answers uses: ECX dropped where hardware ignores it."""
    return (leaf, 0 if leaf in ECX_IGNORED_LEAVES else subleaf)


def key(leaf: int, subleaf: int) -> tuple[int, int]:
    """Normalise (leaf, subleaf): hardware ignores ECX for leaves without sub-leaves."""
    return (leaf, subleaf if leaf in SUBLEAF_LEAVES else 0)


class CpuidTable:
    """Answers by (leaf, sub-leaf). With a source, leaves are read from it when first
    asked for (the live CPU)."""

    __slots__ = ("entries", "source")

    def __init__(
        self,
        entries: dict[tuple[int, int], Registers] | None = None,
        source: Callable[[int, int], Registers] | None = None,
    ) -> None:
        self.entries: dict[tuple[int, int], Registers] = {} if entries is None else entries
        self.source = source

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CpuidTable) and self.entries == other.entries

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by its entries

    def __repr__(self) -> str:
        return f"CpuidTable({self.entries!r})"

    def get(self, leaf: int, subleaf: int = 0) -> Registers | None:
        k = key(leaf, subleaf)
        regs = self.entries.get(k)
        if regs is None and self.source is not None:
            regs = self.entries[k] = self.source(*k)
        return regs

    def __getitem__(self, leaf_subleaf: tuple[int, int]) -> Registers:
        return self.get(*leaf_subleaf) or (0, 0, 0, 0)

    def has_bit(self, leaf: int, subleaf: int, register: Register, bit: int) -> bool:
        regs = self.get(leaf, subleaf)
        return bool(regs and regs[REGISTERS.index(register)] >> bit & 1)

    def __iter__(self) -> Iterator[tuple[tuple[int, int], Registers]]:
        return iter(sorted(self.entries.items()))

    def to_json(self) -> dict[str, list[str]]:
        return {f"{leaf:#010x}.{sub}": [f"{r:#010x}" for r in regs] for (leaf, sub), regs in self}

    @classmethod
    def from_json(cls, data: Mapping[str, list[str]]) -> CpuidTable:
        table = cls()
        for name, regs in data.items():
            leaf, _, sub = name.partition(".")
            a, b, c, d = (int(r, 16) for r in regs)
            table.entries[key(int(leaf, 16), int(sub or "0"))] = (a, b, c, d)
        return table


# -- identity: the vendor (leaf 0) and the brand string (0x80000002-0x80000004) ----------

BRAND_LEAVES = (0x80000002, 0x80000003, 0x80000004)
BRAND_MAX = 47  # characters: the brand string is 48 bytes, NUL-terminated


def _text(words: Iterable[int]) -> str:
    raw = b"".join(w.to_bytes(4, "little") for w in words)
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def _words(raw: bytes) -> list[int]:
    return [int.from_bytes(raw[i : i + 4], "little") for i in range(0, len(raw), 4)]


def vendor(table: CpuidTable) -> str:
    _, ebx, ecx, edx = table[(0, 0)]
    return _text((ebx, edx, ecx))


def vendor_registers(name: str) -> tuple[int, int, int]:
    """(ebx, ecx, edx) of leaf 0 for a 12-character vendor name."""
    ebx, edx, ecx = _words(name.encode().ljust(12, b"\0")[:12])
    return ebx, ecx, edx


def brand(table: CpuidTable) -> str:
    return _text(r for leaf in BRAND_LEAVES for r in table[(leaf, 0)]).strip()


def brand_registers(text: str) -> list[Registers]:
    """The three brand leaves' answers for `text`; ValueError when it does not fit."""
    raw = text.encode()
    if len(raw) > BRAND_MAX:
        raise ValueError(f"brand {text!r} is {len(raw)} bytes; CPUID holds {BRAND_MAX}")
    words = _words(raw.ljust(BRAND_MAX + 1, b"\0"))
    return [(words[i], words[i + 1], words[i + 2], words[i + 3]) for i in range(0, 12, 4)]


def read_table(run: Callable[[int, int], Registers]) -> CpuidTable:
    """Walk every leaf and sub-leaf a CPU reports, executing CPUID through `run`."""
    table = CpuidTable()
    for base in (0, HYPERVISOR_BASE, EXTENDED_BASE):
        top = run(base, 0)[0]
        if base and not base <= top < base + 0x100:
            continue  # range absent (bare metal answers unrelated data at 0x40000000)
        for leaf in range(base, top + 1):
            for subleaf, regs in _subleaves(leaf, run):
                table.entries[(leaf, subleaf)] = regs
    return table


def _subleaves(leaf: int, run: Callable[[int, int], Registers]) -> Iterator[tuple[int, Registers]]:
    first = run(leaf, 0)
    yield 0, first
    if leaf in _MAX_IN_EAX:
        for n in range(1, min(first[0], 63) + 1):
            yield n, run(leaf, n)
    elif leaf in _FIXED:
        for n in range(1, _FIXED[leaf]):
            regs = run(leaf, n)
            if any(regs):
                yield n, regs
    elif leaf in _WHILE and _WHILE[leaf](0, first):
        for n in range(1, 64):
            regs = run(leaf, n)
            yield n, regs
            if not _WHILE[leaf](n, regs):
                break

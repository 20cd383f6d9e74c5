"""CPUID profiles of other machines: read, combine, and turn into a view.

A profile is a CPUID table plus, where known, the XCR0 of the machine it came from.
Formats read:

- xcr0run's own dump (`xcr0run --dump-cpuid`): JSON with "format": "xcr0run-cpuid/1",
  "leaves" {"0x00000001.0": [eax, ebx, ecx, edx]} and "xcr0";
- a feature list (the reference profiles shipped in xcr0run/profiles/): JSON with
  "features", optional "vendor", "signature" (leaf 1 EAX), "brand" and "xcr0";
- Intel SDE cpuid files: "LEAF SUBLEAF => EAX EBX ECX EDX" in hex, "********" for any
  sub-leaf, "#" comments;
- `cpuid -1 -r` (Todd Allen's cpuid): "0xLEAF 0xSUB: eax=0x... ebx=... ecx=... edx=...".

What a profile changes in the view: the features (hidden where the profile lacks them,
refused or with --force added where the host lacks them) and the machine's identity
(vendor, family/model/stepping, brand string). Cache, topology and XSAVE-size leaves stay
the host's: the program runs on this host's caches and this host's XSAVE. Pure module.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from xcr0run import features, xsave
from xcr0run.cpuid import (
    BRAND_LEAVES,
    HYPERVISOR_BASE,
    REGISTERS,
    CpuidTable,
    Registers,
    brand_registers,
    key,
    vendor_registers,
)
from xcr0run.errors import Xcr0runError

FORMAT = "xcr0run-cpuid/1"
_ALL = (0xFFFFFFFF,) * 4
_NONE = (0, 0, 0, 0)


class ProfileError(Xcr0runError):
    pass


@dataclass(frozen=True)
class CpuidProfile:
    name: str
    table: CpuidTable
    xcr0: int | None  # None when the source did not record it
    source: str

    def features(self) -> frozenset[str]:
        return features.present_in(self.table)

    def effective_xcr0(self) -> int:
        """The recorded XCR0, or the components the features imply."""
        if self.xcr0 is not None:
            return self.xcr0
        have = self.features()
        return (
            sum(
                c.bit for c in xsave.COMPONENTS if c.scope == xsave.Scope.USER and c.feature in have
            )
            | 0b11
        )


# -- reading ----------------------------------------------------------------------------------

_SDE_LINE = re.compile(
    r"^\s*([0-9a-fA-F]{8})\s+([0-9a-fA-F]{8}|\*{8})\s*=>\s*"
    r"([0-9a-fA-F]{8})\s+([0-9a-fA-F]{8})\s+([0-9a-fA-F]{8})\s+([0-9a-fA-F]{8})"
)
_CPUID_RAW = re.compile(
    r"^\s*0x([0-9a-fA-F]{8})\s+0x([0-9a-fA-F]{2,8}):\s*eax=0x([0-9a-fA-F]+)\s+"
    r"ebx=0x([0-9a-fA-F]+)\s+ecx=0x([0-9a-fA-F]+)\s+edx=0x([0-9a-fA-F]+)"
)


def parse(text: str, name: str) -> CpuidProfile:
    """Read a profile in any of the formats above; ProfileError names what is wrong."""
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ProfileError(f"{name}: not valid JSON ({err.msg}, line {err.lineno})") from err
        return _from_json(data, name)
    table = CpuidTable()
    if _SDE_LINE.search(text) or "=>" in text:
        for line in text.splitlines():
            m = _SDE_LINE.match(line)
            if m:
                sub = 0 if m.group(2).startswith("*") else int(m.group(2), 16)
                regs = tuple(int(m.group(i), 16) for i in range(3, 7))
                table.entries[key(int(m.group(1), 16), sub)] = regs  # type: ignore[assignment]
        kind = "Intel SDE cpuid file"
    else:
        # `cpuid -1 -r` lists one CPU; with several, the first one's block is taken.
        for line in text.splitlines():
            if table.entries and line.strip().startswith("CPU") and line.strip() != "CPU:":
                break
            m = _CPUID_RAW.match(line)
            if m:
                regs = tuple(int(m.group(i), 16) for i in range(3, 7))
                k = key(int(m.group(1), 16), int(m.group(2), 16))
                table.entries.setdefault(k, regs)  # type: ignore[arg-type]
        kind = "cpuid -r dump"
    if not table.entries:
        raise ProfileError(
            f"{name}: not a CPUID profile (expected xcr0run JSON, an SDE cpuid file or "
            "`cpuid -1 -r` output)"
        )
    return CpuidProfile(name, table, None, kind)


def _from_json(data: Any, name: str) -> CpuidProfile:
    if not isinstance(data, dict):
        raise ProfileError(f"{name}: expected a JSON object")
    xcr0 = int(data["xcr0"], 16) if isinstance(data.get("xcr0"), str) else data.get("xcr0")
    source = str(data.get("source", name))
    if "leaves" in data:
        try:
            table = CpuidTable.from_json(data["leaves"])
        except (ValueError, TypeError, AttributeError) as err:
            raise ProfileError(f"{name}: malformed 'leaves' ({err})") from err
        return CpuidProfile(str(data.get("name", name)), table, xcr0, source)
    if "features" in data:
        try:
            table = table_from_features(
                data["features"],
                vendor=data.get("vendor", "GenuineIntel"),
                signature=int(str(data.get("signature", "0")), 16),
                brand=data.get("brand", ""),
            )
        except KeyError as err:
            raise ProfileError(f"{name}: unknown feature {err}") from err
        except ValueError as err:
            raise ProfileError(f"{name}: {err}") from err
        return CpuidProfile(str(data.get("name", name)), table, xcr0, source)
    raise ProfileError(f"{name}: a profile needs 'leaves' or 'features'")


def table_from_features(
    names: Iterable[str], vendor: str = "GenuineIntel", signature: int = 0, brand: str = ""
) -> CpuidTable:
    """A CPUID table that has exactly these features (and their AMD mirror bits)."""
    regs: dict[tuple[int, int], list[int]] = {}
    for (leaf, subleaf, register), bits in features.register_masks(
        features.canonical(n) for n in names
    ).items():
        regs.setdefault(key(leaf, subleaf), [0, 0, 0, 0])[REGISTERS.index(register)] |= bits
    table = CpuidTable({k: (v[0], v[1], v[2], v[3]) for k, v in regs.items()})
    top = max((leaf for leaf, _ in table.entries if leaf < HYPERVISOR_BASE), default=1)
    table.entries[(0, 0)] = (top, *vendor_registers(vendor))
    one = table.entries.get((1, 0), _NONE)
    table.entries[(1, 0)] = (signature, one[1], one[2], one[3])
    if brand:
        for leaf, answer in zip(BRAND_LEAVES, brand_registers(brand)):
            table.entries[(leaf, 0)] = answer
    return table


# -- combining ----------------------------------------------------------------------------------


def common(profiles: Sequence[CpuidProfile]) -> CpuidProfile:
    """The features every profile has (their XCR0s ANDed); identity from the first."""
    if len(profiles) == 1:
        return profiles[0]
    shared = frozenset.intersection(*(p.features() for p in profiles))
    first = profiles[0]
    table = CpuidTable(dict(first.table.entries))
    for (leaf, subleaf, register), bits in features.register_masks(
        first.features() - shared
    ).items():
        k = key(leaf, subleaf)
        i = REGISTERS.index(register)
        regs = list(table.entries.get(k, _NONE))
        regs[i] &= ~bits
        table.entries[k] = (regs[0], regs[1], regs[2], regs[3])
    xcr0 = first.effective_xcr0()
    for p in profiles[1:]:
        xcr0 &= p.effective_xcr0()
    names = " & ".join(p.name for p in profiles)
    return CpuidProfile(
        names, table, xcr0, "common subset of " + ", ".join(p.source for p in profiles)
    )


# -- presenting ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileView:
    """What the view needs from a profile on this host."""

    mask: int
    hidden: frozenset[str]  # host features the profile lacks
    missing: frozenset[str]  # profile features the host lacks (SIGILL risk)
    identity: dict[tuple[int, int], tuple[Registers, Registers]]


# Bits that vary per machine without being features: left as the host has them.
_IDENTITY = {
    (0, 0): (0, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),  # vendor (max leaf stays the host's)
    (1, 0): (0x0FFF3FFF, 0, 0, 0),  # family, model, stepping
    **{(leaf, 0): _ALL for leaf in BRAND_LEAVES},
}


def profile_view(profile: CpuidProfile, host_table: CpuidTable, host_xcr0: int) -> ProfileView:
    host_has = features.present_in(host_table)
    theirs = profile.features()
    # Bits the OS sets (OSXSAVE, OSPKE) follow from XCR0, not from the profile.
    os_bits = {f.name for f in features.FEATURES if f.os_managed}
    identity = {
        k: (which, profile.table[k]) for k, which in _IDENTITY.items() if profile.table.get(*k)
    }
    return ProfileView(
        mask=profile.effective_xcr0() & host_xcr0,
        hidden=features.hideable(host_has - theirs - os_bits),
        missing=frozenset(theirs - host_has - os_bits - features.SYSTEM_FEATURES),
        identity=identity,
    )


def dump(table: CpuidTable, xcr0: int, kernel: dict[str, Any], name: str) -> dict[str, Any]:
    """This machine as an xcr0run profile (`--dump-cpuid`)."""
    return {
        "format": FORMAT,
        "name": name,
        "xcr0": f"{xcr0:#x}",
        "kernel": kernel,
        "leaves": table.to_json(),
    }

"""The emulation policy: what CPUID answers under a mask (pure, on real and made-up tables)."""

from __future__ import annotations

import pytest

from xcr0run import features, host
from xcr0run.cpuid import REGISTERS, CpuidTable
from xcr0run.view import CpuidView, hidden_features, psabi_level


def _bit(name: str) -> tuple[int, int, str, int]:
    f = features.feature(name)
    return f.leaf, f.subleaf, f.register, f.bit


def _table(*names: str, extra: dict[tuple[int, int], tuple[int, int, int, int]] | None = None):
    regs: dict[tuple[int, int], list[int]] = {}
    for name in names:
        leaf, sub, reg, bit = _bit(name)
        regs.setdefault((leaf, sub), [0, 0, 0, 0])[REGISTERS.index(reg)] |= 1 << bit
    table = CpuidTable({k: (v[0], v[1], v[2], v[3]) for k, v in regs.items()})
    table.entries.update(extra or {})
    return table


SAPPHIRE_FEATURES = [
    "fpu",
    "syscall",
    "cmov",
    "cx8",
    "fxsr",
    "mmx",
    "sse",
    "sse2",
    "sse3",
    "ssse3",
    "sse4_1",
    "sse4_2",
    "popcnt",
    "cx16",
    "lahf_lm",
    "xsave",
    "osxsave",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "bmi1",
    "bmi2",
    "lzcnt",
    "movbe",
    "avx512f",
    "avx512bw",
    "avx512cd",
    "avx512dq",
    "avx512vl",
    "avx512_fp16",
    "avx512vbmi",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "pku",
    "ospke",
    "vaes",
    "vpclmulqdq",
    "avx_vnni",
]
LEAF_0XD = {
    (0xD, 0): (0x602E7, 0x2B00, 0x2B00, 0),
    (0xD, 2): (256, 576, 0, 0),
    (0xD, 5): (64, 1088, 0, 0),
    (0xD, 18): (8192, 2816, 6, 0),
}
AMX_LEAF = {(0x1D, 0): (1, 0, 0, 0), (0x1D, 1): (0x2000, 0x8_0040, 0x10, 0)}


@pytest.fixture
def sapphire() -> CpuidTable:
    return _table(*SAPPHIRE_FEATURES, extra={**LEAF_0XD, **AMX_LEAF})


def _visible(view: CpuidView, table: CpuidTable) -> set[str]:
    seen = view.apply(table)
    return {name for name in SAPPHIRE_FEATURES if seen.has_bit(*_bit(name))}


def test_no_avx512_hides_the_whole_family_and_nothing_else(sapphire: CpuidTable) -> None:
    view = CpuidView.build(0x602E7 & ~0xE0, 0x602E7)
    visible = _visible(view, sapphire)
    assert not {n for n in visible if n.startswith("avx512")}
    assert {"avx", "avx2", "fma", "amx_tile", "pku", "vaes", "avx_vnni"} <= visible


def test_no_avx_takes_every_vex_and_evex_feature(sapphire: CpuidTable) -> None:
    view = CpuidView.build(0x60203, 0x602E7)
    visible = _visible(view, sapphire)
    assert not visible & {
        "avx",
        "avx2",
        "fma",
        "f16c",
        "vaes",
        "vpclmulqdq",
        "avx_vnni",
        "avx512f",
        "avx512_fp16",
    }
    assert {"sse4_2", "popcnt", "bmi1", "lzcnt", "amx_tile"} <= visible
    assert psabi_level(view.apply(sapphire), 0x60203) == "x86-64-v2"


def test_no_amx_zeroes_the_tile_leaves(sapphire: CpuidTable) -> None:
    view = CpuidView.build(0x2E7, 0x602E7)
    assert view.answer(0x1D, 1, sapphire[(0x1D, 1)]) == (0, 0, 0, 0)
    assert not {"amx_tile", "amx_bf16", "amx_int8"} & _visible(view, sapphire)


def test_leaf_0xd_stays_truthful_while_xcr0_is_unchanged(sapphire: CpuidTable) -> None:
    view = CpuidView.build(0x7, 0x602E7)
    for k, regs in LEAF_0XD.items():
        assert view.answer(*k, regs) == regs
    assert any("0xD" in line for line in view.limits())


def test_leaf_0xd_follows_a_really_changed_xcr0(sapphire: CpuidTable) -> None:
    view = CpuidView.build(0x7, 0x602E7, xcr0_changed=True)
    assert view.answer(0xD, 0, LEAF_0XD[(0xD, 0)])[0] == 0x7
    assert view.answer(0xD, 5, LEAF_0XD[(0xD, 5)]) == (0, 0, 0, 0)
    assert view.answer(0xD, 2, LEAF_0XD[(0xD, 2)]) == LEAF_0XD[(0xD, 2)]
    assert view.limits() == []


def test_the_host_mask_changes_nothing(sapphire: CpuidTable) -> None:
    view = CpuidView.build(0x602E7, 0x602E7)
    assert view.apply(sapphire) == sapphire
    assert view.hidden == frozenset()


def test_amd_mirror_bits_are_cleared_too() -> None:
    """AMD repeats leaf-1 EDX bits in 0x80000001 EDX: hiding must clear both copies."""
    bit = features.AMD_E1_EDX_MIRRORS["mmx"]
    view = CpuidView.build(0x7, 0x7, extra_hidden=["mmx"])
    assert view.answer(0x80000001, 0, (0, 0, 0, 1 << bit)) == (0, 0, 0, 0)
    assert view.answer(1, 0, (0, 0, 0, 1 << _bit("mmx")[3])) == (0, 0, 0, 0)


def test_fma4_and_xop_go_with_avx() -> None:
    table = _table("fma4", "xop", "sse4a", "avx")
    view = CpuidView.build(0x3, 0x7)
    seen = view.apply(table)
    assert not seen.has_bit(*_bit("fma4")) and not seen.has_bit(*_bit("xop"))
    assert seen.has_bit(*_bit("sse4a"))


def test_hidden_features_are_closed_under_dependency() -> None:
    hidden = hidden_features(0x7, 0x602E7)
    assert features.dependents(hidden) == hidden


def test_this_hosts_own_table_under_each_preset() -> None:
    """On this machine's real CPUID table, every preset leaves a consistent view: each
    feature still shown has every prerequisite the host has still shown too."""
    from xcr0run import masks

    table, xcr0 = host.cpuid_table(), host.xcr0()

    shown = features.present_in
    on_host = shown(table)
    for name in masks.PRESETS:
        view = CpuidView.build(masks.parse_mask(name, xcr0), xcr0)
        seen = shown(view.apply(table))
        assert seen <= on_host
        for f in seen:
            assert (features.prerequisites([f]) & on_host) <= seen, (name, f)


def test_no_mask_or_extra_hiding_takes_what_a_64_bit_program_runs_on(sapphire) -> None:
    """XCR0 without SSE state (mask x87) hides AVX and up, not SSE2, which every x86-64
    program already runs on; hiding PAE (a profile that leaves system bits out) keeps
    LM and NX, which need it."""
    table = _table(*SAPPHIRE_FEATURES, "pae", "lm", "nx", extra={**LEAF_0XD, **AMX_LEAF})
    view = CpuidView.build(0x1, 0x602E7, extra_hidden=["pae", "msr", "lm"])
    seen = features.present_in(view.apply(table))
    assert {"sse", "sse2", "fpu", "fxsr", "cmov", "cx8", "syscall", "pae", "lm", "nx"} <= seen
    assert not {"avx", "avx2", "avx512f", "amx_tile"} & seen
    assert psabi_level(view.apply(table), 0x1) == "x86-64-v2"

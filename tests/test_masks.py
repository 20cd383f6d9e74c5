"""The mask language: examples, errors, completion, and properties (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xcr0run import masks, xsave
from xcr0run.errors import MaskError

SKYLAKE_X = 0x2FF  # x87..avx512, mpx, pkru
SAPPHIRE = 0x602E7  # with AMX and PKRU, no MPX
ZEN = 0xE7


@pytest.mark.parametrize(
    ("text", "host", "expected"),
    [
        ("x87,sse,avx", SAPPHIRE, 0x7),
        ("0x7", SAPPHIRE, 0x7),
        ("0X7", SAPPHIRE, 0x7),
        ("x87 sse ymm", SAPPHIRE, 0x7),
        ("host", SAPPHIRE, SAPPHIRE),
        ("no-avx512", SAPPHIRE, 0x60207),
        ("no-amx", SAPPHIRE, 0x2E7),
        ("no-avx", SAPPHIRE, 0x60203),
        ("-avx512", SAPPHIRE, 0x60207),
        ("-amx,-pkru", SAPPHIRE, 0xE7),
        ("no-amx,+pkru", SAPPHIRE, 0x2E7),
        ("-opmask", ZEN, 0x7),
        ("x87,sse,avx,avx512", ZEN, 0xE7),
        ("x87,sse,avx,avx512,mpx,pkru", SKYLAKE_X, 0x2FF),
        ("x87", ZEN, 0x1),
    ],
)
def test_examples(text: str, host: int, expected: int) -> None:
    assert masks.parse_mask(text, host) == expected


@pytest.mark.parametrize(
    ("text", "host", "message"),
    [
        ("avx521", ZEN, "unknown component 'avx521', did you mean 'avx512'?"),
        ("x87,sse,avx512", ZEN, "avx512 needs avx"),
        ("x87,amx", ZEN, "tilecfg, tiledata are not supported by this CPU and kernel"),
        ("x87,sse,tiledata", SAPPHIRE, "tilecfg and tiledata go together: use 'amx'"),
        ("-x87", ZEN, "x87 must be set (XCR0 bit 0 can never be cleared)"),
        ("sse,avx", ZEN, "x87 must be set (XCR0 bit 0 can never be cleared)"),
        ("", ZEN, "empty mask"),
        ("0x107", ZEN, "pt: supervisor state, enabled through IA32_XSS and never in XCR0"),
        ("x87,sse,opmask", ZEN, "opmask, zmm_hi256 and hi16_zmm go together: use 'avx512'"),
        ("no-avx513", ZEN, "unknown component 'no-avx513', did you mean 'no-avx512'?"),
    ],
)
def test_errors_are_one_line_with_a_hint(text: str, host: int, message: str) -> None:
    with pytest.raises(MaskError) as err:
        masks.parse_mask(text, host)
    assert str(err.value) == message
    assert "\n" not in message


def test_presets_are_derived_from_the_table() -> None:
    removable = {c.name for c in xsave.COMPONENTS if c.scope is xsave.Scope.USER} - {"x87"}
    grouped = {m for members in xsave.GROUPS.values() for m in members}
    for name in (removable - grouped) | {"avx512", "amx", "mpx"}:
        assert f"no-{name}" in masks.PRESETS
    assert "no-cet" not in masks.PRESETS  # supervisor state is never in XCR0


def test_completion_extends_the_last_item() -> None:
    assert ("x87,sse", "SSE registers XMM0-15 and MXCSR") in masks.complete("x87,s", ZEN)
    assert [v for v, _ in masks.complete("x87,sse,a", ZEN)] == ["x87,sse,avx", "x87,sse,avx512"]
    # x87 can never be removed, so it is no edit to offer.
    assert "-x87" not in [v for v, _ in masks.complete("-", ZEN)]
    assert {"-sse", "-avx", "-avx512"} <= {v for v, _ in masks.complete("-", ZEN)}
    assert [v for v, _ in masks.complete("-a", SAPPHIRE)] == ["-avx", "-avx512", "-amx"]
    assert {v for v, _ in masks.complete("no-a", ZEN)} == {
        "no-avx",
        "no-avx512",
        "no-amx",
        "no-apx",
    }
    assert all(not v.endswith("amx") for v, _ in masks.complete("x87,", ZEN))


def test_format_collapses_groups() -> None:
    assert masks.format_mask(0x602E7) == "x87,sse,avx,avx512,pkru,amx"
    assert masks.format_mask(0x27) == "x87,sse,avx,opmask"
    assert masks.format_mask(0x100001) == "x87,0x100000"


# -- properties ---------------------------------------------------------------------------

hosts = st.sampled_from([ZEN, SAPPHIRE, 0x2FF, 0x7, 0x3, 0xE02E7])
any_mask = st.integers(min_value=0, max_value=(1 << 21) - 1)


@given(any_mask, hosts)
def test_a_mask_parses_exactly_when_it_breaks_no_rule(mask: int, host: int) -> None:
    problems = xsave.violations(mask, host)
    try:
        parsed = masks.parse_mask(hex(mask), host)
    except MaskError as err:
        assert problems, "rejected a mask that breaks no rule"
        assert str(err) == problems[0].message
    else:
        assert problems == []
        assert parsed == mask


@given(any_mask, hosts)
def test_format_round_trips(mask: int, host: int) -> None:
    if xsave.violations(mask, host):
        return
    text = masks.format_mask(mask)
    assert masks.parse_mask(text, host) == mask
    assert masks.format_mask(masks.parse_mask(text, host)) == text


@given(hosts, st.lists(st.sampled_from(sorted(xsave.NAMES)), min_size=1, max_size=4))
def test_edits_of_the_host_always_give_a_valid_mask(host: int, words: list[str]) -> None:
    words = [w for w in words if not xsave.NAMES[w] & 1]  # x87 cannot go
    if not words:
        return
    text = ",".join(f"-{w}" for w in words)
    mask = masks.parse_mask(text, host)
    assert xsave.violations(mask, host) == []
    assert mask & host == mask
    for w in words:
        assert not mask & xsave.NAMES[w]


@given(hosts, st.sampled_from(sorted(masks.PRESETS)))
def test_every_preset_is_valid_on_every_host(host: int, preset: str) -> None:
    mask = masks.parse_mask(preset, host)
    assert xsave.violations(mask, host) == []

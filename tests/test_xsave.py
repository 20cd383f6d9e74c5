"""The XSAVE component table and the XCR0 rules."""

from __future__ import annotations

import pytest

from xcr0run import features, xsave


def test_table_numbers_and_names_are_unique() -> None:
    numbers = [c.number for c in xsave.COMPONENTS]
    assert numbers == sorted(set(numbers)) == list(range(20))
    names = [c.name for c in xsave.COMPONENTS]
    aliases = [a for c in xsave.COMPONENTS for a in c.aliases]
    assert len(set(names + aliases + list(xsave.GROUPS))) == len(
        names + aliases + list(xsave.GROUPS)
    )


def test_every_component_names_a_known_feature() -> None:
    for c in xsave.COMPONENTS:
        assert features.feature(c.feature).name == c.feature


def test_groups_are_made_of_components() -> None:
    assert xsave.NAMES["avx512"] == 0xE0
    assert xsave.NAMES["amx"] == 0x60000
    assert xsave.NAMES["mpx"] == 0x18
    assert xsave.NAMES["cet"] == 0x1800


def test_user_and_supervisor_split() -> None:
    assert xsave.USER_BITS == 0xE02FF
    assert xsave.SUPERVISOR_BITS == 0x1FD00
    assert xsave.USER_BITS & xsave.SUPERVISOR_BITS == 0


@pytest.mark.parametrize(
    ("mask", "rule"),
    [
        (0x6, "x87-required"),
        (0x5, "avx-needs-sse"),
        (0x27, "avx512-together"),
        (0xE3, "avx512-needs-avx"),
        (0xB, "mpx-together"),
        (0x20003, "amx-together"),
        (0x8001B, "apx-excludes-mpx"),
        (0x103, "no-supervisor"),
        (0x100003, "defined"),
    ],
)
def test_each_rule_catches_its_violation(mask: int, rule: str) -> None:
    assert rule in [v.rule for v in xsave.violations(mask)]


@pytest.mark.parametrize("mask", [0x1, 0x3, 0x7, 0xE7, 0x2E7, 0x600E7, 0x1B, 0x80007])
def test_valid_masks_break_no_rule(mask: int) -> None:
    assert xsave.violations(mask) == []


def test_supported_rule_names_the_missing_components() -> None:
    (v,) = xsave.violations(0x600E7, supported=0xE7)
    assert v.rule == "supported"
    assert v.message == "tilecfg, tiledata are not supported by this CPU and kernel"


def test_every_rule_has_an_explanation() -> None:
    for rule in xsave.RULES:
        assert rule.explanation and rule.check(0x7, 0x7) is None


def test_dependents_follow_the_needs_chain() -> None:
    assert xsave.dependents(xsave.NAMES["sse"]) == 0xE6
    assert xsave.dependents(xsave.NAMES["avx"]) == 0xE4
    assert xsave.dependents(xsave.NAMES["opmask"]) == 0xE0
    assert xsave.dependents(xsave.NAMES["tiledata"]) == 0x60000

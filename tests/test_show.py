"""`xcr0run --show` against an independent C program and /proc/cpuinfo."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tests.conftest import xcr0run


@pytest.fixture(scope="module")
def shown() -> dict[str, Any]:
    result = xcr0run(["--show", "--json"], check=True)
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def oracle(cbuild) -> dict[str, str]:
    out = subprocess.run([cbuild("xstate_facts.c")], capture_output=True, text=True, check=True)
    facts: dict[str, str] = {}
    for line in out.stdout.splitlines():
        key, _, value = line.partition(" ")
        facts[key if key != "component" else f"component {value.split()[0]}"] = value
    return facts


def test_xcr0_matches_xgetbv_in_c(shown, oracle) -> None:
    assert shown["xcr0"] == oracle["xcr0"]


def test_sizes_match_cpuid_leaf_0xd(shown, oracle) -> None:
    assert shown["xsave_size"] == {
        "enabled": int(oracle["size_enabled"]),
        "supported": int(oracle["size_supported"]),
        "compacted": int(oracle["size_compacted"]),
    }


def test_components_match_cpuid_leaf_0xd(shown, oracle) -> None:
    xcr0 = int(oracle["xcr0"], 16)
    user = int(oracle["user_supported"], 16)
    supervisor = int(oracle["supervisor_supported"], 16)
    for row in shown["components"]:
        n = row["number"]
        if row["scope"] == "user":
            assert row["enabled"] == bool(xcr0 >> n & 1), row
            assert row["supported"] == bool(user >> n & 1), row
        else:
            assert row["enabled"] is None
            assert row["supported"] == bool(supervisor >> n & 1), row
        if n >= 2 and row["supported"]:
            _, _, size, _, offset, _, align, _, xfd = oracle[f"component {n}"].split()
            assert row["size"] == int(size), row
            assert row["align64"] == bool(int(align)) and row["xfd"] == bool(int(xfd))
            if row["scope"] == "user":
                assert row["offset"] == int(offset), row


def test_in_use_is_reported_when_xgetbv1_exists(shown, oracle) -> None:
    if oracle["xgetbv1"] == "1":
        assert shown["xinuse"] is not None
        # SSE state is always live in a running Python process.
        assert int(shown["xinuse"], 16) & 0b10
    else:
        assert shown["xinuse"] is None


def test_kernel_state_matches_arch_prctl_in_c(shown, oracle) -> None:
    assert shown["kernel"]["xcomp_supported"] == (
        None if oracle["xcomp_supp"] == "none" else oracle["xcomp_supp"]
    )
    assert shown["kernel"]["xcomp_permitted"] == (
        None if oracle["xcomp_perm"] == "none" else oracle["xcomp_perm"]
    )
    assert shown["cpuid_faulting"]["supported"] == (oracle["faulting"] == "1")


def _cpuinfo_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def test_components_agree_with_proc_cpuinfo(shown) -> None:
    flags = _cpuinfo_flags()
    enabled = {row["name"] for row in shown["components"] if row["enabled"]}
    assert ("avx" in enabled) == ("avx" in flags)
    assert ("opmask" in enabled) == ("avx512f" in flags)
    assert ("tiledata" in enabled) == ("amx_tile" in flags)
    assert ("pkru" in enabled) == ("pku" in flags)


def test_psabi_level_agrees_with_glibc_loader(shown) -> None:
    """glibc's loader lists the levels it considers supported; ours must be the top one."""
    out = subprocess.run(
        ["/lib64/ld-linux-x86-64.so.2", "--help"], capture_output=True, text=True
    ).stdout
    supported = [
        line.split()[0] for line in out.splitlines() if "(supported" in line and "x86-64-v" in line
    ]
    if not supported:
        pytest.skip("this glibc's loader does not list ISA levels (glibc < 2.33)")
    assert shown["psabi_level"] == max(supported)


def test_arch_set_xcr0_probe_says_why(shown) -> None:
    setx = shown["arch_set_xcr0"]
    assert setx["code"] == "0x1014"  # ARCH_SET_XCR0 of tests/kernel/arch-set-xcr0.patch
    if not setx["available"]:
        assert "ARCH_SET_XCR0" in setx["detail"]


def test_show_mask_describes_without_running(shown) -> None:
    result = xcr0run(["--show", "--json", "--mask", "x87,sse"], check=True)
    plan = json.loads(result.stdout)["plan"]
    assert plan["xcr0"] == "0x3"
    if "avx" in _cpuinfo_flags():
        assert "avx" in plan["hidden_features"] and "avx2" in plan["hidden_features"]
    assert plan["psabi_level"] in (None, "x86-64-v1", "x86-64-v2")


def test_human_output_names_everything(shown) -> None:
    out = xcr0run(["--show"], check=True, env={"NO_COLOR": "1"}).stdout
    assert f"XCR0 {shown['xcr0']}" in out
    for word in ("CPUID faulting", "ARCH_SET_XCR0", "XSAVE area", "psABI level", "x87"):
        assert word in out
    assert "\x1b[" not in out  # no colour when not a terminal

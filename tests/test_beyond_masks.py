"""psABI levels, CPUID profiles (dumps, SDE and `cpuid -r` imports, reference profiles,
common subsets), library knobs and rr flags. Outside oracles: glibc's loader and NumPy's
runtime feature table, driven through --method env (no CPUID faulting needed)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import xcr0run
from xcr0run import envhints, features, host, profile_files, profiles
from xcr0run.plan import ViewSpec, shape_view
from xcr0run.view import CpuidView, level_restriction

XCR0 = host.xcr0()
TABLE = host.full_cpuid_table()


def _ldso_levels(prefix: list[str]) -> set[str]:
    out = subprocess.run(
        [*prefix, "/lib64/ld-linux-x86-64.so.2", "--help"], capture_output=True, text=True
    ).stdout
    return set(re.findall(r"(x86-64-v\d) \(supported", out))


HOST_LEVELS = _ldso_levels([])


def test_level_restriction_hides_what_the_higher_levels_add() -> None:
    mask, hidden = level_restriction("x86-64-v2")
    assert mask == 0x3
    assert {"avx", "avx2", "bmi1", "bmi2", "lzcnt", "movbe", "fma", "f16c", "avx512f"} <= hidden
    assert not {"popcnt", "sse4_2", "cx16", "ssse3"} & hidden
    mask, hidden = level_restriction("x86-64-v1")
    assert {"popcnt", "sse4_2", "cx16", "lahf_lm"} <= hidden and "sse2" not in hidden
    assert level_restriction("x86-64-v4")[1] == frozenset()


@pytest.mark.parametrize("level", ["x86-64-v2", "x86-64-v3", "x86-64-v4"])
def test_show_level_reports_that_level(level: str) -> None:
    if level not in HOST_LEVELS and HOST_LEVELS:
        pytest.skip(f"this CPU does not reach {level}")
    plan = json.loads(xcr0run(["--show", "--json", "--level", level], check=True).stdout)["plan"]
    assert plan["psabi_level"] == level


@pytest.mark.parametrize("level", ["x86-64-v2", "x86-64-v3"])
def test_glibc_loader_agrees_with_a_level_through_its_tunables(level: str) -> None:
    """Through --method env glibc's own tunables carry the view: its loader must list
    exactly the levels up to the chosen one as supported."""
    if not HOST_LEVELS:
        pytest.skip("this glibc's loader does not list ISA levels")
    if level not in HOST_LEVELS:
        pytest.skip(f"this CPU does not reach {level}")
    seen = _ldso_levels(
        [sys.executable, "-m", "xcr0run", "-q", "--method", "env", "--level", level, "--"]
    )
    up_to = {f"x86-64-v{n}" for n in range(2, int(level[-1]) + 1)}
    assert seen == up_to & HOST_LEVELS


def _numpy_features(args: list[str]) -> dict[str, bool]:
    pytest.importorskip("numpy")
    code = (
        "import json; from numpy._core._multiarray_umath import __cpu_features__ as f;"
        "print(json.dumps(f))"
    )
    out = xcr0run([*args, "--", sys.executable, "-c", code])
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_numpy_runtime_table_follows_env_hints() -> None:
    native = _numpy_features(["-q", "-m", "host"])
    if not native.get("X86_V4"):
        pytest.skip("NumPy sees no x86-64-v4 here (or predates its level groups)")
    masked = _numpy_features(["-q", "--method", "env", "-m", "no-avx512"])
    assert masked["X86_V4"] is False and masked["X86_V3"] is True
    v2 = _numpy_features(["-q", "--method", "env", "--level", "x86-64-v2"])
    assert v2["X86_V3"] is False


def test_env_hints_never_overwrite_and_merge_lists() -> None:
    view = CpuidView.build(0x7, 0xE7)
    env = {
        "GLIBC_TUNABLES": "glibc.malloc.check=3:glibc.cpu.hwcaps=+AVX512F",
        "GODEBUG": "cpu.avx512f=on,http2client=0",
        "MKL_ENABLE_INSTRUCTIONS": "AVX512",
    }
    hints = {h.name: h for h in envhints.env_hints(view.hidden, view.cleared, env)}
    tunables = hints["GLIBC_TUNABLES"].value
    assert tunables.startswith("glibc.malloc.check=3:glibc.cpu.hwcaps=+AVX512F,")
    assert "-AVX512F" not in tunables and "-AVX512VL" in tunables
    assert hints["GODEBUG"].value.startswith("cpu.avx512f=on,http2client=0,")
    assert "cpu.avx512f=off" not in hints["GODEBUG"].value
    assert "MKL_ENABLE_INSTRUCTIONS" not in hints  # the user's own value stands
    assert hints["OPENSSL_ia32cap"].value.startswith("~0x0:~0x")


def test_rr_flags_mask_the_same_bits() -> None:
    out = xcr0run(["--print-rr-flags", "-m", "x87,sse"], check=True).stdout.split()
    if XCR0 & 0x4 == 0:
        pytest.skip("no AVX to hide")
    ecx, _edx = (int(x, 16) for x in out[out.index("--disable-cpuid-features") + 1].split(","))
    assert ecx >> features.feature("avx").bit & 1 and ecx >> features.feature("fma").bit & 1
    ebx7 = int(out[out.index("--disable-cpuid-features-ext") + 1].split(",")[0], 16)
    assert ebx7 >> features.feature("avx2").bit & 1


# -- profiles -----------------------------------------------------------------------------------


def test_dump_round_trips_to_an_identical_view(tmp_path) -> None:
    dump = tmp_path / "me.json"
    xcr0run(["--dump-cpuid", str(dump)], check=True)
    data = json.loads(dump.read_text())
    assert data["format"] == "xcr0run-cpuid/1" and data["xcr0"] == f"{XCR0:#x}"
    plan = json.loads(xcr0run(["--show", "--json", "--profile", str(dump)], check=True).stdout)[
        "plan"
    ]
    assert plan["profile"]["lacks"] == [] and plan["profile"]["extra"] == []
    assert plan["xcr0"] == f"{XCR0:#x}" and plan["hidden_features"] == []


def _as_sde(table) -> str:
    lines = ["# Intel SDE cpuid file, as written for this test"]
    for (leaf, sub), regs in table:
        lines.append(f"{leaf:08x} {sub:08x} => " + " ".join(f"{r:08x}" for r in regs))
    return "\n".join(lines) + "\n"


def _as_cpuid_raw(table) -> str:
    lines = ["CPU 0:"]
    for (leaf, sub), regs in table:
        a, b, c, d = regs
        lines.append(
            f"   0x{leaf:08x} 0x{sub:02x}: eax=0x{a:08x} ebx=0x{b:08x} ecx=0x{c:08x} edx=0x{d:08x}"
        )
    lines.append("CPU 1:")
    lines.append("   0x00000001 0x00: eax=0x00000000 ebx=0x00000000 ecx=0x00000000 edx=0x0")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("render", [_as_sde, _as_cpuid_raw])
def test_imports_of_other_tools_dumps(render) -> None:
    profile = profiles.parse(render(TABLE), "dump")
    assert profile.features() == features.present_in(TABLE)
    assert profile.table[(1, 0)] == TABLE[(1, 0)]


def test_reference_profiles_load_and_cite_their_source() -> None:
    for name in profile_files.reference_profiles():
        profile = profile_files.load_profile(name)
        assert profile.source and profile.features()
        assert "fpu" in profile.features() and "sse2" in profile.features()
    haswell = profile_files.load_profile("haswell")
    assert {"avx2", "fma", "bmi2", "movbe"} <= haswell.features()
    assert "avx512f" not in haswell.features() and haswell.effective_xcr0() == 0x7
    assert features.psabi_level(haswell.features()) == "x86-64-v3"
    skx = profile_files.load_profile("skylake-server")
    assert features.psabi_level(skx.features()) == "x86-64-v4"


def _seen_under(spec: ViewSpec) -> frozenset[str]:
    view = CpuidView.build(
        spec.mask, XCR0, extra_hidden=spec.extra_hidden, added=spec.added, identity=spec.identity
    )
    return features.present_in(view.apply(TABLE))


@pytest.mark.parametrize("name", profile_files.reference_profiles())
def test_no_shipped_profile_hides_what_a_running_program_needs(name: str) -> None:
    """On this machine, every shipped profile leaves a 64-bit program its long mode, NX
    and the rest of what it runs on, and shows every feature it lists that the host has:
    a profile that leaves out a system bit (PAE) must not take its dependents (LM, NX)."""
    profile = profile_files.load_profile(name)
    seen = _seen_under(shape_view(XCR0, TABLE, profile=profile, force=True))
    on_host = features.present_in(TABLE)
    assert features.RUNNING_64BIT & on_host <= seen
    assert profile.features() & on_host <= seen, sorted(profile.features() & on_host - seen)
    assert {"lm", "nx"} & on_host <= seen


@pytest.mark.parametrize("level", features.LEVEL_NAMES)
def test_no_level_hides_what_a_running_program_needs(level: str) -> None:
    seen = _seen_under(shape_view(XCR0, TABLE, level=level))
    assert (features.RUNNING_64BIT | {"nx"}) & features.present_in(TABLE) <= seen


def test_show_profile_keeps_long_mode_and_nx() -> None:
    """The issue as a user saw it: --profile haswell told programs there was no long
    mode and no NX; --level x86-64-v3 did not."""
    for args in (["--profile", "haswell"], ["--profile", "x86-64-v3"], ["--level", "x86-64-v3"]):
        result = xcr0run(["--show", "--json", "--force", *args])
        plan = json.loads(result.stdout)["plan"]
        assert not {"lm", "nx", "pae", "syscall", "sse2"} & set(plan["hidden_features"]), args


def test_common_subset_of_several_profiles() -> None:
    haswell, skx = (
        profile_files.load_profile("haswell"),
        profile_files.load_profile("skylake-server"),
    )
    both = profiles.common([skx, haswell])
    assert both.features() == skx.features() & haswell.features()
    assert both.effective_xcr0() == 0x7
    assert both.table[(0, 0)][1:] == skx.table[(0, 0)][1:]  # identity from the first


def test_a_profile_with_features_the_host_lacks_is_refused() -> None:
    extra = profiles.profile_view(profile_files.load_profile("skylake-server"), TABLE, XCR0).missing
    if not extra:
        pytest.skip("this CPU has every skylake-server feature")
    result = xcr0run(["--show", "--profile", "skylake-server"])
    assert result.returncode == 125
    assert "has features this CPU lacks" in result.stderr
    assert all(name in result.stderr for name in extra)
    forced = json.loads(
        xcr0run(["--show", "--json", "--force", "--profile", "skylake-server"], check=True).stdout
    )["plan"]
    assert set(forced["added_features"]) == set(extra)


def test_show_profile_lists_the_differences() -> None:
    plan = json.loads(xcr0run(["--show", "--json", "--profile", "x86-64-v2"], check=True).stdout)[
        "plan"
    ]
    assert plan["psabi_level"] == "x86-64-v2"
    if "avx2" in features.present_in(TABLE):
        assert "avx2" in plan["profile"]["lacks"]


def test_profile_identity_reaches_the_view() -> None:
    haswell = profile_files.load_profile("haswell")
    pv = profiles.profile_view(haswell, TABLE, XCR0)
    view = CpuidView.build(pv.mask, XCR0, extra_hidden=pv.hidden, identity=pv.identity)
    seen = view.apply(TABLE)
    vendor = b"".join(
        r.to_bytes(4, "little") for r in (seen[(0, 0)][1], seen[(0, 0)][3], seen[(0, 0)][2])
    )
    assert vendor == b"GenuineIntel"
    assert seen[(1, 0)][0] & 0x0FFF3FFF == 0x306C3
    assert seen[(0, 0)][0] == TABLE[(0, 0)][0]  # the max leaf stays the host's


@pytest.mark.parametrize("name", ["haswell", "skylake-server"])
def test_a_profiles_brand_string_arrives_whole(name: str) -> None:
    path = os.path.join(os.path.dirname(profiles.__file__), "profiles", f"{name}.json")
    with open(path) as f:
        brand = json.load(f)["brand"]
    pv = profiles.profile_view(profile_files.load_profile(name), TABLE, XCR0)
    seen = CpuidView.build(pv.mask, XCR0, identity=pv.identity).apply(TABLE)
    raw = b"".join(
        r.to_bytes(4, "little")
        for leaf in (0x80000002, 0x80000003, 0x80000004)
        for r in seen[(leaf, 0)]
    )
    assert raw.split(b"\0")[0].decode() == brand


def test_a_brand_string_longer_than_cpuid_holds_is_refused() -> None:
    text = json.dumps({"features": ["fpu"], "brand": "x" * 48})
    with pytest.raises(profiles.ProfileError, match="48 bytes; CPUID holds 47"):
        profiles.parse(text, "long")
    assert profiles.parse(json.dumps({"features": ["fpu"], "brand": "x" * 47}), "fits")


def test_bad_profiles_are_one_line(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = xcr0run(["--show", "--profile", str(bad)])
    assert result.returncode == 125 and len(result.stderr.splitlines()) == 1
    assert "not valid JSON" in result.stderr
    missing = xcr0run(["--show", "--profile", "no-such-machine"])
    assert "cannot read profile no-such-machine" in missing.stderr and "haswell" in missing.stderr


def test_hints_join_a_raw_environment_as_setenv_would() -> None:
    """The first entry of a name is the one getenv reads and setenv changes; entries a
    mapping cannot hold stay where they are."""
    raw = [b"NOEQUALS", b"=x", b"A=1", b"GLIBC_TUNABLES=a=\xff", b"A=2", b"\xff=\xfe"]
    env = envhints.as_mapping(raw)
    assert env == {"A": "1", "GLIBC_TUNABLES": "a=\udcff", "\udcff": "\udcfe"}
    merged = env["GLIBC_TUNABLES"] + ":b=2"  # a merge keeps the user's bytes
    out = envhints.with_values(raw, {"GLIBC_TUNABLES": merged, "NEW": "v"})
    assert out == [
        b"NOEQUALS", b"=x", b"A=1", b"GLIBC_TUNABLES=a=\xff:b=2", b"A=2", b"\xff=\xfe", b"NEW=v"
    ]  # fmt: skip
    assert raw[3] == b"GLIBC_TUNABLES=a=\xff"  # not changed in place

"""The CPUID feature table and its dependency graph."""

from __future__ import annotations

import pytest

from xcr0run import features


def test_graph_is_consistent() -> None:
    assert features.check_graph() == []


@pytest.mark.parametrize(
    ("root", "expected"),
    [
        (
            "avx",
            {"avx2", "fma", "f16c", "vaes", "vpclmulqdq", "avx_vnni", "avx512f", "fma4", "xop"},
        ),
        ("avx512f", {"avx512bw", "avx512vl", "avx512_fp16", "avx512_vbmi2", "avx10"}),
        ("amx_tile", {"amx_bf16", "amx_int8", "amx_fp16", "amx_complex"}),
        ("pku", {"ospke"}),
        ("sse2", {"sse3", "ssse3", "sse4_1", "sse4_2", "aes", "pclmulqdq"}),
        ("sse", {"sse2", "avx", "avx512f"}),
    ],
)
def test_hiding_a_feature_hides_what_needs_it(root: str, expected: set[str]) -> None:
    hidden = features.dependents([root])
    assert root in hidden
    assert expected <= hidden


def test_dependents_and_prerequisites_are_inverse() -> None:
    for f in features.FEATURES:
        for need in features.prerequisites([f.name]):
            assert f.name in features.dependents([need])


def test_aliases_resolve_to_canonical_names() -> None:
    assert features.feature("pni").name == "sse3"
    assert features.feature("sse4.1").name == "sse4_1"
    assert features.feature("AVX512F").name == "avx512f"
    with pytest.raises(KeyError):
        features.feature("avx513")


def test_psabi_levels_are_cumulative_and_known() -> None:
    levels = list(features.PSABI_LEVELS)
    assert levels == ["x86-64-v1", "x86-64-v2", "x86-64-v3", "x86-64-v4"]
    assert "avx512vl" in features.PSABI_LEVELS["x86-64-v4"]
    assert "avx2" not in features.PSABI_LEVELS["x86-64-v2"]


# Flags Linux derives from no single CPUID bit of the leaves we model (it makes them up
# from vendor, family or other leaves): arch/x86/include/asm/cpufeatures.h, words 3 and 8.
LINUX_SYNTHETIC = {
    "constant_tsc",
    "rep_good",
    "nopl",
    "xtopology",
    "nonstop_tsc",
    "cpuid",
    "extd_apicid",
    "tsc_known_freq",
    "vmmcall",
    "tsc_reliable",
    "nonstop_tsc_s3",
    "art",
    "arch_perfmon",
    "pebs",
    "bts",
    "amd_lbr_v2",
    "aperfmperf",
    "always_running_timer",
    "ibrs",
    "ibpb",
    "stibp",
    "ssbd",
    "ibrs_enhanced",
    "ring3mwait",
    "cpuid_fault",
    "epb",
    "cat_l3",
    "cdp_l3",
    "pti",
    "tpr_shadow",
    "flexpriority",
    "ept",
    "vpid",
    "ept_ad",
    "vnmi",
    "user_shstk",
    "decodeassists",
    "pausefilter",
    "pfthreshold",
    "v_vmsave_vmload",
    "vgif",
    "lbrv",
    "svm_lock",
    "nrip_save",
    "tsc_scale",
    "vmcb_clean",
    "flushbyasid",
    "avic",
    "v_spec_ctrl",
    "x2avic",
    "amd_ppin",
    "perfmon_v2",
    "cqm_llc",
    "cqm_occup_llc",
    "cqm_mbm_total",
    "cqm_mbm_local",
    "amd_ssbd",
    "virt_ssbd",
    "rapl",
    "hw_pstate",
    "proc_feedback",
    "sme",
    "sev",
    "sev_es",
    "sev_snp",
    "cpb",
}


def test_every_cpuinfo_flag_is_a_feature_or_known_synthetic() -> None:
    """Each flag Linux shows here maps to one of our features or is one Linux makes up."""
    known = {f.cpuinfo or f.name for f in features.FEATURES if f.cpuinfo != ""}
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    unexplained = sorted(fl for fl in flags if fl not in known and fl not in LINUX_SYNTHETIC)
    assert unexplained == []
    assert {"fpu", "sse", "sse2"} <= set(flags) & known

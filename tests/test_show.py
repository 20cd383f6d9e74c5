"""`xcr0run --show` against an independent C program and /proc/cpuinfo."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import xcr0run

ROOT = Path(__file__).parent.parent


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
    # Not under xcr0run here; tests/test_supervisor.py checks the other answer.
    assert shown["cpuid_faulting"]["enabled"] is False


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
    assert re.search(rf"^XCR0 +{shown['xcr0']} ", out, re.M)
    for word in ("CPUID faulting", "ARCH_SET_XCR0", "XSAVE area", "psABI level", "x87"):
        assert word in out
    assert "\x1b[" not in out  # no colour when not a terminal


# -- 80 columns ---------------------------------------------------------------------------

_STYLE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# The words a line of --show may start with; anything else is a wrapped line that lost
# its indentation.
_LINE_STARTS = re.compile(
    r"(XCR0|XINUSE|bit|\d+|XSAVE area|Kernel|CPUID faulting|ARCH_SET_XCR0|psABI level|Stop loop|CPU"
    r"|With|pid|tid) "
)


def _on_a_terminal(args: list[str], columns: int = 80) -> list[str]:
    """xcr0run's output on a pseudo-terminal `columns` wide (and COLUMNS set, as a shell
    would), without style codes."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child execs
        os.environ.update(COLUMNS=str(columns), LINES="50", PYTHONPATH=str(ROOT))
        os.execv(sys.executable, [sys.executable, "-m", "xcr0run", *args])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, b"".join(chunks)
    text = _STYLE.sub("", b"".join(chunks).decode())
    return text.replace("\r\n", "\n").split("\n")


def _check_80_columns(lines: list[str]) -> None:
    for line in lines:
        assert len(line) <= 80, line
        assert line == line.rstrip(), f"trailing blanks: {line!r}"
        assert not line or line.startswith(" ") or _LINE_STARTS.match(line), line


@pytest.mark.parametrize(
    "args",
    [
        ["--show"],
        ["--show", "--mask", "-avx"],
        ["--show", "--level", "x86-64-v2"],
        ["--show", "--force", "--profile", "haswell"],
    ],
)
def test_show_fits_80_columns_with_wrapped_lines_indented(args: list[str]) -> None:
    lines = _on_a_terminal(args)
    _check_80_columns(lines)
    assert lines[0].startswith("XCR0") and any(line.startswith("CPU ") for line in lines)
    if len(args) > 1:
        assert f"With {args[-2]} {args[-1]}" in lines


def test_show_pid_fits_80_columns() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        lines = _on_a_terminal(["--show", "-p", str(proc.pid)])
    finally:
        proc.kill()
        proc.wait()
    _check_80_columns(lines)
    assert lines[0].startswith(f"pid {proc.pid} sleep")


def test_piped_show_has_no_trailing_blanks() -> None:
    out = xcr0run(["--show", "--mask", "-avx"], check=True).stdout
    assert all(line == line.rstrip() for line in out.splitlines())


def test_help_fits_80_columns() -> None:
    out = xcr0run(["--help"], check=True, env={"COLUMNS": "80"}).stdout
    assert "Examples:" in out
    for line in out.splitlines():
        assert len(line) <= 80, line

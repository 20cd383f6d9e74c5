"""Under a masked view, with CPUID faulting: the program's signal state survives the
traps, its own use of ARCH_GET/SET_CPUID behaves as without xcr0run and cannot unmask
the view, and no path to CPUID (prefixed encodings, CLONE_UNTRACED) escapes it."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import xcr0run
from xcr0run import host, masks
from xcr0run.view import CpuidView

pytestmark = pytest.mark.faulting

XCR0 = host.xcr0()
MASK = "x87,sse" if XCR0 & 0b100 else "host"


def _masked_l7b(native_l7b: int) -> int:
    view = CpuidView.build(masks.parse_mask(MASK, XCR0), XCR0)
    return view.answer(7, 0, (0, native_l7b, 0, 0))[1]


def _l7b_values(text: str) -> list[int]:
    return [int(v, 16) for v in re.findall(r"l7b=(0x[0-9a-f]+)", text)]


def test_signal_state_survives_trapped_cpuid(cbuild) -> None:
    prog = cbuild("sigstate_trap.c", "-pthread")
    native = subprocess.run([prog], capture_output=True, text=True, timeout=60)
    under = xcr0run(["-q", "-m", MASK, "--", prog])
    assert native.returncode == 0, native.stderr
    assert (under.returncode, under.stdout) == (0, native.stdout), under.stderr


def test_the_programs_own_faulting_calls_behave_as_natively(cbuild) -> None:
    prog = cbuild("faulting_self.c")
    native = subprocess.run([prog], capture_output=True, text=True, timeout=60)
    under = xcr0run(["-q", "-m", MASK, "--", prog])
    assert under.returncode == native.returncode == 0, under.stderr
    # Everything but the view itself is the same, step by step...
    strip = re.compile(r"l7b=\S+")
    assert strip.sub("", under.stdout) == strip.sub("", native.stdout)
    assert "set 0: 0" in native.stdout and "si_code=0x80" in native.stdout
    # ...and switching faulting off and on again never showed the host's leaf 7.
    host_l7b = _l7b_values(native.stdout)[0]
    assert _l7b_values(under.stdout) == [_masked_l7b(host_l7b)] * 3


def test_no_path_to_cpuid_escapes_the_view(cbuild) -> None:
    prog = cbuild("cpuid_paths.c")
    native = subprocess.run([prog], capture_output=True, text=True, timeout=60)
    under = xcr0run(["-q", "-m", MASK, "--", prog])
    assert under.returncode == 0, under.stderr
    paths = dict(re.findall(r"^(\w+) l7b=(0x[0-9a-f]+)", under.stdout, re.M))
    assert set(paths) == {"plain", "opsize", "rep_rex", "segments", "untraced"}, under.stdout
    host_l7b = int(re.search(r"plain l7b=(0x[0-9a-f]+)", native.stdout).group(1), 16)  # type: ignore[union-attr]
    assert {int(v, 16) for v in paths.values()} == {_masked_l7b(host_l7b)}
    assert "untraced status=0" in under.stdout

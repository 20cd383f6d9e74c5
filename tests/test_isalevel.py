"""ISA-level markers (GNU property notes) read from real files, and the refusal."""

from __future__ import annotations

import subprocess

import pytest

from xcr0run import isalevel, launcher
from xcr0run.errors import UnsupportedError


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_interpreter_of_a_dynamic_program() -> None:
    assert isalevel.interpreter(_read("/bin/true")) == "/lib64/ld-linux-x86-64.so.2"


def test_marker_agrees_with_readelf(cbuild) -> None:
    path = cbuild("isa_v4.c", "-Wl,-z,x86-64-v4")
    notes = subprocess.run(["readelf", "-n", path], capture_output=True, text=True).stdout
    if "x86 ISA needed" not in notes:
        pytest.skip("this linker does not write ISA-level markers (binutils < 2.36)")
    assert "x86-64-v4" in notes
    assert isalevel.needed_level(_read(path)) == "x86-64-v4"


def test_unmarked_and_non_elf_files() -> None:
    assert isalevel.needed_level(b"#!/bin/sh\n") is None
    assert isalevel.interpreter(b"") is None


def test_refuses_a_view_below_what_the_program_needs(cbuild) -> None:
    path = cbuild("isa_v4.c", "-Wl,-z,x86-64-v4")
    if isalevel.needed_level(_read(path)) != "x86-64-v4":
        pytest.skip("no ISA-level marker written")
    with pytest.raises(UnsupportedError, match="needs x86-64-v4 but the view is x86-64-v3"):
        launcher.check_isa_level(path, "x86-64-v3")
    launcher.check_isa_level(path, "x86-64-v4")


def test_libc_needs_at_least_baseline() -> None:
    needs = launcher.isa_needs("/bin/true")
    if not needs:
        pytest.skip("this distribution's libc carries no ISA-level marker")
    with pytest.raises(UnsupportedError, match="CPU ISA level is lower than required"):
        launcher.check_isa_level("/bin/true", None)

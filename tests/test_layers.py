"""The three layers stay apart: pure modules import neither ctypes nor rich, and the
launch path does not import rich or psutil (start-up time)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DESIGN = Path(__file__).parent.parent / "docs" / "DESIGN.md"


def _pure_modules() -> list[str]:
    """The modules docs/DESIGN.md's layer diagram puts on the pure floor."""
    diagram = DESIGN.read_text().split("```")[1]
    floor = diagram.split("\npure", 1)[1]
    return re.findall(r"(\w+)\.py", floor)


PURE = _pure_modules()


def test_the_pure_floor_is_the_one_the_design_names() -> None:
    assert {"audit", "profiles", "envhints", "xsave", "view", "errors"} <= set(PURE)


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


def test_pure_modules_need_no_system_layer() -> None:
    loaded = _modules_after("; ".join(f"import xcr0run.{m}" for m in PURE))
    assert "ctypes" not in loaded
    assert "rich" not in loaded
    assert "xcr0run._native" not in loaded
    assert "xcr0run._core" not in loaded


def test_launching_does_not_import_rich_or_psutil() -> None:
    loaded = _modules_after("import xcr0run.cli, xcr0run.launcher, xcr0run.supervisor")
    assert "rich" not in loaded and "psutil" not in loaded


def test_only_the_native_modules_use_ctypes() -> None:
    """_native.py for system calls, _core.py for the compiled core (its own module, so
    nothing loads the library unless it supervises)."""
    import pathlib

    package = pathlib.Path(__file__).parent.parent / "xcr0run"
    users = sorted(p.name for p in package.glob("*.py") if "import ctypes" in p.read_text())
    assert users == ["_core.py", "_native.py"]

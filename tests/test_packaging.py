"""Every Python package of the source tree is in the wheel: the user's top-level folders install under their own
names (one module <-> file rule for the code hash, import contracts and tools), found by pyproject's `include`
patterns, so a new stage folder needs no entry."""

from __future__ import annotations

import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_found_by_pyproject():
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    listed = {Path(*name.split(".")) for name in find_packages(str(ROOT), include=find["include"])}
    found = {init.parent.relative_to(ROOT) for top in ("v3flow", "flows", "stages")
             for init in (ROOT / top).rglob("__init__.py")}
    assert found and found <= listed, f"packages missing from the wheel: {sorted(map(str, found - listed))}"

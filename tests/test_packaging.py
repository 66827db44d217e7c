"""Every Python package of the source tree is in the wheel (pyproject lists them explicitly, because
flows/ and stages/ install under v3flow.*): a missing entry breaks only non-editable installs."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = {Path(tool["package-dir"].get(name, name.replace(".", "/"))) for name in tool["packages"]}
    found = {init.parent.relative_to(ROOT) for top in ("v3flow", "flows", "stages")
             for init in (ROOT / top).rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(map(str, found - listed))}"

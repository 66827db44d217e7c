"""Where code may import from, checked with import-linter against the contracts in pyproject.toml: a stage imports
only the library (never another stage, never flows/); the model, tasks, training and evaluation never import
stages or flows/; Prefect lives in flows/ and MLflow behind v3flow.tracking."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = ("stages-independent", "stages-not-flows", "core-not-pipeline", "prefect-in-flows",
             "mlflow-behind-tracking")


def lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports on the tree at `root` (its packages first on the path, ahead of the installed ones)."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(root)})


def test_the_import_contracts_hold():
    run = lint(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken" in run.stdout


BREAKS = [  # (module, a line that breaks a contract there, the contract's name)
    ("stages/extend/__init__.py", "from stages.pack import packing", "A stage never imports another stage"),
    ("stages/sft/trainer.py", "def f():\n    from flows.recipe import STAGES", "Stages never import flows/"),
    ("v3flow/training/loop.py", "import stages.data", "never import stages or flows/"),
    ("stages/data/report.py", "import prefect", "Prefect only in flows/"),
    ("v3flow/registry.py", "import mlflow", "MLflow only behind v3flow.tracking"),
]


def test_a_forbidden_import_breaks_its_contract(tmp_path):
    """Each contract, broken once in a scratch copy of the tree, is reported broken (and only those)."""
    for name in ("v3flow", "stages", "flows"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for module, line, _ in BREAKS:
        path = tmp_path / module
        path.write_text(path.read_text() + f"\n\n{line}\n")
    run = lint(tmp_path)
    assert run.returncode != 0, run.stdout + run.stderr
    for _, _, contract in BREAKS:
        assert any(contract in line and "BROKEN" in line for line in run.stdout.splitlines()), (contract, run.stdout)
    assert f"Contracts: 0 kept, {len(CONTRACTS)} broken" in run.stdout

"""The one-way house: pyproject's import-linter layers contract holds, and it can fail.

`lint-imports` (import-linter) checks that every module of advface_fast imports only what stands
below it; .ci/run runs it too. The second test plants an upward import in a copy of the package and
requires the contract to break on exactly that line, so a contract that checks nothing cannot pass.
kernels/ ships as advface_fast.kernels from outside the package folder, where import-linter does not
look: the third test keeps it a leaf (it imports nothing of the library)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import need_module

REPO = Path(__file__).resolve().parents[1]


def lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    need_module("importlinter", "pip install import-linter (the test extra has it)")
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, str(cwd / "pyproject.toml"), "--no-cache", "--no-logo"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_layers_contract_is_kept():
    r = lint_imports(REPO, REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "1 kept, 0 broken" in r.stdout


def test_an_upward_import_breaks_the_contract_with_its_line(tmp_path):
    shutil.copytree(REPO / "advface_fast", tmp_path / "advface_fast",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    metrics = tmp_path / "advface_fast" / "metrics.py"
    # metrics (the LFW protocol) sits near the ground; the experiments stand far above it.
    metrics.write_text(metrics.read_text() + "\n\ndef _upward():\n    from .experiments import table1  # planted\n")
    r = lint_imports(tmp_path, tmp_path)
    assert r.returncode != 0, r.stdout[-3000:]
    assert "BROKEN" in r.stdout
    assert "advface_fast.metrics -> advface_fast.experiments.table1" in r.stdout, r.stdout[-3000:]


def test_kernels_import_nothing_of_the_library():
    for path in sorted((REPO / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name}:{node.lineno}: relative import above kernels/"
                assert not (node.module or "").startswith("advface_fast"), f"{path.name}:{node.lineno}: {node.module}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("advface_fast"), f"{path.name}:{node.lineno}: {alias.name}"

"""CI mode (conftest.py): with CI=true a missing test-data folder fails the run, loudly, instead of
skipping the tests that need it; without CI=true those tests are skipped. Checked on one real
data-needing test, run by pytest in a fresh process against an empty data folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_TEST = "tests/test_data.py::test_lfw_ci_counts_and_checksums"  # needs lfw_ci (the lfw_ci fixture)


def run_data_test(data_root: Path, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env.update(ADVFACE_TEST_DATA=str(data_root), OMP_NUM_THREADS="1")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", DATA_TEST], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def test_missing_data_fails_in_ci_mode_and_is_skipped_otherwise(tmp_path):
    empty = tmp_path / "no-data-here"
    empty.mkdir()
    ci = run_data_test(empty, "true")
    output = ci.stdout + ci.stderr
    assert ci.returncode == 1 and "1 error" in output, output[-3000:]
    assert f"test data not found at {empty / 'lfw_ci'}" in output and "CI=true" in output, output[-3000:]
    local = run_data_test(empty, None)
    output = local.stdout + local.stderr
    assert local.returncode == 0 and local.stdout.strip().splitlines()[-1].startswith("1 skipped in"), output[-3000:]
    assert f"test data not found at {empty / 'lfw_ci'}" in output, output[-3000:]  # -ra names the reason

"""Shared fixtures: where the test data lives, and a private cache root per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Tests read LFW from the data folder beside the repository unless ADVFACE_TEST_DATA says otherwise.
DATA_ROOT = Path(os.environ.get("ADVFACE_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))
LFW_CI = DATA_ROOT / "lfw_ci"
LFW_FULL = DATA_ROOT / "lfw"


@pytest.fixture(scope="session")
def lfw_ci() -> Path:
    if not (LFW_CI / "pairs.txt").exists():
        pytest.skip(f"lfw_ci test data not found at {LFW_CI}")
    return LFW_CI


@pytest.fixture(scope="session")
def lfw_full() -> Path:
    if not (LFW_FULL / "pairs.txt").exists():
        pytest.skip(f"full LFW not found at {LFW_FULL}")
    return LFW_FULL

"""Run a snippet under Triton's CPU interpreter in a fresh process (TRITON_INTERPRET=1 must be set
before triton is first imported), against this checkout's ``kernels/`` when it has the op's file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_interpreted(code: str, op_file: str) -> None:
    """Runs ``code`` (which must print ``ok`` last) with ``advface_fast.kernels`` read from the repository's
    ``kernels/`` where it holds ``op_file``; fails with the snippet's stderr otherwise."""
    pytest.importorskip("triton")
    import advface_fast.kernels as kernels

    prefix = "import sys, torch; import advface_fast.kernels as k; k.__path__[:0] = sys.argv[1:2]\n"
    here = str(Path(kernels.__file__).parent)
    mine = str(Path(__file__).resolve().parents[1] / "kernels")
    result = subprocess.run([sys.executable, "-c", prefix + code, mine if Path(mine, op_file).exists() else here],
                            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]

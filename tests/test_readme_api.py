"""The README's Python API example runs as written: as a plain script (no `if __name__ == "__main__":`
guard), in a fresh interpreter, with a cold chip cache (so alignment really starts), on lfw_ci."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def api_example() -> str:
    """The ```python blocks of the README's "Python API" section, joined."""
    text = (REPO / "README.md").read_text()
    section = re.search(r"^## Python API\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README has no '## Python API' section"
    blocks = re.findall(r"```python\n(.*?)```", section.group(1), re.S)
    assert blocks, "the Python API section has no ```python block"
    return "\n".join(blocks)


def test_readme_api_example_runs_as_a_plain_script(lfw_ci, tmp_path):
    code = api_example()
    assert "path/to/lfw" in code and "__main__" not in code
    script = tmp_path / "example.py"
    # Only the data changes: lfw_ci for the path, and Table 1 on 4 pairs of its fold (the example's
    # 20 would attack for a minute and test nothing more).
    script.write_text(code.replace("path/to/lfw", str(lfw_ci)).replace("Table1Config(", "Table1Config(max_pairs=4, "))
    env = dict(os.environ, ADVFACE_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("ADVFACE_LFW", None)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "BrokenProcessPool" not in result.stderr
    assert (tmp_path / "runs" / "verify" / "verify.json").is_file()

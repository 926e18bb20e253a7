"""Results files are written atomically (advface_fast.fileio): a write that dies halfway leaves the
previous file whole and no temporary file behind."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def die_halfway(monkeypatch):
    """Every Path.write_bytes / write_text writes half its bytes, then fails (a full disk, a kill)."""
    def write_bytes(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    monkeypatch.setattr(Path, "write_text", lambda self, text, *a, **k: write_bytes(self, text.encode()))


def test_benchmark_results_are_written_atomically(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import write_json

    out = tmp_path / "results" / "r.json"
    write_json({"run": 1}, out)
    die_halfway(monkeypatch)
    with pytest.raises(OSError):
        write_json({"run": 2, "rows": ["x" * 100] * 10}, out)
    monkeypatch.undo()
    assert json.loads(out.read_text()) == {"run": 1} and [p.name for p in out.parent.iterdir()] == ["r.json"]


def test_bench_report_is_written_atomically(tmp_path, monkeypatch):
    from advface_fast.bench import cli

    out = tmp_path / "bench.json"
    out.write_text('{"old": true}\n')
    monkeypatch.setattr(cli, "run_benchmarks", lambda cfg, log: {"rows": [{"status": "ok", "x": "y" * 500}]})
    monkeypatch.setattr(cli, "format_table", lambda report: "table")
    die_halfway(monkeypatch)
    with pytest.raises(OSError):
        cli.main(["--synthetic", "--quick", "--out", str(out)])
    monkeypatch.undo()
    assert json.loads(out.read_text()) == {"old": True} and [p.name for p in tmp_path.iterdir()] == ["bench.json"]


def test_verify_json_is_written_atomically(lfw_ci, tmp_path, monkeypatch):
    from advface_fast.experiments.verification import run_verify

    (tmp_path / "verify.json").write_text('{"old": true}\n')
    die_halfway(monkeypatch)
    with pytest.raises(OSError):
        run_verify(lfw_ci, folds=[1], out_dir=tmp_path, workers=1, engine="torch", progress=False)
    monkeypatch.undo()
    assert json.loads((tmp_path / "verify.json").read_text()) == {"old": True}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

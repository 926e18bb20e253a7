"""benchmarks/worst_case_union.py: an entry's per-pair worst case over the rows of several runs' ledgers,
against a plain count."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from advface_fast.experiments.leaderboard_rows import SCHEME
from advface_fast.store import Entry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from worst_case_union import main, union  # noqa: E402

IDS = ["A/A_1|A/A_2", "B/B_1|B/B_3", "A/A_1|C/C_2", "D/D_4|E/E_1"]  # two matched, two mismatched


def write_row(ledger, row, correct, attack, thresholds=None, ids=IDS, model="m", defense="d", steps=20):
    config = {"model": model, "defense": defense, "row": row, "thresholds": thresholds or {"1": 0.5},
              "protocol": {"adaptive_steps": steps}, **({"attack": attack} if attack is not None else {})}
    Entry(ledger, config, kind=SCHEME).append(ids, {"correct": np.array(correct, dtype=bool)})


def test_the_union_is_the_per_pair_worst_case_over_every_distinct_attack(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    write_row(a, "clean", [1, 1, 1, 1], None)  # not an attack: left out
    write_row(a, "pgd", [1, 0, 1, 1], {"name": "pgd", "steps": 20})
    write_row(a, "square", [1, 1], {"name": "square"}, ids=IDS[:2])  # a subset of the pairs
    write_row(b, "pgd", [1, 0, 1, 1], {"name": "pgd", "steps": 20}, steps=40)  # the same attack, another run
    write_row(b, "pgd-40", [1, 1, 0, 1], {"name": "pgd", "steps": 40}, steps=40)
    write_row(b, "pgd", [0, 0, 0, 0], {"name": "pgd", "steps": 20}, model="other")  # another entry
    result = union([a, b], "m", "d")
    right = np.array([1, 0, 0, 1], dtype=bool)  # the plain count: right under pgd, square and pgd-40
    assert result["worst_case"] == right.mean() and result["pairs"] == 4 and result["matched"] == 2
    assert result["dodging"] == 0.5 and result["impersonation"] == 0.5
    assert sorted(r["row"] for r in result["rows"]) == ["pgd", "pgd-40", "square"]
    out = tmp_path / "union.json"
    assert main(["--rows", str(a), str(b), "--model", "m", "--defense", "d", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["worst_case"] == 0.5 and "worst case over 3 rows: 50.0%" in capsys.readouterr().out


def test_rows_under_other_thresholds_or_none_at_all_stop_it(tmp_path):
    write_row(tmp_path / "a", "pgd", [1, 1, 1, 1], {"name": "pgd"})
    write_row(tmp_path / "b", "pgd-40", [1, 1, 1, 1], {"name": "pgd", "steps": 40}, thresholds={"1": 0.6})
    with pytest.raises(SystemExit, match="thresholds"):
        union([tmp_path / "a", tmp_path / "b"], "m", "d")
    with pytest.raises(SystemExit, match="no rows"):
        union([tmp_path / "a"], "m", "other")

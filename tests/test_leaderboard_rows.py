"""The row ledger: a row computed in pieces (interrupted, resumed) equals one computed at once, and
only the missing pairs are computed again."""

from __future__ import annotations

import numpy as np
import pytest

from advface_fast.experiments.leaderboard_rows import RowLedger, diagnostic_fields, diagnostics_in
from advface_fast.experiments.runner import Selection


def selection(n: int) -> Selection:
    idx = np.arange(n)
    return Selection(index=idx, same=idx % 2 == 0, folds=np.ones(n, dtype=int), pair_ids=[f"q{i}|g{i}" for i in idx],
                     query_rows=2 * idx, gallery_rows=2 * idx + 1)


def outcome_of(part: Selection) -> dict:
    """A pure function of each pair (as a row's per-pair seeds make it)."""
    sim = np.array([np.sin(1.0 + int(p.split("|")[0][1:])) for p in part.pair_ids])
    return {"similarity": sim, "correct": (sim > 0) == part.same, "seconds": np.full(len(part), 0.5),
            "image_steps": np.full(len(part), 20.0), **diagnostic_fields({"tau": sim ** 2})}


class Interrupted(Exception):
    pass


def test_a_row_in_pieces_equals_the_row_at_once(tmp_path):
    sel, identity = selection(23), {"model": "m", "protocol": {"eps": 4.0}}
    whole = RowLedger(None, identity).outcome("square", sel, outcome_of, chunk=5)
    calls = []

    def dies_on_the_third_piece(part):
        calls.append(part.pair_ids)
        if len(calls) == 3:
            raise Interrupted
        return outcome_of(part)

    with pytest.raises(Interrupted):
        RowLedger(tmp_path, identity).outcome("square", sel, dies_on_the_third_piece, chunk=5)
    calls.clear()
    ledger = RowLedger(tmp_path, identity)
    resumed = ledger.outcome("square", sel, lambda p: calls.append(p.pair_ids) or outcome_of(p), chunk=5)
    assert [pid for c in calls for pid in c] == sel.pair_ids[10:]  # the two finished pieces are not redone
    assert ledger.read_back == ["square (10 of 23 pairs)"]
    assert set(resumed) == set(whole) and all(np.array_equal(resumed[k], whole[k]) for k in whole)
    assert diagnostics_in(resumed) == {"tau": pytest.approx(whole["diag:tau"])}
    assert len(list(tmp_path.rglob("chunk-*.npz"))) == 1  # compacted once the row is whole
    again = RowLedger(tmp_path, identity)  # a finished row: nothing computed, in the selection's order
    part = sel.take([7, 2, 19])
    got = again.outcome("square", part, lambda p: pytest.fail("recomputed"))
    assert again.read_back == ["square"] and np.array_equal(got["similarity"], whole["similarity"][[7, 2, 19]])
    other = RowLedger(tmp_path, {**identity, "protocol": {"eps": 8.0}})  # another config: its own rows
    other.outcome("square", part, outcome_of)
    other.outcome("square", part, outcome_of, key={"attack": {"precision": "bf16"}})  # another attack: its own
    assert other.read_back == []
    other.outcome("square", part, outcome_of, key={"attack": {"precision": "bf16"}})
    assert other.read_back == ["square"]

"""The experiment runner on lfw_ci with a tiny model: attacked queries cached per pair id,
resume after an interruption, shared rows across selections, damage reported, fixed thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from advface_fast.attacks import make_attack
from advface_fast.experiments.runner import ModelVerifier, Runner
from advface_fast.pair_chips import prepare_pairs


@pytest.fixture(scope="module")
def pairs(lfw_ci):
    return prepare_pairs(lfw_ci, workers=1, progress=False)


def setup(pairs, tiny, root, batch_size=4):
    runner = Runner(pairs, cache_dir=root, batch_size=batch_size, progress=False)
    return runner, runner.calibrate(ModelVerifier(tiny, "tiny"))


class Killed(Exception):
    """Stands for the process dying mid-run."""


def counting(attack, fail_at=None):
    """Record the batch size of every perturb call; raise Killed at call `fail_at`."""
    real, sizes = attack.perturb, []

    def perturb(x0, *args, **kwargs):
        if fail_at is not None and len(sizes) + 1 == fail_at:
            raise Killed
        sizes.append(len(x0))
        return real(x0, *args, **kwargs)

    attack.perturb = perturb
    return sizes


def pgd(tiny):
    return make_attack("pgd", tiny, eps=8, steps=2, seed=0)


def test_an_interrupted_run_resumed_equals_an_uninterrupted_one(pairs, tiny, tmp_path):
    runner, cal = setup(pairs, tiny, tmp_path / "a")
    sel = runner.select((1, 2), 12)
    attack = pgd(tiny)
    sizes = counting(attack, fail_at=3)
    with pytest.raises(Killed):
        runner.attack_queries(attack, cal, sel, tiny)
    assert sizes == [4, 4]
    sizes = counting(attack := pgd(tiny))
    resumed = runner.attack_queries(attack, cal, sel, tiny)
    assert sizes == [4]  # only the missing batch was computed

    other, other_cal = setup(pairs, tiny, tmp_path / "b")
    whole = other.attack_queries(pgd(tiny), other_cal, other.select((1, 2), 12), tiny)
    np.testing.assert_array_equal(resumed.delta, whole.delta)
    np.testing.assert_array_equal(resumed.embeddings, whole.embeddings)
    assert resumed.image_steps == whole.image_steps == 12 * 2
    assert np.abs(resumed.delta).max() <= 8 and np.abs(resumed.delta).max() > 0


def test_two_selections_sharing_pairs_share_cached_rows(pairs, tiny, tmp_path):
    runner, cal = setup(pairs, tiny, tmp_path)
    small, big = runner.select((1,), 4), runner.select((1,), 8)
    assert set(small.pair_ids) < set(big.pair_ids)
    attack = pgd(tiny)
    sizes = counting(attack)
    first = runner.attack_queries(attack, cal, small, tiny)
    second = runner.attack_queries(attack, cal, big, tiny)
    assert sum(sizes) == 8  # 4 pairs, then only the 4 new ones
    pos = [big.pair_ids.index(p) for p in small.pair_ids]
    np.testing.assert_array_equal(second.delta[pos], first.delta)
    assert first.image_steps == 4 * 2 and second.image_steps == 8 * 2  # each selection's own cost
    # A different attack config is a different entry.
    sizes2 = counting(other := make_attack("pgd", tiny, eps=4, steps=2, seed=0))
    runner.attack_queries(other, cal, small, tiny)
    assert sum(sizes2) == 4


def test_a_damaged_row_chunk_warns_and_is_recomputed_not_trusted(pairs, tiny, tmp_path):
    runner, cal = setup(pairs, tiny, tmp_path)
    sel = runner.select((1,), 8)
    good = runner.attack_queries(pgd(tiny), cal, sel, tiny)
    entry_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    (path,) = sorted(entry_dir.glob("chunk-*.npz"))  # compacted into one after the run
    path.write_bytes(path.read_bytes()[:-100])
    attack = pgd(tiny)
    sizes = counting(attack)
    with pytest.warns(RuntimeWarning, match="damaged store file"):
        again = runner.attack_queries(attack, cal, sel, tiny)
    assert sum(sizes) == 8  # every pair of the damaged chunk was computed again
    np.testing.assert_array_equal(again.delta, good.delta)


def test_rows_are_judged_with_fixed_clean_thresholds(pairs, tiny, tmp_path):
    runner, cal = setup(pairs, tiny, tmp_path)
    sel = runner.select((1, 2), 12)
    queries = runner.attack_queries(pgd(tiny), cal, sel, tiny)
    emb = runner.query_embeddings(cal, sel, queries)
    # The stored decision embeddings are the verifier's own embeddings of the attacked chips.
    images = queries.images(pairs.chips.chips[sel.query_rows])
    np.testing.assert_allclose(emb, ModelVerifier(tiny).embed(images, sel.pair_ids), atol=1e-5)
    sim = runner.similarity(cal, sel, emb)
    acc = runner.judge(cal, sel, sim)
    thr = cal.similarity_thresholds(sel.folds)
    assert acc.accuracy_mean == pytest.approx(np.mean([np.mean((sim > thr)[sel.folds == f] == sel.same[sel.folds == f])
                                                       for f in np.unique(sel.folds)]))
    # The thresholds do not move with the attacked scores.
    assert cal.thresholds == runner.calibrate(ModelVerifier(tiny, "tiny")).thresholds


def test_weights_id_names_the_weights_of_any_model():
    import torch
    from torch import nn

    from advface_fast.models.identity import weights_id

    torch.manual_seed(0)
    a = nn.Linear(3, 2)
    b = nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert weights_id(a) == weights_id(b) and len(weights_id(a)) == 64
    before = weights_id(a)
    with torch.no_grad():
        a.weight[0, 0] += 1  # an in-place update (what an optimiser does) invalidates the memo
    assert weights_id(a) != before
    assert weights_id(a.to(torch.bfloat16)) != weights_id(b)  # dtype is part of the identity
    # The row cache keys by it: a model with other weights gets another entry.
    assert ModelVerifier(b, "m").config() != ModelVerifier(nn.Linear(3, 2), "m").config()

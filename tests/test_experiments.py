"""The experiment runner on lfw_ci with a tiny model: attacked queries cached per pair id,
resume after an interruption, shared rows across selections, damage reported, fixed thresholds."""

from __future__ import annotations

from pathlib import Path

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


def test_a_warm_started_attack_begins_at_its_start_queries_and_is_its_own_entry(pairs, tiny, tmp_path):
    runner, cal = setup(pairs, tiny, tmp_path)
    sel = runner.select((1,), 8)
    first = runner.attack_queries(pgd(tiny), cal, sel, tiny)
    zero = make_attack("pgd", tiny, eps=8, steps=0, seed=5)  # no steps: the delivered queries ARE the start
    sizes = counting(zero)
    cold = runner.attack_queries(zero, cal, sel, tiny)
    warm = runner.attack_queries(zero, cal, sel, tiny, start=first)
    assert sum(sizes) == 16  # the warm-started attack was computed, not read from the cold one's entry
    np.testing.assert_array_equal(warm.delta, first.delta)
    assert not np.array_equal(cold.delta, first.delta) and warm.key != cold.key
    again = runner.attack_queries(zero, cal, sel, tiny, start=first)  # cached under the start's key
    assert sum(sizes) == 16 and again.key == warm.key
    with pytest.raises(ValueError, match="cover 4 pairs"):
        runner.attack_queries(zero, cal, sel, tiny, start=runner.attack_queries(pgd(tiny), cal, runner.select((1,), 4), tiny))


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


# --- advface paper: the "Adversarial training and cost" section -------------------------------------

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks/results"
AT_RUNS = [RESULTS / "advtrain_cpu_finetune" / m for m in ("clean", "fgsm-rs", "pgd")]


def test_paper_cost_section_not_run_shows_the_command():
    from advface_fast.experiments.report import cost_section

    text = "\n".join(cost_section(None))
    assert "## Adversarial training and cost" in text and "Not run" in text
    assert "--train-runs" in text and "advface cost --train" in text


def test_paper_takes_train_runs_and_keeps_the_defense_options():
    from advface_fast.cli import build_parser
    from advface_fast.experiments.cli import cmd_defend, cmd_paper

    parse = build_parser().parse_args
    args = parse(["paper", "--train-runs", "runs/clean", "runs/pgd", "--eot-redraw", "fixed", "--out", "x"])
    assert args.train_runs == ["runs/clean", "runs/pgd"] and args.func is cmd_paper and args.eot_redraw == "fixed"
    assert parse(["paper", "--out", "x"]).train_runs is None
    args = parse(["defend", "--adaptive", "--eot-redraw", "fixed"])
    assert args.func is cmd_defend and args.adaptive and args.eot_redraw == "fixed"


def test_paper_rejects_a_missing_train_run_before_any_work(tmp_path):
    from advface_fast.experiments.report import PaperConfig, run_paper

    with pytest.raises(FileNotFoundError, match="train.json"):
        run_paper(tmp_path / "no-lfw", PaperConfig(train_runs=(str(tmp_path / "nowhere"),)), out_dir=tmp_path / "out",
                  progress=False)
    assert not (tmp_path / "out").exists()


def test_paper_with_train_runs_writes_the_cost_section(lfw_ci, pairs, tiny, tmp_path, monkeypatch):
    import json

    from advface_fast.experiments.report import PaperConfig, run_paper

    monkeypatch.setenv("ADVFACE_HOME", str(tmp_path / "home"))
    cfg = PaperConfig(folds=(1, 2), max_pairs=8, steps=2, eps=(4.0,), defense_steps=(1, 2), precision="fp32",
                      batch_size=8, defenses=("pgd", "fgsm"), attacks=("fgsm", "pgd"),
                      adaptive_options=dict(steps=(2,), eot=(1,), copy_steps=(None,), kappas=(0.1,),
                                            hc_eps_factors=(1.0,), sweep_pairs=4),
                      train_runs=tuple(str(p) for p in AT_RUNS))
    report = run_paper(lfw_ci, cfg, out_dir=tmp_path / "p", progress=False, net=tiny, pairs=pairs)
    worst = next(w["accuracy"] for a in report["defend"]["adaptive"] for w in a["worst_case"]
                 if w["pairs"] == "all pairs" and w["defense_steps"] == 1)
    d1 = next(d for d in report["cost"]["defense"] if d["defense"] == "pgd" and d["defense_steps"] == 1)
    assert d1["adaptive_accuracy"] == worst and d1["files"] == ["defend/defend.json"]
    text = (tmp_path / "p" / "REPORT.md").read_text()
    section = text.split("## Adversarial training and cost")[1].split("## Parameters")[0]
    assert "Not run" not in section and "Break-even" in section and "cost/accuracy_vs_compute.png" in section
    assert (tmp_path / "p" / "cost" / "accuracy_vs_compute.png").stat().st_size > 0
    saved = json.loads((tmp_path / "p" / "paper.json").read_text())
    assert str(RESULTS.parents[1]) not in json.dumps(saved["config"]) + json.dumps(saved["cost"])

"""Table 1 end to end on lfw_ci: fixed clean thresholds, the rows, outputs, resume from the row cache."""

from __future__ import annotations

import json

import pytest

from advface_fast.cli import main
from advface_fast.experiments.table1 import Table1Config, run_table1


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("advface-home")


@pytest.fixture(scope="module")
def small_cfg():
    return Table1Config(attacks=("fgsm", "pgd"), eps=(2, 8), steps=(3,), folds=(1, 2), max_pairs=8,
                        batch_size=8, seed=0)


@pytest.fixture(scope="module")
def report(lfw_ci, home, small_cfg, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("ADVFACE_HOME", str(home))
    out = tmp_path_factory.mktemp("table1")
    try:
        rep = run_table1(lfw_ci, small_cfg, out_dir=out, workers=1, progress=False)
    finally:
        mp.undo()
    rep["_out"] = out
    return rep


def rows_by(report):
    return {(r["attack"], r["eps"]): r for r in report["rows"]}


def test_rows_and_outputs(report):
    rows = rows_by(report)
    assert set(rows) == {("clean", 0), ("fgsm", 2), ("fgsm", 8), ("pgd", 2), ("pgd", 8), ("noise", 2), ("noise", 8)}
    assert report["n_pairs"] == 8 and all(r["n_pairs"] == 8 for r in report["rows"])
    out = report["_out"]
    for name in ("table1.json", "table1.md", "accuracy_vs_eps.png", "examples.png"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "table1.json").read_text())
    assert saved["thresholds"]["fitted_on"].startswith("clean data")
    assert rows[("pgd", 8)]["params"]["steps"] == 3 and rows[("pgd", 8)]["image_steps_per_s"] > 0
    assert rows[("clean", 0)]["paper_accuracy"] == 99.3


def test_attacks_hurt_noise_does_not(report):
    rows = rows_by(report)
    clean = rows[("clean", 0)]["accuracy_mean"]
    assert clean >= 0.85
    # PGD at eps 8 breaks nearly every pair; more eps never helps the defender.
    assert rows[("pgd", 8)]["accuracy_mean"] <= 0.25
    assert rows[("pgd", 8)]["accuracy_mean"] <= rows[("pgd", 2)]["accuracy_mean"] <= clean
    assert rows[("pgd", 8)]["mean_shift"] > rows[("pgd", 2)]["mean_shift"] > 0
    # Random noise at the same budget barely moves anything.
    for eps in (2, 8):
        assert rows[("noise", eps)]["accuracy_mean"] >= clean - 0.13
        assert abs(rows[("noise", eps)]["mean_shift"]) < 0.1 * rows[("pgd", eps)]["mean_shift"] + 1e-3


def test_rerun_resumes_from_the_row_cache(report, lfw_ci, home, small_cfg, monkeypatch):
    monkeypatch.setenv("ADVFACE_HOME", str(home))
    import advface_fast.experiments.table1 as table1

    def no_attacks(*args, **kwargs):
        attack = real_make_attack(*args, **kwargs)
        attack.perturb = lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed a cached row"))
        return attack

    real_make_attack = table1.make_attack
    monkeypatch.setattr(table1, "make_attack", no_attacks)
    again = run_table1(lfw_ci, small_cfg, workers=1, progress=False)
    for a, b in zip(report["rows"], again["rows"]):
        assert a["accuracy_mean"] == b["accuracy_mean"] and a["mean_shift"] == b["mean_shift"]


def test_cli_attack_rejects_unknown_attack(lfw_ci, capsys):
    assert main(["attack", "--lfw", str(lfw_ci), "--attacks", "pgd,bogus", "--quiet"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_rows_equal_a_plain_reference_computation(report, lfw_ci, home, small_cfg, monkeypatch):
    """The runner (store, selection, thresholds, judging) against the simplest loop that computes
    the same thing: clean k-fold thresholds, every selected pair attacked in one batch, fp32 scores."""
    import numpy as np
    import torch

    from advface_fast.attacks import make_attack
    from advface_fast.engine import chips_to_tensor, embed_chips
    from advface_fast.models import create_model
    from advface_fast.pair_chips import prepare_pairs
    from advface_fast.seeds import derive_seed
    from advface_fast.metrics import accuracy_with_thresholds, evaluate_embeddings

    monkeypatch.setenv("ADVFACE_HOME", str(home))
    pairs = prepare_pairs(lfw_ci, workers=1, progress=False)
    net = create_model("dlib-resnet")
    emb = embed_chips(net, pairs.chips.chips)
    thr = evaluate_embeddings(emb[pairs.query], emb[pairs.gallery], pairs.same, pairs.folds).threshold_map()
    chosen = [i for i in range(len(pairs)) if pairs.folds[i] in small_cfg.folds]
    sel = sorted([i for i in chosen if pairs.same[i]][:4] + [i for i in chosen if not pairs.same[i]][:4])
    same, folds = pairs.same[sel], pairs.folds[sel]
    gallery = torch.from_numpy(emb[pairs.gallery[sel]])
    seeds = [derive_seed(small_cfg.seed, f"{pairs.dataset.pairs[i].a}|{pairs.dataset.pairs[i].b}") for i in sel]

    def cosine(q):
        return torch.nn.functional.cosine_similarity(q, gallery, dim=1).double().numpy()

    clean = cosine(torch.from_numpy(emb[pairs.query[sel]]))
    goal = np.where(same, -1.0, 1.0)
    rows = rows_by(report)
    for name, eps in [("fgsm", 2), ("fgsm", 8), ("pgd", 2), ("pgd", 8), ("noise", 8)]:
        options = {"steps": 3} if name == "pgd" else {}
        if name != "noise":
            options["precision"] = "fp32"
        attack = make_attack(name, net, eps=eps, seed=small_cfg.seed, **options)
        x = attack(chips_to_tensor(pairs.chips.chips[pairs.query[sel]]), gallery, torch.from_numpy(same),
                   torch.tensor([thr[f] for f in folds], dtype=torch.float32), sample_seeds=seeds)
        with torch.no_grad():
            sim = cosine(net(x).float())
        acc = accuracy_with_thresholds(sim, same, folds, thr)
        row = rows[(name, eps)]
        assert row["fold_accuracies"] == list(acc.fold_accuracies), name
        assert row["accuracy_mean"] == acc.accuracy_mean
        assert row["mean_shift"] == pytest.approx(float(np.mean(goal * (sim - clean))), abs=1e-6)

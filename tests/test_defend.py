"""Tables 2-4 and the adaptive evaluation on lfw_ci with a tiny model and few steps: every row
type, the defended-embedding store (once per image, batch invariant), the threshold rule (fitted
on clean defended pairs, never refit), the per-pair worst case, resume with no work, eval mode."""

from __future__ import annotations

import json

import numpy as np
import pytest

from advface_fast.cli import main
from advface_fast.experiments.defended import DefendedStore
from advface_fast.experiments.defense_context import DefendConfig, build_defense, calibrate_defense, make_context
from advface_fast.experiments.defense_tables import run_defend
from advface_fast.experiments.report import PaperConfig, run_paper
from advface_fast.pair_chips import prepare_pairs
from advface_fast.metrics import accuracy_with_thresholds, evaluate_embeddings, fit_threshold

ADAPTIVE = dict(steps=(3,), eot=(1, 2), copy_steps=(1, None), kappas=(0.1,), hc_eps_factors=(1.0,), sweep_pairs=4)


@pytest.fixture(scope="module")
def pairs(lfw_ci):
    return prepare_pairs(lfw_ci, workers=1, progress=False)


def small_cfg(**kw) -> DefendConfig:
    base = dict(defenses=("pgd", "fgsm"), defense_steps=(2, 4), attacks=("fgsm", "pgd"), eps=(4.0,), attack_steps=3,
                folds=(1, 2), max_pairs=8, precision="fp32", batch_size=8, defense_batch_size=8, adaptive=True,
                adaptive_options=ADAPTIVE)
    return DefendConfig(**{**base, **kw})


def context(pairs, tiny, root, cfg):
    return make_context(None, cfg, cache_dir=root / "attacks", defended_dir=root / "defended", progress=False,
                        pairs=pairs, net=tiny)


@pytest.fixture(scope="module")
def run(pairs, tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("defend")
    cfg = small_cfg()
    ctx = context(pairs, tiny, root, cfg)
    report = run_defend(None, cfg, out_dir=root / "out", progress=False, ctx=ctx)
    return report, ctx, root


def test_every_row_type_and_the_outputs(run):
    report, ctx, root = run
    rows = report["rows"]
    for d in ("pgd", "fgsm"):
        for k in (2, 4):
            kinds = {(r["kind"], r["query"]) for r in rows if r["defense"] == d and r["defense_steps"] == k}
            known = {("known", d)} if d in ("pgd", "fgsm") else set()
            assert kinds == {("clean", "clean"), ("unknown", "fgsm" if d == "pgd" else "pgd")} | known
    required = {"defense", "defense_eps", "defense_steps", "objective", "query", "eps", "accuracy",
                "matched_accuracy", "mismatched_accuracy", "auc", "n_pairs", "image_steps", "seconds",
                "undefended_accuracy"}
    assert all(required <= set(r) for r in rows)
    assert all(0 <= r["accuracy"] <= 1 and r["n_pairs"] == 8 for r in rows)
    assert {r["table"] for r in rows} == {2, 4}
    clean_pgd = [r for r in rows if r["defense"] == "pgd" and r["query"] == "clean"]
    assert [r["image_steps"] for r in clean_pgd] == [4, 8]  # D on query and gallery, k steps each
    # The adaptive evaluation: for D = pgd only (Tables 2-3), every row type.
    (adaptive,) = report["adaptive"]
    queries = {r["query"] for r in adaptive["rows"]}
    assert queries == {"transfer-fgsm", "transfer-pgd", "bpda-eot", "high-confidence"}
    assert {w["pairs"] for w in adaptive["worst_case"]} == {"all pairs", "sweep subset"}
    saved = json.loads((root / "out" / "defend.json").read_text())
    assert len(saved["rows"]) == len(rows)
    md = (root / "out" / "defend.md").read_text()
    assert md.count("50% is chance") >= 3 and "Table 2" in md and "Table 4" in md and "worst case" in md
    for name in ("accuracy_vs_defense_steps.png", "price_vs_gain.png", "adaptive_curves.png"):
        assert (root / "out" / name).stat().st_size > 0
    # `advface cache info` knows the defended-embedding entries (one per D step config).
    from advface_fast.cache_admin import cache_info

    entries = cache_info(root)["caches"]["defended"]["entries"]
    assert len(entries) >= 4 and all(e["status"] == "ok" for e in entries)


def test_worst_case_is_the_per_pair_minimum_and_never_above_any_attack(run):
    report, ctx, _ = run
    (adaptive,) = report["adaptive"]
    worst = next(w for w in adaptive["worst_case"] if w["pairs"] == "all pairs")
    full_rows = [r for r in adaptive["rows"] if not r["subset"] and r["eps"] <= worst["eps"]]
    assert {r["row"] for r in full_rows} == set(worst["over"])
    # Per pair: robust only if every attack failed, so never above any attack, in all and per side.
    for r in full_rows:
        assert worst["accuracy"] <= r["accuracy"] + 1e-12
        assert worst["matched_accuracy"] <= r["matched_accuracy"] + 1e-12
        assert worst["mismatched_accuracy"] <= r["mismatched_accuracy"] + 1e-12
    transfer = next(r for r in full_rows if r["query"] == "transfer-pgd")
    assert worst["accuracy"] <= transfer["accuracy"] and worst["static_known_attack_accuracy"] == transfer["accuracy"]
    # Every check is stated; a violated one carries the loud message.
    assert adaptive["checks"] and all(("VIOLATED" in c["message"] or "WEAKER" in c["message"]) != c["ok"]
                                      for c in adaptive["checks"])


def test_thresholds_are_fitted_on_clean_defended_pairs_and_never_refit(run, tiny, pairs):
    report, ctx, _ = run
    # An independent reference: D (a fresh object, no store) on every chip, k-fold on clean pairs.
    d = build_defense(tiny, "dlib-resnet", "pgd", 4, (2, 4), precision="fp32", batch_size=8)
    emb = d.embed(pairs.chips.chips, pairs.chips.ids)[4].numpy()
    clean = evaluate_embeddings(emb[pairs.query], emb[pairs.gallery], pairs.same, pairs.folds)
    cal = next(c for c in report["thresholds"]["defended"] if c["defense"] == "pgd")
    assert cal["full_protocol"] and cal["n_calibration_pairs"] == len(pairs)
    saved = {int(f): t for f, t in cal["per_step"]["4"]["per_fold"].items()}
    assert saved == pytest.approx(clean.threshold_map(), abs=1e-9)
    # Every defended row is judged with those fixed thresholds; a refit on the row's own scores
    # would change the numbers on at least one attacked row (so this test can fail).
    sel = ctx.sel
    differs = 0
    for q in ("fgsm", "pgd"):
        row = next(r for r in report["rows"] if r["defense"] == "pgd" and r["defense_steps"] == 4 and r["query"] == q)
        attacked = ctx.runner.attack_queries(__import__("advface_fast.experiments.defense_tables", fromlist=["x"])
                                             .query_attack(ctx, q, 4.0), ctx.plain, sel, ctx.net)
        images = attacked.images(pairs.chips.chips[sel.query_rows])
        q_emb = d.embed(images, [f"{pid}@{attacked.key}" for pid in sel.pair_ids])[4].numpy()
        g = emb[sel.gallery_rows]
        sim = (q_emb * g).sum(1) / np.linalg.norm(q_emb, axis=1) / np.linalg.norm(g, axis=1)
        fixed = accuracy_with_thresholds(sim, sel.same, sel.folds, clean.threshold_map())
        assert row["accuracy"] == pytest.approx(fixed.accuracy_mean, abs=1e-9)
        assert row["matched_accuracy"] == pytest.approx(fixed.matched_accuracy, abs=1e-9)
        _, refit = fit_threshold(sim, sel.same)
        differs += abs(refit - fixed.accuracy_pooled) > 1e-9
    assert differs >= 1


def test_a_subset_calibration_is_recorded_loudly(pairs, tiny, tmp_path):
    cfg = small_cfg(defenses=("fgsm",), calibration_pairs=20, adaptive=False)
    report = run_defend(None, cfg, out_dir=tmp_path / "out", progress=False, ctx=context(pairs, tiny, tmp_path, cfg))
    (cal,) = report["thresholds"]["defended"]
    assert not cal["full_protocol"] and cal["protocol"].startswith("SUBSET") and cal["n_calibration_pairs"] == 20
    assert "WARNING — calibration on a subset" in (tmp_path / "out" / "defend.md").read_text()


class Counting:
    """Wraps D.embed: records the ids of every image D is run on."""

    def __init__(self, defense):
        self.ids, real = [], defense.embed

        def embed(images, ids):
            self.ids += list(ids)
            return real(images, ids)

        defense.embed = embed


def test_a_defended_image_is_computed_once_however_many_pairs_use_it(pairs, tiny, tmp_path):
    d = build_defense(tiny, "dlib-resnet", "pgd", 4, (2, 4), precision="fp32", batch_size=4)
    count = Counting(d)
    store = DefendedStore(d, root=tmp_path, chunk=4)
    chips, ids = pairs.chips.chips, pairs.chips.ids
    # One gallery image used by five "pairs", beside four others used once each.
    rows = [0, 1, 0, 2, 0, 3, 0, 4, 0]
    first = store.embed(chips[rows], [ids[r] for r in rows])
    assert sorted(count.ids) == sorted(ids[r] for r in range(5)) and store.computed == 5
    for k in (2, 4):  # every use of the image gets the same embedding
        np.testing.assert_array_equal(first[k][0], first[k][2])
    again = DefendedStore(d, root=tmp_path).embed(chips[rows], [ids[r] for r in rows])  # from disk
    assert len(count.ids) == 5
    for k in (2, 4):
        np.testing.assert_array_equal(again[k], first[k])
    # A whole calibration asks for every chip: only the missing ones are run, each once.
    cfg = small_cfg(defenses=("pgd",), adaptive=False)
    ctx = context(pairs, tiny, tmp_path / "run", cfg)
    s = DefendedStore(d, root=tmp_path, chunk=8)
    calibrate_defense(ctx, s)
    assert len(count.ids) == len(set(count.ids)) == len(ids)
    calibrate_defense(ctx, DefendedStore(d, root=tmp_path))
    assert len(count.ids) == len(ids)


def test_d_is_identical_whichever_batch_or_pair_an_image_comes_in(pairs, tiny, tmp_path):
    chips, ids = pairs.chips.chips, pairs.chips.ids
    d = build_defense(tiny, "dlib-resnet", "pgd", 4, (2, 4), precision="fp32", batch_size=4)
    whole = DefendedStore(d, root=tmp_path / "a", chunk=8).embed(chips[:12], ids[:12])
    order = [11, 3, 7, 0, 5, 9, 1, 10, 2, 8, 6, 4]
    store = DefendedStore(d, root=tmp_path / "b", chunk=3)
    store.embed(chips[[3]], [ids[3]])  # alone first
    shuffled = store.embed(chips[order], [ids[i] for i in order])
    for k in (2, 4):
        np.testing.assert_array_equal(shuffled[k], whole[k][order])


def test_eval_mode_is_restored(pairs, tiny, tmp_path):
    d = build_defense(tiny, "dlib-resnet", "pgd", 4, (2,), precision="fp32", batch_size=4)
    tiny.train()
    try:
        DefendedStore(d, root=tmp_path).embed(pairs.chips.chips[:4], pairs.chips.ids[:4])
        assert tiny.training
    finally:
        tiny.eval()


def test_paper_rerun_does_no_attack_or_defense_work(lfw_ci, pairs, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("ADVFACE_HOME", str(tmp_path / "home"))
    cfg = PaperConfig(folds=(1, 2), max_pairs=8, steps=2, eps=(4.0,), defense_steps=(1, 2), precision="fp32",
                      batch_size=8, adaptive_options=dict(ADAPTIVE, steps=(2,)), transfer_models=("sface",))
    first = run_paper(lfw_ci, cfg, out_dir=tmp_path / "p1", progress=False, net=tiny, pairs=pairs)
    assert first["work"]["attacked_pairs"] > 0 and first["work"]["defense_images_computed"] > 0
    again = run_paper(lfw_ci, cfg, out_dir=tmp_path / "p2", progress=False, net=tiny, pairs=pairs)
    assert again["work"]["attacked_pairs"] == 0 and again["work"]["defense_images_computed"] == 0
    assert again["defend"]["rows"] == first["defend"]["rows"] or all(
        a["accuracy"] == b["accuracy"] for a, b in zip(again["defend"]["rows"], first["defend"]["rows"]))
    text = (tmp_path / "p2" / "REPORT.md").read_text()
    assert "Table 1" in text and "Table 2" in text and "Table 3" in text and "Table 4" in text
    assert "71.4" in text and "50% is chance" in text
    assert again["reuse"]["image_steps_naive"] > again["reuse"]["image_steps_with_reuse"] > 0
    # The transfer matrix over the main model (here the tiny stand-in, registered name) and sface.
    cells = again["transfer"]["accuracy_after_attack"]["pgd-2 eps=4"]
    assert set(cells) == {"dlib-resnet->dlib-resnet", "dlib-resnet->sface", "sface->dlib-resnet", "sface->sface"}
    assert cells == first["transfer"]["accuracy_after_attack"]["pgd-2 eps=4"]
    assert "## Transfer between models" in text and "| sface |" in text


def test_fgsm_defense_is_one_column_not_copies(run):
    from advface_fast.experiments.defense_render import static_markdown

    report, _, _ = run
    table4 = static_markdown(report).split("### Table 4")[1]
    assert "D (one step)" in table4 and "D 4 steps" not in table4 and "D 2 steps" not in table4
    table2 = static_markdown(report).split("### Table 2")[1].split("### Table")[0]
    assert "D 2 steps" in table2 and "D 4 steps" in table2


def test_cli_paper_rejects_an_unknown_transfer_model_before_any_work(lfw_ci, tmp_path, capsys):
    assert main(["paper", "--lfw", str(lfw_ci), "--transfer-models", "sface,bogus", "--out", str(tmp_path),
                 "--quiet"]) == 2
    assert "bogus" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_cli_defend_rejects_an_unknown_defense(lfw_ci, capsys):
    assert main(["defend", "--lfw", str(lfw_ci), "--defense", "pgd,bogus", "--quiet"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_clean_embeddings_are_stored_once_per_chip(pairs, tiny, tmp_path):
    from advface_fast.engine import embed_chips
    from advface_fast.experiments.runner import ModelVerifier, Runner

    runner = Runner(pairs, cache_dir=tmp_path / "attacks", progress=False)
    verifier = ModelVerifier(tiny, "tiny")
    calls, real = [], verifier.embed
    verifier.embed = lambda chips, ids: calls.append(len(ids)) or real(chips, ids)
    first = runner.calibrate(verifier)
    assert sum(calls) == len(pairs.chips.ids)
    second = Runner(pairs, cache_dir=tmp_path / "attacks", progress=False).calibrate(verifier)
    assert sum(calls) == len(pairs.chips.ids)  # nothing embedded again
    np.testing.assert_array_equal(first.embeddings, second.embeddings)
    np.testing.assert_allclose(first.embeddings, embed_chips(tiny, pairs.chips.chips, batch_size=64), atol=1e-6)
    assert first.thresholds == second.thresholds


def test_price_vs_gain_plots_the_adaptive_worst_case_beside_the_static_rows(tmp_path):
    """The trade-off plot over eps_d shows what D buys against attackers who know it, not only the static
    rows: on the committed eps_d sweep the worst-case points are the reports' own worst cases."""
    import json
    from pathlib import Path

    from advface_fast.experiments.defense_render import plot_tradeoff

    report = json.loads((Path(__file__).parents[1] / "benchmarks/results/defense_eps_sweep/defend.json").read_text())
    points = plot_tradeoff(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    worst = {ed: gain for ed, _, gain in points["worst_case"][("pgd", 4.0)]}
    want = {a["defense_eps"]: next(w["accuracy"] for w in a["worst_case"] if w["pairs"] == "all pairs")
            for a in report["adaptive"]}
    und = min(r["undefended_accuracy"] for r in report["rows"] if r["query"] != "clean")
    assert sorted(worst) == [1.0, 2.0, 4.0, 8.0]
    assert all(abs(worst[e] - 100 * (want[e] - und)) < 1e-9 for e in worst)
    static = points["static"]
    assert all(len(pts) == 4 for pts in static.values()) and len(static) == 3  # three attacked queries x 4 eps_d

"""advface cost: training cost per image and epoch, defense cost per query, break-even, the accuracy each
buys (clean / static / adaptive per-pair worst case), the plot."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import pytest

from advface_fast.cli import main
from advface_fast.experiments import cost
from advface_fast.train.loop import training_cost

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results"
FULL = RESULTS / "defense_fold1_full"
PGD_ADAPTIVE, CW_ADAPTIVE, CW_FGSM = (FULL / f"{d}/defend.json" for d in ("pgd_adaptive", "cw_adaptive", "cw_fgsm"))
AT_RUNS = [RESULTS / "advtrain_cpu_finetune" / m for m in ("pretrained", "clean", "fgsm-rs", "free", "pgd")]


def fake_run(folder, method, *, images, attack_steps, attack_s, update_s, clean, worst, epochs=1):
    history = [{"epoch": e + 1, "loss": 1.0, "clean_accuracy": 0.5, "robust_accuracy": None, "images": images,
                "attack_image_steps": attack_steps, "update_passes": images, "attack_seconds": attack_s,
                "update_seconds": update_s, "train_seconds": attack_s + update_s, "monitor_seconds": 0.0,
                "images_per_s": 1.0} for e in range(epochs)]
    rep = {"config": {"method": method, "eps": 4.0, "steps": 5 if method == "pgd" else 1}, "epochs_done": epochs,
           "n_images": images, "history": history, "cost": training_cost(history),
           "evaluation": {"clean_accuracy": clean, "worst_attack_accuracy": worst, "n_pairs": 200,
                          "held_out_folds": [9, 10], "rows": {"pgd-10@4": worst}}}
    folder.mkdir()
    (folder / "train.json").write_text(json.dumps(rep))
    return folder


@pytest.fixture
def runs(tmp_path):
    clean = fake_run(tmp_path / "clean", "clean", images=100, attack_steps=0, attack_s=0.0, update_s=10.0,
                     clean=0.98, worst=0.0)
    pgd = fake_run(tmp_path / "pgd", "pgd", images=100, attack_steps=500, attack_s=25.0, update_s=10.0,
                   clean=0.95, worst=0.3)
    return clean, pgd


def worst_case_in(path: Path, steps: int) -> float:
    """The per-pair worst case on all pairs at eps_a = eps_d, read straight from a defend.json."""
    report = json.loads(path.read_text())
    return min(w["accuracy"] for a in report["adaptive"] for w in a["worst_case"]
               if w["pairs"] == "all pairs" and w["eps"] == w["defense_eps"] and w["defense_steps"] == steps)


def test_training_cost_per_image_epoch_and_full_scale(runs):
    rows = [cost.training_row(r, full_images=1000, full_epochs=2) for r in cost.load_training_runs(runs)]
    pgd = rows[1]
    assert pgd["image_steps_per_image_epoch"] == pytest.approx(6.0)  # 5 attack steps + 1 update pass
    assert pgd["seconds_per_image_epoch"] == pytest.approx(0.35)
    assert pgd["full_scale_seconds"] == pytest.approx(0.35 * 1000 * 2)
    assert pgd["full_scale_image_steps"] == pytest.approx(6.0 * 1000 * 2)
    assert cost.attack_step_seconds(cost.load_training_runs(runs)) == pytest.approx(25.0 / 500)


def test_free_at_full_scale_divides_the_epochs_by_the_replays(tmp_path):
    free = fake_run(tmp_path / "free", "free", images=100, attack_steps=0, attack_s=0.0, update_s=30.0,
                    clean=0.9, worst=0.1)
    rep = cost.load_training_runs([free])[0]
    rep["config"]["steps"] = 3
    row = cost.training_row(rep, full_images=1000, full_epochs=30)
    assert row["full_scale_epochs"] == 10 and row["full_scale_seconds"] == pytest.approx(0.3 * 1000 * 10)


def test_cost_command_reads_the_adaptive_worst_case_of_a_real_defend_json(tmp_path, runs, capsys):
    """The adaptive evaluation lives under adaptive[].worst_case in a defend.json, not in its rows."""
    out = tmp_path / "cost"
    rc = main(["cost", "--train", str(runs[0]), str(runs[1]), "--defense-report", str(PGD_ADAPTIVE),
               "--full-images", "1000", "--epochs-full", "2", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "cost.json").read_text())
    d = {r["defense_steps"]: r for r in report["defense"]}
    assert d[10]["adaptive_accuracy"] == worst_case_in(PGD_ADAPTIVE, 10)
    assert d[20]["adaptive_accuracy"] is None and d[40]["adaptive_accuracy"] is None  # no adaptive run there
    rows = [r for r in json.loads(PGD_ADAPTIVE.read_text())["rows"] if r["defense_steps"] == 10]
    assert d[10]["clean_accuracy"] == next(r["accuracy"] for r in rows if r["query"] == "clean")
    assert d[10]["static_accuracy"] == min(r["accuracy"] for r in rows if r["query"] != "clean")
    assert d[10]["image_steps_per_query"] == rows[0]["image_steps"] / 2 == 10
    pgd = next(c for c in report["break_even"] if c["training"].startswith("PGD-AT") and c["defense"] == d[10]["setting"])
    assert pgd["break_even_queries_run_seconds"] == pytest.approx(35.0 / d[10]["seconds_per_query"])
    assert pgd["break_even_queries_run_image_steps"] == pytest.approx(600 / 10)
    assert pgd["break_even_queries_full_image_steps"] == pytest.approx(6.0 * 2000 / 10)
    assert pgd["break_even_queries_full_extra_over_clean_seconds"] == pytest.approx(
        (0.35 - 0.1) * 2000 / d[10]["seconds_per_query"])
    assert (out / "accuracy_vs_compute.png").stat().st_size > 0
    assert "Break-even" in capsys.readouterr().out


def test_several_defense_reports_merge_with_fgsm_as_one_setting(tmp_path):
    out = tmp_path / "cost"
    assert main(["cost", "--train", *map(str, AT_RUNS), "--defense-report", str(PGD_ADAPTIVE), str(CW_ADAPTIVE),
                 str(CW_FGSM), "--out", str(out)]) == 0
    report = json.loads((out / "cost.json").read_text())
    settings = {(d["defense"], d["defense_steps"]): d for d in report["defense"]}
    assert set(settings) == {("pgd", 10), ("pgd", 20), ("pgd", 40), ("cw", 10), ("cw", 20), ("cw", 40), ("fgsm", 1)}
    assert settings[("cw", 10)]["adaptive_accuracy"] == worst_case_in(CW_ADAPTIVE, 10)
    assert settings[("pgd", 10)]["adaptive_accuracy"] == worst_case_in(PGD_ADAPTIVE, 10)
    assert settings[("fgsm", 1)]["image_steps_per_query"] == 1 and settings[("fgsm", 1)]["requested_steps"] == [10, 20, 40]
    assert sorted(settings[("cw", 10)]["files"]) == sorted(cost.display_path(p) for p in (CW_ADAPTIVE, CW_FGSM))
    md = (out / "cost.md").read_text()
    defense_table = md.split("### Attack-as-defense: cost")[1].split("###")[0]
    assert defense_table.count("D=FGSM") == 1
    header = next(line for line in md.splitlines() if line.startswith("| training | defense |"))
    assert "| full scale (image-steps) |" in header
    col = header.split(" | ").index("full scale (image-steps)")
    pgd_at = next(c for c in report["break_even"] if c["training"].startswith("PGD-AT") and c["defense"].startswith("D=FGSM"))
    line = next(x for x in md.splitlines() if x.startswith(f"| {pgd_at['training']} | {pgd_at['defense']} |"))
    assert line.split(" | ")[col] == f"{pgd_at['break_even_queries_full_image_steps']:,.0f}"


def test_merging_keeps_the_lower_worst_case_and_refuses_other_pairs():
    curves = FULL / "pgd_curves/defend.json"
    reports = cost.load_defense_reports([PGD_ADAPTIVE, curves])
    merged = cost.merge_defense_rows([cost.defense_rows(r, eps=4.0) for r in reports])
    pgd10 = next(d for d in merged if d["defense_steps"] == 10)
    assert pgd10["adaptive_accuracy"] == min(worst_case_in(PGD_ADAPTIVE, 10), worst_case_in(curves, 10))
    subset = cost.load_defense_reports([RESULTS / "defend_fold1/defend.json"])  # 50 pairs, not the 600
    with pytest.raises(ValueError, match="different pairs"):
        cost.merge_defense_rows([cost.defense_rows(r) for r in reports[:1] + subset])


def test_training_rows_clean_static_adaptive_from_the_strongest_evaluation():
    """Static: the lowest accuracy at eps over every evaluation of the run (here C&W-40 / PGD-40 of the
    --eval-only run beat the training run's own PGD-10); adaptive: the same number (white-box)."""
    rep = cost.load_training_runs([AT_RUNS[-1]])[0]
    evals = [rep["evaluation"], *rep["evaluations"]]
    at4 = [(v, ev) for ev in evals for k, v in ev["rows"].items() if k.endswith("@4")]
    lowest, ev = min(at4, key=lambda t: t[0])
    row = cost.training_row(rep, eps=4.0)
    assert row["static_accuracy"] == row["adaptive_accuracy"] == lowest
    assert row["clean_accuracy"] == ev["clean_accuracy"] and row["n_pairs"] == ev["n_pairs"]
    assert row["static_accuracy"] < rep["evaluation"]["worst_attack_accuracy"]  # the stronger attacks count
    md = cost.cost_markdown(cost.cost_report([rep], [], eps=4.0))
    assert "white-box attack on the trained model is the adaptive attack" in md


def test_plot_one_curve_per_approach_and_labels_that_do_not_overlap():
    report = cost.cost_from(cost.load_training_runs(AT_RUNS),
                            cost.load_defense_reports([PGD_ADAPTIVE, CW_ADAPTIVE, CW_FGSM]), eps=4.0)
    series, baselines = cost.plot_series(report, queries=10_000)
    names = [s["name"] for s in series]
    assert names[0].startswith("adversarial training") and len(names) == 4
    assert [n.split("D=")[1].split(" ")[0] for n in names[1:]] == ["PGD", "C&W", "FGSM"]
    pgd = {p[3]: p for p in series[1]["points"]}
    assert pgd["10"][1] == pytest.approx(100 * worst_case_in(PGD_ADAPTIVE, 10)) and pgd["10"][2] is True
    assert pgd["20"][2] is False  # static only, drawn hollow
    assert [b["name"] for b in baselines] == ["pretrained (no training): no training compute"]
    fig = cost.cost_figure(report)
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(boxes) == len(series[0]["points"])  # only the trained models are labelled
    assert not [(a, b) for a, b in combinations(boxes, 2) if a.overlaps(b)]


def test_cost_command_estimates_from_the_step_rate(tmp_path, runs):
    out = tmp_path / "est"
    assert main(["cost", "--train", str(runs[0]), str(runs[1]), "--defense-steps", "10,40", "--out", str(out)]) == 0
    report = json.loads((out / "cost.json").read_text())
    assert [d["source"] for d in report["defense"]] == ["estimated from the step rate"] * 2
    assert report["defense"][1]["seconds_per_query"] == pytest.approx(40 * 25.0 / 500)


def test_results_name_no_machine_path(tmp_path, runs):
    """Run folders outside the working directory appear by their last two path parts only."""
    out = tmp_path / "cost"
    assert main(["cost", "--train", str(runs[0]), str(runs[1]), "--defense-report", str(PGD_ADAPTIVE),
                 "--out", str(out)]) == 0
    text = (out / "cost.json").read_text() + (out / "cost.md").read_text()
    assert str(tmp_path) not in text and str(ROOT) not in text
    assert "pgd/train.json" in text


def test_cost_errors_are_one_line(tmp_path, runs, capsys):
    assert main(["cost", "--train", str(runs[0])]) == 2  # a clean run measured no attack step
    assert main(["cost", "--train", str(tmp_path / "nowhere")]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": [{"defense": "pgd"}]}))
    assert main(["cost", "--train", str(runs[1]), "--defense-report", str(bad)]) == 2
    assert "lacks" in capsys.readouterr().err


def test_defense_cost_from_a_real_defend_json():
    """defend.json's image_steps / seconds are per query, D on the query and its gallery image: with the
    gallery cached, a query costs D's steps on the query alone (10 for D = PGD-10, 1 for FGSM, one setting)."""
    report = json.loads((RESULTS / "defend_fold1/defend.json").read_text())
    rows = {(d["defense"], d["defense_steps"]): d for d in cost.defense_rows(report)}
    assert rows[("pgd", 10)]["image_steps_per_query"] == 10
    assert rows[("pgd", 40)]["image_steps_per_query"] == 40
    assert rows[("fgsm", 1)]["image_steps_per_query"] == 1
    assert [k for k in rows if k[0] == "fgsm"] == [("fgsm", 1)]
    assert rows[("pgd", 10)]["seconds_per_query"] == rows[("pgd", 10)]["seconds_per_gallery_image"] > 0

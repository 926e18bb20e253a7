"""advface cost: training cost per image and epoch, defense cost per query, break-even, plot."""

from __future__ import annotations

import json

import pytest

from advface_fast.cli import main
from advface_fast.train import cost
from advface_fast.train.loop import training_cost


def fake_run(folder, method, *, images, attack_steps, attack_s, update_s, clean, worst, epochs=1):
    history = [{"epoch": e + 1, "loss": 1.0, "clean_accuracy": 0.5, "robust_accuracy": None, "images": images,
                "attack_image_steps": attack_steps, "update_passes": images, "attack_seconds": attack_s,
                "update_seconds": update_s, "train_seconds": attack_s + update_s, "monitor_seconds": 0.0,
                "images_per_s": 1.0} for e in range(epochs)]
    rep = {"config": {"method": method, "eps": 4.0, "steps": 5 if method == "pgd" else 1}, "epochs_done": epochs,
           "n_images": images, "history": history, "cost": training_cost(history),
           "evaluation": {"clean_accuracy": clean, "worst_attack_accuracy": worst, "n_pairs": 200,
                          "rows": {"pgd-10@4": worst}}}
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


def test_cost_command_with_a_defense_report(tmp_path, runs, capsys):
    defend = {"rows": [
        {"defense": "pgd", "defense_eps": 4, "defense_steps": 10, "query": "clean", "accuracy": 0.9,
         "image_steps": 20, "seconds": 0.1, "n_pairs": 200},
        {"defense": "pgd", "defense_eps": 4, "defense_steps": 10, "query": "pgd-40", "accuracy": 0.6,
         "image_steps": 20, "seconds": 0.1, "n_pairs": 200},
        {"defense": "pgd", "defense_eps": 4, "defense_steps": 10, "query": "adaptive-bpda", "accuracy": 0.1,
         "image_steps": 20, "seconds": 0.1, "n_pairs": 200}]}
    (tmp_path / "defend.json").write_text(json.dumps(defend))
    out = tmp_path / "cost"
    rc = main(["cost", "--train", str(runs[0]), str(runs[1]), "--defense-report", str(tmp_path / "defend.json"),
               "--full-images", "1000", "--epochs-full", "2", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "cost.json").read_text())
    d = report["defense"][0]
    assert d["source"] == "measured (defend.json)"
    assert (d["image_steps_per_query"], d["seconds_per_query"]) == (10, 0.05)
    assert (d["clean_accuracy"], d["static_accuracy"], d["adaptive_accuracy"]) == (0.9, 0.6, 0.1)
    pgd = next(c for c in report["break_even"] if c["training"].startswith("pgd"))
    assert pgd["break_even_queries_run_seconds"] == pytest.approx(35.0 / 0.05)
    assert pgd["break_even_queries_run_image_steps"] == pytest.approx(600 / 10)
    assert pgd["break_even_queries_full_seconds"] == pytest.approx(0.35 * 2000 / 0.05)
    assert pgd["break_even_queries_full_extra_over_clean_seconds"] == pytest.approx((0.35 - 0.1) * 2000 / 0.05)
    assert (out / "accuracy_vs_compute.png").stat().st_size > 0
    assert "Break-even" in capsys.readouterr().out


def test_cost_command_estimates_from_the_step_rate(tmp_path, runs):
    out = tmp_path / "est"
    assert main(["cost", "--train", str(runs[0]), str(runs[1]), "--defense-steps", "10,40", "--out", str(out)]) == 0
    report = json.loads((out / "cost.json").read_text())
    assert [d["source"] for d in report["defense"]] == ["estimated from the step rate"] * 2
    assert report["defense"][1]["seconds_per_query"] == pytest.approx(40 * 25.0 / 500)


def test_cost_errors_are_one_line(tmp_path, runs, capsys):
    assert main(["cost", "--train", str(runs[0])]) == 2  # a clean run measured no attack step
    assert main(["cost", "--train", str(tmp_path / "nowhere")]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": [{"defense": "pgd"}]}))
    assert main(["cost", "--train", str(runs[1]), "--defense-report", str(bad)]) == 2
    assert "lacks" in capsys.readouterr().err


def test_defense_cost_from_a_real_defend_json():
    """defend.json's image_steps / seconds are per query, D on the query and its gallery image: with the
    gallery cached, a query costs D's steps on the query alone (10 for D = PGD-10, 1 for FGSM)."""
    from pathlib import Path

    report = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/defend_fold1/defend.json").read_text())
    rows = {(d["defense"], d["defense_steps"]): d for d in cost.defense_rows(report)}
    assert rows[("pgd", 10)]["image_steps_per_query"] == 10
    assert rows[("pgd", 40)]["image_steps_per_query"] == 40
    assert rows[("fgsm", 10)]["image_steps_per_query"] == 1
    assert rows[("pgd", 10)]["seconds_per_query"] == rows[("pgd", 10)]["seconds_per_gallery_image"] > 0


"""Transfer rows on lfw_ci: queries crafted on dlib-resnet, judged by sface with sface's clean
thresholds, on sface's MTCNN chips (dlib-resnet sees them through ResizedInput)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from advface_fast.experiments.runner import ResizedInput
from advface_fast.experiments.table1 import Table1Config, run_table1
from advface_fast.models import create_model


def test_resized_input_is_the_model_on_resized_images():
    class Probe(torch.nn.Module):
        input_size = (150, 150)

        def forward(self, x):
            assert x.shape[2:] == (150, 150)
            return x.mean(dim=(2, 3))

    wrapped = ResizedInput(Probe(), (112, 112))
    x = torch.rand(2, 3, 112, 112, requires_grad=True)
    expected = torch.nn.functional.interpolate(x, size=(150, 150), mode="bilinear", align_corners=False,
                                               antialias=True).mean(dim=(2, 3))
    out = wrapped(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert x.grad is not None and (x.grad != 0).all()  # every chip pixel reaches the crafting model
    assert wrapped.name == "Probe@112x112"


@pytest.fixture(scope="module")
def report(lfw_ci, tmp_path_factory):
    from advface_fast.align.mtcnn import weights_dir

    try:
        weights_dir()
    except ModuleNotFoundError as err:
        from conftest import missing

        missing(str(err))
    mp = pytest.MonkeyPatch()
    mp.setenv("ADVFACE_HOME", str(tmp_path_factory.mktemp("advface-home")))
    out = tmp_path_factory.mktemp("transfer")
    cfg = Table1Config(model="sface", craft_model="dlib-resnet", attacks=("fgsm", "pgd"), eps=(8,), steps=(5,),
                       folds=(1, 2), max_pairs=8, batch_size=8, noise_baseline=False)
    try:
        rep = run_table1(lfw_ci, cfg, out_dir=out, workers=1, progress=False)
    finally:
        mp.undo()
    rep["_out"] = out
    return rep


def test_transfer_rows_are_crafted_on_one_model_and_judged_on_the_other(report):
    t = report["transfer"]
    assert t["craft_model"] == "dlib-resnet" and t["judge_model"] == "sface" and report["model"] == "sface"
    assert t["chips"].startswith("the judge's (112x112)")
    rows = {r["attack"]: r for r in report["rows"]}
    clean = rows["clean"]
    assert clean["craft_accuracy"] is None and clean["accuracy_mean"] >= 0.85
    # dlib-resnet on sface's chips is still a working verifier (else its attacks would mean nothing).
    assert t["craft_clean_all_folds"]["accuracy_mean"] >= 0.8
    pgd = rows["pgd"]
    # White-box on the crafting model: PGD at eps 8 breaks it; the judge is scored separately.
    assert pgd["craft_accuracy"] <= 0.25
    assert pgd["paper_accuracy"] is None and rows["fgsm"]["craft_accuracy"] is not None
    # Transfer is weaker than white-box on the model that crafted the queries.
    assert pgd["accuracy_mean"] >= pgd["craft_accuracy"]
    md = (report["_out"] / "table1.md").read_text()
    assert "crafted on dlib-resnet" in md and "on craft model" in md
    saved = json.loads((report["_out"] / "table1.json").read_text())
    assert saved["transfer"]["craft_model"] == "dlib-resnet"


def test_judge_sees_the_crafted_images(report, lfw_ci, tmp_path):
    """The judge's accuracy comes from sface's embeddings of the attacked chips: recompute one row."""
    from advface_fast.experiments.runner import ModelVerifier, Runner
    from advface_fast.pair_chips import prepare_pairs

    mp = pytest.MonkeyPatch()
    mp.setenv("ADVFACE_HOME", str(tmp_path))
    try:
        pairs = prepare_pairs(lfw_ci, "sface", workers=1, progress=False)
    finally:
        mp.undo()
    sface = create_model("sface")
    dlib_net = ResizedInput(create_model("dlib-resnet"), (112, 112))
    runner = Runner(pairs, model="sface", cache_dir=tmp_path / "attacks", progress=False, batch_size=8)
    judge = runner.calibrate(ModelVerifier(sface, "sface"))
    craft = runner.calibrate(ModelVerifier(dlib_net, dlib_net.name))
    sel = runner.select((1, 2), 8)
    from advface_fast.attacks import make_attack

    attack = make_attack("fgsm", dlib_net, metric="cosine", eps=8, seed=0)
    queries = runner.attack_queries(attack, craft, sel, dlib_net, decision_name=dlib_net.name)
    assert np.abs(queries.delta).max() <= 8 and np.abs(queries.delta).max() > 0
    judged = runner.query_embeddings(judge, sel, queries)
    images = queries.images(pairs.chips.chips[sel.query_rows])
    direct = sface(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).detach().numpy()
    np.testing.assert_allclose(judged, direct, atol=1e-4)
    acc = runner.judge(judge, sel, runner.similarity(judge, sel, judged)).accuracy_mean
    assert acc == pytest.approx({r["attack"]: r for r in report["rows"]}["fgsm"]["accuracy_mean"])


def test_matrix_cells_diagonal_and_unavailable_models():
    from advface_fast.experiments.transfer import matrix_from_reports, transfer_markdown

    def rep(acc_clean, acc_pgd):
        rows = [{"attack": "clean", "eps": 0, "params": {}, "accuracy_mean": acc_clean},
                {"attack": "pgd", "eps": 4.0, "params": {"steps": 40}, "accuracy_mean": acc_pgd, "accuracy_std": 0.0,
                 "matched_accuracy": acc_pgd, "mismatched_accuracy": acc_pgd},
                {"attack": "noise", "eps": 4.0, "params": {}, "accuracy_mean": 0.9, "accuracy_std": 0.0,
                 "matched_accuracy": 0.9, "mismatched_accuracy": 0.9}]
        return {"rows": rows, "n_pairs": 10, "folds": [1]}

    m = matrix_from_reports({("a", "a"): rep(0.99, 0.01), ("a", "b"): rep(0.98, 0.90), ("b", "b"): rep(0.98, 0.02)},
                            unavailable={"facenet": "needs weights"})
    assert m["models"] == ["a", "b"] and list(m["accuracy_after_attack"]) == ["pgd-40 eps=4"]  # noise is no cell
    cells = m["accuracy_after_attack"]["pgd-40 eps=4"]
    assert cells["a->b"]["accuracy"] == 0.90 and cells["a->a"]["accuracy"] == 0.01 and "b->a" not in cells
    md = transfer_markdown(m)
    assert "| a | 1.0 | 90.0 |" in md and "| b | — | 2.0 |" in md and "facenet (needs weights)" in md


def test_transfer_matrix_over_two_real_models(report, lfw_ci, tmp_path, monkeypatch):
    """Every cell over dlib-resnet and sface; the dlib->sface cell equals the Table 1 transfer run of the
    same config (computed afresh here, in another cache); a model without weights is listed, not run;
    a second call does no attack work."""
    from advface_fast.experiments.transfer import run_transfer_matrix

    monkeypatch.setenv("ADVFACE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ADVFACE_FACENET_WEIGHTS", raising=False)
    cfg = Table1Config(attacks=("fgsm", "pgd"), eps=(8,), steps=(5,), folds=(1, 2), max_pairs=8, batch_size=8)
    kw = dict(out_dir=tmp_path / "m", cache_dir=tmp_path / "attacks", workers=1, progress=False)
    m = run_transfer_matrix(lfw_ci, ("dlib-resnet", "sface", "facenet"), cfg, **kw)
    assert m["models"] == ["dlib-resnet", "sface"] and "facenet" in m["unavailable"]
    pgd = m["accuracy_after_attack"]["pgd-5 eps=8"]
    assert set(pgd) == {f"{a}->{b}" for a in m["models"] for b in m["models"]}
    want = {r["attack"]: r for r in report["rows"]}["pgd"]["accuracy_mean"]
    assert pgd["dlib-resnet->sface"]["accuracy"] == pytest.approx(want)
    for model in m["models"]:  # white-box breaks each model; transfer is weaker than white-box on the judge
        assert pgd[f"{model}->{model}"]["accuracy"] <= 0.25
        other = next(o for o in m["models"] if o != model)
        assert pgd[f"{other}->{model}"]["accuracy"] >= pgd[f"{model}->{model}"]["accuracy"]
    assert sum(m["work"]["attacked_pairs"].values()) > 0
    assert (tmp_path / "m" / "sface_on_dlib-resnet" / "table1.json").exists()
    assert "Not in the matrix: facenet" in (tmp_path / "m" / "transfer.md").read_text()
    again = run_transfer_matrix(lfw_ci, ("dlib-resnet", "sface"), cfg, **kw)
    assert sum(again["work"]["attacked_pairs"].values()) == 0
    assert again["accuracy_after_attack"] == m["accuracy_after_attack"]

"""The benchmark runner: a quick end-to-end run of benchmarks/run_all.py, and its building blocks."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from advface_fast import bench
from advface_fast.attacks import VerificationObjective

REPO_ROOT = Path(__file__).resolve().parents[1]

ROW_PREFIXES = ("pgd_step fused", "cw_step fused", "PGD 1 step: ours fp32", "PGD 1 step: ours",
                "PGD-2: ours fp32", "embedding: onnxruntime", "embedding: ", "GEMM 256^3",
                "fwd+bwd effective GFLOP/s: fp32 eager", "Triton pgd_step bandwidth", "PGD step: ")


def test_run_all_quick_smoke(tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "run_all.py"), "--quick", "--synthetic",
           "--threads", "1", "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["seconds"] < 60, f"quick mode took {report['seconds']} s (wall {wall:.0f} s)"

    # Provenance of the numbers.
    for key in ("host", "date", "command", "cpu", "versions", "threads", "precision", "data", "config"):
        assert key in report, key
    assert report["threads"] == 1 and "--quick" in report["command"]
    assert report["versions"]["torch"] == torch.__version__
    assert report["data"]["source"].startswith("synthetic")

    rows = report["rows"]
    names = [r["name"] for r in rows]
    for prefix in ROW_PREFIXES:
        assert any(n.startswith(prefix) for n in names), (prefix, names)
    for r in rows:
        assert not r["status"].startswith("error"), r
        if r["status"] == "ok":
            assert r["ours"] > 0 and r["baseline"] > 0 and r["ratio"] > 0, r
            if r["target"] is not None:
                assert r["met"] == (r["ratio"] >= r["target"])
    gpu_rows = [r for r in rows if r["section"] == "gpu"]
    assert len(gpu_rows) == 2
    if not torch.cuda.is_available():
        assert all(r["status"] == "pending (no GPU)" for r in gpu_rows)
    # Both success rates are reported for every measured PGD row, judged on the same pairs.
    for r in rows:
        if r["section"] == "pgd" and r["status"] == "ok":
            rates = r["details"]["success_rate"]
            assert {"ours_fp32", "torchattacks"} <= set(rates) and all(0 <= v <= 1 for v in rates.values())

    # The printed table carries every row and its columns.
    assert "ratio" in proc.stdout and "target" in proc.stdout and "met?" in proc.stdout
    for name in names:
        assert name in proc.stdout


class TinyEmbedder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8))

    def forward(self, x):
        return self.net(x)


def test_two_logit_wrapper_ascends_our_objective():
    """Maximising CE(wrapper(x), label) moves x exactly as ascending our objective does."""
    model = TinyEmbedder().eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 8, 8, generator=gen)
    gallery = torch.randn(6, 8, generator=gen)
    is_same = torch.tensor([True, False, True, False, True, False])
    wrapper = bench.TwoLogitVerifier(model)
    wrapper.set_pairs(gallery, 0.1)

    xa = x.clone().requires_grad_(True)
    ce = nn.functional.cross_entropy(wrapper(xa), bench.TwoLogitVerifier.labels(is_same))
    (g_ce,) = torch.autograd.grad(ce, xa)
    xb = x.clone().requires_grad_(True)
    objective = VerificationObjective("cosine")
    ours = objective.ascent_loss(objective.similarity(model(xb), gallery), is_same).sum()
    (g_ours,) = torch.autograd.grad(ours, xb)
    assert torch.equal(torch.sign(g_ce), torch.sign(g_ours))


def test_torchattacks_pgd_on_wrapper_dodges_and_impersonates():
    torchattacks = pytest.importorskip("torchattacks")
    model = TinyEmbedder().eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (8, 3, 8, 8), generator=gen).float() / 255
    gallery = torch.randn(8, 8, generator=gen)
    is_same = torch.arange(8) % 2 == 0
    wrapper = bench.TwoLogitVerifier(model)
    wrapper.set_pairs(gallery, 0.0)
    attack = torchattacks.PGD(wrapper, eps=8 / 255, alpha=2 / 255, steps=5, random_start=False)
    x_adv = bench.deliver_torchattacks(attack(x, bench.TwoLogitVerifier.labels(is_same)), x, 8)
    objective = VerificationObjective("cosine")
    before = objective.similarity(model(x), gallery)
    after = objective.similarity(model(x_adv), gallery)
    assert (after[is_same] < before[is_same]).all()  # dodging lowers matched similarities
    assert (after[~is_same] > before[~is_same]).all()  # impersonation raises mismatched ones
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    assert torch.equal(torch.round(x_adv * 255) / 255, x_adv)


def test_time_side_by_side_interleaves_and_calibrates():
    calls = []

    def fast():
        calls.append("fast")

    def slow():
        calls.append("slow")
        time.sleep(0.004)

    t = bench.time_side_by_side({"fast": fast, "slow": slow}, rounds=3, warmup=1, min_sample_s=0.002)
    assert t["slow"].median_s > t["fast"].median_s
    assert t["fast"].number > 1 and len(t["fast"].samples) == 3
    assert t["slow"].min_s >= 0.004
    f, s = ["fast"] * t["fast"].number, ["slow"] * t["slow"].number
    # The timed rounds run in rotated order: fast-slow, slow-fast, fast-slow.
    assert calls[-(3 * len(f) + 3 * len(s)):] == f + s + s + f + f + s


def test_row_ratio_and_target():
    faster = bench.Row("s", "time", ours=1.0, baseline=5.0, unit="ms", higher_is_better=False, target=4)
    assert faster.ratio == pytest.approx(5.0) and faster.met is True
    slower = bench.Row("s", "rate", ours=30.0, baseline=100.0, unit="GFLOP/s", target=0.3)
    assert slower.ratio == pytest.approx(0.3) and slower.met is True
    assert bench.Row("s", "rate", ours=20.0, baseline=100.0, target=0.3).met is False
    assert bench.Row("s", "missing", baseline=1.0, target=2).met is None
    assert bench.pending("s", "n", "why").status == "pending: why"


def test_host_id_is_a_safe_file_name(monkeypatch):
    monkeypatch.setattr(bench.platform, "node", lambda: "lab box/01:gpu*")
    assert bench.host_id() == "lab_box_01_gpu"
    monkeypatch.setattr(bench.platform, "node", lambda: "")
    assert bench.host_id() == "unknown-host"


def test_missing_pieces_become_pending_rows(monkeypatch):
    monkeypatch.setattr(bench, "precision_module", lambda: None)
    ctx = bench.BenchContext(bench.BenchConfig(quick=True, synthetic=True, threads=1))
    model, precision, why = ctx.fast()
    assert model is None and "pending" not in why and "not available" in why

    monkeypatch.setattr(bench, "table1_fields", lambda: {"model", "eps"})
    rows = bench.section_table1(ctx)
    assert len(rows) == 2 and all(r.status.startswith("pending: Table1Config lacks precision") for r in rows)


def test_quick_pgd_section_without_fast_path(monkeypatch):
    """Without the precision module the fast rows are pending and the fp32 rows still measure."""
    pytest.importorskip("torchattacks")  # the fp32 row compares against it (optional: the bench extra)
    monkeypatch.setattr(bench, "precision_module", lambda: None)
    report = bench.run_benchmarks(bench.BenchConfig(quick=True, synthetic=True, threads=1, sections=("pgd",),
                                                    pgd_steps=1, rounds=1), command="test")
    rows = report["rows"]
    assert [r["status"] for r in rows][0] == "ok" and rows[1]["status"].startswith("pending")
    assert report["precision"]["fast_path"] is None and report["command"] == "test"


@pytest.mark.slow
def test_quick_run_on_real_pairs(lfw_full):
    report = bench.run_benchmarks(bench.BenchConfig(lfw=lfw_full, quick=True, threads=1,
                                                    sections=("pgd", "embedding")), command="test")
    assert report["data"]["source"].startswith("LFW fold 1, 2 matched + 2 mismatched")
    assert all(not r["status"].startswith("error") for r in report["rows"])


@pytest.mark.slow
def test_quick_table1_on_ci_pairs(lfw_ci):
    report = bench.run_benchmarks(bench.BenchConfig(lfw=lfw_ci, quick=True, threads=1, sections=("table1",)),
                                  command="test")
    rows = report["rows"]
    assert len(rows) == 2 and all(r["status"] == "ok" or r["status"].startswith("pending") for r in rows), rows


def test_table1_section_runs_three_isolated_variants(monkeypatch, tmp_path):
    """fp32 eager, fast, fast + early stop: each with its own empty attack cache; wiring only (fake run)."""
    import advface_fast.pipeline
    import advface_fast.experiments.table1 as table1

    seen = []

    def fake_run_table1(lfw, cfg, *, cache_dir, progress):
        assert not any(Path(cache_dir).iterdir())  # nothing reused from another variant
        (Path(cache_dir) / "row.npz").write_bytes(b"x")
        seen.append((cfg, cache_dir))
        acc = {"fp32": 0.50, "bf16": 0.52}[cfg.precision]
        rows = [{"attack": "pgd", "eps": 2.0, "accuracy_mean": acc, "time_s": 1.0, "image_steps": 8,
                 "image_steps_full": 16}]
        return {"rows": rows, "n_pairs": 4}

    monkeypatch.setattr(table1, "run_table1", fake_run_table1)
    monkeypatch.setattr(advface_fast.pipeline, "prepare_pairs", lambda *a, **k: None)
    ctx = bench.BenchContext(bench.BenchConfig(lfw=tmp_path, quick=True, threads=1))
    ctx._fast = (object(), "bf16", None)
    rows = bench.section_table1(ctx)

    # The real config: a renamed field would make the fast path silently run the plain model.
    assert all(isinstance(c, table1.Table1Config) for c, _ in seen)
    assert [(c.precision, c.fast_model, c.early_stop) for c, _ in seen] == [
        ("fp32", False, False), ("bf16", True, False), ("bf16", True, True)]
    assert len({d for _, d in seen}) == 3 and all(c.folds == (1,) and not c.noise_baseline for c, _ in seen)
    assert [r.status for r in rows] == ["ok", "ok"]
    assert all(r.ours > 0 and r.baseline > 0 and not r.higher_is_better for r in rows)
    assert rows[0].details["accuracy"] == {"pgd@2": 0.52} and "2.0 pts" in rows[0].note
    assert rows[0].target == bench.TARGET_TABLE1 and rows[1].target is None  # the target is early stop off
    variants = rows[0].details["variants"]
    assert set(variants) == {"fp32", "fast", "early"} and variants["fp32"]["image_steps"] == {"pgd@2": 8}


def test_profile_script_splits_a_step_into_groups(tmp_path):
    """benchmarks/profile_attack_step.py on a tiny batch: groups add up to the profiled step."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_attack_step.py"
    spec = importlib.util.spec_from_file_location("profile_attack_step", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.group_of("aten::convolution_backward") == "conv backward"
    assert script.group_of("aten::mkldnn_convolution") == "conv forward"
    assert script.group_of("aten::_to_copy") == script.group_of("aten::copy_")

    out = tmp_path / "profile.json"
    result = script.main(["--threads", "1", "--batch", "2", "--steps", "1", "--gemm-size", "128",
                          "--torchattacks-rate", "100", "--out", str(out)])
    assert json.loads(out.read_text())["batch"] == 2
    for r in result["configs"].values():
        assert sum(r["groups_s"].values()) == pytest.approx(r["profiled_step_s"])
        assert r["groups_s"]["conv forward"] > 0 and r["groups_s"]["conv backward"] > 0
        assert 0 < r["conv_share"] <= 1 and r["image_steps_per_s"] > 0
    # About 1.1 GFLOP per image-step for a 150x150 dlib-resnet forward + input-gradient backward.
    assert 0.8 < result["fwd_bwd_gflop_per_step"] / 2 < 1.5


def test_embedding_sweep_script_on_ci_pairs(lfw_ci, tmp_path):
    """benchmarks/embedding_batch_sweep.py on a few lfw_ci chips: every engine x batch has a rate."""
    import importlib.util

    pytest.importorskip("onnxruntime")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "embedding_batch_sweep.py"
    spec = importlib.util.spec_from_file_location("embedding_batch_sweep", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "sweep.json"
    result = script.main(["--lfw", str(lfw_ci), "--threads", "1", "--images", "8", "--batches", "4,8",
                          "--rounds", "1", "--out", str(out)])
    assert json.loads(out.read_text())["images"] == 8 and "<LFW>" in result["command"]
    assert len(result["rows"]) == 3 * 2 and all(r["images_per_s"] > 0 for r in result["rows"])
    assert 0.5 < result["forward_gflop_per_image"] < 0.6  # dlib-resnet at 150x150: ~0.54 GFLOP
    assert set(result["onnxruntime_vs_torch_fp32"]["at_each_batch"]) == {4, 8}

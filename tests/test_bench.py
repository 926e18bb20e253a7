"""The benchmark package: a quick end-to-end run of benchmarks/run_all.py, its building blocks, the
output checks of `advface bench`, and the pytest-benchmark files in quick mode.

No test here asserts anything about wall-clock time: speed claims live in benchmarks/results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import need_module  # in CI mode a missing library fails
import torch
from torch import nn

from advface_fast import bench
from advface_fast.attacks import PGD, VerificationObjective
from advface_fast.bench import cli as bench_cli
from advface_fast.bench import harness

REPO_ROOT = Path(__file__).resolve().parents[1]
from conftest import CI_MODE as IN_CI  # noqa: E402

ROW_PREFIXES = ("pgd_step fused", "cw_step fused", "PGD 1 step: ours fp32", "PGD 1 step: ours",
                "PGD-2: ours fp32", "embedding: onnxruntime", "embedding: ", "GEMM 256^3",
                "fwd+bwd effective GFLOP/s: fp32 eager", "Triton pgd_step bandwidth", "PGD step: ")


def import_torchattacks():
    """torchattacks, the peer library; CI installs it (README's test command), so there it must import."""
    return need_module("torchattacks", hint="pip install --no-deps torchattacks==3.5.1")


def quick_env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1", **extra}


def test_run_all_quick_smoke(tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "run_all.py"), "--quick", "--synthetic",
           "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=quick_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())

    # Provenance of the numbers.
    for key in ("host", "date", "command", "cpu", "versions", "threads", "precision", "data", "config", "seconds"):
        assert key in report, key
    assert report["threads"] == 1 and "--quick" in report["command"]
    assert report["versions"]["torch"] == torch.__version__
    assert report["data"]["source"].startswith("synthetic")
    assert report["precision"]["fast_path"] in ("fp32", "bf16")

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
    pgd_rows = [r for r in rows if r["section"] == "pgd"]
    assert len(pgd_rows) == 4
    if IN_CI or report["versions"]["torchattacks"]:  # the peer is measured, not skipped
        assert all(r["status"] == "ok" for r in pgd_rows), pgd_rows
    # Both success rates are reported for every measured PGD row, judged on the same pairs.
    for r in pgd_rows:
        if r["status"] == "ok":
            rates = r["details"]["success_rate"]
            assert {"ours_fp32", "ours_fast", "torchattacks"} <= set(rates)
            assert all(0 <= v <= 1 for v in rates.values())

    # The printed table carries every row and its columns.
    assert "ratio" in proc.stdout and "target" in proc.stdout and "met?" in proc.stdout
    for name in names:
        assert name in proc.stdout


# ------------------------------------------------------------------------------------------------
# --out: checked before the work, a folder accepted
# ------------------------------------------------------------------------------------------------
def test_out_folder_gets_a_host_named_report(tmp_path, monkeypatch):
    """`advface bench --out DIR` (its own --help example) used to run everything, then die on the folder."""
    from advface_fast.cli import main

    monkeypatch.setattr(harness.platform, "node", lambda: "box-1")
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    code = main(["bench", "--quick", "--synthetic", "--threads", "1", "--only", "kernels", "--out", str(out_dir)])
    assert code == 0
    report = json.loads((out_dir / "bench_box-1.json").read_text())
    assert [r["section"] for r in report["rows"]] == ["kernels", "kernels"]


def test_report_path_file_or_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(harness.platform, "node", lambda: "box-1")
    assert bench.report_path(tmp_path / "a.json", "unused") == tmp_path / "a.json"
    assert bench.report_path(tmp_path, "unused") == tmp_path / "bench_box-1.json"
    new = tmp_path / "new" / "folder"
    assert bench.report_path(new, "unused") == new / "bench_box-1.json" and new.is_dir()  # created
    (tmp_path / "odd.json").mkdir()  # a folder that happens to end in .json is still a folder
    assert bench.report_path(tmp_path / "odd.json", "unused") == tmp_path / "odd.json" / "bench_box-1.json"
    assert bench.report_path(None, tmp_path / "default") == tmp_path / "default" / "bench_box-1.json"


@pytest.mark.parametrize("out", ["blocker/report.json", "blocker/sub"])
def test_unwritable_out_fails_in_one_line_before_any_work(tmp_path, monkeypatch, capsys, out):
    from advface_fast.cli import main

    (tmp_path / "blocker").write_text("a file where a folder is needed")
    monkeypatch.setattr(bench_cli, "run_benchmarks", lambda *a, **k: pytest.fail("ran before checking --out"))
    assert main(["bench", "--quick", "--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("advface bench: error: --out: cannot write the report to") and "\n" not in err


def test_run_all_reports_bad_out_the_same_way(tmp_path, monkeypatch, capsys):
    (tmp_path / "blocker").write_text("x")
    monkeypatch.setattr(bench_cli, "run_benchmarks", lambda *a, **k: pytest.fail("ran before checking --out"))
    assert bench.main(["--quick", "--out", str(tmp_path / "blocker" / "r.json")], prog="run_all.py") == 2
    assert capsys.readouterr().err.startswith("run_all.py: error: --out:")


def test_out_and_no_write_exclude_each_other(capsys):
    from advface_fast.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--no-write", "--out", "x.json"])
    assert "not allowed with" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------
class TinyEmbedder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8))

    def forward(self, x):
        return self.net(x)


def tiny_pairs(seed: int, n: int = 6):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 8, 8), generator=gen).float() / 255
    gallery = torch.randn(n, 8, generator=gen)
    return x, gallery, torch.arange(n) % 2 == 0


def test_two_logit_wrapper_ascends_our_objective():
    """Maximising CE(wrapper(x), label) moves x exactly as ascending our objective does."""
    model = TinyEmbedder().eval().requires_grad_(False)
    x, gallery, is_same = tiny_pairs(1)
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
    torchattacks = import_torchattacks()
    model = TinyEmbedder().eval().requires_grad_(False)
    x, gallery, is_same = tiny_pairs(2, n=8)
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


def test_one_step_helper_is_the_pgd_class():
    """The FLOP-rate and CUDA-graph rows time PGD itself: the helper's step equals PGD(steps=1)."""
    model = TinyEmbedder().eval().requires_grad_(False)
    x, gallery, is_same = tiny_pairs(3)
    step = bench.pgd_one_step(model, "fp32", x.contiguous(), gallery, is_same, eps=8)
    reference = PGD(model, eps=8, steps=1, random_start=False, round_output=False)(x, gallery, is_same)
    assert torch.equal(step(), reference)
    assert not torch.equal(reference, x)  # it did move


def test_time_side_by_side_interleaves_calibrates_and_takes_medians():
    """A fake clock: each call of "fast" takes 1 ms, each call of "slow" 10 ms (no wall clock involved)."""
    now = [0.0]
    calls = []

    def make(name, cost):
        def fn():
            calls.append(name)
            now[0] += cost
        return fn

    fns = {"fast": make("fast", 0.001), "slow": make("slow", 0.010)}
    t = bench.time_side_by_side(fns, rounds=3, warmup=1, min_sample_s=0.004, clock=lambda: now[0])
    assert t["fast"].number == 4 and t["slow"].number == 1  # as many calls as fill 4 ms
    assert t["fast"].median_s == pytest.approx(0.001) and t["slow"].median_s == pytest.approx(0.010)
    assert len(t["fast"].samples) == 3 and t["slow"].min_s == pytest.approx(0.010)
    f, s = ["fast"] * 4, ["slow"]
    # warm-up, calibration, then timed rounds in rotated order: fast-slow, slow-fast, fast-slow.
    assert calls == ["fast", "slow"] + f + s + f + s + s + f + f + s


def test_row_ratio_and_target():
    faster = bench.BenchRow("s", "time", ours=1.0, baseline=5.0, unit="ms", higher_is_better=False, target=4)
    assert faster.ratio == pytest.approx(5.0) and faster.met is True
    slower = bench.BenchRow("s", "rate", ours=30.0, baseline=100.0, unit="GFLOP/s", target=0.3)
    assert slower.ratio == pytest.approx(0.3) and slower.met is True
    assert bench.BenchRow("s", "rate", ours=20.0, baseline=100.0, target=0.3).met is False
    assert bench.BenchRow("s", "missing", baseline=1.0, target=2).met is None
    assert bench.pending("s", "n", "why").status == "pending: why"


def test_host_id_is_a_safe_file_name(monkeypatch):
    monkeypatch.setattr(harness.platform, "node", lambda: "lab box/01:gpu*")
    assert bench.host_id() == "lab_box_01_gpu"
    monkeypatch.setattr(harness.platform, "node", lambda: "")
    assert bench.host_id() == "unknown-host"


def test_table1_section_runs_three_isolated_variants(monkeypatch, tmp_path):
    """fp32 eager, fast, fast + early stop: each with its own empty attack cache; wiring only (fake run)."""
    import advface_fast.pair_chips
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
    monkeypatch.setattr(advface_fast.pair_chips, "prepare_pairs", lambda *a, **k: None)
    ctx = bench.BenchContext(bench.BenchConfig(lfw=tmp_path, quick=True, threads=1))
    ctx._fast = (object(), "bf16")
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


def test_table1_section_needs_lfw():
    ctx = bench.BenchContext(bench.BenchConfig(synthetic=True, quick=True, threads=1))
    rows = bench.section_table1(ctx)
    assert len(rows) == 2 and all(r.status == "pending: needs LFW (not synthetic)" for r in rows)


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
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows), rows


# ------------------------------------------------------------------------------------------------
# The scripts and pytest-benchmark files in benchmarks/
# ------------------------------------------------------------------------------------------------
BENCHMARK_FILES = ["benchmarks/bench_attack.py", "benchmarks/bench_embedding.py", "benchmarks/bench_kernels.py",
                   "benchmarks/bench_verify.py"]


def run_benchmark_files(*args, **env):
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *BENCHMARK_FILES, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT, env=quick_env(**env))


def test_benchmark_files_without_timing_skip_with_a_pointer():
    proc = run_benchmark_files()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed" not in proc.stdout and "skipped" in proc.stdout
    assert "--benchmark-enable" in proc.stdout


def test_benchmark_files_run_in_quick_mode():
    import_torchattacks()
    proc = run_benchmark_files("--benchmark-enable", "--benchmark-max-time=0.05", "--benchmark-min-rounds=1",
                               ADVFACE_BENCH_QUICK="1", ADVFACE_BENCH_SYNTHETIC="1", ADVFACE_BENCH_THREADS="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # 6 PGD + 3 embedding + 2 forward-backward + 6 kernels + 1 verify; only the opt-in torch.compile ones skip.
    assert "18 passed, 2 skipped" in proc.stdout, proc.stdout
    assert proc.stdout.count("SKIPPED") == proc.stdout.count("set ADVFACE_BENCH_COMPILE=1") == 2, proc.stdout


def load_script(name: str):
    """A script of benchmarks/ as a module (its main(argv) returns the result it writes)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_allocator_page_faults_script_quick(tmp_path):
    script = load_script("allocator_page_faults")
    out = tmp_path / "faults.json"
    result = script.main(["--threads", "1", "--batch", "2", "--steps", "1", "--runs", "1", "--out", str(out)])
    assert json.loads(out.read_text())["median"] == result["median"]
    detail = result["runs_detail"]["dlib-resnet"]
    assert detail["default"][0]["keep_freed_memory"] is False
    for setting in ("threshold", "heap"):
        assert [r["keep_freed_memory"] for r in detail[setting]] == [True]
        assert f"mallopt {setting} applied" in detail[setting][0]["allocator"]
    assert all(m["step_ms"] > 0 for m in result["median"]["dlib-resnet"].values())


def test_stem_input_grad_script_quick(tmp_path):
    script = load_script("stem_input_grad")
    out = tmp_path / "stem.json"
    result = script.main(["--threads", "1", "--batch", "2", "--rounds", "1", "--chunks", "1,2", "--out", str(out)])
    assert json.loads(out.read_text())["input_gradient"] == result["input_gradient"]
    assert [r["variant"] for r in result["input_gradient"]] == [
        "bf16 aten convolution_backward", "bf16 polyphase", "fp32 aten convolution_backward", "fp32 polyphase"]
    assert [r["variant"] for r in result["stem_forward_and_input_gradient_bf16"]][2:] == [
        "ChunkedStem chunk 1", "ChunkedStem chunk 2"]
    assert all(r["ms"] > 0 for r in result["input_gradient"])
    assert result["command"].startswith("python ") and "--chunks 1,2" in result["command"]


def test_fast_path_switches_script_quick(tmp_path):
    script = load_script("fast_path_switches")
    out = tmp_path / "switches.json"
    result = script.main(["--threads", "1", "--batches", "2", "--rounds", "1", "--steps", "1",
                          "--configs", "fp32 NCHW plain,bf16 CL folded in-place fused-stem frozen-convs", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert [r["config"] for r in result["rows"]] == ["fp32 NCHW plain", "bf16 CL folded in-place fused-stem frozen-convs"]
    assert all(r["batch_2"] > 0 for r in result["rows"])
    with pytest.raises(SystemExit):  # a misspelt configuration is an error, not silently skipped
        script.main(["--configs", "bf16 CL folded in-place frozen-convs"])


def test_equal_strength_script_quick(lfw_ci, tmp_path):
    script = load_script("equal_strength")
    out = tmp_path / "equal.json"
    result = script.main(["--lfw", str(lfw_ci), "--fold", "1", "--attack", "pgd:eps=2,steps=1",
                          "--max-pairs", "4", "--threads", "1", "--batch-size", "4", "--out", str(out)])
    assert json.loads(out.read_text())["n_pairs"] == 4
    (entry,) = result["results"]
    assert set(entry["variants"]) == {"fast fp32", "fast bf16"}
    assert all(0 <= v["accuracy"] <= 1 for v in entry["variants"].values())


def test_profile_script_splits_a_step_into_groups(tmp_path):
    """benchmarks/profile_attack_step.py on a tiny batch: groups add up to the profiled step."""
    script = load_script("profile_attack_step")
    assert script.group_of("aten::convolution_backward") == "conv backward"
    assert script.group_of("aten::mkldnn_convolution") == "conv forward"
    assert script.group_of("aten::_to_copy") == script.group_of("aten::copy_")
    assert script.group_of("mkldnn::_convolution_transpose_pointwise").startswith("conv prepacked")

    out = tmp_path / "profile.json"
    result = script.main(["--threads", "1", "--batch", "2", "--steps", "1", "--gemm-size", "128",
                          "--torchattacks-rate", "100", "--out", str(out)])
    assert json.loads(out.read_text())["batch"] == 2
    for r in result["configs"].values():
        assert sum(r["groups_s"].values()) == pytest.approx(r["profiled_step_s"])
        conv = {g: t for g, t in r["groups_s"].items() if g.startswith("conv")}
        assert (conv.get("conv forward", 0) > 0 and conv.get("conv backward", 0) > 0) or \
            conv.get("conv prepacked (forward + input gradient)", 0) > 0, conv  # the packed path: both ways
        assert 0 < r["conv_share"] <= 1 and r["image_steps_per_s"] > 0
    assert any(g.startswith("conv prepacked") for r in result["configs"].values() for g in r["groups_s"])
    # About 1.1 GFLOP per image-step for a 150x150 dlib-resnet forward + input-gradient backward.
    assert 0.8 < result["fwd_bwd_gflop_per_step"] / 2 < 1.5


def test_embedding_sweep_script_on_ci_pairs(lfw_ci, tmp_path):
    """benchmarks/embedding_batch_sweep.py on a few lfw_ci chips: every engine x batch has a rate."""
    need_module("onnxruntime")
    script = load_script("embedding_batch_sweep")
    out = tmp_path / "sweep.json"
    result = script.main(["--lfw", str(lfw_ci), "--threads", "1", "--images", "8", "--batches", "4,8",
                          "--rounds", "1", "--out", str(out)])
    assert json.loads(out.read_text())["images"] == 8 and "<LFW>" in result["command"]
    assert len(result["rows"]) == 3 * 2 and all(r["images_per_s"] > 0 for r in result["rows"])
    assert 0.5 < result["forward_gflop_per_image"] < 0.6  # dlib-resnet at 150x150: ~0.54 GFLOP
    assert set(result["onnxruntime_vs_torch_fp32"]["at_each_batch"]) == {4, 8}


def test_threads_vs_load_script_quick(tmp_path):
    script = load_script("threads_vs_load")
    out = tmp_path / "threads.json"
    result = script.main(["--threads", "1", "--batch", "2", "--rounds", "1", "--steps", "1", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert result["rows"][0]["threads"] == 1 and result["rows"][0]["median_step_s"] > 0
    assert result["default_rule_picked"] >= 1 and result["default_rule_why"].startswith("auto: ")


def test_flop_fraction_target_follows_the_cpu(monkeypatch):
    """The step's FLOP-rate target: 0.50 of bf16 GEMM on AMX CPUs, 0.80 on AVX512-BF16 ones, 0.70 elsewhere."""
    import advface_fast.precision as precision
    from advface_fast.bench import flops

    for flags, want in (({"amx_bf16": True, "avx512_bf16": True}, 0.50), ({"avx512_bf16": True}, 0.80),
                        ({"avx2": True}, flops.TARGET_FLOP_FRACTION)):
        monkeypatch.setattr(precision, "cpu_features", lambda flags=flags: {"flags": flags})
        assert flops.flop_fraction_target(torch.device("cpu")) == want
    assert flops.flop_fraction_target(torch.device("cuda")) == flops.TARGET_FLOP_FRACTION


def test_model_attack_step_script_quick(tmp_path):
    script = load_script("model_attack_step")
    out = tmp_path / "steps.json"
    result = script.main(["--threads", "1", "--batch", "2", "--repeats", "1", "--models", "sface", "--out", str(out)])
    row = json.loads(out.read_text())["models"]["sface"]
    assert row == result["models"]["sface"]
    labels = ["plain fp32", "fast fp32", "fast without dilated_grad fp32"]
    assert all(row[label]["step_s"] > 0 for label in labels)
    assert "keep_freed_memory" in result and result["statistic"] == "median over interleaved rounds"


def test_bench_prelu_script_quick(tmp_path):
    script = load_script("bench_prelu")
    result = script.main(["--batch", "1", "--dtypes", "fp32,bf16", "--out", str(tmp_path / "prelu.json")])
    assert [r["dtype"] for r in result["rows"]] == ["fp32"] * 8 + ["bf16"] * 8
    assert all(r[k] > 0 for r in result["rows"] for k in ("fused_ms", "sign_ms", "two_pass_ms", "reference_ms"))


def test_strided_depthwise_grad_script_quick(tmp_path):
    script = load_script("strided_depthwise_grad")
    result = script.main(["--threads", "1", "--batch", "1", "--rounds", "1", "--out", str(tmp_path / "dw.json")])
    assert [(r["layer"][0], r["dtype"]) for r in result["rows"]][:2] == [(64, "bf16"), (64, "fp32")]
    assert all(r["dilated_ms"] > 0 and r["aten_backward_ms"] > 0 for r in result["rows"])
    assert all(r["dilated_relative_error"] < (2 ** -6 if r["dtype"] == "bf16" else 1e-5) for r in result["rows"])


def test_square_query_rate_script_quick(tmp_path):
    script = load_script("square_query_rate")
    result = script.main(["--threads", "1", "--pairs", "2", "--queries", "2", "--rounds", "1", "--models", "dlib-resnet",
                          "--out", str(tmp_path / "sq.json")])
    row = result["models"]["dlib-resnet"]
    assert row["plain fp32"]["queries_per_s"] > 0 and row["fast copy fp32"]["queries_per_s"] > 0
    assert row["max_similarity_difference"] < 1e-3  # the same function up to summation order


def test_onednn_log_counts_weight_reorders_of_dense_and_grouped_convolutions():
    from advface_fast.bench.onednn import count_primitives

    head = "onednn_verbose,v1,primitive,exec,cpu,"
    log = "\n".join([
        head + "reorder,jit:uni,undef,src:bf16::blocked:abcd::f0 dst:bf16::blocked:AcdB64a2b::f0,"
               "attr-scratchpad:user,,512x256x1x1,0.25",
        head + "reorder,jit:uni,undef,src:bf16::blocked:abcde::f0 dst:bf16::blocked:debcA16a::f0,"
               "attr-scratchpad:user,,512x1x1x3x3,0.5",  # a depthwise weight (groups x 1 x 1 x k x k)
        head + "reorder,jit:uni,undef,src:bf16::blocked:abcd::f0 dst:bf16::blocked:acdb::f0,"
               "attr-scratchpad:user,,64x32x75x75,1.0",  # an activation
        head + "convolution,brgconv:avx512_core_bf16,forward_training,src:bf16::blocked:acdb::f0,"
               "attr-post-ops:eltwise_relu,alg:convolution_direct,mb64_ic32oc32_ih75oh75kh3sh1ph1,2.0",
        "onednn_verbose,v1,info,prim_template:operation,engine,primitive,implementation,prop_kind,"
        "memory_descriptors,attributes,auxiliary,problem_desc,exec_time",  # the header: not a primitive
    ])
    found = count_primitives(log)
    assert found["reorders"] == {"weight-shaped": 2, "other": 1}, found
    assert found["primitives"] == {"convolution forward_training": 1, "reorder": 3}, found
    ms = found["milliseconds"]
    assert ms["reorder weight-shaped"] == pytest.approx(0.75) and ms["reorder other"] == pytest.approx(1.0)
    assert ms["reorder"] == pytest.approx(1.75) and ms["convolution forward_training"] == pytest.approx(2.0)

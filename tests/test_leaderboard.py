"""The leaderboard on lfw_ci: defense specs parse; the `none` entry's rows are Table 1's (the same
cached queries, nothing recomputed); the checks flag a defense built to mask gradients (Square beats
BPDA through a zero-gradient surrogate); entries merge, and refuse to merge across other pairs or
another threat model; `advface leaderboard --merge` writes the table."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from advface_fast.cli import main
from advface_fast.cli_options import pair_count_or_all
from advface_fast.experiments.leaderboard import (LeaderboardConfig, _comparable, defense_slug, parse_defense,
                                               run_leaderboard, square_pair_count)
from advface_fast.experiments.leaderboard_render import leaderboard_markdown, merge_entries
from advface_fast.experiments.table1 import Table1Config, run_table1

sys.path.insert(0, str(Path(__file__).resolve().parent))  # example_defense.py

TINY = "tiny-leaderboard"


class TinyFace(torch.nn.Module):
    """A small fixed random conv net on 32 x 32 chips: the protocol's mechanics in seconds, not a face model."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1, self.c2 = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(32 * 8 * 8, 16)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.05)

    def forward(self, x):
        return self.fc(torch.tanh(self.c2(torch.tanh(self.c1(x - 0.5)))).flatten(1))


@pytest.fixture(scope="module", autouse=True)
def tiny_registered():
    from advface_fast.models import ModelSpec, list_models, register_model
    from advface_fast.models.registry import _REGISTRY

    if TINY not in list_models():
        register_model(ModelSpec(name=TINY, build=TinyFace, input_size=(32, 32), embedding_dim=16,
                                 alignment={"size": 32, "padding": 0.25}, description="test-only tiny net"))
    yield
    _REGISTRY.pop(TINY, None)


def test_defense_specs_parse():
    assert parse_defense("none") == ("none", {})
    assert parse_defense("jpeg:quality=75") == ("jpeg", {"quality": 75})
    assert parse_defense("attack-as-defense:attack=pgd,eps=4,steps=10|40") == (
        "attack-as-defense", {"attack": "pgd", "eps": 4, "steps": (10, 40)})
    assert parse_defense("mypkg.defenses:build") == ("mypkg.defenses:build", {})
    assert parse_defense("mypkg.defenses:build:strength=0.5") == ("mypkg.defenses:build", {"strength": 0.5})
    assert defense_slug("jpeg:quality=75") == "jpeg-quality75"
    with pytest.raises(ValueError, match="bad defense parameters"):
        parse_defense("jpeg:quality=75,=3")


def none_precision(report) -> str:
    return next(e for e in report["entries"] if e["defense"]["name"] == "none")["protocol"]["transfer_precision"]


@pytest.fixture(scope="module")
def board(lfw_ci, tmp_path_factory):
    out = tmp_path_factory.mktemp("leaderboard")
    cfg = LeaderboardConfig(models=(TINY,), defenses=("none", "example_defense:masked:levels=64",
                                                               "counter-attack:steps=1"), folds=None,
                            max_pairs=20, eps=8, attack_steps=5, adaptive_steps=4, eot=1, square_queries=200,
                            costly_square_pairs=10, precision="fp32")
    report = run_leaderboard(lfw_ci, cfg, out, workers=1, progress=False)
    return cfg, report, out


def test_the_none_entry_is_table_1(lfw_ci, board):
    cfg, report, _ = board
    # by default the transfer rows are crafted at Table 1's default precision, so they read its queries
    assert LeaderboardConfig().transfer_precision == Table1Config().precision == "fp32"
    assert none_precision(report) == cfg.transfer_precision
    none = next(e for e in report["entries"] if e["defense"]["name"] == "none")
    t1 = run_table1(lfw_ci, Table1Config(model=TINY, attacks=("fgsm", "pgd", "cw"), eps=(8.0,), steps=(5,),
                                         folds=None, max_pairs=20, precision="fp32", noise_baseline=False),
                    workers=1, progress=False)
    rows = {r["attack"]: r for r in t1["rows"]}
    assert none["clean"]["accuracy"] == pytest.approx(rows["clean"]["accuracy_mean"], abs=1e-12)
    for attack in ("fgsm", "pgd", "cw"):
        assert none["static"][f"transfer-{attack}"] == pytest.approx(rows[attack]["accuracy_mean"], abs=1e-12), attack
    assert none["worst_case"]["accuracy"] <= min(none["static"].values())
    assert none["checks"] and all("masking" not in f.lower() for f in none["flags"])


def test_defense_families_from_the_command_line(tmp_path, capsys):
    from advface_fast.experiments.leaderboard import DEFAULT_DEFENSES, defense_families

    assert defense_families("all") == DEFAULT_DEFENSES  # the issue's `--defenses all`
    assert defense_families("none, jpeg,median") == ("none", "jpeg:quality=75", "median:size=3")  # protocol params
    for bad in ("jpeg:quality=50", "all,none", "no-such-defense", " , "):
        with pytest.raises(ValueError):
            defense_families(bad)
    argv = ["leaderboard", "--defenses", "jpeg:quality=50", "--out", str(tmp_path / "x"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--defense NAME:param" in err[0], err


def test_a_costly_defense_meets_square_on_its_stated_pair_subset(board):
    cfg, report, _ = board
    by_name = {e["defense"]["name"]: e for e in report["entries"]}
    for name, e in by_name.items():
        costly = e["cost"]["defense_passes_per_query"] > 2
        square = next(v for k, v in e["attacks"].items() if k.startswith("square"))
        n = cfg.costly_square_pairs if costly else e["pairs"]["n"]
        assert square["n_pairs"] == e["cost"]["attack_budget"]["square_pairs"] == n, name
        assert square["n_matched"] == n // 2, name  # the first half matched, half mismatched
        assert (e["worst_case"]["square_subset"] is not None) == costly, name
    assert by_name["counter-attack"]["cost"]["defense_passes_per_query"] > 2  # the board has a costly entry
    table = leaderboard_markdown(report["entries"])  # the table says which cells are on the subset
    rows = {line.split("|")[2].strip(): line for line in table.splitlines() if line.startswith(f"| {TINY} |")}
    costly_row = next(line for spec, line in rows.items() if spec.startswith("counter-attack"))
    assert costly_row.count(f"(on {cfg.costly_square_pairs} pairs)") == 1 and "Square ran on the first N" in table
    assert all("(on " not in line for spec, line in rows.items() if not spec.startswith("counter-attack"))
    # the two limits combine: the smaller wins; None is every pair
    assert square_pair_count(LeaderboardConfig(square_pairs=6, costly_square_pairs=10), True) == 6
    assert square_pair_count(LeaderboardConfig(square_pairs=6, costly_square_pairs=10), False) == 6
    assert square_pair_count(LeaderboardConfig(square_pairs=None, costly_square_pairs=None), True) is None
    assert square_pair_count(LeaderboardConfig(), False) is None and square_pair_count(LeaderboardConfig(), True) == 100
    assert pair_count_or_all("all") is None and pair_count_or_all("12") == 12  # --costly-square-pairs
    with pytest.raises(argparse.ArgumentTypeError):
        pair_count_or_all("0")


def test_the_checks_flag_masked_gradients(board):
    _, report, _ = board
    masked = next(e for e in report["entries"] if e["defense"]["name"] == "example-masked-rounding")
    rows = masked["attacks"]
    square = next(r for r in rows if r.startswith("square"))
    bpda = [r for r in rows if r.startswith("bpda-eot") and "start" not in rows[r]]  # from their own starts
    assert rows[square]["accuracy"] < min(rows[r]["accuracy"] for r in bpda) - 0.002, rows
    assert any("GRADIENT MASKING" in f for f in masked["flags"]), masked["flags"]
    # the worst case counts every attack, so masking does not buy accuracy
    assert masked["worst_case"]["accuracy"] <= rows[square]["accuracy"]


def test_the_warm_started_bpda_row_begins_at_the_strongest_transfer_queries(board):
    _, report, _ = board
    for e in report["entries"]:
        rows = e["attacks"]
        warm = [r for r in rows if r.startswith("bpda-eot from ")]
        assert len(warm) == 1, list(rows)
        origin = rows[warm[0]]["start"]
        transfers = {r: rows[r]["accuracy"] for r in rows if rows[r]["kind"] == "transfer"}
        assert rows[origin]["kind"] == "transfer" and transfers[origin] == min(transfers.values())
        assert rows[warm[0]]["kind"] == "white-box" and warm[0] in e["worst_case"]["over"]
        assert e["protocol"]["warm_start"] is True


def test_best_iterate_rows_keep_what_their_start_achieved(board):
    # The protocol's BPDA + EOT rows deliver, per pair, the best of their iterates by the attacker's loss,
    # the start included: against the deterministic undefended model the warm row, begun at the transfer
    # queries, never ends weaker than its origin (a last-iterate warm row may).
    cfg, report, _ = board
    assert cfg.best_iterate is True and cfg.copy_steps is None
    none = next(e for e in report["entries"] if e["defense"]["name"] == "none")
    rows = none["attacks"]
    warm = next(r for r in rows if r.startswith("bpda-eot from "))
    assert rows[warm]["accuracy"] <= rows[rows[warm]["start"]]["accuracy"]
    assert none["protocol"]["best_iterate"] is True
    last = copy.deepcopy(report["entries"][1])  # an entry of a last-iterate run (or of before the option)
    last["config"].pop("best_iterate")
    with pytest.raises(ValueError, match="differ in protocol.*best_iterate"):
        merge_entries([report["entries"][0], last])


def test_the_counter_attack_entry_fits_its_gate_and_meets_the_gate_aware_attacker(board):
    _, report, _ = board
    ttc = next(e for e in report["entries"] if e["defense"]["name"] == "counter-attack")
    fit = ttc["defense"]["fit"]
    assert fit["images"] >= 10 and ttc["defense"]["config"]["tau"] == pytest.approx(
        fit["clean_tau"]["quantiles"]["0.2"])
    gate = [r for r in ttc["attacks"] if r.startswith("gate-aware")]
    assert len(gate) == 1 and ttc["attacks"][gate[0]]["kind"] == "white-box"
    assert gate[0] in ttc["worst_case"]["over"]
    for row in ttc["attacks"].values():  # the gate's record on every row's queries
        assert 0.0 <= row["defense_diagnostics"]["counterattacked"] <= 1.0
    assert "defense_diagnostics" not in next(e for e in report["entries"] if e["defense"]["name"] == "none")["attacks"]["clean"]


def test_a_rerun_resumes_and_a_bad_spec_is_one_line(lfw_ci, board, capsys, tmp_path):
    cfg, report, out = board
    before = {p.name: p.stat().st_mtime_ns for p in (out / "entries").glob("*.json")}
    again = run_leaderboard(lfw_ci, cfg, out, workers=1, progress=True)  # every entry read back, none recomputed
    assert {p.name: p.stat().st_mtime_ns for p in (out / "entries").glob("*.json")} == before
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[leaderboard] ")]
    n = len(report["entries"])
    assert len(said) == n and all(f"/{n} " in line and ": read back from " in line for line in said), said
    redo = tmp_path / "redo"  # one entry missing: computed again (its rows from the cache), said so, the same
    shutil.copytree(out, redo)
    gone = sorted((redo / "entries").glob("*.json"))[0]
    gone.unlink()
    redone = run_leaderboard(lfw_ci, cfg, redo, workers=1, progress=True)
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[leaderboard] ")]
    assert sum(": read back from " in line for line in said) == n - 1
    assert sum(line.endswith(": computing") for line in said) == 1
    done = [line for line in said if ": worst case " in line]
    assert len(done) == 1 and gone.is_file() and f"/{n} " in done[0]
    assert sorted(e["worst_case"]["accuracy"] for e in redone["entries"]) == \
        sorted(e["worst_case"]["accuracy"] for e in report["entries"])
    assert [e["worst_case"] for e in again["entries"]] == [e["worst_case"] for e in report["entries"]]
    for spec, words in (("jpeg:qualty=75", "unexpected keyword"), ("jpeg:seed=3", "come from the run"),
                        ("no-such-defense", "unknown defense")):
        argv = ["leaderboard", "--lfw", str(lfw_ci), "--models", TINY, "--defense", spec, "--pairs", "4",
                "--out", str(out.parent / "bad-spec"), "--workers", "1", "--quiet"]
        assert main(argv) == 2, spec
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0] and "Traceback" not in err[0], err


def test_an_entry_whose_square_predates_the_randomised_search_is_recomputed(lfw_ci, board, capsys, tmp_path):
    cfg, report, out = board
    square = {e["defense"]["name"]: next(r for r in e["attacks"].values() if r["kind"] == "black-box")
              for e in report["entries"]}
    assert square["counter-attack"]["confirm"] == 8 and square["none"]["confirm"] == 0  # the search is recorded
    old = tmp_path / "old"
    shutil.copytree(out, old)
    path = next(p for p in (old / "entries").glob("*.json") if "counter-attack" in p.name)
    entry = json.loads(path.read_text())
    for r in entry["attacks"].values():
        r.pop("confirm", None)  # as written before the randomised search
    path.write_text(json.dumps(entry))
    again = run_leaderboard(lfw_ci, cfg, old, workers=1, progress=True)
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[leaderboard] ")]
    assert sum(": read back from " in line for line in said) == len(report["entries"]) - 1
    assert any("counter-attack" in line and "is recomputed: its Square stopped pairs at their first flipped draw"
               in line for line in said), said
    redone = next(e for e in again["entries"] if e["defense"]["name"] == "counter-attack")
    assert next(r for r in redone["attacks"].values() if r["kind"] == "black-box")["confirm"] == 8
    before = next(e for e in report["entries"] if e["defense"]["name"] == "counter-attack")
    assert redone["worst_case"] == before["worst_case"]  # its rows came back from the ledger


def test_entries_merge_and_refuse_mismatches(board, tmp_path, capsys):
    _, report, out = board
    entries = report["entries"]
    assert len(merge_entries(entries + entries)) == len(entries)  # the same entry twice counts once
    other_pairs = copy.deepcopy(entries[1])
    other_pairs["pairs"]["ids_sha256"] = "0" * 16
    with pytest.raises(ValueError, match="differ in pairs"):
        merge_entries([entries[0], other_pairs])
    other_eps = copy.deepcopy(entries[1])
    other_eps["threat_model"]["eps"] = 2.0
    with pytest.raises(ValueError, match="differ in threat model"):
        merge_entries([entries[0], other_eps])
    quick = copy.deepcopy(entries[1])
    quick["config"]["steps_cap"] = 1
    with pytest.raises(ValueError, match="differ in protocol.*steps_cap"):
        merge_entries([entries[0], quick])
    older = copy.deepcopy(entries[1])  # made before the costly pair subset existed: Square on every pair
    older["config"].pop("costly_square_pairs")
    with pytest.raises(ValueError, match="differ in protocol.*costly_square_pairs"):
        merge_entries([entries[0], older])
    plain_sq = copy.deepcopy(entries[1])  # Square on the plain model's scores (or made before the option existed)
    plain_sq["config"].pop("square_fast_copy")
    with pytest.raises(ValueError, match="differ in protocol.*square_fast_copy"):
        merge_entries([entries[0], plain_sq])
    cold = copy.deepcopy(entries[1])  # an entry of a run without the warm-started row (or of before it existed)
    cold["config"].pop("warm_start")
    with pytest.raises(ValueError, match="differ in protocol.*warm_start"):
        merge_entries([entries[0], cold])
    # A costly defense gets the costly Square budget: same protocol (the test board has one).
    costly = [e for e in entries if e["cost"]["attack_budget"]["square_queries"] != entries[0]["cost"]["attack_budget"]["square_queries"]]
    assert costly and len(merge_entries([entries[0], *costly])) == 2
    assert main(["leaderboard", "--merge", str(out), "--out", str(tmp_path / "merged")]) == 0
    text = (tmp_path / "merged" / "LEADERBOARD.md").read_text()
    assert "GRADIENT MASKING" in text and "| 1 |" in text
    other_run = copy.deepcopy(entries[1])  # made by another command: both commands are named, each once
    other_run["config"]["command"] = "advface leaderboard --another-run"
    text = leaderboard_markdown(merge_entries([*entries, other_run]))
    assert "2 commands: " in text and text.count("`advface leaderboard --another-run`") == 1
    ranking = json.loads((tmp_path / "merged" / "leaderboard.json").read_text())["ranking"]
    assert [r["worst_case_accuracy"] for r in ranking] == sorted((r["worst_case_accuracy"] for r in ranking), reverse=True)
    for r in ranking:  # every row at the lowest single-attack accuracy is named, ties included
        e = next(e for e in entries if e["defense"]["spec"] == r["defense"])
        low = min(v["accuracy"] for k, v in e["attacks"].items() if k != "clean")
        assert r["strongest_attacks"] == [k for k, v in e["attacks"].items() if k != "clean" and v["accuracy"] == low]
        assert e["worst_case"]["strongest"] == r["strongest_attacks"]  # the entry names what the table names
        # the attacks' compute: every timed row's seconds per pair x its pairs (Square's on its own pairs)
        timed = [v for v in e["attacks"].values() if v["attack_seconds_per_pair"] is not None]
        assert len(timed) == len(e["attacks"]) - 1 and r["attack_seconds"] > 0
        assert r["attack_seconds"] == pytest.approx(sum(v["attack_seconds_per_pair"] * v["n_pairs"] for v in timed), abs=0.1)
    assert (tmp_path / "merged" / "leaderboard.png").stat().st_size > 1000
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.json").write_text(json.dumps(entries[0]))
    (bad / "b.json").write_text(json.dumps(other_eps))
    assert main(["leaderboard", "--merge", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "differ in threat model" in capsys.readouterr().err


def test_a_model_stage_entry_is_attacked_on_its_held_out_folds_only(tmp_path):
    from advface_fast.experiments.leaderboard import model_stage, parse_model

    assert parse_model("dlib-resnet") == ("dlib-resnet", None)
    assert parse_model("dlib-resnet@runs/pgd/weights.safetensors") == ("dlib-resnet", "runs/pgd/weights.safetensors")
    with pytest.raises(ValueError, match="after '@'"):
        parse_model("dlib-resnet@")
    run = tmp_path / "pgd"
    run.mkdir()
    (run / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="no weights file"):
        model_stage(f"dlib-resnet@{run / 'missing.safetensors'}", (9,))
    spec = f"dlib-resnet@{run / 'weights.safetensors'}"
    assert "training split is unknown" in model_stage(spec, (1,))["note"]
    (run / "train.json").write_text(json.dumps({"config": {"method": "pgd", "eps": 4.0, "steps": 5, "epochs": 3,
                                                           "seed": 0}, "split": {"test_folds": [9, 10]}}))
    stage = model_stage(spec, (9,))
    assert stage["stage"] == "pgd-AT eps=4" and stage["held_out_folds"] == [9, 10] and stage["run"] == "pgd"
    for folds in ((1,), (9, 1), None):  # folds the model may have been trained on: refused
        with pytest.raises(ValueError, match="held-out folds"):
            model_stage(spec, folds)


def test_defend_points_another_family_to_the_leaderboard(lfw_ci, tmp_path, capsys):
    assert main(["defend", "--lfw", str(lfw_ci), "--defense", "jpeg:quality=75", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "advface leaderboard --defense jpeg:quality=75" in err[0]
    assert main(["defend", "--lfw", str(lfw_ci), "--defense", "nope", "--out", str(tmp_path)]) == 2
    assert "available: pgd, cw, fgsm" in capsys.readouterr().err


def test_square_reads_the_fp32_fast_copy_where_the_model_has_one(board):
    from types import SimpleNamespace

    from advface_fast.attacks import make_attack
    from advface_fast.defenses import DefendedModel, create_defense
    from advface_fast.experiments.leaderboard import square_oracle
    from advface_fast.models import arithmetic_key, create_model

    _, report, _ = board  # the tiny test model has no fast copy: its Square reads the plain model
    for e in report["entries"]:
        square = next(v for k, v in e["attacks"].items() if k.startswith("square"))
        assert square["scores_from"] == "plain model" and e["protocol"]["square_fast_copy"] is True
    net = create_model("dlib-resnet")
    ctx = SimpleNamespace(cfg=SimpleNamespace(model="dlib-resnet"), net=net, attacked_net=net, square_copy=None)
    copy_, label = square_oracle(ctx, LeaderboardConfig())
    assert label == "fast copy (fp32)" and copy_ is not net and arithmetic_key(copy_)
    assert square_oracle(ctx, LeaderboardConfig())[0] is copy_  # built once per context
    assert square_oracle(ctx, LeaderboardConfig(square_fast_copy=False)) == (None, "plain model")
    x = torch.rand(4, 3, 150, 150, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the plain model's function up to summation order
        a, b = net(x), copy_(x)
    assert torch.allclose(a, b, rtol=0, atol=1e-4 * a.abs().max().item())
    # Square's cache keys tell the two oracles apart, so neither reads the other's queries
    defense = create_defense("jpeg", net)
    keys = [make_attack("square", DefendedModel(defense, embedder=m), eps=4, n_queries=10).config()
            for m in (None, copy_)]
    assert keys[0] != keys[1]


def test_fast_model_reaches_the_defense_context(lfw_ci, tmp_path):
    assert LeaderboardConfig().defend_config("dlib-resnet").fast_model is False  # committed entries: plain model
    assert LeaderboardConfig(fast_model=True).defend_config("dlib-resnet").fast_model is True
    # a model without a fast copy: one clear error before any work, not a crash midway
    cfg = LeaderboardConfig(models=(TINY,), defenses=("none",), max_pairs=4, fast_model=True)
    with pytest.raises(ValueError, match="no fast copy"):
        run_leaderboard(lfw_ci, cfg, tmp_path, workers=1, progress=False)


def test_rows_come_back_from_the_ledger_without_the_image_cache(lfw_ci, board, tmp_path):
    """Only the row ledger travels (no entries, no attacked images): every row is read back, none attacked,
    and the entries are the same."""
    cfg, report, out = board
    moved = tmp_path / "moved"
    shutil.copytree(out / "rows", moved / "rows")
    cold = tmp_path / "cold-attack-cache"
    again = run_leaderboard(lfw_ci, cfg, moved, cache_dir=cold, workers=1, progress=False)
    assert not list(cold.rglob("chunk-*.npz"))  # no attack ran
    for old, new in zip(report["entries"], again["entries"]):
        assert new["attacks"] == old["attacks"] and new["worst_case"] == old["worst_case"]
        assert old["rows_read_back"] == [] and new["rows_read_back"] == [r for r in old["attacks"] if r != "clean"]
    shutil.copytree(out / "rows", tmp_path / "other" / "rows")  # another protocol finds nothing to read back
    other = run_leaderboard(lfw_ci, dataclasses.replace(cfg, kappa=0.2, defenses=("none",)), tmp_path / "other",
                            cache_dir=cold, workers=1, progress=False)
    assert other["entries"][0]["rows_read_back"] == []


def test_a_pairs_file_counts_by_its_content_not_its_path(tmp_path):
    a, b, c = tmp_path / "a.txt", tmp_path / "moved" / "b.txt", tmp_path / "c.txt"
    b.parent.mkdir()
    a.write_text("1\t1\nAbel_Pacheco\t1\t4\n")
    b.write_bytes(a.read_bytes())
    c.write_text("1\t1\nAbel_Pacheco\t1\t2\n")
    cfg = dataclasses.asdict(LeaderboardConfig())
    same = [_comparable({**cfg, "pairs_file": str(p)}) for p in (a, b)]
    assert same[0] == same[1] and same[0]["pairs_file"].startswith("sha256:")
    assert _comparable({**cfg, "pairs_file": str(c)}) != same[0]
    gone = str(tmp_path / "gone.txt")
    assert _comparable({**cfg, "pairs_file": gone})["pairs_file"] == gone != same[0]["pairs_file"]
    assert _comparable(cfg) == _comparable({**cfg, "command": "other"})  # no pairs file: as before

"""Adversarial training: identity split, PGD-AT / FGSM-RS / free AT steps, resume, registry weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from advface_fast.train import TrainConfig, make_split, train
from advface_fast.train.adapter import HeadObjective, attack_images, training_attack
from advface_fast.train.head import CosFaceHead


# ------------------------------------------------------------------ tiny model and data


class TinyBN(nn.Module):
    """A small trainable embedder WITH BatchNorm (the general case): N x 3 x H x W -> N x 8."""

    embedding_dim = 8

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 5, stride=4, padding=2)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 4, 8)
        self.modes = []  # self.training at every forward, to check attacks run in eval mode

    def forward(self, x):
        self.modes.append(self.training)
        y = torch.tanh(self.bn(self.conv1(x - 0.5)))
        y = torch.tanh(self.conv2(y))
        return self.fc(nn.functional.adaptive_avg_pool2d(y, 2).flatten(1))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return TinyBN()


@pytest.fixture(scope="module")
def tiny_data():
    """12 seeded 'chips' (uint8 N x 48 x 48 x 3) of 3 classes: class-dependent colour plus noise."""
    rng = np.random.default_rng(0)
    labels = np.arange(12) % 3
    base = np.array([[200, 60, 60], [60, 200, 60], [60, 60, 200]], dtype=np.float64)
    chips = base[labels][:, None, None, :] + rng.normal(0, 40, size=(12, 48, 48, 3))
    return np.clip(chips, 0, 255).astype(np.uint8), labels, [f"P{i % 3}/P{i % 3}_{i:04d}" for i in range(12)]


def run(tmp_path, data, name="run", model=None, **kw):
    chips, labels, ids = data
    options = dict(resume=False, progress=False)
    options.update({k: kw.pop(k) for k in ("resume", "stop_after", "checkpoint_every") if k in kw})
    cfg = TrainConfig(**{"method": "pgd", "eps": 8, "steps": 2, "epochs": 2, "batch_size": 5, "lr": 1e-2,
                         "precision": "fp32", **kw})
    model = model or tiny_model()
    report = train(model, chips, labels, ids, cfg, tmp_path / name, **options)
    return model, report


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------ identity split


def _contiguous(lfw: Path, name: str) -> int:
    """How many images Name_0001, Name_0002, ... exist without a gap (lfw_ci holds a subset of LFW)."""
    k = 0
    while (lfw / "lfw-deepfunneled" / name / f"{name}_{k + 1:04d}.jpg").exists():
        k += 1
    return max(k, 1)


def write_people(lfw: Path, path: Path) -> Path:
    """A people.txt for lfw_ci: people fold k = the people of pair fold k, with their image counts."""
    lines = (lfw / "pairs.txt").read_text().splitlines()
    n_folds, per_half = map(int, lines[0].split())
    folds = [dict() for _ in range(n_folds)]
    for k, line in enumerate(lines[1:]):
        f = line.split("\t")
        for name in ([f[0]] if len(f) == 3 else [f[0], f[2]]):
            folds[k // (2 * per_half)][name] = _contiguous(lfw, name)
    # a person in two pair folds would make people folds overlap; keep them in the first only
    seen = set()
    out = [str(n_folds)]
    for fold in folds:
        kept = {n: c for n, c in sorted(fold.items()) if n not in seen}
        seen |= set(kept)
        out += [str(len(kept))] + [f"{n}\t{c}" for n, c in kept.items()]
    path.write_text("\n".join(out) + "\n")
    return path


def test_split_never_trains_on_a_test_identity(lfw_ci, tmp_path):
    people = write_people(lfw_ci, tmp_path / "people.txt")
    split = make_split(lfw_ci, [2], people_file=people)
    pair_lines = (lfw_ci / "pairs.txt").read_text().splitlines()[1:]
    test_names = {f for line in pair_lines[20:] for f in line.split("\t") if not f.isdigit()}
    trained = {i.split("/")[0] for i in split.image_ids}
    assert trained and not trained & test_names
    assert set(split.identities) == trained and split.n_identities >= 2
    assert all(split.image_ids.count(i) == 1 for i in split.image_ids)
    # every identity has >= 2 images and labels index the identities
    counts = np.bincount(split.labels)
    assert counts.min() >= 2 and len(counts) == split.n_identities
    assert all(split.identities[l] == i.split("/")[0] for i, l in zip(split.image_ids, split.labels))
    # a person named by a held-out pair is excluded even if the people file lists them in a training fold
    text = people.read_text().splitlines()
    victim = sorted(test_names)[0]
    hacked = [text[0], str(int(text[1]) + 1), f"{victim}\t2"] + text[2:]
    (tmp_path / "hacked.txt").write_text("\n".join(hacked) + "\n")
    split2 = make_split(lfw_ci, [2], people_file=tmp_path / "hacked.txt")
    assert victim not in split2.identities
    with pytest.raises(ValueError, match="nothing is left"):
        make_split(lfw_ci, [1, 2], people_file=people)
    with pytest.raises(ValueError, match="1..2"):
        make_split(lfw_ci, [3], people_file=people)


@pytest.mark.slow
def test_split_full_lfw_counts(lfw_full):
    split = make_split(lfw_full, [9, 10])
    assert (split.n_identities, len(split.image_ids)) == (1324, 7007)
    pair_lines = (lfw_full / "pairs.txt").read_text().splitlines()[1:]
    test_names = {f for line in pair_lines[4800:] for f in line.split("\t") if not f.isdigit()}
    assert not {i.split("/")[0] for i in split.image_ids} & test_names


# ------------------------------------------------------------------ methods and the loop


def test_training_attack_raises_the_head_loss_within_eps(tiny_data):
    chips, labels, ids = tiny_data
    model = tiny_model()
    x = torch.from_numpy(chips).permute(0, 3, 1, 2).float() / 255
    y = torch.as_tensor(labels)
    head = CosFaceHead(8, 3)
    attack = training_attack(model.eval(), head, eps=8, steps=5, alpha=2, precision="fp32")
    x_adv = attack_images(attack, x, y, seeds=range(12))
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        before, after = head.loss(model(x), y), head.loss(model(x_adv), y)
    assert after > before
    assert HeadObjective(head).config()["name"] == "cosface-head"


def test_pgd_at_end_to_end_and_loss_decreases(tmp_path, tiny_data):
    model, report = run(tmp_path, tiny_data, epochs=6)
    hist = report["history"]
    assert report["finished"] and len(hist) == 6
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert all(r["robust_accuracy"] is not None and 0 <= r["clean_accuracy"] <= 1 for r in hist)
    # 12 images x 2 PGD steps per epoch, one update pass per image
    assert hist[0]["attack_image_steps"] == 24 and hist[0]["update_passes"] == 12
    assert report["cost"]["per_image_epoch"]["image_steps"] == pytest.approx(3.0)
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, 7))
    assert (tmp_path / "run" / "weights.safetensors").exists()
    assert not model.training


def test_attacks_run_in_eval_mode_and_the_update_in_train_mode(tmp_path, tiny_data):
    model = tiny_model()
    run(tmp_path, tiny_data, model=model, epochs=1, batch_size=12, steps=3)
    # per batch: the clean-accuracy forward (eval), 3 attack steps (eval), the update (train)
    assert model.modes[-5:] == [False, False, False, False, True]


@pytest.mark.parametrize("method", ["pgd", "fgsm-rs", "free", "clean"])
def test_resume_equals_uninterrupted_bit_for_bit(tmp_path, tiny_data, method):
    straight, rep = run(tmp_path, tiny_data, name="straight", method=method, epochs=2)
    # 3 batches per epoch; interrupt after 4 (mid-epoch 2), resume in a fresh model and process
    first, _ = run(tmp_path, tiny_data, name="split", method=method, epochs=2, stop_after=4)
    assert not state_equal(first, straight)
    resumed, rep2 = run(tmp_path, tiny_data, name="split", method=method, epochs=2, resume=True,
                        model=tiny_model(seed=123))
    assert state_equal(resumed, straight)
    strip = ("attack_seconds", "update_seconds", "train_seconds", "monitor_seconds", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in strip} for r in rep2["history"]] == \
           [{k: v for k, v in r.items() if k not in strip} for r in rep["history"]]


def test_resume_refuses_other_settings_and_overwriting(tmp_path, tiny_data):
    run(tmp_path, tiny_data, epochs=1, stop_after=1)
    with pytest.raises(ValueError, match="eps"):
        run(tmp_path, tiny_data, epochs=1, eps=4, resume=True)
    with pytest.raises(FileExistsError):
        run(tmp_path, tiny_data, epochs=1)


def test_deterministic_by_seed(tmp_path, tiny_data):
    a, _ = run(tmp_path, tiny_data, name="a", epochs=1)
    b, _ = run(tmp_path, tiny_data, name="b", epochs=1)
    c, _ = run(tmp_path, tiny_data, name="c", epochs=1, seed=1)
    assert state_equal(a, b) and not state_equal(a, c)


# ------------------------------------------------------------------ registry


def test_trained_weights_load_through_the_registry(tmp_path, ci_chips):
    from advface_fast.models import create_model
    from advface_fast.models.identity import weights_id

    model = create_model("dlib-resnet", frozen=False)
    chips = ci_chips[:6]
    labels = np.array([0, 0, 0, 1, 1, 1])
    cfg = TrainConfig(method="pgd", eps=4, steps=1, epochs=1, batch_size=6, lr=1e-3, precision="auto")
    report = train(model, chips, labels, [f"x/x_{i:04d}" for i in range(6)], cfg, tmp_path / "dlib", progress=False)
    path = tmp_path / "dlib" / report["weights"]
    loaded = create_model("dlib-resnet", weights=path)
    original = create_model("dlib-resnet")
    assert state_equal(loaded, model)
    assert weights_id(loaded) == weights_id(model) != weights_id(original)
    assert loaded.weights_sha256 and not loaded.training
    x = torch.from_numpy(chips[:2]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    # strict: a file with a missing key or another shape is refused, and pickles are never read
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.pop("fc.weight")
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        create_model("dlib-resnet", weights=tmp_path / "missing.safetensors")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="safetensors"):
        create_model("dlib-resnet", weights=tmp_path / "w.pt")


# ------------------------------------------------------------------ command line and held-out evaluation


def test_cli_advtrain_then_heldout_evaluation(lfw_ci, tmp_path, capsys):
    from advface_fast.cli import main
    from advface_fast.train.evaluate import evaluate_heldout, summarize

    people = write_people(lfw_ci, tmp_path / "people.txt")
    out = tmp_path / "fgsm"
    common = ["advtrain", "--lfw", str(lfw_ci), "--people-file", str(people), "--method", "fgsm-rs", "--epochs", "1",
              "--batch-size", "8", "--threads", "1", "--workers", "1", "--quiet", "--out", str(out)]
    # one held-out fold cannot fit its own threshold: refused before any training
    assert main(common + ["--test-folds", "2"]) == 2
    assert "at least two held-out folds" in capsys.readouterr().err
    assert main(common + ["--test-folds", "2", "--no-eval"]) == 0
    text = capsys.readouterr().out
    assert "identities" in text and "epoch 1" in text
    split = json.loads((out / "split.json").read_text())
    assert split["test_folds"] == [2] and split["n_images"] == len(split["image_ids"])
    # the trained weights judged by the Table 1 code on folds 1-2 (thresholds cross-fitted between them)
    report = evaluate_heldout(lfw_ci, [1, 2], weights=out / "weights.safetensors", attacks=("fgsm",), eps=(4,),
                              steps=None, max_pairs=4, progress=False, workers=1)
    assert report["config"]["weights"].endswith("weights.safetensors")
    assert report["held_out_folds"] == [1, 2] and "held-out" in report["thresholds"]["rule"]
    s = summarize(report)
    assert s["n_pairs"] == 4 and set(s["rows"]) == {"fgsm@4"} and 0 <= s["clean_accuracy"] <= 1
    with pytest.raises(ValueError, match="two held-out folds"):
        evaluate_heldout(lfw_ci, [2])
    # --eval-only judges the finished run again and records it in train.json
    assert main(["advtrain", "--lfw", str(lfw_ci), "--test-folds", "1,2", "--eval-only", "--eval-attacks", "fgsm",
                 "--eval-eps", "2", "--eval-pairs", "4", "--eval-out", str(tmp_path / "ev2"), "--threads", "1",
                 "--workers", "1", "--quiet", "--out", str(out)]) == 0
    evals = json.loads((out / "train.json").read_text())["evaluations"]
    assert len(evals) == 1 and set(evals[0]["rows"]) == {"fgsm@2"} and (tmp_path / "ev2" / "table1.json").exists()


def test_cli_advtrain_honours_the_input_rules(lfw_ci, tmp_path, capsys):
    """--on-bad / --no-face reach the training images and the held-out pairs, are recorded, and a resume
    with other rules is refused."""
    import hashlib
    import shutil

    from advface_fast.cli import main
    from advface_fast.data import parse_pairs

    lfw = tmp_path / "lfw"
    shutil.copytree(lfw_ci, lfw)
    people = write_people(lfw, tmp_path / "people.txt")
    limits = ["--max-identities", "3", "--max-images-per-identity", "2"]
    split = make_split(lfw, [2], people_file=people, max_identities=3, max_images_per_identity=2)
    in_fold_1 = {i for p in parse_pairs(lfw / "pairs.txt").pairs if p.fold == 1 for i in (p.a, p.b)}
    victim = next(i for i in split.image_ids if i in in_fold_1)  # a training image a held-out pair uses too
    image = lfw / "lfw-deepfunneled" / f"{victim}.jpg"
    image.write_bytes(image.read_bytes()[:300])  # truncated; SHA256SUMS is kept true, so only the image is bad
    sums = lfw / "SHA256SUMS"
    sums.write_text("".join(f"{hashlib.sha256(image.read_bytes()).hexdigest()}  ./lfw-deepfunneled/{victim}.jpg\n"
                            if line.endswith(f"/{victim}.jpg") else line + "\n"
                            for line in sums.read_text().splitlines()))
    out = tmp_path / "run"
    train_args = ["advtrain", "--lfw", str(lfw), "--people-file", str(people), "--test-folds", "2", "--no-eval",
                  "--method", "clean", "--epochs", "0", *limits, "--threads", "1", "--workers", "1", "--quiet",
                  "--out", str(out)]
    # error (every command's default): one line naming the file, before any training
    assert main(train_args) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("advface advtrain: error: ") and f"{victim}.jpg" in line and "--on-bad skip" in line, line
    assert not (out / "split.json").exists()
    # skip: trained without it (its identity, left with one image, goes too), and recorded; the pairs
    # file that says who is held out can be the user's own (--pairs-file, like every command)
    own_pairs = tmp_path / "my_pairs.txt"
    own_pairs.write_bytes((lfw / "pairs.txt").read_bytes())
    assert main(train_args + ["--on-bad", "skip", "--pairs-file", str(own_pairs)]) == 0
    assert "training input: 1 image(s) dropped (--on-bad skip" in capsys.readouterr().out
    recorded = json.loads((out / "split.json").read_text())
    assert recorded["input"]["on_bad"] == "skip" and [s["image"] for s in recorded["input"]["skipped"]] == [victim]
    assert victim not in recorded["image_ids"] and recorded["identities_dropped"] == [victim.split("/")[0]]
    assert recorded["n_identities"] == 2 and json.loads((out / "train.json").read_text())["split"]["input"]
    assert recorded["pairs_file"].endswith("my_pairs.txt")
    # a rerun with other input rules is refused, naming the change (--resume is accepted, and changes nothing)
    assert main(train_args + ["--on-bad", "skip", "--no-face", "skip", "--resume"]) == 2
    assert "--no-face skip != center in the existing run" in capsys.readouterr().err
    # the held-out pairs are loaded with the same rules
    evaluate = ["advtrain", "--lfw", str(lfw), "--test-folds", "1,2", "--eval-only", "--eval-attacks", "",
                "--eval-pairs", "4", "--threads", "1", "--workers", "1", "--quiet", "--out", str(out)]
    assert main(evaluate) == 2
    assert f"{victim}.jpg" in capsys.readouterr().err
    assert main(evaluate + ["--on-bad", "skip", "--pairs-file", str(own_pairs)]) == 0
    assert "pair(s) skipped (--on-bad skip" in capsys.readouterr().out
    table = json.loads((out / "eval" / "table1.json").read_text())
    assert table["input"]["on_bad"] == "skip" and table["config"]["on_bad"] == "skip"
    assert table["input"]["pairs_file"].endswith("my_pairs.txt")
    assert table["input"]["skipped"] and all(victim in s["reason"] for s in table["input"]["skipped"])


def test_cli_advtrain_rerun_continues_does_nothing_when_finished_and_refuses_other_settings(lfw_ci, tmp_path, capsys,
                                                                                           monkeypatch):
    """Like every long command: the same command into the same --out continues an interrupted run (exactly,
    without --resume), does nothing once it is finished, and other settings are refused in one line."""
    from safetensors.torch import load_file

    from advface_fast.train import loop
    from advface_fast.cli import main

    people = write_people(lfw_ci, tmp_path / "people.txt")

    def args(out, *extra):
        return ["advtrain", "--lfw", str(lfw_ci), "--people-file", str(people), "--test-folds", "2", "--no-eval",
                "--method", "clean", "--epochs", "1", "--batch-size", "2", "--lr", "1e-3", "--max-identities", "3",
                "--max-images-per-identity", "2", "--checkpoint-every", "1", "--threads", "1", "--workers", "1",
                "--quiet", "--out", str(out), *extra]

    out = tmp_path / "run"
    real_save = loop.save_checkpoint

    def save_then_interrupt(*a, **k):  # Ctrl-C right after the first checkpoint
        real_save(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_interrupt)
    assert main(args(out)) == 130
    saved_steps = []  # the global step of every checkpoint the rerun writes

    def save_and_record(*a, **k):
        saved_steps.append(k["meta"]["global_step"])
        return real_save(*a, **k)

    monkeypatch.setattr(loop, "save_checkpoint", save_and_record)
    assert (out / "checkpoint.safetensors").exists() and not (out / "weights.safetensors").exists()
    capsys.readouterr()
    # the same command again continues it (from step 1, not from the start) ...
    assert main(args(out)) == 0
    assert "epoch 1:" in capsys.readouterr().out
    assert saved_steps and saved_steps[0] == 2
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    report = json.loads((out / "train.json").read_text())
    n_images = json.loads((out / "split.json").read_text())["n_images"]
    assert report["finished"] and report["global_step"] == (n_images + 1) // 2 > 1
    # ... and ends where the uninterrupted run ends
    assert main(args(tmp_path / "straight")) == 0
    resumed, straight = load_file(out / "weights.safetensors"), load_file(tmp_path / "straight" / "weights.safetensors")
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in resumed)
    capsys.readouterr()
    # a finished run is not redone: it says so and where the results are (--resume, kept for old scripts, too)
    files = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    for extra in ([], ["--resume"]):
        assert main(args(out, *extra)) == 0
        text = capsys.readouterr().out
        assert text.startswith(f"nothing to do: {out} holds this run, finished"), text
        assert "results: weights.safetensors" in text and "epoch 1:" in text
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == files  # nothing written
    # other settings: refused in one line naming every change, before any work
    changed = args(out)
    changed[changed.index("--epochs") + 1] = "3"
    changed[changed.index("--max-identities") + 1] = "2"
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("advface advtrain: error: ") and "Traceback" not in err
    assert "--epochs 3 != 1 in the existing run" in err and "--max-identities 2 != 3 in the existing run" in err
    assert main(args(out, "--seed", "1", "--method", "pgd")) == 2
    err = capsys.readouterr().err
    assert "--method pgd != clean in the existing run" in err and "--seed 1 != 0 in the existing run" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == files

"""``advface advtrain`` as one Python call: split -> chips -> fine-tune -> held-out evaluation."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..data.policy import InputPolicy
from ..fileio import write_json_atomic
from ..models import create_model
from ..environment import environment
from .evaluate import evaluate_heldout, summarize
from .loop import WEIGHTS, TrainConfig, train
from .split import load_train_chips, make_split


def run_advtrain(lfw, cfg: TrainConfig, out_dir, *, model: str = "dlib-resnet", test_folds=(9, 10),
                 people_file=None, pairs_file=None, max_identities: int | None = None,
                 max_images_per_identity: int | None = None, policy: InputPolicy | None = None,
                 resume: bool = False, checkpoint_every: int = 0, evaluate: bool = True,
                 eval_attacks=("pgd",), eval_eps=(4,), eval_steps=(10,), eval_pairs: int | None = None,
                 eval_precision: str = "auto", workers=None, progress: bool = True) -> dict:
    """Train ``model`` with ``cfg`` on the identities outside ``test_folds`` and judge it on them.

    policy: the input rules (data.policy.InputPolicy: on_bad, no_face), as for every command, for
    the training images and the held-out pairs alike; pairs_file: your own pairs file instead of the
    dataset's pairs.txt (it names the held-out pairs and so who is never trained on).
    Writes to ``out_dir``: checkpoint / weights / log (see :func:`.loop.train`), ``split.json``
    (with ``input``: what the input rules did), ``train.json`` (with ``evaluation``: the held-out
    Table 1 summary) and ``eval/`` (the full Table 1 files). A resumed run (``resume=True``) must
    present the input rules and training images it started with.
    """
    out = Path(out_dir)
    t0 = time.perf_counter()
    policy = policy or InputPolicy()
    if evaluate and len(set(test_folds)) < 2:
        raise ValueError("evaluation needs at least two held-out folds (each fold's threshold is fitted on the other "
                         f"held-out folds), got {sorted(set(test_folds))}; e.g. --test-folds 9,10, or --no-eval")
    before = _started_split(out) if resume else None
    if before is not None:
        _check_same_input_rules(out, before, policy)
    split = make_split(lfw, test_folds, people_file=people_file, max_identities=max_identities,
                       max_images_per_identity=max_images_per_identity,
                       pairs_file="pairs.txt" if pairs_file is None else str(pairs_file))
    chips, align_info, split = load_train_chips(lfw, split, model, policy=policy, workers=workers, progress=progress)
    if before is not None and before.get("image_ids") != list(split.image_ids):
        raise ValueError(f"{out} was trained on another set of images (other people / pairs file, --max-* "
                         "options or input); resume with the same settings or use a new --out")
    summary = {**split.summary(), **align_info}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "split.json", {**summary, "identities": list(split.identities),
                                           "image_ids": list(split.image_ids)})
    net = create_model(model, frozen=False)
    report = train(net, chips, split.labels, split.image_ids, cfg, out, resume=resume, progress=progress,
                   checkpoint_every=checkpoint_every,
                   extra={"model": model, "split": summary, "environment": environment()})
    if evaluate and report["finished"]:
        ev = evaluate_heldout(lfw, test_folds, weights=out / WEIGHTS, model=model, attacks=eval_attacks,
                              eps=eval_eps, steps=eval_steps, max_pairs=eval_pairs, precision=eval_precision,
                              seed=cfg.seed, policy=policy, pairs_file=pairs_file, out_dir=out / "eval",
                              workers=workers, progress=progress)
        report["evaluation"] = {**summarize(ev), "held_out_folds": ev["held_out_folds"],
                                "threshold_rule": ev["thresholds"]["rule"], "file": "eval/table1.json",
                                "precision": ev["precision"]["gradients"], "input": ev["input"]}
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(out / "train.json", report)
    return report


def evaluate_run(lfw, out_dir, test_folds, *, model: str = "dlib-resnet", eval_out=None, eval_attacks=("pgd",),
                 eval_eps=(4,), eval_steps=(10,), eval_pairs: int | None = None, eval_precision: str = "auto",
                 seed: int = 0, policy: InputPolicy | None = None, pairs_file=None, workers=None,
                 progress: bool = True) -> dict:
    """Judge the weights of a finished run again (other attacks / eps / pairs, input rules ``policy``):
    writes the Table 1 files to ``eval_out`` (default ``<out_dir>/eval``) and adds the summary to
    train.json's ``evaluations``."""
    out = Path(out_dir)
    weights = out / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"no finished run in {out} (no {WEIGHTS})")
    eval_out = Path(eval_out) if eval_out is not None else out / "eval"
    ev = evaluate_heldout(lfw, test_folds, weights=weights, model=model, attacks=eval_attacks, eps=eval_eps,
                          steps=eval_steps, max_pairs=eval_pairs, precision=eval_precision, seed=seed,
                          policy=policy, pairs_file=pairs_file, out_dir=eval_out, workers=workers, progress=progress)
    summary = {**summarize(ev), "held_out_folds": ev["held_out_folds"], "threshold_rule": ev["thresholds"]["rule"],
               # relative to the run folder: train.json names no machine path
               "file": os.path.relpath(eval_out / "table1.json", out), "precision": ev["precision"]["gradients"], "input": ev["input"]}
    report = json.loads((out / "train.json").read_text())
    report.setdefault("evaluations", []).append(summary)
    write_json_atomic(out / "train.json", report)
    return {**summary, "file": str(eval_out / "table1.json")}


def _started_split(out: Path) -> dict | None:
    """split.json of the run in ``out`` (what a resumed run must train on again), if there is one."""
    path = out / "split.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _check_same_input_rules(out: Path, before: dict, policy: InputPolicy) -> None:
    # Runs made before the input rules were recorded used the defaults.
    old = before.get("input", InputPolicy().to_dict())
    changed = [f"--{key.replace('_', '-')} {old.get(key)} -> {getattr(policy, key)}" for key in ("on_bad", "no_face")
               if old.get(key) != getattr(policy, key)]
    if changed:
        raise ValueError(f"{out} was trained with other input rules ({'; '.join(changed)}); resume with the same "
                         "ones or use a new --out")


__all__ = ["evaluate_run", "run_advtrain"]

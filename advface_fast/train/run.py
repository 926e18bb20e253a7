"""``advface advtrain`` as one Python call: split -> chips -> fine-tune -> held-out evaluation."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from ..data.paths import resolve_lfw_path
from ..data.policy import InputPolicy
from ..fileio import sha256_file, write_json_atomic
from ..models import create_model
from ..environment import environment
from .evaluate import evaluate_heldout, summarize
from .loop import CHECKPOINT, WEIGHTS, TrainConfig, train
from .split import load_train_chips, make_split

RUN = "run.json"  # the settings of the run in a folder, written before training; a rerun must present them
RUN_FORMAT = "advface-advtrain-run-v1"


def run_advtrain(lfw, cfg: TrainConfig, out_dir, *, model: str = "dlib-resnet", test_folds=(9, 10),
                 people_file=None, pairs_file=None, max_identities: int | None = None,
                 max_images_per_identity: int | None = None, policy: InputPolicy | None = None,
                 resume: bool = True, checkpoint_every: int = 0, evaluate: bool = True,
                 eval_attacks=("pgd",), eval_eps=(4,), eval_steps=(10,), eval_pairs: int | None = None,
                 eval_precision: str = "auto", workers=None, progress: bool = True) -> dict:
    """Train ``model`` with ``cfg`` on the identities outside ``test_folds`` and judge it on them.

    policy: the input rules (data.policy.InputPolicy: on_bad, no_face), as for every command, for
    the training images and the held-out pairs alike; pairs_file: your own pairs file instead of the
    dataset's pairs.txt (it names the held-out pairs and so who is never trained on).
    Writes to ``out_dir``: ``run.json`` (the settings, before training starts), checkpoint / weights /
    log (see :func:`.loop.train`), ``split.json`` (with ``input``: what the input rules did),
    ``train.json`` (with ``evaluation``: the held-out Table 1 summary) and ``eval/`` (the full Table 1
    files).

    Rerunning into the same ``out_dir`` resumes, like every long command: with the settings of the run
    there, a finished run is not redone (its train.json report is returned, with
    ``already_finished: True``), an interrupted one continues from its checkpoint (exactly), one whose
    training finished but not its evaluation is only evaluated; other settings are refused with a
    ValueError naming each change (``--epochs 3 != 2 in the existing run``). ``resume`` is kept for old
    callers and ignored: there is nothing to choose.
    """
    del resume  # always: see above
    out = Path(out_dir)
    t0 = time.perf_counter()
    policy = policy or InputPolicy()
    if evaluate and len(set(test_folds)) < 2:
        raise ValueError("evaluation needs at least two held-out folds (each fold's threshold is fitted on the other "
                         f"held-out folds), got {sorted(set(test_folds))}; e.g. --test-folds 9,10, or --no-eval")
    pairs_name = "pairs.txt" if pairs_file is None else str(pairs_file)
    split = make_split(lfw, test_folds, people_file=people_file, max_identities=max_identities,
                       max_images_per_identity=max_images_per_identity, pairs_file=pairs_name)
    config = _run_config(lfw, cfg, model=model, test_folds=test_folds, people_file=people_file, pairs_file=pairs_name,
                         max_identities=max_identities, max_images_per_identity=max_images_per_identity,
                         policy=policy, evaluate=evaluate, eval_attacks=eval_attacks, eval_eps=eval_eps,
                         eval_steps=eval_steps, eval_pairs=eval_pairs, eval_precision=eval_precision)
    recorded = _recorded_config(out)
    before = _started_split(out)
    stored = None
    if recorded is not None:
        _check_same_run(out, recorded, config)
        stored = _trained_report(out)
        if stored is not None and (not evaluate or "evaluation" in stored):
            return {**stored, "already_finished": True}
    elif before is not None:  # a run made before run.json existed: the checks it had then
        _check_same_input_rules(out, before, policy)
    if stored is None:
        report = _train(lfw, cfg, out, split, before, model=model, policy=policy, workers=workers, progress=progress,
                        checkpoint_every=checkpoint_every, config=None if recorded is not None else config,
                        legacy=recorded is None and (before is not None or (out / CHECKPOINT).exists()))
    else:  # trained before, the evaluation was interrupted: only evaluate
        report = stored
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


def _train(lfw, cfg: TrainConfig, out: Path, split, before: dict | None, *, model: str, policy: InputPolicy, workers,
           progress: bool, checkpoint_every: int, config: dict | None, legacy: bool) -> dict:
    """Chips, split.json, run.json (``config``, unless recorded already) and training (continued from the
    checkpoint in ``out`` when there is one)."""
    chips, align_info, split = load_train_chips(lfw, split, model, policy=policy, workers=workers, progress=progress)
    if before is not None and before.get("image_ids") != list(split.image_ids):
        raise ValueError(f"{out} was trained on another set of images (other people / pairs file, --max-* "
                         "options or input); rerun with the same settings or use a new --out")
    summary = {**split.summary(), **align_info}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "split.json", {**summary, "identities": list(split.identities),
                                           "image_ids": list(split.image_ids)})
    if config is not None and not legacy:
        _write_config(out, config)
    net = create_model(model, frozen=False)
    report = train(net, chips, split.labels, split.image_ids, cfg, out, resume=True, progress=progress,
                   checkpoint_every=checkpoint_every,
                   extra={"model": model, "split": summary, "environment": environment()})
    if config is not None and legacy:  # the checkpoint's settings were checked by train: record them now
        _write_config(out, config)
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


def _run_config(lfw, cfg: TrainConfig, *, model, test_folds, people_file, pairs_file, max_identities,
                max_images_per_identity, policy, evaluate, eval_attacks, eval_eps, eval_steps, eval_pairs,
                eval_precision) -> dict:
    """Everything the results in the run folder depend on (not where the data lives, nor --workers,
    --threads or --checkpoint-every, which change no number). The people and pairs files count by
    content; make_split has found them already."""
    root = resolve_lfw_path(lfw)
    people = Path(people_file) if people_file is not None else root / "people.txt"
    pairs = Path(pairs_file) if Path(pairs_file).is_absolute() else root / pairs_file
    evaluation = None
    if evaluate:
        evaluation = {"attacks": list(eval_attacks), "eps": [float(e) for e in eval_eps],
                      "steps": None if eval_steps is None else [int(k) for k in eval_steps], "pairs": eval_pairs,
                      "precision": eval_precision}
    config = {"model": model, "train": asdict(cfg), "test_folds": sorted({int(f) for f in test_folds}),
              "people_file_sha256": sha256_file(people), "pairs_file_sha256": sha256_file(pairs),
              "max_identities": max_identities, "max_images_per_identity": max_images_per_identity,
              "input": {"on_bad": policy.on_bad, "no_face": policy.no_face}, "evaluation": evaluation}
    return json.loads(json.dumps(config))  # as it reads back from run.json


def _write_config(out: Path, config: dict) -> None:
    write_json_atomic(out / RUN, {"format": RUN_FORMAT, "config": config})


def _recorded_config(out: Path) -> dict | None:
    """The settings recorded in ``out``'s run.json, if there is one."""
    path = out / RUN
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not readable JSON ({err}); use a new --out") from None
    if not isinstance(doc, dict) or doc.get("format") != RUN_FORMAT or not isinstance(doc.get("config"), dict):
        raise ValueError(f"{path} is not an advtrain run record of this version ({RUN_FORMAT}); use a new --out")
    return doc["config"]


# TrainConfig fields and the advtrain options that set them (the others are Python-only)
_TRAIN_FLAGS = {"method", "eps", "steps", "alpha", "epochs", "batch_size", "optimizer", "lr", "weight_decay",
                "scale", "margin", "seed", "precision"}
_FLAGS = {"model": "--model", "test_folds": "--test-folds", "max_identities": "--max-identities",
          "max_images_per_identity": "--max-images-per-identity", "input.on_bad": "--on-bad",
          "input.no_face": "--no-face", "evaluation.attacks": "--eval-attacks", "evaluation.eps": "--eval-eps",
          "evaluation.steps": "--eval-steps", "evaluation.pairs": "--eval-pairs", "evaluation.precision": "--precision"}
_FILES = {"people_file_sha256": "--people-file", "pairs_file_sha256": "--pairs-file"}


def _shown(value) -> str:
    if value is None:
        return "(not given)"
    if isinstance(value, list):
        return ",".join(_shown(v) for v in value) or "(empty)"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def describe_run_changes(old: dict, new: dict) -> list[str]:
    """Each difference of two run configs, in command-line terms: ``--epochs 3 != 2 in the existing run``."""
    changes = []
    for key in dict.fromkeys([*new, *old]):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if a == b:
            continue
        if key == "train" and isinstance(a, dict) and isinstance(b, dict):
            for k in dict.fromkeys([*b, *a]):
                if a.get(k, "<absent>") != b.get(k, "<absent>"):
                    flag = f"--{k.replace('_', '-')}" if k in _TRAIN_FLAGS else f"TrainConfig.{k}"
                    changes.append(f"{flag} {_shown(b.get(k))} != {_shown(a.get(k))} in the existing run")
        elif key == "evaluation" and (a is None) != (b is None):
            changes.append("--no-eval " + ("given, not" if b is None else "not given, given") + " in the existing run")
        elif key in ("evaluation", "input") and isinstance(a, dict) and isinstance(b, dict):
            for k in dict.fromkeys([*b, *a]):
                if a.get(k, "<absent>") != b.get(k, "<absent>"):
                    changes.append(f"{_FLAGS.get(f'{key}.{k}', f'{key}.{k}')} {_shown(b.get(k))} != "
                                   f"{_shown(a.get(k))} in the existing run")
        elif key in _FILES:
            changes.append(f"{_FILES[key]}: another file (sha256 {str(b)[:12]}) than in the existing run "
                           f"(sha256 {str(a)[:12]})")
        else:
            changes.append(f"{_FLAGS.get(key, key)} {_shown(b)} != {_shown(a)} in the existing run")
    return list(dict.fromkeys(changes))


def _check_same_run(out: Path, recorded: dict, config: dict) -> None:
    changes = describe_run_changes(recorded, config)
    if changes:
        def training(c: dict) -> dict:
            return {k: v for k, v in c.items() if k != "evaluation"}

        hint = (" (--eval-only judges a finished run with other --eval-* settings)"
                if training(recorded) == training(config) else "")
        raise ValueError(f"{out} holds an advtrain run with other settings: {'; '.join(changes)}. Rerun with its "
                         f"settings to continue it (a finished run is not redone), or use a new --out{hint}")


def _trained_report(out: Path) -> dict | None:
    """train.json of the run in ``out`` when its training is finished (its weights written), else None."""
    path = out / "train.json"
    if not (path.is_file() and (out / WEIGHTS).is_file()):
        return None
    try:
        report = json.loads(path.read_text())
    except ValueError:
        return None  # not trusted: training is continued from the checkpoint, which writes it anew
    return report if isinstance(report, dict) and report.get("finished") is True else None


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
        raise ValueError(f"{out} was trained with other input rules ({'; '.join(changed)}); rerun with the same "
                         "ones or use a new --out")


__all__ = ["RUN", "describe_run_changes", "evaluate_run", "run_advtrain"]

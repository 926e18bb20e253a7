"""Judging a trained model with the same code as every other table: Table 1 on the held-out folds.

Threshold rule (fixed before any number is seen): only the HELD-OUT folds are loaded, and the
LFW k-fold protocol runs across them — each held-out fold's threshold is fitted on the clean
pairs of the OTHER held-out folds (with folds 9 and 10 held out: 2-fold cross-fitting, fold 9
judged with fold 10's threshold and vice versa). No training fold's pair is ever scored or used
for a threshold, so training data never touches the evaluation. At least two held-out folds are
therefore needed; hold out one fold more rather than fit a threshold on the pairs it judges.

Attacks are white-box against the trained model itself (for adversarial training the static
attack on the model is also the adaptive one: the attacker knows the weights), crafted through
the experiment runner (cached per pair id, keyed by the weights identity, so runs of different
weights never mix), thresholds never refit on attacked data.
"""

from __future__ import annotations

from ..data import load_lfw
from ..data.policy import InputPolicy
from ..experiments.table1 import Table1Config, run_table1


def evaluate_heldout(lfw, test_folds, *, weights=None, model: str = "dlib-resnet", attacks=("pgd",), eps=(4,),
                     steps=(10,), max_pairs: int | None = None, precision: str = "auto", seed: int = 0,
                     attack_options: dict | None = None, policy: InputPolicy | None = None, pairs_file=None,
                     out_dir=None, cache_dir=None, workers=None, progress: bool = True) -> dict:
    """Table 1 of ``weights`` (None: the model's own weights) on the held-out folds only.

    max_pairs: the first max_pairs/2 matched and max_pairs/2 mismatched held-out pairs in
    pairs.txt order are attacked and scored (thresholds still use every held-out pair's clean
    similarity). policy: the input rules (data.policy.InputPolicy), as for every command; what
    they did is under ``input`` in the report. pairs_file: your own pairs file (see load_lfw's pairs)."""
    policy = policy or InputPolicy()
    folds = sorted({int(f) for f in test_folds})
    if len(folds) < 2:
        raise ValueError("evaluation needs at least two held-out folds: each fold's threshold is fitted on the "
                         f"other held-out folds (got {folds}); e.g. --test-folds 9,10")
    pairs = {} if pairs_file is None else {"pairs": str(pairs_file)}
    dataset = load_lfw(lfw, folds=folds, on_bad=policy.on_bad, **pairs)
    cfg = Table1Config(model=model, attacks=tuple(attacks), eps=tuple(eps), steps=tuple(steps) if steps else None,
                       folds=None, max_pairs=max_pairs, precision=precision, seed=seed, noise_baseline=False,
                       attack_options=dict(attack_options or {}), on_bad=policy.on_bad, no_face=policy.no_face,
                       weights=str(weights) if weights else None)
    report = run_table1(dataset, cfg, out_dir=out_dir, cache_dir=cache_dir, workers=workers, progress=progress)
    report["thresholds"]["rule"] = ("cross-fitted across the held-out folds only: each held-out fold's threshold "
                                    "is fitted on the clean pairs of the other held-out folds")
    report["held_out_folds"] = folds
    return report


def summarize(report: dict) -> dict:
    """Clean accuracy and the worst accuracy under attack (per attack row, and overall)."""
    rows = report["rows"]
    clean = next(r for r in rows if r["attack"] == "clean")
    attacked = [r for r in rows if r["attack"] not in ("clean", "noise")]
    out = {"n_pairs": report["n_pairs"], "clean_accuracy": clean["accuracy_mean"],
           "clean_all_held_out": report["clean_all_folds"].get("accuracy_mean"),
           "rows": {_row_name(r): r["accuracy_mean"] for r in attacked}}
    if attacked:
        out["worst_attack_accuracy"] = min(r["accuracy_mean"] for r in attacked)
    return out


def _row_name(r: dict) -> str:
    steps = r["params"].get("steps")
    return f"{r['attack']}{'-' + str(steps) if steps and r['attack'] != 'fgsm' else ''}@{r['eps']:g}"


__all__ = ["evaluate_heldout", "summarize"]

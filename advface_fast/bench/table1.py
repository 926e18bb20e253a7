"""Table 1 end to end on fold 1: fp32 eager vs the fast path vs the fast path with PGD early stop.

Each variant runs ``run_table1`` with its own empty attack cache (FGSM, PGD, C&W at eps 2, 4, 8);
the chip cache is warmed first so that no variant pays for alignment. Opt-in: tens of minutes.
"""

from __future__ import annotations

import tempfile
import time

from .context import MODEL_NAME, BenchContext
from .harness import BenchRow, pending

TARGET_TABLE1 = 4.0  # fp32 eager seconds over the fast path's (early stop off)

NAMES = {"fast": "Table 1 fold 1: fast path vs fp32 eager (s)",
         "early": "Table 1 fold 1: fast path + early stop vs fp32 eager (s)"}


def table1_variants(precision: str) -> dict[str, dict]:
    """The Table1Config fields that differ between the three variants."""
    return {"fp32": dict(precision="fp32", fast_model=False, early_stop=False),
            "fast": dict(precision=precision, fast_model=True, early_stop=False),
            "early": dict(precision=precision, fast_model=True, early_stop=True)}


def _per_row(report: dict, field: str) -> dict:
    return {f"{r['attack']}@{r['eps']:g}": r.get(field) for r in report["rows"]}


def section_table1(ctx: BenchContext) -> list[BenchRow]:
    from ..pair_chips import prepare_pairs
    from ..experiments.table1 import Table1Config, run_table1

    cfg = ctx.cfg
    if cfg.synthetic or cfg.lfw is None:
        return [pending("table1", n, "needs LFW (not synthetic)") for n in NAMES.values()]
    _, precision = ctx.fast()
    ctx.log("table1: warming the chip cache so no variant pays for alignment")
    prepare_pairs(cfg.lfw, MODEL_NAME, progress=False)
    base = dict(model=MODEL_NAME, attacks=("fgsm", "pgd", "cw"), eps=(2, 4) if cfg.quick else (2, 4, 8),
                steps=(cfg.table1_steps,), folds=(1,), max_pairs=cfg.table1_pairs, noise_baseline=False,
                seed=cfg.seed)
    variants = table1_variants(precision)
    seconds, reports = {}, {}
    for key, extra in variants.items():
        ctx.log(f"table1: {key} {extra}")
        with tempfile.TemporaryDirectory(prefix="advface-bench-table1-") as cache_dir:
            t0 = time.perf_counter()
            reports[key] = run_table1(cfg.lfw, Table1Config(**base, **extra), cache_dir=cache_dir, progress=False)
            seconds[key] = time.perf_counter() - t0
    acc = {k: _per_row(rep, "accuracy_mean") for k, rep in reports.items()}
    # Every variant's per-row seconds and image-steps, so a reader sees where the time went.
    per_variant = {k: {"total_s": seconds[k], "config": {**base, **variants[k]},
                       "attack_seconds": _per_row(rep, "time_s"), "image_steps": _per_row(rep, "image_steps"),
                       "image_steps_full": _per_row(rep, "image_steps_full")} for k, rep in reports.items()}
    rows = []
    for key, target in (("fast", TARGET_TABLE1), ("early", None)):
        gap = max((abs(acc[key][r] - acc["fp32"][r]) for r in acc["fp32"] if r in acc[key]), default=float("nan"))
        rows.append(BenchRow("table1", NAMES[key], seconds[key], seconds["fp32"], "s", higher_is_better=False,
                             target=target, note=f"max |accuracy - fp32| {100 * gap:.1f} pts",
                             details={"config": {**base, **variants[key]}, "accuracy": acc[key],
                                      "accuracy_fp32": acc["fp32"],
                                      "attack_seconds": per_variant[key]["attack_seconds"],
                                      "pairs": reports[key]["n_pairs"], "variants": per_variant}))
    return rows

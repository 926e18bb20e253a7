"""The paper's Tables 2-4 (attack-as-defense), declared on the experiment runner.

Protocol (fixed before any number is seen):

1. The defended pipeline is a verifier like any other: for each D config (attack, eps_d, step
   count k) D is applied to BOTH clean images of every pair of the dataset (cached on disk, once
   per image: :mod:`advface_fast.experiments.defended`) and the LFW k-fold protocol fits one
   threshold per fold on the OTHER folds' clean defended pairs. These thresholds are then fixed:
   every defended row (clean or attacked queries) is judged with them and they are never refit on
   attacked data (with balanced pairs a refit threshold cannot score below ~50%, which would fake
   a recovery). ``calibration_pairs`` restricts the calibration to a balanced subset of every
   fold (faster, recorded loudly in the report); default: the full protocol.
2. The query conditions are Table 1's: clean, and the query attacked on the UNDEFENDED model by
   each attack at each eps (dodging for matched pairs, impersonation for mismatched). They come
   from the runner's attacked-queries store, built exactly as Table 1 builds them, so the same
   attack config is never computed twice.
3. A row = (D, eps_d, k, query condition): D on the query and on the gallery image, the cosine of
   the two defended embeddings, judged with the defended thresholds. Beside it: the undefended
   accuracy of the same queries (Table 1's number), the AUC, and the cost per query.

The table of a D is the paper's layout: its "known attack" row (queries attacked by D's own
method), the "unknown attack" rows and the clean-query row (the price), columns D's step counts.
LFW pairs are balanced: 50% is chance.

The adaptive evaluation (an attacker who knows D) lives in :mod:`advface_fast.experiments.adaptive`.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..environment import environment
from ..precision import device_features, model_device, resolve_precision
from .defense_context import (Context, DefendConfig, attacked_queries, auc_or_none, calibrate_defense, calibration_index,
                              correct, defended_store, make_context, query_attack, summarise)
from .defended import DefendedStore

TABLE_OF = {"pgd": 2, "cw": 3, "fgsm": 4}
CHANCE = "LFW pairs are balanced: 50% is chance; a 'recovery' to about 50% is no recovery."

# The paper's Tables 2-4 (CosFace on LFW, accuracy %, after 40 defense iterations).
PAPER = {("pgd", "pgd"): "71.4", ("cw", "cw"): "72.1", ("pgd", "fgsm"): "80.6",
         ("pgd", "cw"): "> 80", ("cw", "fgsm"): "> 80", ("cw", "pgd"): "> 80",
         ("fgsm", "fgsm"): "≈ 0", ("fgsm", "pgd"): "≈ 0", ("fgsm", "cw"): "≈ 0"}


def paper_number(defense: str, query: str, steps: int) -> str | None:
    """The paper's number for a row (published after 40 defense iterations, printed beside every
    step count of ours as the reference)."""
    return PAPER.get((defense, query))


def static_rows(ctx: Context, name: str, eps_d: float, store: DefendedStore, cals: dict, queries: dict,
                undefended: dict) -> tuple[list[dict], dict]:
    """The rows of one D (name, eps_d): every step count x (clean + every attacked query)."""
    sel, runner = ctx.sel, ctx.runner
    d = store.defense
    rows, per_pair = [], {}
    images = np.concatenate([sel.query_rows, sel.gallery_rows])
    for k in d.steps:
        cal = cals[k]
        spent = store.cost([ctx.pairs.chips.ids[r] for r in np.unique(images)], k)
        sec_per_image = spent["seconds"] / max(len(np.unique(images)), 1) * (k / max(d.steps) if name != "fgsm" else 1)
        for (qname, eps), q in [(("clean", 0.0), None)] + list(queries.items()):
            emb = runner.query_embeddings(cal, sel, q)
            sim = runner.similarity(cal, sel, emb)
            ok = correct(ctx, cal, sim)
            per_pair[(k, qname, eps)] = ok
            s = summarise(ok, sel)
            und = undefended[(qname, eps)]
            kind = "clean" if qname == "clean" else ("known" if qname == name else "unknown")
            rows.append({
                "table": TABLE_OF.get(name), "defense": name, "defense_eps": float(eps_d), "defense_steps": int(k),
                "objective": d.objective.name, "query": qname, "kind": kind, "eps": float(eps),
                **s, "auc": auc_or_none(sim, sel.same),
                "undefended_accuracy": und["accuracy"], "undefended_accuracy_std": und["accuracy_std"],
                "undefended_matched_accuracy": und["matched_accuracy"],
                "undefended_mismatched_accuracy": und["mismatched_accuracy"],
                "defended_clean_accuracy_all_folds": float(cal.clean.accuracy_mean),
                "defended_clean_auc_all_folds": float(cal.clean.auc),
                "image_steps": 2 * d.image_steps_per_image(k),  # D on the query and on the gallery image
                "seconds": round(2 * sec_per_image, 4),
                "attack_image_steps": 0 if q is None else round(q.image_steps / max(len(sel), 1), 1),
                "attack_seconds": 0.0 if q is None else round(q.seconds / max(len(sel), 1), 4),
                "paper": paper_number(name, qname, k),
            })
    return rows, per_pair


def run_defend(lfw, cfg: DefendConfig | None = None, *, out_dir=None, cache_dir=None, defended_dir=None,
               workers=None, progress: bool = True, ctx: Context | None = None) -> dict:
    """Tables 2-4 (and, with ``cfg.adaptive``, the adaptive evaluation): returns the report and
    writes defend.json, defend.md and the plots to ``out_dir``."""
    cfg = cfg or DefendConfig()
    t_start = time.perf_counter()
    ctx = ctx or make_context(lfw, cfg, cache_dir=cache_dir, defended_dir=defended_dir, workers=workers,
                              progress=progress)
    sel, runner = ctx.sel, ctx.runner
    # Undefended: clean and attacked queries judged by the plain model (Table 1's numbers).
    undefended = {("clean", 0.0): summarise(correct(ctx, ctx.plain, runner.similarity(
        ctx.plain, sel, runner.query_embeddings(ctx.plain, sel, None))), sel)}
    queries = {}
    for name in cfg.attacks:
        for eps in cfg.eps:
            q = attacked_queries(ctx, query_attack(ctx, name, eps))
            queries[(name, float(eps))] = q
            sim = runner.similarity(ctx.plain, sel, runner.query_embeddings(ctx.plain, sel, q))
            undefended[(name, float(eps))] = summarise(correct(ctx, ctx.plain, sim), sel)
    rows, calibrations, adaptive_reports = [], [], []
    configs = [(n, float(e)) for n in cfg.defenses for e in cfg.defense_eps]
    for name, eps_d in tqdm(configs, desc="defenses", unit="D", disable=not progress or len(configs) < 2):
        store = defended_store(ctx, name, eps_d, cfg.defense_steps)
        t0 = time.perf_counter()
        cals = calibrate_defense(ctx, store)
        calibrations.append({"defense": name, "defense_eps": eps_d, "seconds": round(time.perf_counter() - t0, 1),
                             **calibration_record(ctx, cals)})
        r, per_pair = static_rows(ctx, name, eps_d, store, cals, queries, undefended)
        rows += r
        if cfg.adaptive and name in ("pgd", "cw"):
            from .adaptive import AdaptiveConfig, run_adaptive

            acfg = AdaptiveConfig(**cfg.adaptive_options)
            adaptive_reports.append(run_adaptive(ctx, acfg, store, cals, queries, per_pair))
        if out_dir is not None and (name, eps_d) != configs[-1]:
            write_report(ctx, undefended, rows, calibrations, adaptive_reports, t_start, out_dir,
                         done=len(calibrations), of=len(configs))
    return write_report(ctx, undefended, rows, calibrations, adaptive_reports, t_start, out_dir,
                        done=len(configs), of=len(configs))


def write_report(ctx: Context, undefended, rows, calibrations, adaptive_reports, t_start, out_dir, done=1,
                 of=1) -> dict:
    """The report of the rows so far (written after every D, so a long run shows what is done)."""
    cfg, sel = ctx.cfg, ctx.sel
    report = {
        "table": "Tables 2-4: attack-as-defense (the defender re-attacks query and gallery with D)",
        "model": cfg.model, "chance": CHANCE,
        "config": {**asdict(cfg)},
        "dataset": {"name": ctx.pairs.dataset.name, "layout": ctx.pairs.dataset.layout},
        "dataset_fingerprint": ctx.pairs.dataset.fingerprint,
        "input": ctx.pairs.input_record(),
        "n_pairs": int(len(sel)), "folds": sorted(int(f) for f in np.unique(sel.folds)),
        "subset": cfg.max_pairs is not None,
        "thresholds": {"metric": cfg.metric,
                       "undefended": {"fitted_on": "clean pairs of every fold (k-fold, other folds)",
                                      "per_fold": {str(k): v for k, v in ctx.plain.thresholds.items()}},
                       "defended": calibrations,
                       "rule": "fitted on CLEAN defended pairs (D on both images), other folds; fixed; never "
                               "refit on attacked data"},
        "eps_units": "0-255 pixel levels, L-inf, after rounding to uint8",
        "cost_units": "image_steps / seconds: D's cost per query (D on the query and on its gallery image); "
                      "attack_image_steps / attack_seconds: the query attack's cost per query",
        "precision": {"gradients": resolve_precision(cfg.precision, model_device(ctx.net)), "requested": cfg.precision,
                      "decisions": "fp32", "features": device_features(model_device(ctx.net))},
        "undefended": [{"query": q, "eps": e, **v} for (q, e), v in undefended.items()],
        "rows": rows,
        "adaptive": adaptive_reports,
        "work": work_record(ctx),
        "time_s": round(time.perf_counter() - t_start, 1),
        "complete": done == of, "defense_configs_done": f"{done}/{of}",
        "load_average_1min": round(os.getloadavg()[0], 2),
        "environment": environment(),
    }
    if out_dir is not None:
        from .defense_render import write_defend

        write_defend(report, Path(out_dir))
    return report


def calibration_record(ctx: Context, cals: dict) -> dict:
    cal_idx = calibration_index(ctx)
    full = ctx.cfg.calibration_pairs is None
    return {
        "protocol": "full: every pair of the dataset, k-fold (each fold's threshold fitted on the other folds)"
                    if full else f"SUBSET: {len(cal_idx)} pairs (--calibration-pairs {ctx.cfg.calibration_pairs}), "
                                 "balanced per fold, k-fold on them — NOT the full protocol",
        "full_protocol": full, "n_calibration_pairs": int(len(cal_idx)),
        "per_step": {str(k): {"per_fold": {str(f): float(t) for f, t in c.thresholds.items()},
                              "clean_accuracy": float(c.clean.accuracy_mean),
                              "clean_accuracy_std": float(c.clean.accuracy_std), "clean_auc": float(c.clean.auc)}
                     for k, c in cals.items()},
    }


def work_record(ctx: Context) -> dict:
    return {"defense_images_computed": int(sum(s.computed for s in ctx.stores)),
            "defense_runs": int(sum(s.calls for s in ctx.stores)),
            "defense_image_steps": int(sum(s.image_steps for s in ctx.stores)),
            "defense_seconds": round(sum(s.seconds for s in ctx.stores), 1),
            **ctx.runner.work}


# DefendConfig is run_defend's argument: importable from here as well as from .defense_context.
__all__ = ["CHANCE", "DefendConfig", "PAPER", "TABLE_OF", "paper_number", "run_defend"]

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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..attacks import DEFAULT_ATTACK_BATCH, make_attack
from ..data.policy import InputPolicy
from ..defenses import AttackAsDefense, make_defense
from ..environment import environment
from ..models import arithmetic_key, create_model, get_model_spec
from ..pair_chips import prepare_pairs
from ..precision import device_features, model_device, resolve_precision
from ..verify import evaluate_embeddings, roc_auc
from .defended import DefendedStore, StoredDefenseVerifier
from .runner import Calibration, ModelVerifier, Runner, Selection
from .table1 import DEFAULT_STEPS

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


def build_defense(net, model: str, attack: str, eps: float, steps, *, objective: str = "away-from-self",
                  seed: int = 0, precision: str = "auto", batch_size: int = 32, progress=False) -> AttackAsDefense:
    """D as every table builds it (:func:`advface_fast.defenses.make_defense` with the model's spec)."""
    return make_defense(net, attack, eps, steps, spec=get_model_spec(model), objective=objective, seed=seed,
                        precision=precision, batch_size=batch_size, progress=progress)


@dataclass
class DefendConfig:
    model: str = "dlib-resnet"
    defenses: tuple = ("pgd",)  # D's attack: pgd (Table 2), cw (Table 3), fgsm (Table 4)
    defense_eps: tuple = (4.0,)  # eps_d, 0-255 levels
    defense_steps: tuple = (10, 20, 40)  # one run of the largest records all
    attacks: tuple = ("fgsm", "pgd", "cw")  # the attacked query conditions (Table 1's)
    eps: tuple = (4.0,)
    attack_steps: int | None = None  # PGD / C&W steps of the query attacks (None: Table 1's 40)
    folds: tuple | None = (1,)
    max_pairs: int | None = None
    metric: str = "cosine"
    objective: str = "away-from-self"  # D's label-free objective (or random-direction)
    seed: int = 0  # run seed: attacks' per-pair seeds and D's per-image seeds derive from it
    batch_size: int = DEFAULT_ATTACK_BATCH  # attack batches
    defense_batch_size: int = 32  # D's batch size (part of D's cache key: results depend on it)
    precision: str = "auto"  # gradients (attacks and D); decisions always fp32
    fast_model: bool = False  # attacks on the undefended model through its fast copy (as Table 1)
    calibration_pairs: int | None = None  # None: the full protocol (every pair of the dataset)
    steps_cap: int | None = None  # caps every iteration count (quick runs)
    adaptive: bool = False
    adaptive_options: dict = field(default_factory=dict)  # see experiments.adaptive.AdaptiveConfig
    on_bad: str = "error"
    no_face: str = "center"
    pairs_file: str | None = None


@dataclass
class Context:
    """What the rows of one run share: pairs, runner, models, selection, the plain calibration."""

    cfg: DefendConfig
    pairs: object
    runner: Runner
    net: object
    attacked_net: object
    sel: Selection
    plain: Calibration
    defended_root: Path | None
    progress: bool
    stores: list = field(default_factory=list)  # every DefendedStore used (work counters)


def cap(steps: int, cfg: DefendConfig) -> int:
    return steps if cfg.steps_cap is None else max(1, min(steps, cfg.steps_cap))


def make_context(lfw, cfg: DefendConfig, *, cache_dir=None, defended_dir=None, workers=None, progress=True,
                 pairs=None, net=None) -> Context:
    if pairs is None:
        pairs = prepare_pairs(lfw, cfg.model, policy=InputPolicy(cfg.on_bad, cfg.no_face), pairs_file=cfg.pairs_file,
                              workers=workers, progress=progress)
    net = net if net is not None else create_model(cfg.model)
    attacked_net = get_model_spec(cfg.model).make_fast(net) if cfg.fast_model else net
    runner = Runner(pairs, metric=cfg.metric, seed=cfg.seed, model=cfg.model, cache_dir=cache_dir,
                    batch_size=cfg.batch_size, progress=progress)
    plain = runner.calibrate(ModelVerifier(net, cfg.model, batch_size=64, progress=progress and "clean embeddings"))
    sel = runner.select(cfg.folds, cfg.max_pairs)
    return Context(cfg, pairs, runner, net, attacked_net, sel, plain,
                   None if defended_dir is None else Path(defended_dir), progress)


def query_attack(ctx: Context, name: str, eps: float, **extra):
    """The attack of a query condition, built exactly as Table 1 builds it (so its cache is shared)."""
    cfg = ctx.cfg
    options = {"steps": cap(cfg.attack_steps or DEFAULT_STEPS.get(name, 40), cfg)} if name in ("pgd", "cw", "cw-l2") else {}
    if name != "noise":
        options["precision"] = cfg.precision
    options.update(extra)
    return make_attack(name, ctx.attacked_net, metric=cfg.metric, eps=eps, seed=cfg.seed, **options)


def attacked_queries(ctx: Context, attack, target: Calibration | None = None, sel: Selection | None = None,
                     extra_key: dict | None = None):
    """Queries attacked against ``target`` (default: the undefended model), from the runner's store:
    computed once per config and pair (``runner.work`` counts the attack work actually done)."""
    key = {"fast_model": arithmetic_key(ctx.attacked_net) or True} if ctx.cfg.fast_model and target is None else {}
    return ctx.runner.attack_queries(attack, target or ctx.plain, sel or ctx.sel, ctx.net,
                                     extra_key={**key, **(extra_key or {})} or None)


def defended_store(ctx: Context, name: str, eps: float, steps) -> DefendedStore:
    cfg = ctx.cfg
    d = build_defense(ctx.net, cfg.model, name, eps, tuple(sorted({cap(k, cfg) for k in steps})),
                      objective=cfg.objective, seed=cfg.seed, precision=cfg.precision,
                      batch_size=cfg.defense_batch_size)
    store = DefendedStore(d, root=ctx.defended_root, align=ctx.runner.align_key,
                          progress=ctx.progress and f"D {name} eps={eps:g} ({max(d.steps)} steps)")
    ctx.stores.append(store)
    return store


def calibration_index(ctx: Context) -> np.ndarray:
    """The pairs the defended thresholds are fitted on: every pair of the dataset, or (with
    ``calibration_pairs``) the first N/(2 x folds) matched and mismatched pairs of every fold."""
    pairs, n = ctx.pairs, ctx.cfg.calibration_pairs
    idx = np.arange(len(pairs))
    if n is None:
        return idx
    fold_ids = np.unique(pairs.folds)
    per = max(1, n // (2 * len(fold_ids)))
    keep = []
    for f in fold_ids:
        in_fold = idx[pairs.folds == f]
        keep += [in_fold[pairs.same[in_fold]][:per], in_fold[~pairs.same[in_fold]][:per]]
    return np.sort(np.concatenate(keep))


def calibrate_defense(ctx: Context, store: DefendedStore) -> dict[int, Calibration]:
    """{k: the defended verifier at k steps calibrated on clean defended pairs} (fixed thereafter).
    D runs once per image (all step counts from one run); the selection's images are included."""
    pairs, sel = ctx.pairs, ctx.sel
    cal_idx = calibration_index(ctx)
    rows = np.unique(np.concatenate([pairs.query[cal_idx], pairs.gallery[cal_idx], sel.query_rows, sel.gallery_rows]))
    chips = pairs.chips
    emb = store.embed(chips.chips[rows], [chips.ids[r] for r in rows])
    out = {}
    for k in store.defense.steps:
        full = np.full((len(chips.ids), emb[k].shape[1]), np.nan, dtype=np.float32)
        full[rows] = emb[k]
        clean = evaluate_embeddings(full[pairs.query[cal_idx]], full[pairs.gallery[cal_idx]], pairs.same[cal_idx],
                                    pairs.folds[cal_idx], metric=ctx.cfg.metric)
        out[k] = Calibration(verifier=StoredDefenseVerifier(store, k), embeddings=full, clean=clean,
                             metric=ctx.cfg.metric)
    return out


def correct(ctx: Context, cal: Calibration, sim: np.ndarray, sel: Selection | None = None) -> np.ndarray:
    """Per pair: is the decision right under the verifier's FIXED per-fold thresholds."""
    sel = sel or ctx.sel
    thr = cal.similarity_thresholds(sel.folds)
    return (sim > thr) == sel.same


def summarise(correct_: np.ndarray, sel: Selection) -> dict:
    """Accuracy mean ± std over folds, matched (dodging) / mismatched (impersonation) pooled, n."""
    folds = np.unique(sel.folds)
    per_fold = [float(correct_[sel.folds == f].mean()) for f in folds]
    same = sel.same
    return {"accuracy": float(np.mean(per_fold)), "accuracy_std": float(np.std(per_fold)),
            "fold_accuracies": per_fold, "n_folds": len(folds),
            "matched_accuracy": float(correct_[same].mean()) if same.any() else None,
            "mismatched_accuracy": float(correct_[~same].mean()) if (~same).any() else None,
            "n_pairs": int(len(sel)), "n_matched": int(same.sum()), "n_mismatched": int((~same).sum())}


def _auc(sim: np.ndarray, same: np.ndarray) -> float | None:
    if same.all() or (~same).all():
        return None
    return float(roc_auc(sim, same, metric="cosine"))


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
                **s, "auc": _auc(sim, sel.same),
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


__all__ = ["CHANCE", "Context", "DefendConfig", "PAPER", "TABLE_OF", "build_defense", "calibrate_defense",
           "make_context", "paper_number", "run_defend", "summarise"]

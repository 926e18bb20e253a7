"""What every defended run shares — the tables (:mod:`.defense_tables`) and the adaptive
evaluation (:mod:`.adaptive`) alike: the run's config, its context (pairs, runner, models,
selection, the plain calibration), D built the one way, the attacked queries from the runner's
store, the defended store and its calibration on CLEAN defended pairs, and the per-pair decisions
under those fixed thresholds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..attacks import DEFAULT_ATTACK_BATCH, make_attack
from ..data.policy import InputPolicy
from ..defenses import AttackAsDefense, make_defense
from ..metrics import evaluate_embeddings, roc_auc
from ..models import arithmetic_key, create_model, get_model_spec
from ..pair_chips import prepare_pairs
from .defended import DefendedStore, StoredDefenseVerifier
from .runner import Calibration, ModelVerifier, Runner, Selection
from .table1 import DEFAULT_STEPS


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
    weights: str | None = None  # the model's weights from this safetensors file (e.g. an advtrain checkpoint)


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
    square_copy: object = None  # the leaderboard's fp32 fast copy for Square's queries, built when first needed


def cap(steps: int, cfg: DefendConfig) -> int:
    return steps if cfg.steps_cap is None else max(1, min(steps, cfg.steps_cap))


def make_context(lfw, cfg: DefendConfig, *, cache_dir=None, defended_dir=None, workers=None, progress=True,
                 pairs=None, net=None) -> Context:
    make_fast = get_model_spec(cfg.model).make_fast
    if cfg.fast_model and make_fast is None:  # before any work
        raise ValueError(f"model '{cfg.model}' has no fast copy: run without --fast-model")
    if pairs is None:
        pairs = prepare_pairs(lfw, cfg.model, policy=InputPolicy(cfg.on_bad, cfg.no_face), pairs_file=cfg.pairs_file,
                              workers=workers, progress=progress)
    net = net if net is not None else create_model(cfg.model, **({"weights": cfg.weights} if cfg.weights else {}))
    attacked_net = make_fast(net) if cfg.fast_model else net
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
                     extra_key: dict | None = None, start=None):
    """Queries attacked against ``target`` (default: the undefended model), from the runner's store:
    computed once per config and pair (``runner.work`` counts the attack work actually done).
    ``start``: queries of the same selection the attack begins from (a warm start)."""
    key = {"fast_model": arithmetic_key(ctx.attacked_net) or True} if ctx.cfg.fast_model and target is None else {}
    return ctx.runner.attack_queries(attack, target or ctx.plain, sel or ctx.sel, ctx.net,
                                     extra_key={**key, **(extra_key or {})} or None, start=start)


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


def fit_rows(ctx: Context, limit: int = 1000) -> np.ndarray:
    """Chip rows of the clean images a defense fits its own parameters on (:meth:`Defense.fit`): the
    images of the calibration pairs outside the attacked folds (all of them when the folds are
    every fold), at most ``limit``, in pair order."""
    pairs, cal_idx = ctx.pairs, calibration_index(ctx)
    outside = cal_idx[~np.isin(pairs.folds[cal_idx], np.unique(ctx.sel.folds))]
    use = outside if len(outside) else cal_idx
    rows = np.stack([pairs.query[use], pairs.gallery[use]], axis=1).ravel()
    _, first = np.unique(rows, return_index=True)
    return rows[np.sort(first)][:limit]


def fit_defense(ctx: Context, defense) -> dict | None:
    """Fit a defense that needs it on clean images (:func:`fit_rows`); its fit record, or None."""
    if not defense.needs_fit():
        return None
    rows, chips = fit_rows(ctx), ctx.pairs.chips
    defense.fit(chips.chips[rows], [chips.ids[r] for r in rows])
    return getattr(defense, "fit_record", None) or {"images": int(len(rows))}


def calibrate_defense(ctx: Context, store: DefendedStore) -> dict[int, Calibration]:
    """{k: the defended verifier at k steps calibrated on clean defended pairs} (fixed thereafter).
    D runs once per image (all step counts from one run); the selection's images are included."""
    pairs, sel = ctx.pairs, ctx.sel
    cal_idx = calibration_index(ctx)
    rows = np.unique(np.concatenate([pairs.query[cal_idx], pairs.gallery[cal_idx], sel.query_rows, sel.gallery_rows]))
    chips = pairs.chips
    emb = store.embed(chips.chips[rows], [chips.ids[r] for r in rows])
    out = {}
    for k in store.defense.variants:
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


def auc_or_none(sim: np.ndarray, same: np.ndarray) -> float | None:
    if same.all() or (~same).all():
        return None
    return float(roc_auc(sim, same, metric="cosine"))


__all__ = ["DefendConfig", "Context", "attacked_queries", "auc_or_none", "build_defense", "calibrate_defense", "calibration_index", "cap", "correct", "defended_store", "make_context", "query_attack", "summarise"]

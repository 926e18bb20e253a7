"""The paper's Table 1: verification accuracy after FGSM / PGD / C&W at several eps.

Protocol (fixed before any number is seen):

1. Clean thresholds: every pair of the dataset is embedded and the LFW k-fold protocol fits
   one threshold per fold on the OTHER folds. These thresholds judge every attacked pair and
   are never refitted on attacked data.
2. The attacked pairs are those of ``folds`` (optionally the first ``max_pairs``, half matched
   and half mismatched). The attacker perturbs the query (the pair's first image); the
   gallery (second image) keeps its clean embedding. Matched pairs are attacked by dodging,
   mismatched pairs by impersonation.
3. Accuracy after attack = the fraction of pairs still decided correctly, per fold, reported as
   mean ± std over the folds used, with matched / mismatched accuracy pooled.

A declaration on :class:`advface_fast.experiments.runner.Runner`: one verifier (the plain
model), query conditions clean + one attack per row, all crafted against and judged by that
model. Attacked queries are cached per pair id (see the runner), so an interrupted run resumes
where it stopped and results never depend on batching or on which other pairs were selected.

Transfer (``craft_model``): every attack row is crafted on ``craft_model`` (A) and judged by
``model`` (B) with B's clean thresholds, on B's chips (A sees them through a resize: see the
runner's docstring for why and what it costs). Each row also carries ``craft_accuracy``: A's own
accuracy on the same attacked queries under A's thresholds on those chips (the white-box number
the transfer number is read against).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..attacks import DEFAULT_ATTACK_BATCH, make_attack
from ..data.policy import InputPolicy
from ..models import arithmetic_key, create_model, get_model_spec
from ..environment import environment
from ..pair_chips import prepare_pairs
from ..precision import device_features, model_device, resolve_precision
from .runner import ModelVerifier, ResizedInput, Runner

# The paper's Table 1 (CosFace on LFW, accuracy %): (attack, eps) -> accuracy after attack.
PAPER_TABLE1 = {("clean", 0): 99.3, ("fgsm", 4): 7.5, ("fgsm", 8): 2.9, ("pgd", 4): 0.0, ("cw", 4): 0.0}

DEFAULT_STEPS = {"fgsm": 1, "noise": 0, "pgd": 40, "cw": 40}


@dataclass
class Table1Config:
    model: str = "dlib-resnet"
    attacks: tuple = ("fgsm", "pgd", "cw")
    eps: tuple = (2, 4, 8)
    steps: tuple | None = None  # PGD / C&W step counts (None: 40)
    folds: tuple | None = (1,)  # 1-based folds to attack (None: all)
    max_pairs: int | None = None
    metric: str = "cosine"
    batch_size: int = DEFAULT_ATTACK_BATCH
    seed: int = 0
    noise_baseline: bool = True
    precision: str = "fp32"  # gradients: fp32 | bf16 | auto (decisions are always fp32)
    fast_model: bool = False  # attack through the fast copy (affine folded, channels_last)
    early_stop: bool = False  # PGD: pairs past the threshold by a margin leave the batch
    attack_options: dict = field(default_factory=dict)  # per attack name: extra constructor kwargs
    on_bad: str = "error"  # input rules (data.policy.InputPolicy): error | skip | convert
    no_face: str = "center"  # error | skip | center
    pairs_file: str | None = None  # your own pairs file instead of the dataset's pairs.txt
    weights: str | None = None  # the model's weights from this safetensors file (create_model(weights=))
    craft_model: str | None = None  # transfer: craft on this model, judge on `model` (None: white-box)


@dataclass
class Table1Row:
    attack: str
    eps: float
    params: dict
    n_pairs: int
    n_folds: int
    accuracy_mean: float
    accuracy_std: float
    matched_accuracy: float
    mismatched_accuracy: float
    fold_accuracies: list
    mean_shift: float  # mean of (s_adv - s_clean) toward the attacker's goal (down for matched, up for mismatched)
    time_s: float
    image_steps_per_s: float | None
    image_steps: int = 0  # forward+backward image passes computed
    image_steps_full: int = 0  # what the run would cost without early exits
    paper_accuracy: float | None = None
    craft_accuracy: float | None = None  # transfer rows: the crafting model's own (white-box) accuracy


def _row_specs(cfg: Table1Config):
    """(attack name, eps, steps) for every row, noise baseline last."""
    specs = []
    for name in cfg.attacks:
        if name in ("pgd", "cw", "cw-l2"):
            for steps in cfg.steps or (DEFAULT_STEPS.get(name, 40),):
                for eps in cfg.eps:
                    specs.append((name, eps, steps))
        else:
            for eps in cfg.eps:
                specs.append((name, eps, None))
    if cfg.noise_baseline and "noise" not in cfg.attacks:
        specs += [("noise", eps, None) for eps in cfg.eps]
    return specs


def run_table1(lfw, cfg: Table1Config | None = None, *, out_dir=None, cache_dir=None, workers=None,
               progress: bool = True, example_pairs: int = 4, pairs=None, net=None, runner=None) -> dict:
    """Run the grid and return the report (also written to out_dir: JSON, Markdown, plots)."""
    cfg = cfg or Table1Config()
    t_start = time.perf_counter()
    # pairs / net / runner: those of a larger plan sharing its chips, model and attack store (advface paper)
    pairs = pairs or prepare_pairs(lfw, cfg.model, policy=InputPolicy(cfg.on_bad, cfg.no_face),
                                   pairs_file=cfg.pairs_file, workers=workers, progress=progress)
    if net is None:  # decisions: the plain model in fp32
        net = create_model(cfg.model, **({"weights": cfg.weights} if cfg.weights else {}))
    transfer = cfg.craft_model is not None and cfg.craft_model != cfg.model
    device = model_device(net)
    runner = runner or Runner(pairs, metric=cfg.metric, seed=cfg.seed, model=cfg.model, cache_dir=cache_dir,
                              batch_size=cfg.batch_size, progress=progress)

    # 1. The verifier (the plain model) and its thresholds, fitted on clean pairs of every fold.
    model = runner.calibrate(ModelVerifier(net, cfg.model, batch_size=64, progress=progress and "clean embeddings"))
    if transfer:  # the crafting model, on the judge's chips (see the runner's docstring)
        chip_size = tuple(pairs.chips.chips.shape[1:3])
        craft_plain = create_model(cfg.craft_model, device=device)
        craft_net = ResizedInput(craft_plain, chip_size)
        attacked_net = (ResizedInput(get_model_spec(cfg.craft_model).make_fast(craft_plain), chip_size)
                        if cfg.fast_model else craft_net)
        craft = runner.calibrate(ModelVerifier(craft_net, craft_net.name, batch_size=64,
                                               progress=progress and "clean embeddings (crafting model)"))
        decision_net, target = craft_net, craft
    else:
        attacked_net = get_model_spec(cfg.model).make_fast(net) if cfg.fast_model else net
        decision_net, target = net, model
    # 2. The attacked pairs.
    sel = runner.select(cfg.folds, cfg.max_pairs)
    clean_sim = runner.similarity(model, sel, runner.query_embeddings(model, sel, None))
    examples = _example_positions(sel.same, sel.query_rows, example_pairs)
    goal = np.where(sel.same, -1.0, 1.0)  # the direction each pair's attacker pushes the similarity

    def shift(sim: np.ndarray) -> float:
        return float(np.mean(goal * (sim - clean_sim)))

    # 3. Rows: clean, then one attack per row, crafted against the model and judged by it.
    rows = [_make_row("clean", 0, {}, runner.judge(model, sel, clean_sim), 0.0)]
    example_images: dict[str, np.ndarray] = {}
    clean_examples = pairs.chips.chips[sel.query_rows[examples]]
    extra_key = {"fast_model": arithmetic_key(attacked_net) or True} if cfg.fast_model else {}
    if transfer:
        extra_key["craft"] = {"model": cfg.craft_model, "input": "judge chip resized (bilinear, antialias)"}
    for name, eps, steps in tqdm(_row_specs(cfg), desc="table 1", unit="row", disable=not progress):
        options = dict(cfg.attack_options.get(name, {}))
        if steps is not None:
            options["steps"] = steps
        if cfg.early_stop and name == "pgd":
            options.setdefault("early_stop", True)
        if name != "noise":
            options.setdefault("precision", cfg.precision)
        attack = make_attack(name, attacked_net, metric=cfg.metric, eps=eps, seed=cfg.seed, **options)
        params = {k: v for k, v in attack.config().items() if k not in ("name", "eps", "objective", "seed")}
        queries = runner.attack_queries(attack, target, sel, decision_net, extra_key=extra_key or None,
                                        decision_name=craft_net.name if transfer else None)
        sim = runner.similarity(model, sel, runner.query_embeddings(model, sel, queries))
        row = _make_row(name, eps, params, runner.judge(model, sel, sim), shift(sim),
                        queries.seconds, queries.image_steps, queries.image_steps_full)
        if transfer:  # the white-box number on the crafting model, and no paper figure to compare with
            own = runner.judge(craft, sel, runner.similarity(craft, sel, queries.embeddings))
            row.craft_accuracy, row.paper_accuracy = own.accuracy_mean, None
        rows.append(row)
        if eps == max(cfg.eps) and name != "noise" and examples:
            example_images[name + (f"-{steps}" if steps is not None else "")] = (
                clean_examples.astype(np.int16) + queries.delta[examples]).astype(np.uint8)

    thr_native = model.thresholds
    report = {
        "table": "Table 1: verification accuracy after attack",
        "model": cfg.model,
        "config": {**asdict(cfg), "attacks": list(cfg.attacks), "eps": list(cfg.eps)},
        "dataset": {"name": pairs.dataset.name, "layout": pairs.dataset.layout},
        "dataset_fingerprint": pairs.dataset.fingerprint,
        "input": pairs.input_record(),
        "n_pairs": int(len(sel)),
        "folds": sorted(int(f) for f in np.unique(sel.folds)),
        "thresholds": {"metric": cfg.metric, "fitted_on": "clean data, other folds (k-fold)",
                       "per_fold": {str(k): v for k, v in thr_native.items()}},
        "clean_all_folds": model.clean.to_dict(),
        "eps_units": "0-255 pixel levels, L-inf, holds after rounding to uint8",
        "precision": {"gradients": resolve_precision(cfg.precision, device), "requested": cfg.precision,
                      "decisions": "fp32", "fast_model": cfg.fast_model,
                      "features": device_features(device)},
        "early_stop": cfg.early_stop,
        "transfer": None if not transfer else {
            "craft_model": cfg.craft_model, "judge_model": cfg.model,
            "chips": f"the judge's ({'x'.join(map(str, pairs.chips.chips.shape[1:3]))}); the crafting model sees "
                     "them resized to its input (bilinear, antialiased)",
            "craft_clean_all_folds": craft.clean.to_dict(),
            "craft_thresholds": {str(k): v for k, v in craft.thresholds.items()},
        },
        "rows": [asdict(r) for r in rows],
        "time_s": round(time.perf_counter() - t_start, 1),
        "environment": environment(),
    }
    if out_dir is not None:
        from .render import write_table1

        write_table1(report, Path(out_dir), clean_examples, example_images)
    return report


def _example_positions(same: np.ndarray, query_rows: np.ndarray, k: int) -> list[int]:
    """The first pairs with distinct query images, about half matched and half mismatched."""
    seen, chosen = set(), {True: [], False: []}
    quota = {True: (k + 1) // 2, False: k // 2}
    for i, (s, q) in enumerate(zip(same.tolist(), query_rows.tolist())):
        if q not in seen and len(chosen[s]) < quota[s]:
            seen.add(q)
            chosen[s].append(i)
    return sorted(chosen[True] + chosen[False])


def _make_row(name, eps, params, acc, mean_shift, seconds=0.0, steps=0, steps_full=0) -> Table1Row:
    rate = steps / seconds if seconds > 0 and steps > 0 else None
    return Table1Row(attack=name, eps=eps, params=params, n_pairs=acc.n_pairs, n_folds=len(acc.fold_ids),
               accuracy_mean=acc.accuracy_mean, accuracy_std=acc.accuracy_std,
               matched_accuracy=acc.matched_accuracy, mismatched_accuracy=acc.mismatched_accuracy,
               fold_accuracies=list(acc.fold_accuracies), mean_shift=mean_shift,
               time_s=round(seconds, 2), image_steps_per_s=None if rate is None else round(rate, 1),
               image_steps=steps, image_steps_full=steps_full, paper_accuracy=PAPER_TABLE1.get((name, eps)))

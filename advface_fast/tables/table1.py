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

Each row (attack x eps x steps) is cached on disk per pair, keyed by model weights, dataset,
alignment, attack config and run seed; per-pair seeds come from (run seed, pair id), so an
interrupted run resumes where it stopped and results never depend on batching.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..align import AlignConfig
from ..attacks import VerificationObjective, make_attack
from ..cache import config_key, default_cache_root, derive_seed
from ..engine import chips_to_tensor, embed_chips
from ..models import create_model, get_model_spec
from ..pipeline import PairChips, environment, prepare_pairs
from ..precision import device_features, resolve_precision
from ..verify import accuracy_with_thresholds, evaluate_embeddings

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
    batch_size: int = 32
    seed: int = 0
    noise_baseline: bool = True
    precision: str = "fp32"  # gradients: fp32 | bf16 | auto (decisions are always fp32)
    fast_model: bool = False  # attack through the fast copy (affine folded, channels_last)
    early_stop: bool = False  # PGD: pairs past the threshold by a margin leave the batch
    attack_options: dict = field(default_factory=dict)  # per attack name: extra constructor kwargs


@dataclass
class Row:
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


def _select_pairs(pairs: PairChips, folds, max_pairs) -> np.ndarray:
    """Indices of the attacked pairs: the chosen folds, optionally the first max_pairs balanced."""
    idx = np.arange(len(pairs))
    if folds is not None:
        idx = idx[np.isin(pairs.folds, list(folds))]
    if max_pairs is not None and max_pairs < len(idx):
        same = idx[pairs.same[idx]][: (max_pairs + 1) // 2]
        diff = idx[~pairs.same[idx]][: max_pairs // 2]
        idx = np.sort(np.concatenate([same, diff]))
    if len(idx) == 0:
        raise ValueError(f"no pairs selected (folds={folds}, max_pairs={max_pairs})")
    return idx


def _similarity_convention(scores_native: np.ndarray, metric: str) -> np.ndarray:
    return scores_native if metric == "cosine" else -scores_native


class RowCache:
    """Per-pair results of one table row on disk (npz, replaced atomically after each batch)."""

    def __init__(self, root: Path, key: str):
        self.path = root / f"{key}.npz"
        self.sim: dict[int, float] = {}
        self.examples: dict[int, np.ndarray] = {}
        self.seconds = 0.0
        self.steps_done = self.steps_full = 0
        if self.path.exists():
            try:
                with np.load(self.path) as z:
                    self.sim = dict(zip(z["pair"].tolist(), z["sim"].tolist()))
                    self.examples = dict(zip(z["ex_pair"].tolist(), z["ex_img"]))
                    self.seconds, self.steps_done = float(z["seconds"]), int(z["steps_done"])
                    self.steps_full = int(z["steps_full"]) if "steps_full" in z.files else self.steps_done
            except Exception:  # a damaged cache is recomputed, never trusted
                self.sim, self.examples, self.seconds, self.steps_done, self.steps_full = {}, {}, 0.0, 0, 0

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.stem + ".tmp.npz")
        ex_pairs = sorted(self.examples)
        ex_img = np.stack([self.examples[p] for p in ex_pairs]) if ex_pairs else np.zeros((0, 1, 1, 3), np.uint8)
        np.savez(tmp, pair=np.array(sorted(self.sim), dtype=np.int64),
                 sim=np.array([self.sim[p] for p in sorted(self.sim)], dtype=np.float64),
                 ex_pair=np.array(ex_pairs, dtype=np.int64), ex_img=ex_img,
                 seconds=self.seconds, steps_done=self.steps_done, steps_full=self.steps_full)
        tmp.replace(self.path)


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
               progress: bool = True, example_pairs: int = 4) -> dict:
    """Run the grid and return the report (also written to out_dir: JSON, Markdown, plots)."""
    cfg = cfg or Table1Config()
    t_start = time.perf_counter()
    pairs = prepare_pairs(lfw, cfg.model, on_bad="error", workers=workers, progress=progress)
    net = create_model(cfg.model)  # decisions: the plain model in fp32
    attacked_net = get_model_spec(cfg.model).make_fast(net) if cfg.fast_model else net
    device = next(net.parameters()).device

    # 1. Clean embeddings of every pair image and k-fold thresholds fitted on clean data only.
    emb = embed_chips(net, pairs.chips.chips, batch_size=64, progress=progress and "clean embeddings")
    clean = evaluate_embeddings(emb[pairs.a], emb[pairs.b], pairs.same, pairs.folds, metric=cfg.metric)
    thr_native = clean.threshold_map()

    # 2. The attacked pairs.
    sel = _select_pairs(pairs, cfg.folds, cfg.max_pairs)
    same, folds = pairs.same[sel], pairs.folds[sel]
    pair_ids = [f"{p.a}|{p.b}" for p in (pairs.dataset.pairs[i] for i in sel)]
    thr_sim = _similarity_convention(np.array([thr_native[f] for f in folds]), cfg.metric)
    objective = VerificationObjective(cfg.metric)
    gallery_all = torch.from_numpy(emb[pairs.b[sel]])
    clean_sim = objective.similarity(torch.from_numpy(emb[pairs.a[sel]]), gallery_all).numpy().astype(np.float64)
    examples = set(_example_positions(same, pairs.a[sel], example_pairs))

    def judge(sim: np.ndarray):
        native = _similarity_convention(sim, cfg.metric)
        return accuracy_with_thresholds(native, same, folds, thr_native, metric=cfg.metric)

    goal = np.where(same, -1.0, 1.0)  # the direction each pair's attacker pushes the similarity

    def shift(sim: np.ndarray) -> float:
        return float(np.mean(goal * (sim - clean_sim)))

    rows = [_make_row("clean", 0, {}, judge(clean_sim), 0.0)]

    key_base = dict(model=cfg.model, weights=getattr(net, "dat_sha256", None), data=pairs.dataset.fingerprint,
                    align=AlignConfig(**get_model_spec(cfg.model).alignment).key(), metric=cfg.metric,
                    seed=cfg.seed, thresholds=[round(float(t), 12) for t in thr_sim],
                    **({"fast_model": True} if cfg.fast_model else {}))
    cache_root = Path(cache_dir) if cache_dir else default_cache_root() / "attacks"
    example_images: dict[str, np.ndarray] = {}
    specs = _row_specs(cfg)
    for name, eps, steps in tqdm(specs, desc="table 1", unit="row", disable=not progress):
        options = dict(cfg.attack_options.get(name, {}))
        if steps is not None:
            options["steps"] = steps
        if cfg.early_stop and name == "pgd":
            options.setdefault("early_stop", True)
        if name != "noise":
            options.setdefault("precision", cfg.precision)
        attack = make_attack(name, attacked_net, metric=cfg.metric, eps=eps, seed=cfg.seed, **options)
        params = {k: v for k, v in attack.config().items() if k not in ("name", "eps", "objective", "seed")}
        cache = RowCache(cache_root, config_key(**key_base, attack=attack.config()))
        todo = [i for i in range(len(sel)) if i not in cache.sim]
        bar = tqdm(total=len(todo), desc=f"{name} eps={eps:g}", unit="pair", leave=False,
                   disable=not progress or not todo)
        for start in range(0, len(todo), cfg.batch_size):
            batch = np.array(todo[start : start + cfg.batch_size])
            t0 = time.perf_counter()
            queries = chips_to_tensor(pairs.chips.chips[pairs.a[sel[batch]]], device)
            x_adv = attack(queries, gallery_all[batch], torch.from_numpy(same[batch]),
                           torch.from_numpy(thr_sim[batch]).float(),
                           sample_seeds=[derive_seed(cfg.seed, pair_ids[i]) for i in batch])
            with torch.no_grad():  # decisions in fp32 on the delivered (uint8-grid) images
                sim = objective.similarity(net(x_adv).float(), gallery_all[batch].to(device))
            cache.seconds += time.perf_counter() - t0
            cache.steps_done += attack.last_stats["image_steps"]
            cache.steps_full += attack.last_stats["image_steps_full"]
            cache.sim.update(zip(batch.tolist(), sim.cpu().double().numpy().tolist()))
            for j, i in enumerate(batch.tolist()):
                if i in examples:
                    cache.examples[i] = _to_uint8(x_adv[j])
            cache.save()
            bar.update(len(batch))
        bar.close()
        sim_all = np.array([cache.sim[i] for i in range(len(sel))])
        rows.append(_make_row(name, eps, params, judge(sim_all), shift(sim_all),
                              cache.seconds, cache.steps_done, cache.steps_full))
        if eps == max(cfg.eps) and name != "noise":
            example_images[f"{name}" + (f"-{steps}" if steps is not None else "")] = np.stack(
                [cache.examples[i] for i in sorted(examples) if i in cache.examples]) if cache.examples else None

    report = {
        "table": "Table 1: verification accuracy after attack",
        "model": cfg.model,
        "config": {**asdict(cfg), "attacks": list(cfg.attacks), "eps": list(cfg.eps)},
        "dataset": {"name": pairs.dataset.name, "layout": pairs.dataset.layout},
        "dataset_fingerprint": pairs.dataset.fingerprint,
        "n_pairs": int(len(sel)),
        "folds": sorted(int(f) for f in np.unique(folds)),
        "thresholds": {"metric": cfg.metric, "fitted_on": "clean data, other folds (k-fold)",
                       "per_fold": {str(k): v for k, v in thr_native.items()}},
        "clean_all_folds": clean.to_dict(),
        "eps_units": "0-255 pixel levels, L-inf, holds after rounding to uint8",
        "precision": {"gradients": resolve_precision(cfg.precision, device), "requested": cfg.precision,
                      "decisions": "fp32", "fast_model": cfg.fast_model,
                      "features": device_features(device)},
        "early_stop": cfg.early_stop,
        "rows": [asdict(r) for r in rows],
        "time_s": round(time.perf_counter() - t_start, 1),
        "environment": environment(),
    }
    if out_dir is not None:
        from .render import write_table1

        clean_chips = pairs.chips.chips[pairs.a[sel[sorted(examples)]]]
        write_table1(report, Path(out_dir), clean_chips, example_images)
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


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def _make_row(name, eps, params, acc, mean_shift, seconds=0.0, steps=0, steps_full=0) -> Row:
    rate = steps / seconds if seconds > 0 and steps > 0 else None
    return Row(attack=name, eps=eps, params=params, n_pairs=acc.n_pairs, n_folds=len(acc.fold_ids),
               accuracy_mean=acc.accuracy_mean, accuracy_std=acc.accuracy_std,
               matched_accuracy=acc.matched_accuracy, mismatched_accuracy=acc.mismatched_accuracy,
               fold_accuracies=list(acc.fold_accuracies), mean_shift=mean_shift,
               time_s=round(seconds, 2), image_steps_per_s=None if rate is None else round(rate, 1),
               image_steps=steps, image_steps_full=steps_full, paper_accuracy=PAPER_TABLE1.get((name, eps)))

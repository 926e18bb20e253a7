"""LFW face-verification protocol and metrics (pure numpy).

Conventions
-----------
* Scores come in the metric's *native* units: cosine similarity (higher = same) or
  L2 distance on raw embeddings (lower = same; dlib's rule is "same if distance < 0.6").
  Internally every score is turned into a *similarity* ``s`` (L2: ``s = -distance``) so one
  code path serves both metrics. Thresholds are always reported back in native units.
* Decision rule (strict, mirrored exactly between the two metrics):
  cosine: same iff ``score > threshold``; L2: same iff ``distance < threshold``.
* Threshold fitting (standard 10-fold LFW protocol): for test fold k the threshold is the one
  that maximises accuracy on all *other* folds. Candidates are every midpoint between
  consecutive sorted unique training scores, plus one value below the minimum (accept all)
  and one above the maximum (reject all), both 1.0 away from the extreme score.
  Ties between equally accurate candidates are broken by taking the *lower median* of the
  tied candidates in increasing similarity order (``best[(len(best) - 1) // 2]``); for L2 that
  is the upper median in distance order. The median sits in the middle of an accuracy
  plateau, which is less brittle than an edge when the thresholds are reused later.
  With a single fold there are no other folds: the threshold is fitted on that fold itself
  and the result says ``thresholds_fitted_on="same-fold"`` (otherwise ``"other-folds"``).
* Thresholds are never refitted on attacked data: use :func:`accuracy_with_thresholds`
  (or :meth:`VerificationResult.apply`) to judge new scores with the fitted thresholds.
* ``accuracy_std`` is the population standard deviation over folds (``np.std``, ddof=0).
* Matched / mismatched accuracy, AUC, ROC and TAR@FAR are computed on all test folds pooled.
  Matched/mismatched use each pair's own fold threshold; AUC, ROC and TAR@FAR are
  threshold-free summaries of the pooled scores.
* TAR@FAR: over every operating point of the pooled ROC, the largest true-accept rate whose
  false-accept rate is <= the target. FAR is counted on the different-identity pairs, so its
  resolution is 1/n_different: with 3000 negatives FAR 1e-3 allows at most 3 false accepts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# metric name -> higher_is_same
METRICS: dict[str, bool] = {"cosine": True, "l2": False}
DEFAULT_FAR_TARGETS: tuple[float, ...] = (1e-3, 1e-2)
TIE_BREAK = "lower median of tied candidates in increasing similarity order"
_EDGE_MARGIN = 1.0  # distance of the accept-all / reject-all candidates from the extreme score


# ----------------------------------------------------------------------------- scores


def _check_embeddings(emb_a, emb_b) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(emb_a, dtype=np.float64)
    b = np.asarray(emb_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N x D), got shapes {a.shape} and {b.shape}")
    if a.shape != b.shape:
        raise ValueError(f"embedding shapes differ: {a.shape} vs {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("embeddings contain NaN or inf")
    return a, b


def cosine_scores(emb_a, emb_b) -> np.ndarray:
    """Cosine similarity of each row pair (float64, higher = same identity)."""
    a, b = _check_embeddings(emb_a, emb_b)
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    if (na == 0).any() or (nb == 0).any():
        raise ValueError("cannot L2-normalise an all-zero embedding")
    return np.einsum("nd,nd->n", a / na[:, None], b / nb[:, None])


def l2_scores(emb_a, emb_b) -> np.ndarray:
    """Euclidean distance of each row pair on the raw embeddings (float64, LOWER = same)."""
    a, b = _check_embeddings(emb_a, emb_b)
    return np.linalg.norm(a - b, axis=1)


SCORE_FUNCTIONS = {"cosine": cosine_scores, "l2": l2_scores}


# ----------------------------------------------------------------------------- validation


def _higher_is_same(metric: str, higher_is_same: bool | None) -> bool:
    if higher_is_same is not None:
        return bool(higher_is_same)
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {sorted(METRICS)} or pass higher_is_same")
    return METRICS[metric]


def _check_scores(scores) -> np.ndarray:
    s = np.asarray(scores)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if s.size == 0:
        raise ValueError("scores are empty")
    if s.dtype.kind not in "iuf":
        raise ValueError(f"scores must be numeric, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError(f"scores contain {int((~np.isfinite(s)).sum())} NaN/inf value(s)")
    return s


def _check_same(same, n: int) -> np.ndarray:
    y = np.asarray(same)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"same must be 1-D with {n} entries (one per score), got shape {y.shape}")
    if y.dtype == bool:
        return y
    if y.dtype.kind not in "iuf" or not np.isin(y, (0, 1)).all():
        raise ValueError("same must be boolean or 0/1")
    return y.astype(bool)


def _check_folds(folds, n: int) -> np.ndarray:
    f = np.asarray(folds)
    if f.ndim != 1 or f.shape[0] != n:
        raise ValueError(f"folds must be 1-D with {n} entries (one per score), got shape {f.shape}")
    if f.dtype.kind not in "iu":
        raise ValueError(f"folds must be an integer array of fold ids, got dtype {f.dtype}")
    return f.astype(np.int64)


def _to_similarity(native: np.ndarray, higher_is_same: bool) -> np.ndarray:
    return native if higher_is_same else -native


def _to_native(similarity, higher_is_same: bool):
    return similarity if higher_is_same else -similarity


# ----------------------------------------------------------------------------- core


def _split_counts(sim: np.ndarray, same: np.ndarray):
    """Candidate thresholds and, for each, how many positives/negatives it accepts.

    Candidate i (0..m) accepts exactly the scores whose unique value index is >= i, under the
    strict rule ``sim > threshold``. Returns (candidates, pos_accepted, neg_accepted).
    """
    uniq, inverse = np.unique(sim, return_inverse=True)
    m = uniq.size
    pos_per = np.bincount(inverse[same], minlength=m)
    neg_per = np.bincount(inverse[~same], minlength=m)
    # accepted by candidate i = counts at unique indices >= i (reverse cumulative sum)
    pos_acc = np.concatenate([np.cumsum(pos_per[::-1])[::-1], [0]])
    neg_acc = np.concatenate([np.cumsum(neg_per[::-1])[::-1], [0]])

    lo, hi = uniq[:-1], uniq[1:]
    mid = lo + (hi - lo) / 2.0
    # Rounding can put a midpoint of two adjacent floats onto `hi`; the strict rule needs
    # lo <= t < hi, and `lo` itself satisfies that.
    mid = np.where(mid < hi, mid, lo)
    candidates = np.concatenate([[uniq[0] - _EDGE_MARGIN], mid, [uniq[-1] + _EDGE_MARGIN]])
    return candidates, pos_acc, neg_acc


def _fit_similarity_threshold(sim: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """Best threshold (similarity units) and its accuracy on (sim, same)."""
    candidates, pos_acc, neg_acc = _split_counts(sim, same)
    n_neg = int((~same).sum())
    correct = pos_acc + (n_neg - neg_acc)  # exact integers: ties are found without float noise
    best = np.flatnonzero(correct == correct.max())
    k = best[(best.size - 1) // 2]
    return float(candidates[k]), float(correct[k]) / sim.size


def fit_threshold(scores, same, *, metric: str = "cosine", higher_is_same: bool | None = None) -> tuple[float, float]:
    """Accuracy-maximising threshold on the given pairs: (threshold in native units, accuracy)."""
    his = _higher_is_same(metric, higher_is_same)
    s = _check_scores(scores)
    y = _check_same(same, s.size)
    t, acc = _fit_similarity_threshold(_to_similarity(s, his), y)
    return float(_to_native(t, his)), acc


def predict_same(scores, threshold: float, *, higher_is_same: bool = True) -> np.ndarray:
    """Apply one threshold: cosine ``score > t``; distance ``score < t``."""
    s = _check_scores(scores)
    return s > threshold if higher_is_same else s < threshold


def _rate(hits: np.ndarray) -> float:
    return float(hits.mean()) if hits.size else float("nan")


def roc_curve(scores, same, *, metric: str = "cosine", higher_is_same: bool | None = None):
    """Pooled ROC: (fpr, tpr, thresholds), from (0, 0) to (1, 1) with fpr non-decreasing.

    One point per distinct operating point; ``thresholds`` are in native units under the
    module's strict decision rule. Rates are NaN when a class is absent.
    """
    his = _higher_is_same(metric, higher_is_same)
    s = _check_scores(scores)
    y = _check_same(same, s.size)
    candidates, pos_acc, neg_acc = _split_counts(_to_similarity(s, his), y)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = pos_acc[::-1] / n_pos
        fpr = neg_acc[::-1] / n_neg
    return fpr, tpr, _to_native(candidates[::-1], his)


def roc_auc(scores, same, *, metric: str = "cosine", higher_is_same: bool | None = None) -> float:
    """Rank-based (Mann-Whitney) ROC AUC; tied positive/negative pairs count 0.5. NaN if a class is absent."""
    his = _higher_is_same(metric, higher_is_same)
    s = _check_scores(scores)
    y = _check_same(same, s.size)
    sim = _to_similarity(s, his)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(sim, return_inverse=True, return_counts=True)
    # average 1-based rank of each tie group
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0
    rank_sum_pos = avg_rank[inverse][y].sum()
    return float((rank_sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def tar_at_far(scores, same, far_target: float, *, metric: str = "cosine",
               higher_is_same: bool | None = None) -> tuple[float, float]:
    """(TAR, threshold in native units): the largest TAR over all operating points with FAR <= far_target.

    Among points with that TAR the one with the lowest FAR (strictest threshold) is returned.
    NaN when a class is absent.
    """
    fpr, tpr, thr = roc_curve(scores, same, metric=metric, higher_is_same=higher_is_same)
    if np.isnan(fpr).any() or np.isnan(tpr).any():
        return float("nan"), float("nan")
    ok = np.flatnonzero(fpr <= far_target)  # never empty: the reject-all point has fpr 0
    best_tar = tpr[ok].max()
    k = ok[tpr[ok] == best_tar][0]  # fpr is non-decreasing, so the first is the strictest
    return float(best_tar), float(thr[k])


# ----------------------------------------------------------------------------- results


def _far_key(target: float) -> str:
    return np.format_float_scientific(target, trim="-", exp_digits=1)


def _json_float(x):
    x = float(x)
    return None if math.isnan(x) else x


@dataclass
class ThresholdedAccuracy:
    """Accuracy of fixed per-fold thresholds on a set of scores (no refitting)."""

    fold_ids: list[int]
    fold_accuracies: list[float]
    accuracy_mean: float
    accuracy_std: float  # population std over folds (ddof=0)
    matched_accuracy: float  # TAR on same pairs, pooled over folds (NaN if none)
    mismatched_accuracy: float  # true-reject rate on different pairs, pooled (NaN if none)
    accuracy_pooled: float  # fraction of all pairs decided correctly
    n_pairs: int
    n_same: int
    n_different: int

    def to_dict(self) -> dict:
        return {
            "fold_ids": [int(f) for f in self.fold_ids],
            "fold_accuracies": [_json_float(a) for a in self.fold_accuracies],
            "accuracy_mean": _json_float(self.accuracy_mean),
            "accuracy_std": _json_float(self.accuracy_std),
            "matched_accuracy": _json_float(self.matched_accuracy),
            "mismatched_accuracy": _json_float(self.mismatched_accuracy),
            "accuracy_pooled": _json_float(self.accuracy_pooled),
            "n_pairs": int(self.n_pairs),
            "n_same": int(self.n_same),
            "n_different": int(self.n_different),
        }


def _threshold_per_pair(folds: np.ndarray, thresholds, fold_ids) -> np.ndarray:
    if isinstance(thresholds, Mapping):
        table = {int(k): float(v) for k, v in thresholds.items()}
    else:
        thr = np.asarray(thresholds, dtype=np.float64).ravel()
        ids = np.unique(folds) if fold_ids is None else np.asarray(fold_ids).ravel()
        if ids.size != thr.size:
            raise ValueError(f"{thr.size} thresholds for {ids.size} fold ids; pass fold_ids or a mapping")
        table = {int(k): float(v) for k, v in zip(ids, thr)}
    missing = sorted(set(np.unique(folds).tolist()) - set(table))
    if missing:
        raise ValueError(f"no threshold for fold id(s) {missing}")
    if not all(math.isfinite(v) for v in table.values()):
        raise ValueError("thresholds contain NaN or inf")
    ids_sorted = np.array(sorted(table), dtype=np.int64)
    values = np.array([table[k] for k in ids_sorted.tolist()])
    return values[np.searchsorted(ids_sorted, folds)]


def accuracy_with_thresholds(scores, same, folds, thresholds, *, fold_ids=None, metric: str = "cosine",
                             higher_is_same: bool | None = None) -> ThresholdedAccuracy:
    """Judge (e.g. attacked) scores with fixed per-fold thresholds in native units; nothing is refitted.

    ``thresholds`` is a mapping fold id -> threshold, or a sequence aligned with ``fold_ids``
    (default: the sorted unique ids in ``folds``). Only folds present in ``folds`` are reported.
    """
    his = _higher_is_same(metric, higher_is_same)
    s = _check_scores(scores)
    y = _check_same(same, s.size)
    f = _check_folds(folds, s.size)
    t = _threshold_per_pair(f, thresholds, fold_ids)
    pred = s > t if his else s < t
    correct = pred == y
    present = np.unique(f)
    fold_acc = np.array([correct[f == k].mean() for k in present])
    return ThresholdedAccuracy(
        fold_ids=present.tolist(),
        fold_accuracies=fold_acc.tolist(),
        accuracy_mean=float(fold_acc.mean()),
        accuracy_std=float(fold_acc.std(ddof=0)),
        matched_accuracy=_rate(pred[y]),
        mismatched_accuracy=_rate(~pred[~y]),
        accuracy_pooled=float(correct.mean()),
        n_pairs=int(s.size),
        n_same=int(y.sum()),
        n_different=int((~y).sum()),
    )


@dataclass
class VerificationResult:
    """Outcome of the LFW protocol on one set of scores. Thresholds are in native units."""

    metric: str
    higher_is_same: bool
    n_pairs: int
    n_folds: int
    n_same: int
    n_different: int
    fold_ids: list[int]
    thresholds: list[float]  # one per fold id, fitted on the other folds (see thresholds_fitted_on)
    thresholds_fitted_on: str  # "other-folds" or "same-fold"
    fold_accuracies: list[float]
    accuracy_mean: float
    accuracy_std: float  # population std over folds (ddof=0)
    matched_accuracy: float
    mismatched_accuracy: float
    auc: float
    tar_at_far: dict[float, float]
    threshold_at_far: dict[float, float]
    fpr: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    tpr: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @property
    def decision_rule(self) -> str:
        return "same if score > threshold" if self.higher_is_same else "same if distance < threshold"

    def threshold_map(self) -> dict[int, float]:
        return dict(zip(self.fold_ids, self.thresholds))

    def apply(self, scores, same, folds) -> ThresholdedAccuracy:
        """Judge new scores (same metric) with this result's per-fold thresholds, without refitting."""
        return accuracy_with_thresholds(scores, same, folds, self.threshold_map(),
                                        metric=self.metric, higher_is_same=self.higher_is_same)

    def to_dict(self, include_roc: bool = False) -> dict:
        """JSON-ready plain types; NaN becomes None. ROC arrays only with include_roc=True."""
        d = {
            "metric": self.metric,
            "higher_is_same": bool(self.higher_is_same),
            "decision_rule": self.decision_rule,
            "n_pairs": int(self.n_pairs),
            "n_folds": int(self.n_folds),
            "n_same": int(self.n_same),
            "n_different": int(self.n_different),
            "fold_ids": [int(f) for f in self.fold_ids],
            "thresholds": [float(t) for t in self.thresholds],
            "thresholds_fitted_on": self.thresholds_fitted_on,
            "tie_break": TIE_BREAK,
            "fold_accuracies": [float(a) for a in self.fold_accuracies],
            "accuracy_mean": _json_float(self.accuracy_mean),
            "accuracy_std": _json_float(self.accuracy_std),
            "accuracy_std_ddof": 0,
            "matched_accuracy": _json_float(self.matched_accuracy),
            "mismatched_accuracy": _json_float(self.mismatched_accuracy),
            "auc": _json_float(self.auc),
        }
        for target in sorted(self.tar_at_far):
            d[f"tar_at_far_{_far_key(target)}"] = _json_float(self.tar_at_far[target])
            d[f"threshold_at_far_{_far_key(target)}"] = _json_float(self.threshold_at_far[target])
        if include_roc:
            d["roc_fpr"] = [_json_float(x) for x in self.fpr]
            d["roc_tpr"] = [_json_float(x) for x in self.tpr]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VerificationResult":
        """Inverse of to_dict (None -> NaN); ROC arrays are empty unless they were saved."""
        def num(x):
            return float("nan") if x is None else float(x)

        tar, thr = {}, {}
        for key, value in d.items():
            if key.startswith("tar_at_far_"):
                target = float(key[len("tar_at_far_"):])
                tar[target] = num(value)
                thr[target] = num(d.get(f"threshold_at_far_{key[len('tar_at_far_'):]}"))
        return cls(
            metric=d["metric"], higher_is_same=bool(d["higher_is_same"]),
            n_pairs=int(d["n_pairs"]), n_folds=int(d["n_folds"]),
            n_same=int(d.get("n_same", -1)), n_different=int(d.get("n_different", -1)),
            fold_ids=[int(f) for f in d["fold_ids"]], thresholds=[float(t) for t in d["thresholds"]],
            thresholds_fitted_on=d["thresholds_fitted_on"],
            fold_accuracies=[float(a) for a in d["fold_accuracies"]],
            accuracy_mean=num(d["accuracy_mean"]), accuracy_std=num(d["accuracy_std"]),
            matched_accuracy=num(d["matched_accuracy"]), mismatched_accuracy=num(d["mismatched_accuracy"]),
            auc=num(d["auc"]), tar_at_far=tar, threshold_at_far=thr,
            fpr=np.array([num(x) for x in d.get("roc_fpr", [])]),
            tpr=np.array([num(x) for x in d.get("roc_tpr", [])]),
        )


def evaluate(scores, same, folds, metric: str = "cosine", *, higher_is_same: bool | None = None,
             far_targets: Sequence[float] = DEFAULT_FAR_TARGETS) -> VerificationResult:
    """Run the LFW k-fold verification protocol on native-unit scores.

    ``same``: bool (or 0/1) per pair; ``folds``: integer fold id per pair (any labels).
    ``metric`` picks the score direction ("cosine": higher = same, "l2": lower = same);
    ``higher_is_same`` overrides it for other score types.
    """
    his = _higher_is_same(metric, higher_is_same)
    s = _check_scores(scores)
    y = _check_same(same, s.size)
    f = _check_folds(folds, s.size)
    sim = _to_similarity(s, his)
    fold_ids = np.unique(f)

    thresholds = []
    for k in fold_ids:
        train = f != k if fold_ids.size > 1 else np.ones_like(y)
        t_sim, _ = _fit_similarity_threshold(sim[train], y[train])
        thresholds.append(float(_to_native(t_sim, his)))

    applied = accuracy_with_thresholds(s, y, f, thresholds, fold_ids=fold_ids, metric=metric, higher_is_same=his)
    fpr, tpr, _ = roc_curve(s, y, metric=metric, higher_is_same=his)
    tar, thr = {}, {}
    for target in far_targets:
        tar[float(target)], thr[float(target)] = tar_at_far(s, y, float(target), metric=metric, higher_is_same=his)

    return VerificationResult(
        metric=metric,
        higher_is_same=his,
        n_pairs=int(s.size),
        n_folds=int(fold_ids.size),
        n_same=applied.n_same,
        n_different=applied.n_different,
        fold_ids=fold_ids.tolist(),
        thresholds=thresholds,
        thresholds_fitted_on="other-folds" if fold_ids.size > 1 else "same-fold",
        fold_accuracies=applied.fold_accuracies,
        accuracy_mean=applied.accuracy_mean,
        accuracy_std=applied.accuracy_std,
        matched_accuracy=applied.matched_accuracy,
        mismatched_accuracy=applied.mismatched_accuracy,
        auc=roc_auc(s, y, metric=metric, higher_is_same=his),
        tar_at_far=tar,
        threshold_at_far=thr,
        fpr=fpr,
        tpr=tpr,
    )


def evaluate_embeddings(emb_a, emb_b, same, folds, metric: str = "cosine", **kwargs) -> VerificationResult:
    """Score embedding pairs with ``metric`` ("cosine" or "l2") and run :func:`evaluate`."""
    if metric not in SCORE_FUNCTIONS:
        raise ValueError(f"unknown metric {metric!r}; use one of {sorted(SCORE_FUNCTIONS)}")
    return evaluate(SCORE_FUNCTIONS[metric](emb_a, emb_b), same, folds, metric=metric, **kwargs)


# ----------------------------------------------------------------------------- plot


def plot_roc(results: Mapping[str, VerificationResult], path, *, log_far: bool = True, title: str | None = None) -> Path:
    """Write a PNG with one ROC curve per result (legend: AUC and mean accuracy). Returns the path."""
    # Figure + Agg canvas directly: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not results:
        raise ValueError("no results to plot")
    fig = Figure(figsize=(6.4, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    smallest_far = 1.0
    for name, res in results.items():
        if res.fpr.size == 0:
            raise ValueError(f"result {name!r} has no ROC points")
        fpr, tpr = np.asarray(res.fpr), np.asarray(res.tpr)
        if log_far:
            keep = fpr > 0  # FAR = 0 has no place on a log axis
            fpr, tpr = fpr[keep], tpr[keep]
            if fpr.size:
                smallest_far = min(smallest_far, float(fpr.min()))
        label = f"{name} (AUC {res.auc:.4f}, acc {100 * res.accuracy_mean:.2f}±{100 * res.accuracy_std:.2f}%)"
        ax.plot(fpr, tpr, lw=1.5, label=label)
    if log_far:
        ax.set_xscale("log")
        ax.set_xlim(smallest_far / 2, 1.0)
    else:
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("False accept rate (FAR)" + (", log scale" if log_far else ""))
    ax.set_ylabel("True accept rate (TAR)")
    ax.set_title(title or "ROC (pooled over folds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path

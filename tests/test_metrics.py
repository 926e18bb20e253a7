"""Tests for advface_fast.metrics against brute-force and scikit-learn reference computations."""

import json

import numpy as np
import pytest

from conftest import need_module  # in CI mode a missing library fails

from advface_fast import metrics
from advface_fast.metrics import (
    VerificationResult,
    accuracy_with_thresholds,
    cosine_scores,
    evaluate,
    evaluate_embeddings,
    fit_threshold,
    l2_scores,
    plot_roc,
    predict_same,
    roc_auc,
    roc_curve,
    tar_at_far,
)


# ----------------------------------------------------------------------------- references


def brute_force_threshold(sim, same):
    """Python loop over every candidate; strict rule sim > t; lower median of the best."""
    uniq = sorted(set(float(x) for x in sim))
    candidates = [uniq[0] - 1.0] + [(a + b) / 2 for a, b in zip(uniq[:-1], uniq[1:])] + [uniq[-1] + 1.0]
    accs = [int(((sim > t) == same).sum()) for t in candidates]
    best = [t for t, a in zip(candidates, accs) if a == max(accs)]
    return best[(len(best) - 1) // 2]


def brute_force_fold_accuracies(sim, same, folds):
    ids = sorted(set(folds.tolist()))
    accs, thresholds = [], []
    for k in ids:
        train = folds != k if len(ids) > 1 else np.ones(len(folds), bool)
        t = brute_force_threshold(sim[train], same[train])
        test = folds == k
        thresholds.append(t)
        accs.append(float(((sim[test] > t) == same[test]).mean()))
    return accs, thresholds


def brute_force_tar_at_far(sim, same, target):
    best = 0.0
    for t in list(np.unique(sim)) + [np.inf]:
        accept = sim >= t
        far = accept[~same].mean()
        tar = accept[same].mean()
        if far <= target:
            best = max(best, tar)
    return best


def random_pairs(rng, n=600, n_folds=10, separation=1.0, decimals=None):
    same = rng.random(n) < 0.5
    scores = rng.normal(size=n) + separation * same
    if decimals is not None:
        scores = np.round(scores, decimals)  # forces many ties
    folds = np.repeat(np.arange(1, n_folds + 1), int(np.ceil(n / n_folds)))[:n]
    rng.shuffle(folds)
    return scores, same, folds


# ----------------------------------------------------------------------------- scores


def test_cosine_and_l2_scores_match_direct_formulas():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 8)).astype(np.float32)
    b = rng.normal(size=(20, 8)).astype(np.float32)
    cos = cosine_scores(a, b)
    l2 = l2_scores(a, b)
    assert cos.dtype == np.float64 and l2.dtype == np.float64
    for i in range(20):
        x, y = a[i].astype(np.float64), b[i].astype(np.float64)
        assert cos[i] == pytest.approx(x @ y / np.linalg.norm(x) / np.linalg.norm(y), abs=1e-12)
        assert l2[i] == pytest.approx(np.sqrt(((x - y) ** 2).sum()), abs=1e-12)
    # cosine is scale-invariant, raw L2 is not
    # (scale in float64: 3 * a in float32 would round)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    np.testing.assert_allclose(cosine_scores(3 * a64, b64), cos, atol=1e-12)
    np.testing.assert_allclose(l2_scores(3 * a64, 3 * b64), 3 * l2, rtol=1e-12)


# ----------------------------------------------------------------------------- protocol


@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_fold_accuracies_match_brute_force(decimals):
    rng = np.random.default_rng(1 if decimals is None else 10 + decimals)
    scores, same, folds = random_pairs(rng, decimals=decimals)
    res = evaluate(scores, same, folds, metric="cosine")
    accs, thresholds = brute_force_fold_accuracies(scores, same, folds)
    np.testing.assert_allclose(res.fold_accuracies, accs, atol=1e-12)
    np.testing.assert_allclose(res.thresholds, thresholds, atol=1e-12)
    assert res.accuracy_mean == pytest.approx(np.mean(accs))
    assert res.accuracy_std == pytest.approx(np.std(accs, ddof=0))
    assert res.n_folds == 10 and res.n_pairs == 600 and res.fold_ids == list(range(1, 11))
    assert res.thresholds_fitted_on == "other-folds"


def test_matched_and_mismatched_accuracy_use_each_pairs_fold_threshold():
    rng = np.random.default_rng(2)
    scores, same, folds = random_pairs(rng)
    res = evaluate(scores, same, folds)
    thr = np.array([res.threshold_map()[int(k)] for k in folds])
    pred = scores > thr
    assert res.matched_accuracy == pytest.approx(pred[same].mean())
    assert res.mismatched_accuracy == pytest.approx((~pred[~same]).mean())
    assert res.n_same == same.sum() and res.n_different == (~same).sum()


def test_l2_direction_perfectly_separable():
    rng = np.random.default_rng(3)
    n = 200
    same = np.arange(n) % 2 == 0
    a = rng.normal(size=(n, 16))
    # same pairs: small perturbation (distance ~0.3); different pairs: unrelated vectors (distance ~5.6)
    b = np.where(same[:, None], a + 0.3 * rng.normal(size=(n, 16)) / 4, rng.normal(size=(n, 16)))
    folds = np.arange(n) % 10
    res = evaluate_embeddings(a, b, same, folds, metric="l2")
    assert res.higher_is_same is False
    assert res.fold_accuracies == [1.0] * 10
    assert res.matched_accuracy == 1.0 and res.mismatched_accuracy == 1.0 and res.auc == 1.0
    d = l2_scores(a, b)
    # thresholds are distances lying between the two classes, and "same if distance < t"
    assert all(d[same].max() < t < d[~same].min() for t in res.thresholds)
    assert np.array_equal(predict_same(d, res.thresholds[0], higher_is_same=False), same)
    # the same data scored as a similarity (negated distance) gives the mirrored thresholds
    res_neg = evaluate(-d, same, folds, metric="cosine")
    np.testing.assert_allclose(res_neg.thresholds, -np.array(res.thresholds))
    # wrong direction on distances is catastrophically bad, which shows the flag matters
    assert evaluate(d, same, folds, metric="cosine").accuracy_mean < 0.6


def test_l2_matches_negated_similarity_on_random_data_with_ties():
    rng = np.random.default_rng(4)
    scores, same, folds = random_pairs(rng, decimals=1)
    dist = 5.0 - scores  # lower = same
    r_l2 = evaluate(dist, same, folds, metric="l2")
    r_sim = evaluate(-dist, same, folds, metric="cosine")
    assert r_l2.fold_accuracies == r_sim.fold_accuracies
    np.testing.assert_allclose(r_l2.thresholds, -np.array(r_sim.thresholds))
    assert r_l2.auc == pytest.approx(r_sim.auc)
    assert r_l2.tar_at_far == pytest.approx(r_sim.tar_at_far)


def test_accuracy_with_thresholds_reproduces_evaluate_without_refitting():
    rng = np.random.default_rng(5)
    scores, same, folds = random_pairs(rng)
    for metric, s in (("cosine", scores), ("l2", -scores)):
        res = evaluate(s, same, folds, metric=metric)
        again = accuracy_with_thresholds(s, same, folds, res.thresholds, metric=metric)
        assert again.fold_accuracies == res.fold_accuracies
        assert again.matched_accuracy == res.matched_accuracy
        assert again.mismatched_accuracy == res.mismatched_accuracy
        assert res.apply(s, same, folds).fold_accuracies == res.fold_accuracies
    # "attacked" scores: every same pair pushed far down -> matched accuracy collapses, thresholds unchanged
    res = evaluate(scores, same, folds)
    attacked = np.where(same, scores - 100.0, scores)
    out = res.apply(attacked, same, folds)
    assert out.matched_accuracy == 0.0
    assert out.mismatched_accuracy == res.mismatched_accuracy
    # a subset of folds, thresholds given as a mapping
    sub = np.isin(folds, [3, 7])
    out = accuracy_with_thresholds(scores[sub], same[sub], folds[sub], res.threshold_map())
    assert out.fold_ids == [3, 7]
    assert out.fold_accuracies == [res.fold_accuracies[2], res.fold_accuracies[6]]
    with pytest.raises(ValueError, match="no threshold"):
        accuracy_with_thresholds(scores, same, folds, {1: 0.0, 2: 0.0})
    with pytest.raises(ValueError, match="thresholds for"):
        accuracy_with_thresholds(scores, same, folds, [0.0, 0.0])


def test_all_scores_tied():
    scores = np.full(10, 0.5)
    same = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], bool)
    folds = np.array([0, 1] * 5)
    res = evaluate(scores, same, folds)
    # nothing can split a single tie group: best is accept-all (majority class is "same")
    assert res.fold_accuracies == [0.6, 0.6]
    assert res.matched_accuracy == 1.0 and res.mismatched_accuracy == 0.0
    assert res.auc == 0.5
    assert all(t < 0.5 for t in res.thresholds)


def test_tie_break_is_lower_median_of_best():
    # sim:   0   1   2   3
    # same:  F   T   F   T   -> candidates -1, .5, 1.5, 2.5, 4 give 2,3,2,3,2 correct
    # best = {0.5, 2.5}; lower median -> 0.5
    t, acc = fit_threshold([0.0, 1.0, 2.0, 3.0], [0, 1, 0, 1])
    assert t == 0.5 and acc == 0.75
    # three tied best {0.5, 2.5, 4.5}: median -> 2.5
    t, acc = fit_threshold([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [0, 1, 0, 1, 0, 1])
    assert t == 2.5 and acc == pytest.approx(4 / 6)


def test_decision_rule_is_strict_at_the_threshold():
    # dlib: "same if distance < 0.6" -> a distance of exactly 0.6 is "different"
    dist = np.array([0.5, 0.6, 0.7])
    same = np.array([True, False, False])
    assert predict_same(dist, 0.6, higher_is_same=False).tolist() == [True, False, False]
    out = accuracy_with_thresholds(dist, same, np.zeros(3, int), [0.6], metric="l2")
    assert out.fold_accuracies == [1.0]
    # cosine mirror: "same if score > t"
    cos = np.array([0.7, 0.6, 0.5])
    assert predict_same(cos, 0.6).tolist() == [True, False, False]
    assert accuracy_with_thresholds(cos, same, np.zeros(3, int), [0.6]).fold_accuracies == [1.0]


def test_midpoint_of_adjacent_floats_still_separates():
    a = 0.3
    b = np.nextafter(a, 1.0)
    t, acc = fit_threshold([a, b], [0, 1])
    assert acc == 1.0
    assert predict_same([a, b], t).tolist() == [False, True]
    t, acc = fit_threshold([a, b], [1, 0], metric="l2")
    assert acc == 1.0
    assert predict_same([a, b], t, higher_is_same=False).tolist() == [True, False]


def test_fold_with_all_same_labels():
    rng = np.random.default_rng(6)
    scores, same, folds = random_pairs(rng, n=300, n_folds=5)
    same[folds == 3] = True
    res = evaluate(scores, same, folds)
    accs, thresholds = brute_force_fold_accuracies(scores, same, folds)
    np.testing.assert_allclose(res.fold_accuracies, accs)
    k = res.fold_ids.index(3)
    assert res.fold_accuracies[k] == pytest.approx((scores[folds == 3] > res.thresholds[k]).mean())
    assert res.thresholds_fitted_on == "other-folds"


def test_training_folds_with_one_class_only():
    scores = np.array([0.1, 0.9, 0.2, 0.8])
    same = np.array([True, True, False, False])
    folds = np.array([1, 1, 2, 2])
    res = evaluate(scores, same, folds)
    # fold 1 is fitted on fold 2 (all different) -> reject all; fold 2 fitted on fold 1 -> accept all
    assert res.fold_accuracies == [0.0, 0.0]
    assert res.thresholds[0] > 0.9 and res.thresholds[1] < 0.1


def test_single_fold_fits_on_itself_and_says_so():
    rng = np.random.default_rng(7)
    scores, same, _ = random_pairs(rng, n=100)
    folds = np.full(100, 4)
    res = evaluate(scores, same, folds)
    t = brute_force_threshold(scores, same)
    assert res.thresholds_fitted_on == "same-fold"
    assert res.n_folds == 1 and res.fold_ids == [4]
    assert res.thresholds[0] == pytest.approx(t)
    assert res.fold_accuracies[0] == pytest.approx(((scores > t) == same).mean())
    assert res.accuracy_std == 0.0


# ----------------------------------------------------------------------------- pooled metrics


@pytest.mark.parametrize("decimals", [None, 1])
def test_auc_and_roc_match_sklearn(decimals):
    metrics = need_module("sklearn.metrics")
    rng = np.random.default_rng(8)
    scores, same, folds = random_pairs(rng, n=1000, decimals=decimals)
    res = evaluate(scores, same, folds)
    assert res.auc == pytest.approx(metrics.roc_auc_score(same, scores), abs=1e-12)
    fpr, tpr, _ = metrics.roc_curve(same, scores, drop_intermediate=False)
    np.testing.assert_allclose(res.fpr, fpr, atol=1e-12)
    np.testing.assert_allclose(res.tpr, tpr, atol=1e-12)
    # L2: lower distance = same, so sklearn needs the negated distance
    dist = 3.0 - scores
    assert roc_auc(dist, same, metric="l2") == pytest.approx(metrics.roc_auc_score(same, -dist), abs=1e-12)


def test_roc_thresholds_realise_their_points():
    rng = np.random.default_rng(9)
    scores, same, _ = random_pairs(rng, n=300, decimals=1)
    fpr, tpr, thr = roc_curve(scores, same)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    for f, t, th in zip(fpr, tpr, thr):
        pred = predict_same(scores, th)
        assert pred[~same].mean() == pytest.approx(f) and pred[same].mean() == pytest.approx(t)


@pytest.mark.parametrize("decimals", [None, 2])
def test_tar_at_far_matches_brute_force(decimals):
    rng = np.random.default_rng(11)
    scores, same, folds = random_pairs(rng, n=2000, separation=2.5, decimals=decimals)
    res = evaluate(scores, same, folds, far_targets=(1e-3, 1e-2, 0.1))
    for target in (1e-3, 1e-2, 0.1):
        expected = brute_force_tar_at_far(scores, same, target)
        assert res.tar_at_far[target] == pytest.approx(expected, abs=1e-12)
        pred = predict_same(scores, res.threshold_at_far[target])
        assert pred[~same].mean() <= target
        assert pred[same].mean() == pytest.approx(expected)
    # l2 direction
    tar, thr = tar_at_far(-scores, same, 1e-2, metric="l2")
    assert tar == pytest.approx(brute_force_tar_at_far(scores, same, 1e-2))
    assert (predict_same(-scores, thr, higher_is_same=False)[~same]).mean() <= 1e-2


def test_far_1e3_with_3000_negatives_allows_at_most_three_false_accepts():
    rng = np.random.default_rng(12)
    same = np.repeat([True, False], 3000)
    scores = rng.normal(size=6000) + 3.0 * same
    folds = np.tile(np.arange(1, 11), 600)
    res = evaluate(scores, same, folds)
    false_accepts = int(predict_same(scores, res.threshold_at_far[1e-3])[~same].sum())
    assert false_accepts <= 3
    # one more accepted negative would exceed the target
    neg_sorted = np.sort(scores[~same])[::-1]
    assert (false_accepts + 1) / 3000 > 1e-3
    assert res.tar_at_far[1e-3] == pytest.approx((scores[same] > neg_sorted[false_accepts]).mean())


# ----------------------------------------------------------------------------- serialisation, plot


def test_to_dict_is_json_ready_and_round_trips():
    rng = np.random.default_rng(14)
    scores, same, folds = random_pairs(rng)
    res = evaluate(scores, same, folds, metric="l2")
    d = res.to_dict()
    for key in ("metric", "n_pairs", "n_folds", "accuracy_mean", "accuracy_std", "fold_accuracies",
                "matched_accuracy", "mismatched_accuracy", "auc", "tar_at_far_1e-3", "tar_at_far_1e-2",
                "thresholds", "higher_is_same", "thresholds_fitted_on"):
        assert key in d
    assert d["higher_is_same"] is False and d["metric"] == "l2" and len(d["thresholds"]) == 10
    text = json.dumps(d, allow_nan=False)
    back = VerificationResult.from_dict(json.loads(text))
    assert back.thresholds == res.thresholds and back.fold_accuracies == res.fold_accuracies
    assert back.tar_at_far == res.tar_at_far
    assert back.apply(scores, same, folds).fold_accuracies == res.fold_accuracies
    # NaN (no negatives -> no AUC) becomes null, not an invalid JSON token
    only_same = evaluate(scores[same], same[same], folds[same])
    assert np.isnan(only_same.auc)
    assert json.loads(json.dumps(only_same.to_dict(), allow_nan=False))["auc"] is None
    with_roc = res.to_dict(include_roc=True)
    assert len(with_roc["roc_fpr"]) == len(res.fpr)


def test_plot_roc_writes_png(tmp_path):
    need_module("matplotlib")
    rng = np.random.default_rng(15)
    scores, same, folds = random_pairs(rng)
    results = {"clean": evaluate(scores, same, folds), "attacked": evaluate(scores - 0.8 * same, same, folds)}
    for log_far in (True, False):
        out = plot_roc(results, tmp_path / f"roc_{log_far}.png", log_far=log_far)
        data = out.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError):
        plot_roc({}, tmp_path / "empty.png")


# ----------------------------------------------------------------------------- validation


def test_input_validation():
    scores = np.array([0.1, 0.2, 0.3, 0.4])
    same = np.array([1, 0, 1, 0])
    folds = np.array([1, 1, 2, 2])
    with pytest.raises(ValueError, match="same must be"):
        evaluate(scores, same[:3], folds)
    with pytest.raises(ValueError, match="folds must be"):
        evaluate(scores, same, folds[:3])
    with pytest.raises(ValueError, match="NaN"):
        evaluate(np.array([0.1, np.nan, 0.3, 0.4]), same, folds)
    with pytest.raises(ValueError, match="NaN"):
        evaluate(np.array([0.1, np.inf, 0.3, 0.4]), same, folds)
    with pytest.raises(ValueError, match="0/1"):
        evaluate(scores, np.array([1, 2, 0, 1]), folds)
    with pytest.raises(ValueError, match="integer"):
        evaluate(scores, same, folds.astype(float))
    with pytest.raises(ValueError, match="1-D"):
        evaluate(scores[:, None], same, folds)
    with pytest.raises(ValueError, match="empty"):
        evaluate(np.array([]), np.array([], bool), np.array([], int))
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(scores, same, folds, metric="euclid")
    with pytest.raises(ValueError, match="shapes differ"):
        cosine_scores(np.ones((3, 4)), np.ones((3, 5)))
    with pytest.raises(ValueError, match="all-zero"):
        cosine_scores(np.zeros((1, 4)), np.ones((1, 4)))
    with pytest.raises(ValueError, match="NaN"):
        l2_scores(np.full((1, 4), np.nan), np.ones((1, 4)))
    with pytest.raises(ValueError, match="NaN"):
        accuracy_with_thresholds(scores, same, folds, [0.1, float("nan")])
    assert metrics.METRICS == {"cosine": True, "l2": False}

"""Attacks: objective signs, the eps bound after uint8 rounding, seeding, batching invariance,
NaN gradients, and real attacks on dlib-resnet with lfw_ci chips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from _images import uint8_images
from _tolerances import assert_same_but_for_rare_flips, same_but_for_rare_flips
from advface_fast.attacks import (
    ATTACKS,
    CW,
    CWL2,
    FGSM,
    PGD,
    Noise,
    VerificationObjective,
    make_attack,
    round_to_uint8_grid,
)

def pairs_for(model, n: int = 6, size: int = 16, seed: int = 0):
    """Queries, gallery embeddings of other random images, half matched / half mismatched."""
    queries = uint8_images(n, size, seed)
    with torch.no_grad():
        gallery = model(uint8_images(n, size, seed + 1))
    is_same = torch.arange(n) % 2 == 0
    return queries, gallery, is_same


def similarities(model, x, gallery, metric="cosine"):
    with torch.no_grad():
        return VerificationObjective(metric).similarity(model(x), gallery)


def as_int(x: torch.Tensor) -> np.ndarray:
    return torch.round(x * 255).to(torch.int64).numpy()


# ----------------------------------------------------------------------------- objective


def test_objective_signs_and_ties():
    obj = VerificationObjective("cosine")
    sim = torch.tensor([0.5, 0.5, 0.3, 0.7])
    same = torch.tensor([True, False, True, False])
    tau = torch.full((4,), 0.5)
    assert torch.equal(obj.ascent_loss(sim, same), torch.tensor([-0.5, 0.5, -0.3, 0.7]))
    # A tie s == tau is predicted "different": a success for the matched pair, not the mismatched one.
    assert obj.success(sim, same, tau).tolist() == [True, False, True, True]
    margin = obj.margin_loss(sim, same, tau, kappa=0.1)
    assert torch.allclose(margin, torch.tensor([0.1, 0.1, 0.0, 0.0]))
    with pytest.raises(ValueError, match="metric"):
        VerificationObjective("dot")


def test_l2_similarity_is_negated_distance():
    q, g = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 0.0]])
    assert VerificationObjective("l2").similarity(q, g).item() == pytest.approx(-5.0)
    assert VerificationObjective("cosine").similarity(q, q * 2).item() == pytest.approx(1.0)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_one_step_dodges_matched_and_impersonates_mismatched(tiny, metric):
    queries, gallery, is_same = pairs_for(tiny, n=8)
    before = similarities(tiny, queries, gallery, metric)
    attack = FGSM(tiny, eps=0.5, objective=VerificationObjective(metric), round_output=False)
    after = similarities(tiny, attack(queries, gallery, is_same), gallery, metric)
    assert (after[is_same] < before[is_same]).all()  # dodging lowers the similarity
    assert (after[~is_same] > before[~is_same]).all()  # impersonation raises it


# ----------------------------------------------------------------------------- budget and rounding


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**31 - 1),
    eps=st.one_of(st.sampled_from([0.0, 1.0, 2.0, 2.5, 4.0, 8.0, 3.9999999999999996]),
                  st.floats(0.0, 16.0, allow_nan=False)),
    alpha=st.floats(0.1, 20.0, allow_nan=False),
    steps=st.integers(1, 3),
    name=st.sampled_from(["pgd", "fgsm", "cw", "noise", "square"]),
)
def test_linf_bound_holds_after_rounding(tiny, seed, eps, alpha, steps, name):
    queries, gallery, is_same = pairs_for(tiny, n=2, size=8, seed=seed % 1000)
    kwargs = {"pgd": dict(alpha=alpha, steps=steps), "cw": dict(lr=alpha, steps=steps),
              "square": dict(n_queries=10 * steps)}.get(name, {})
    attack = make_attack(name, tiny, eps=eps, seed=seed, **kwargs)
    x_adv = attack(queries, gallery, is_same, torch.zeros(2))
    adv, clean = as_int(x_adv), as_int(queries)
    assert torch.equal(torch.from_numpy(adv).float() / 255.0, x_adv)  # exactly k/255 in float32
    assert adv.min() >= 0 and adv.max() <= 255
    assert np.abs(adv - clean).max() <= eps  # integer arrays: the bound holds exactly


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), eps=st.floats(0.0, 300.0, allow_nan=False))
def test_rounding_clamps_any_float_image_into_the_budget(seed, eps):
    clean = uint8_images(1, size=6, seed=seed)
    wild = torch.from_numpy(np.random.default_rng(seed).uniform(-0.5, 1.5, size=clean.shape)).float()
    out = as_int(round_to_uint8_grid(wild, clean, eps))
    assert out.min() >= 0 and out.max() <= 255
    assert np.abs(out - as_int(clean)).max() <= eps


def test_off_grid_queries_are_rejected_unless_float_output(tiny):
    queries, gallery, is_same = pairs_for(tiny, n=2)
    off_grid = (queries + 0.3 / 255).clamp(0, 1)
    with pytest.raises(ValueError, match="uint8 grid"):
        PGD(tiny, eps=4, steps=1)(off_grid, gallery, is_same)
    out = PGD(tiny, eps=4, steps=1, round_output=False)(off_grid, gallery, is_same)
    assert (out - off_grid).abs().max() <= 4 / 255 + 1e-6


def test_input_validation(tiny):
    queries, gallery, is_same = pairs_for(tiny, n=2)
    with pytest.raises(ValueError, match="threshold"):
        CW(tiny, eps=4)(queries, gallery, is_same)
    with pytest.raises(ValueError, match="gallery"):
        PGD(tiny)(queries, gallery[:1], is_same)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PGD(tiny)(queries * 2, gallery, is_same)
    with pytest.raises(ValueError, match="sample_seeds"):
        PGD(tiny)(queries, gallery, is_same, sample_seeds=[1])


def test_a_given_start_is_the_first_iterate_projected_onto_the_budget(tiny):
    queries, gallery, is_same = pairs_for(tiny, n=4)
    far = round_to_uint8_grid((queries + 10 / 255 * torch.sign(torch.randn(queries.shape,
                                                                  generator=torch.Generator().manual_seed(3)))).clamp(0, 1),
                              queries, None)
    # steps=0: the delivered image IS the start, projected onto the eps-box (random start skipped)
    out = PGD(tiny, eps=4, steps=0, seed=1)(queries, gallery, is_same, start=far)
    expected = torch.minimum(torch.maximum(far, (queries - 4 / 255).clamp(0, 1)), (queries + 4 / 255).clamp(0, 1))
    assert np.array_equal(as_int(out), as_int(expected))
    assert not np.array_equal(as_int(out), as_int(PGD(tiny, eps=4, steps=0, seed=1)(queries, gallery, is_same)))
    # a warm-started attack is deterministic and its steps start from there (not from the random start)
    warm = PGD(tiny, eps=4, steps=3, seed=1)
    a, b = warm(queries, gallery, is_same, start=far), warm(queries, gallery, is_same, start=far)
    assert torch.equal(a, b) and (a - queries).abs().max() <= 4 / 255 + 1e-6
    assert not torch.equal(a, warm(queries, gallery, is_same))
    with pytest.raises(ValueError, match="shaped like"):
        PGD(tiny, eps=4, steps=1)(queries, gallery, is_same, start=far[:2])
    with pytest.raises(ValueError, match="does not take a start"):
        Noise(tiny, eps=4)(queries, gallery, is_same, start=far)


# ----------------------------------------------------------------------------- seeding and batching


@pytest.mark.parametrize("cls", [PGD, Noise])
def test_same_seed_same_images(tiny, cls):
    queries, gallery, is_same = pairs_for(tiny)
    kwargs = {"steps": 3} if cls is PGD else {}
    a = cls(tiny, eps=4, seed=7, **kwargs)(queries, gallery, is_same)
    b = cls(tiny, eps=4, seed=7, **kwargs)(queries, gallery, is_same)
    c = cls(tiny, eps=4, seed=8, **kwargs)(queries, gallery, is_same)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_seeds_make_results_independent_of_batching(tiny):
    # Batches of 4 and of 2 may run on other oneDNN kernels (the model's floats may change with
    # the batch size, on some CPUs even the tiny model's), so the property is claimed up to the
    # rare pixel whose gradient sign that rounding flips; another random start changes whole images.
    queries, gallery, is_same = pairs_for(tiny, n=4)
    seeds = [101, 202, 303, 404]
    attack = PGD(tiny, eps=4, steps=3, seed=0)
    whole = attack(queries, gallery, is_same, sample_seeds=seeds)
    halves = torch.cat([attack(queries[:2], gallery[:2], is_same[:2], sample_seeds=seeds[:2]),
                        attack(queries[2:], gallery[2:], is_same[2:], sample_seeds=seeds[2:])])
    assert_same_but_for_rare_flips(whole, halves)
    # Without per-sample seeds the second half draws other noise when attacked on its own.
    shared = torch.cat([attack(queries[:2], gallery[:2], is_same[:2]), attack(queries[2:], gallery[2:], is_same[2:])])
    assert not same_but_for_rare_flips(attack(queries, gallery, is_same)[2:], shared[2:])


# ----------------------------------------------------------------------------- attack mechanics


class NaNGradient(torch.autograd.Function):
    """Identity forward; backward gives NaN on channel 0 (a stand-in for a degenerate model)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[:, 0] = float("nan")
        return grad


class NaNGradModel(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(NaNGradient.apply(x))


@pytest.mark.parametrize("name", ["fgsm", "pgd", "cw", "cw-l2"])
def test_nan_gradients_leave_those_pixels_alone(tiny, name):
    model = NaNGradModel(tiny)
    queries, gallery, is_same = pairs_for(tiny, n=4)
    kwargs = {"pgd": dict(steps=3, random_start=False), "cw": dict(steps=3, kappa=10.0),
              "cw-l2": dict(steps=3, search_steps=2, kappa=10.0)}.get(name, {})
    x_adv = make_attack(name, model, **kwargs)(queries, gallery, is_same, torch.zeros(4))
    assert torch.isfinite(x_adv).all()
    assert torch.equal(x_adv[:, 0], queries[:, 0])  # NaN-gradient channel: unchanged
    assert not torch.equal(x_adv[:, 1:], queries[:, 1:])  # the rest was attacked


def test_restarts_keep_the_most_adversarial_per_pair(tiny):
    queries, gallery, is_same = pairs_for(tiny, n=8)
    obj = VerificationObjective()

    def ascent(restarts):
        x = PGD(tiny, eps=8, steps=2, restarts=restarts, seed=3, round_output=False)(queries, gallery, is_same)
        return obj.ascent_loss(similarities(tiny, x, gallery), is_same)

    one, three = ascent(1), ascent(3)
    assert (three >= one).all()  # restart 1 is the same run; a restart only replaces it when better
    assert (three > one).any()


class _Phase(nn.Module):
    """An embedding that turns with the image's mean: sign steps of a whole image overshoot and oscillate."""

    def forward(self, x):
        phase = 600.0 * x.mean((1, 2, 3))
        return torch.stack([torch.cos(phase), torch.sin(phase), torch.ones_like(phase)], 1)


@pytest.mark.parametrize("which", ["tiny", "phase"])
def test_best_iterate_delivers_each_pairs_highest_loss_iterate(tiny, which):
    # The k-step run with the same seed delivers exactly the k-th iterate, so the best-iterate run must
    # deliver, per pair, the highest-loss one of iterates 0..T (the start included), warm-started or not.
    model = tiny if which == "tiny" else _Phase()
    queries, gallery, is_same = pairs_for(model, n=8)
    obj = VerificationObjective()
    far = round_to_uint8_grid((queries + 4 / 255 * torch.sign(torch.randn(queries.shape,
                                                                 generator=torch.Generator().manual_seed(5)))).clamp(0, 1),
                              queries, None)

    def loss(x):
        return obj.ascent_loss(similarities(model, x, gallery), is_same)

    for start in (None, far):
        run = dict(eps=4, alpha=1, seed=2, round_output=False)
        per_step = torch.stack([loss(PGD(model, steps=k, **run)(queries, gallery, is_same, start=start))
                                for k in range(6)])
        best = loss(PGD(model, steps=5, best_iterate=True, **run)(queries, gallery, is_same, start=start))
        assert torch.allclose(best, per_step.max(0).values, atol=1e-5)
        assert (best >= per_step[-1] - 1e-6).all()
        if which == "phase":  # the last iterate is not the best for some pair: best_iterate changes the result
            assert (per_step.max(0).values > per_step[-1] + 1e-3).any()
    assert PGD(model, best_iterate=True).config()["best_iterate"] is True and "best_iterate" not in PGD(model).config()
    with pytest.raises(ValueError, match="best_iterate"):
        PGD(model, best_iterate=True, early_stop=True)


def test_cw_freezes_pairs_whose_margin_is_already_met(tiny):
    queries, gallery, is_same = pairs_for(tiny, n=4)
    sim = similarities(tiny, queries, gallery)
    # Pairs 0, 1 already flipped by more than kappa; pairs 2, 3 far from it.
    gap = torch.tensor([0.5, -0.5, 0.5, -0.5])
    thresholds = sim + torch.where(torch.arange(4) < 2, gap, -gap)
    x_adv = CW(tiny, eps=4, steps=5, kappa=0.01)(queries, gallery, is_same, thresholds)
    assert torch.equal(x_adv[:2], queries[:2])
    assert not torch.equal(x_adv[2], queries[2]) and not torch.equal(x_adv[3], queries[3])


def test_cw_pairs_that_succeed_stay_frozen(tiny):
    # A pair that meets its margin mid-run must not drift on Adam's momentum afterwards:
    # running more steps delivers exactly the same image for it.
    queries, gallery, is_same = pairs_for(tiny, n=8)
    sim = similarities(tiny, queries, gallery)
    thresholds = torch.where(is_same, sim - 0.03, sim + 0.03)
    short, long = (CW(tiny, eps=8, steps=steps, lr=0.5, kappa=0.01, round_output=False)(
        queries, gallery, is_same, thresholds) for steps in (8, 30))
    margin = VerificationObjective().margin_loss(similarities(tiny, short, gallery), is_same, thresholds, 0.01)
    met = margin <= 0
    assert 0 < met.sum() < 8  # some pairs met the margin within the short run, not all
    assert torch.equal(short[met], long[met])


def test_cwl2_binary_search_never_enlarges_the_perturbation(tiny):
    queries, gallery, is_same = pairs_for(tiny, n=6)
    sim = similarities(tiny, queries, gallery)
    thresholds = torch.where(is_same, sim - 0.05, sim + 0.05)  # reachable targets

    def run(search_steps):
        x = CWL2(tiny, steps=20, search_steps=search_steps, c_init=1.0, lr=0.05, kappa=0.01,
                 round_output=False)(queries, gallery, is_same, thresholds)
        ok = VerificationObjective().success(similarities(tiny, x, gallery), is_same, thresholds)
        return ok, (x - queries).flatten(1).norm(dim=1)

    ok1, l2_1 = run(1)
    ok4, l2_4 = run(4)
    assert ok1.any() and (ok4 >= ok1).all()
    assert (l2_4[ok1] <= l2_1[ok1]).all()  # round 1 is identical; later rounds only keep smaller ones
    assert (l2_4[ok1] < l2_1[ok1]).any()


def test_parameters_untouched_and_works_under_no_grad(tiny):
    before = [p.clone() for p in tiny.parameters()]
    queries, gallery, is_same = pairs_for(tiny, n=2)
    with torch.no_grad():
        PGD(tiny, eps=4, steps=2)(queries, gallery, is_same)
    assert all(torch.equal(a, b) for a, b in zip(before, tiny.parameters()))
    assert all(p.grad is None for p in tiny.parameters()) and not tiny.training


def test_registry_and_config_round_trip(tiny):
    assert set(ATTACKS) == {"fgsm", "pgd", "cw", "cw-l2", "noise", "square"}
    pgd = make_attack("pgd", tiny, eps=4, metric="cosine")
    config = pgd.config()
    assert {k: config[k] for k in ("name", "eps", "alpha", "steps", "restarts", "objective")} == \
        {"name": "pgd", "eps": 4, "alpha": 1.0, "steps": 40, "restarts": 1,
         "objective": {"name": "verification", "metric": "cosine"}}
    for name in ATTACKS:
        attack = make_attack(name, tiny, metric="l2")
        rebuilt = make_attack(model=tiny, **attack.config())
        assert type(rebuilt) is type(attack) and rebuilt.config() == attack.config()
    assert make_attack("cw-l2", tiny).config()["eps"] is None
    with pytest.raises(KeyError, match="available"):
        make_attack("deepfool", tiny)


# ----------------------------------------------------------------------------- dlib-resnet on lfw_ci


@pytest.fixture(scope="module")
def dlib_model(tmp_path_factory):
    from advface_fast.models import create_model

    return create_model("dlib-resnet", cache_dir=tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def ci_pairs(ci_pair_chips):
    """8 matched + 8 mismatched lfw_ci pairs as dlib-aligned chips (HOG + 5 landmarks)."""
    queries, galleries = (torch.from_numpy(c).permute(0, 3, 1, 2).float().div(255.0) for c in ci_pair_chips)
    return queries, galleries, torch.tensor([True] * 8 + [False] * 8)


@pytest.fixture(scope="module")
def ci_setup(dlib_model, ci_pairs):
    """Clean similarities and one cosine threshold: the midpoint that maximises clean accuracy."""
    queries, gallery_images, is_same = ci_pairs
    with torch.no_grad():
        gallery = dlib_model(gallery_images)
    clean = similarities(dlib_model, queries, gallery)
    s = np.sort(clean.numpy())
    candidates = (s[1:] + s[:-1]) / 2
    accuracy = [((clean.numpy() > t) == is_same.numpy()).mean() for t in candidates]
    tau = float(candidates[int(np.argmax(accuracy))])
    thresholds = torch.full((len(is_same),), tau)
    return queries, gallery, is_same, thresholds, clean


def accuracy(sim, is_same, thresholds) -> float:
    return ((sim > thresholds) == is_same).float().mean().item()


def test_attacks_break_dlib_resnet_at_eps4(dlib_model, ci_setup):
    queries, gallery, is_same, thresholds, clean = ci_setup
    clean_acc = accuracy(clean, is_same, thresholds)
    assert clean_acc >= 0.9
    results = {}
    for attack in (PGD(dlib_model, eps=4, steps=10), CW(dlib_model, eps=4, steps=20), FGSM(dlib_model, eps=4),
                   Noise(dlib_model, eps=4)):
        x_adv = attack(queries, gallery, is_same, thresholds)
        assert np.abs(as_int(x_adv) - as_int(queries)).max() <= 4
        sim = similarities(dlib_model, x_adv, gallery)
        results[attack.name] = (accuracy(sim, is_same, thresholds), (sim - clean).abs().mean().item())
    assert results["pgd"][0] <= 0.1
    assert results["cw"][0] <= 0.1
    assert results["fgsm"][0] <= 0.5
    noise_acc, noise_shift = results["noise"]
    assert noise_acc >= clean_acc - 1 / 16  # at most one decision changes
    assert noise_shift < 0.1 * results["pgd"][1]  # random noise moves similarities far less


def test_more_budget_or_steps_never_helps_the_defender(dlib_model, ci_setup):
    # PGD with a random start is not monotone per pair (the start and the path change with
    # eps), so the test compares the mean adversarial shift of the objective and the number of
    # flipped pairs, with the same seed, allowing a small slack on the mean.
    queries, gallery, is_same, thresholds, clean = ci_setup
    obj = VerificationObjective()

    def outcome(eps, steps):
        x = PGD(dlib_model, eps=eps, steps=steps, seed=0)(queries, gallery, is_same)
        sim = similarities(dlib_model, x, gallery)
        shift = (obj.ascent_loss(sim, is_same) - obj.ascent_loss(clean, is_same)).mean().item()
        return shift, int(obj.success(sim, is_same, thresholds).sum())

    runs = {(eps, steps): outcome(eps, steps) for eps, steps in ((1, 2), (1, 4), (2, 4), (4, 4))}
    by_eps = [runs[1, 4], runs[2, 4], runs[4, 4]]
    by_steps = [runs[1, 2], runs[1, 4]]
    for series in (by_eps, by_steps):
        shifts, flips = zip(*series)
        assert all(b >= a - 0.005 for a, b in zip(shifts, shifts[1:])), shifts
        assert all(b >= a for a, b in zip(flips, flips[1:])), flips
    assert by_eps[-1][0] > by_eps[0][0] + 0.05  # and it does grow


# ----------------------------------------------------------------------------- objective contract


def test_label_free_objectives_need_no_labels_or_gallery(tiny):
    queries = uint8_images(4)
    for name in ("fgsm", "pgd", "cw", "cw-l2", "noise"):
        kwargs = {"pgd": dict(steps=2), "cw": dict(steps=2), "cw-l2": dict(steps=2, search_steps=1)}.get(name, {})
        attack = make_attack(name, tiny, objective="away-from-self", **kwargs)
        x = attack(queries)
        assert x.shape == queries.shape
        assert attack.config()["objective"] == {"name": "away-from-self", "metric": "cosine"}
    # The verification objective says what it misses, in one line.
    with pytest.raises(ValueError, match="gallery embeddings"):
        PGD(tiny, steps=1)(queries, None, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_same"):
        PGD(tiny, steps=1)(queries, tiny(queries))
    with pytest.raises(ValueError, match="threshold"):
        CW(tiny, steps=1)(queries, tiny(queries), torch.ones(4, dtype=torch.bool))


def test_away_from_self_target_defaults_to_the_clean_embedding(tiny):
    queries = uint8_images(4)
    with torch.no_grad():
        clean = tiny(queries)
    given = PGD(tiny, eps=4, steps=3, objective="away-from-self")(queries, clean)
    computed = PGD(tiny, eps=4, steps=3, objective="away-from-self")(queries)
    assert torch.equal(given, computed)


def test_make_attack_takes_objective_specs_and_metric_shorthand(tiny):
    by_metric = make_attack("pgd", tiny, metric="l2")
    by_dict = make_attack("pgd", tiny, objective={"name": "verification", "metric": "l2"})
    by_object = make_attack("pgd", tiny, objective=VerificationObjective("l2"))
    assert by_metric.config() == by_dict.config() == by_object.config()
    assert by_metric.config()["objective"] == {"name": "verification", "metric": "l2"}
    assert make_attack("pgd", tiny, objective="random-direction").config()["objective"]["name"] == "random-direction"
    with pytest.raises(ValueError, match="either metric or objective"):
        make_attack("pgd", tiny, metric="l2", objective="verification")
    with pytest.raises(ValueError, match="unknown objective"):
        make_attack("pgd", tiny, objective="bogus")


# ----------------------------------------------------------------------------- the gradient hook


class ZeroGradient:
    """Mixin: the hook returns a zero gradient (a wrapper substituting the gradient)."""

    def loss_and_grad(self, x, target, loss_fn, rows=None):
        grad, sim = super().loss_and_grad(x, target, loss_fn, rows)
        self.hook_calls = getattr(self, "hook_calls", 0) + 1
        return torch.zeros_like(grad), sim


@pytest.mark.parametrize("name", ["fgsm", "pgd", "cw", "cw-l2"])
def test_every_attack_takes_its_gradient_from_the_one_hook(tiny, name):
    queries, gallery, is_same = pairs_for(tiny, n=4)
    kwargs = {"pgd": dict(steps=3, random_start=False), "cw": dict(steps=3, kappa=10.0),
              "cw-l2": dict(steps=3, search_steps=1, kappa=10.0)}.get(name, {})
    cls = type("Zero" + ATTACKS[name].__name__, (ZeroGradient, ATTACKS[name]), {})
    attack = cls(tiny, **kwargs)
    x_adv = attack(queries, gallery, is_same, torch.zeros(4))
    assert attack.hook_calls >= 1
    # Without the model's gradient nothing moves. (C&W-L2 keeps its distance term, which only pulls
    # towards the clean image: at most a rounding level from float noise of tanh(atanh(x0)).)
    off = (x_adv - queries).abs().max() * 255
    assert off <= (1 + 1e-4 if name == "cw-l2" else 0), float(off)
    assert not torch.equal(ATTACKS[name](tiny, **kwargs)(queries, gallery, is_same, torch.zeros(4)), queries)


# ----------------------------------------------------------------------------- mode and precision


class ModeRecorder(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        self.seen.append((self.training, self.dropout.training, torch.is_autocast_enabled("cpu"), x.dtype))
        return self.inner(x)


@pytest.mark.parametrize("name", ["fgsm", "pgd", "cw"])
def test_attack_runs_in_eval_mode_and_restores_every_module(tiny, name):
    model = ModeRecorder(tiny)
    model.train()
    model.inner.eval()  # a mixed state must come back exactly
    queries, gallery, is_same = pairs_for(tiny, n=2)
    make_attack(name, model, **({} if name == "fgsm" else {"steps": 2}))(queries, gallery, is_same, torch.zeros(2))
    assert model.seen and all(not m and not d for m, d, _, _ in model.seen)  # eval during the attack
    assert model.training and model.dropout.training and not model.inner.training
    assert not any(m.training for m in model.inner.modules())


def test_fp32_attack_stays_fp32_inside_a_bf16_region(tiny):
    model = ModeRecorder(tiny)
    queries, gallery, is_same = pairs_for(tiny, n=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = PGD(model, eps=4, steps=2, precision="fp32")(queries, gallery, is_same)
    assert model.seen and all(not autocast_on for _, _, autocast_on, _ in model.seen)
    assert x_adv.dtype == torch.float32


# ----------------------------------------------------------------------------- iterates at several step counts


@pytest.mark.parametrize("restarts", [1, 3])
def test_pgd_records_the_iterates_of_shorter_runs(tiny, restarts):
    queries, gallery, is_same = pairs_for(tiny, n=6)
    seeds = [11, 12, 13, 14, 15, 16]
    long = PGD(tiny, eps=8, steps=12, restarts=restarts, seed=4, record_steps=(0, 3, 7))
    final = long(queries, gallery, is_same, sample_seeds=seeds)
    assert sorted(long.last_iterates) == [0, 3, 7, 12] and torch.equal(long.last_iterates[12], final)
    for k in (0, 3, 7):
        alone = PGD(tiny, eps=8, steps=k, restarts=restarts, seed=4)(queries, gallery, is_same, sample_seeds=seeds)
        assert torch.equal(long.last_iterates[k], alone), k
    assert not torch.equal(long.last_iterates[3], final)
    assert "record_steps" not in long.config()  # observing more steps changes no result


def test_cw_records_the_results_of_shorter_runs(tiny):
    queries, gallery, is_same = pairs_for(tiny, n=8)
    sim = similarities(tiny, queries, gallery)
    thresholds = torch.where(is_same, sim - 0.03, sim + 0.03)  # some pairs finish (and leave the batch)
    long = CW(tiny, eps=8, steps=20, lr=0.5, kappa=0.01, record_steps=(1, 4, 9))
    final = long(queries, gallery, is_same, thresholds)
    for k in (1, 4, 9):
        alone = CW(tiny, eps=8, steps=k, lr=0.5, kappa=0.01)(queries, gallery, is_same, thresholds)
        assert torch.equal(long.last_iterates[k], alone), k
    assert torch.equal(long.last_iterates[20], final)


def test_record_steps_are_checked(tiny):
    with pytest.raises(ValueError, match="record_steps"):
        PGD(tiny, steps=5, record_steps=(6,))
    with pytest.raises(ValueError, match="early_stop"):
        PGD(tiny, steps=5, record_steps=(2,), early_stop=True)


# ----------------------------------------------------------------------------- high confidence (kappa)


def test_pgd_kappa_stops_pushing_past_the_margin(tiny):
    queries, gallery, is_same = pairs_for(tiny, n=8)
    sim = similarities(tiny, queries, gallery)
    thresholds = torch.where(is_same, sim - 0.02, sim + 0.02)

    def past(kappa):  # how far past its threshold each pair ends (positive: flipped)
        x = PGD(tiny, eps=8, steps=20, kappa=kappa, seed=0, round_output=False)(queries, gallery, is_same, thresholds)
        return torch.where(is_same, thresholds - similarities(tiny, x, gallery),
                           similarities(tiny, x, gallery) - thresholds)

    small, large, unbounded = past(0.01), past(0.2), past(None)
    assert (small > 0).all()  # every pair flipped ...
    assert (small < 0.01 + 0.05).all()  # ... and left about where it crossed the margin (one step past at most)
    assert large.mean() > small.mean() + 0.02, (small, large)
    assert unbounded.mean() >= large.mean() - 1e-6, (large, unbounded)
    assert PGD(tiny, kappa=0.1).config()["kappa"] == 0.1 and "kappa" not in PGD(tiny).config()
    with pytest.raises(ValueError, match="kappa"):
        PGD(tiny, kappa=0.1, steps=1)(queries, gallery, is_same)


@pytest.mark.parametrize("cls", [FGSM, CW])
def test_random_start_is_seeded_and_within_budget(tiny, cls):
    queries, gallery, is_same = pairs_for(tiny, n=4)
    thresholds = torch.zeros(4)
    kwargs = {"steps": 3} if cls is CW else {}
    a = cls(tiny, eps=3, random_start=True, seed=1, **kwargs)(queries, gallery, is_same, thresholds)
    b = cls(tiny, eps=3, random_start=True, seed=1, **kwargs)(queries, gallery, is_same, thresholds)
    c = cls(tiny, eps=3, random_start=True, seed=2, **kwargs)(queries, gallery, is_same, thresholds)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert np.abs(as_int(a) - as_int(queries)).max() <= 3
    assert cls(tiny, random_start=True).config()["random_start"] is True
    assert "random_start" not in cls(tiny).config()  # default configs unchanged

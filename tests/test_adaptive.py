"""The attacker who knows the defense, on a tiny model with a real PGD defense D.

What must hold (the checklist of an adaptive evaluation): BPDA + EOT is at least as strong as the
transfer attack on the same pairs; more attack steps or EOT samples never help the defender; the
BPDA gradient is the model's gradient taken at D(x); EOT draws differ per sample and from the
defender's own draws; eval mode is restored; an fp32 D nested in a bf16 attacker stays fp32."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from _tolerances import assert_same_but_for_rare_flips
from advface_fast.attacks import PGD, VerificationObjective
from advface_fast.seeds import derive_seed
from advface_fast.defenses import AttackAsDefense, DefendedModel, adaptive_attack
from advface_fast.metrics import fit_threshold

OBJ = VerificationObjective()
N, K = 24, 5


class Setup:
    """Synthetic pairs: a matched gallery is its query plus small noise, a mismatched one another
    image. D = PGD (eps 4, K steps, away-from-self). Thresholds fitted on clean pairs: the plain
    model's for the transfer attacker, the defended pipeline's (clean defended pairs) for the
    judge and the adaptive attacker, then fixed."""

    def __init__(self, model):
        rng = np.random.default_rng(0)
        base = rng.integers(0, 256, size=(N, 3, 16, 16))
        self.same = np.arange(N) % 2 == 0
        near = np.clip(base + rng.integers(-6, 7, size=base.shape), 0, 255)
        gallery = np.where(self.same[:, None, None, None], near, rng.integers(0, 256, size=base.shape))
        self.q = torch.from_numpy(base).float() / 255
        self.g = torch.from_numpy(gallery).float() / 255
        self.q_ids = [f"q{i}" for i in range(N)]
        self.model = model
        self.defense = AttackAsDefense(model, "pgd", eps=4, steps=(K,), seed=0, batch_size=N)
        self.gallery_defended = self.defense.embed(self.g, [f"g{i}" for i in range(N)])[K]
        with torch.no_grad():
            self.gallery_plain = model(self.g)
            plain = OBJ.similarity(model(self.q), self.gallery_plain).numpy()
        defended = OBJ.similarity(self.defense.embed(self.q, self.q_ids)[K], self.gallery_defended).numpy()
        self.thr_plain, self.clean_accuracy = fit_threshold(plain, self.same)
        self.thr_defended, self.defended_accuracy = fit_threshold(defended, self.same)
        self.same_t = torch.from_numpy(self.same)

    def thresholds(self, defended=True):
        return torch.full((N,), float(self.thr_defended if defended else self.thr_plain))

    def successes(self, x_adv) -> int:
        """Pairs whose DEFENDED decision is wrong: the full D with the defender's seed, fixed threshold."""
        s = OBJ.similarity(self.defense.embed(x_adv, self.q_ids)[K], self.gallery_defended)
        return int(OBJ.success(s, self.same_t, self.thresholds()).sum())

    def transfer(self, seed=1, steps=20):
        return PGD(self.model, eps=4, steps=steps, seed=seed)(self.q, self.gallery_plain, self.same_t)

    def adaptive(self, attack="pgd", seed=1, **kwargs):
        a = adaptive_attack(attack, self.defense, eps=4, seed=seed, **kwargs)
        return a(self.q, self.gallery_defended, self.same_t, self.thresholds(),
                 sample_seeds=[derive_seed(seed, i) for i in self.q_ids])


@pytest.fixture(scope="module")
def setup(tiny):
    s = Setup(tiny)
    assert s.clean_accuracy == 1.0 and s.defended_accuracy >= 0.9  # a working verifier, with and without D
    return s


def test_bpda_eot_is_at_least_as_strong_as_transfer(setup):
    transfer = setup.successes(setup.transfer())
    with torch.no_grad():  # the transfer attack works on the model it was made on ...
        plain = OBJ.success(OBJ.similarity(setup.model(setup.transfer()), setup.gallery_plain), setup.same_t,
                            setup.thresholds(defended=False))
    assert int(plain.sum()) > transfer  # ... and D undoes part of it: the paper's static result
    for attack, kwargs in (("pgd", dict(steps=20)), ("pgd", dict(steps=20, samples=3)),
                           ("pgd", dict(steps=20, copy_steps=2)), ("cw", dict(steps=20)), ("fgsm", {})):
        adaptive = setup.successes(setup.adaptive(attack, **kwargs))
        assert adaptive >= transfer, (attack, kwargs, adaptive, transfer)
    assert setup.successes(setup.adaptive("pgd", steps=20)) > transfer


def test_more_steps_or_eot_samples_never_help_the_defender(setup):
    by_steps, by_samples = [], []
    for seed in range(3):
        few, many = (setup.successes(setup.adaptive("pgd", seed=seed, steps=k)) for k in (5, 20))
        assert many >= few, (seed, few, many)  # ties allowed
        by_steps.append((few, many))
        by_samples.append(setup.successes(setup.adaptive("pgd", seed=seed, steps=20, samples=3)))
    # EOT samples: in expectation (summed over attacker seeds), never fewer successes.
    assert sum(by_samples) >= sum(many for _, many in by_steps), (by_samples, by_steps)
    assert sum(many for _, many in by_steps) > sum(few for few, _ in by_steps)  # and the steps do help


def test_bpda_gradient_is_the_models_gradient_at_d_of_x(setup):
    defended = DefendedModel(setup.defense, samples=1)
    attack = PGD(defended, eps=4, steps=1, seed=0)
    x = setup.q[:4]
    seeds = [7, 8, 9, 10]
    attack._row_seeds = seeds
    loss_fn = lambda sim: OBJ.ascent_loss(sim, setup.same_t[:4])  # noqa: E731
    grad, sim = attack.loss_and_grad(x, setup.gallery_defended[:4], loss_fn)
    d_x = setup.defense.attack_at(K)(x, sample_seeds=[derive_seed(s, "eot/0/0") for s in seeds])
    d_x = d_x.clone().requires_grad_(True)
    want_sim = OBJ.similarity(setup.model(d_x), setup.gallery_defended[:4])
    (want,) = torch.autograd.grad(loss_fn(want_sim).sum(), d_x)
    assert torch.equal(grad, want) and torch.equal(sim, want_sim.detach())


def test_differentiating_through_ds_pgd_steps_gives_bpdas_gradient(tiny):
    """Why the protocol attacks PGD-D with BPDA through the identity and not through D's unrolled steps
    (second order): D(x) = clamp(x_k + alpha sign(g_k), max(x - eps, 0), min(x + eps, 1)) repeated, and sign has
    a zero derivative, so the exact Jacobian of D is diagonal with entries 0 or 1 (0 only where a pixel's path
    met the [0, 1] box): the exact gradient of the defended loss is BPDA's, masked. And after D's uint8
    rounding it is zero everywhere, the masking BPDA exists for."""
    from kernels.pgd_step import pgd_step_reference

    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16)
    x[:, :, :2] = 0.995  # some pixels near the box edge, where the path can stick
    gallery = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    eps, alpha = 4 / 255, 1 / 255
    start = (torch.rand_like(x) * 2 - 1) * eps

    def d(x0, rounded=False):  # PGD-D (away from self) through the library's reference step, differentiable
        anchor = tiny(x0).detach()
        lo, hi = (x0 - eps).clamp(min=0), (x0 + eps).clamp(max=1)
        z = torch.min(torch.max(x0 + start, lo), hi)
        for _ in range(10):
            loss = -torch.nn.functional.cosine_similarity(tiny(z), anchor).sum()
            (g,) = torch.autograd.grad(loss, z, create_graph=True)
            z = pgd_step_reference(z.clone(), g, lo, hi, alpha)
        return torch.round(z * 255) / 255 if rounded else z

    def defended_loss(z):
        return torch.nn.functional.cosine_similarity(tiny(z), gallery).sum()

    x0 = x.clone().requires_grad_(True)
    z = d(x0)
    (exact,) = torch.autograd.grad(defended_loss(z), x0)
    zd = z.detach().requires_grad_(True)
    (bpda,) = torch.autograd.grad(defended_loss(zd), zd)
    x1 = x.clone().requires_grad_(True)
    (diag,) = torch.autograd.grad(d(x1).sum(), x1)  # the Jacobian's diagonal; diagonal, as the next lines check
    assert set(diag.unique().tolist()) <= {0.0, 1.0} and 0 < int((diag == 0).sum()) < diag.numel() // 10
    torch.testing.assert_close(exact, bpda * diag, rtol=1e-5, atol=1e-7)
    assert float(exact.abs().max()) > 0.1 * float(bpda.abs().max())
    x2 = x.clone().requires_grad_(True)
    (through_rounding,) = torch.autograd.grad(defended_loss(d(x2, rounded=True)), x2)
    assert not through_rounding.any()


def test_eot_samples_differ_and_never_reuse_the_defenders_draws(setup):
    defended = DefendedModel(setup.defense, samples=3)
    x = setup.q[:4]
    views = defended.views(x, [derive_seed(1, i) for i in setup.q_ids[:4]])
    assert len(views) == 3 and not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])
    defenders = setup.defense.defend(x, setup.q_ids[:4])[K]
    assert all(not torch.equal(v, defenders) for v in views)
    assert defended.step_cost == 3 * (K + 1)
    attack = adaptive_attack("pgd", setup.defense, eps=4, steps=2, samples=3, copy_steps=2)
    attack(x, setup.gallery_defended[:4], setup.same_t[:4], setup.thresholds()[:4])
    assert attack.last_stats["image_steps"] == 4 * 2 * 3 * (2 + 1)
    config = attack.config()["defended_model"]
    assert config["eot_samples"] == 3 and config["copy_steps"] == 2 and config["bpda"] == "identity"


def test_eot_draws_are_fresh_at_every_step_and_independent_of_batching(setup):
    """Per-step redraws: the views of one image differ from one evaluation to the next (the attacker
    never optimises against one fixed draw of D), yet a row's result is the same alone or in a batch."""
    defended = DefendedModel(setup.defense, samples=1)
    x, seeds = setup.q[:2], [11, 12]
    first, second = defended.views(x, seeds, 0)[0], defended.views(x, seeds, 1)[0]
    assert not torch.equal(first, second) and torch.equal(first, defended.views(x, seeds, 0)[0])
    fixed = DefendedModel(setup.defense, samples=1, redraw="fixed")
    assert torch.equal(fixed.views(x, seeds, 0)[0], fixed.views(x, seeds, 5)[0])
    assert "eot_redraw" not in fixed.config() and defended.config()["eot_redraw"] == "per-step"
    # Only the per-step wrapper of a randomised D is randomised (what Square's stopping rule asks).
    assert defended.randomized and not fixed.randomized
    with pytest.raises(ValueError, match="redraw"):
        DefendedModel(setup.defense, redraw="sometimes")

    seeds = [derive_seed(5, i) for i in setup.q_ids]
    for attack, kwargs in (("pgd", dict(steps=4)), ("pgd", dict(steps=4, early_stop=True)), ("cw", dict(steps=4))):
        a = adaptive_attack(attack, setup.defense, eps=4, seed=5, **kwargs)
        whole = a(setup.q, setup.gallery_defended, setup.same_t, setup.thresholds(), sample_seeds=seeds)
        parts = [a(setup.q[i:i + 5], setup.gallery_defended[i:i + 5], setup.same_t[i:i + 5],
                   setup.thresholds()[i:i + 5], sample_seeds=seeds[i:i + 5]) for i in range(0, N, 5)]
        # the attacker's model runs on 24 images, then on 5: other batch sizes, maybe other kernels
        assert_same_but_for_rare_flips(whole, torch.cat(parts), what=attack)


def test_fixed_draws_are_the_weaker_attacker(setup):
    """The ablation the per-step redraw fixed: over attacker seeds, fresh draws break at least as many
    defended decisions as one fixed draw of D at every step."""
    fresh = sum(setup.successes(setup.adaptive("pgd", seed=s, steps=20)) for s in range(3))
    fixed = sum(setup.successes(setup.adaptive("pgd", seed=s, steps=20, redraw="fixed")) for s in range(3))
    assert fresh >= fixed, (fresh, fixed)


class Recorder(nn.Module):
    """Records, at every forward, (own training flag, autocast on?, input dtype)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x):
        self.seen.append((self.training, torch.is_autocast_enabled("cpu"), x.dtype))
        return self.inner(x)


def test_fp32_defense_stays_fp32_inside_a_bf16_attacker_and_modes_come_back(tiny):
    embedder, d_model = Recorder(tiny), Recorder(tiny)
    embedder.train()
    d_model.train()
    defense = AttackAsDefense(embedder, "pgd", eps=4, steps=(2,), precision="fp32", attack_model=d_model)
    setup_q = torch.from_numpy(np.random.default_rng(3).integers(0, 256, size=(2, 3, 16, 16))).float() / 255
    with torch.no_grad():
        gallery = tiny(setup_q.flip(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 on a CPU without native bf16: slow, but it runs
        attack = adaptive_attack("pgd", defense, eps=4, steps=2, precision="bf16")
    attack(setup_q, gallery, torch.tensor([True, False]), torch.zeros(2))
    assert d_model.seen and all(not on and dtype == torch.float32 for _, on, dtype in d_model.seen)  # D: fp32
    assert any(on for _, on, _ in embedder.seen)  # the attacker's own gradients: bf16 autocast
    assert all(not training for training, _, _ in d_model.seen + embedder.seen)  # eval during the attack
    assert embedder.training and d_model.training  # and the modes come back
    # Also directly: D called inside a bf16 autocast region runs with autocast disabled.
    d_model.seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        defense.defend(setup_q, ["a", "b"])
    assert d_model.seen and all(not on for _, on, _ in d_model.seen)

"""The tau-gated counter-attack (TTC) on lfw_ci chips with dlib-resnet: the gate is fitted on clean
images by its stated rule and keyed; an open gate passes x + n, a closed one counter-attacks within
the eps box and moves the embedding further than the noise; the gate-aware attacker's gradient is
autograd through its terms, it is deterministic by seed, and it pushes images past the gate where a
gate-blind attack leaves them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from advface_fast.attacks import PGD
from advface_fast.defenses import CounterAttack, GateAwareModel, create_defense
from advface_fast.defenses.counter_attack import drift
from advface_fast.models import create_model


@pytest.fixture(scope="module")
def model():
    return create_model("dlib-resnet")


@pytest.fixture(scope="module")
def chips(ci_chips):
    return torch.from_numpy(ci_chips[:10]).permute(0, 3, 1, 2).float().div(255.0)


IDS = [f"img/{i}" for i in range(10)]


def test_the_gate_is_fitted_on_clean_images_by_its_rule(model, chips):
    d = create_defense("counter-attack", model, steps=1, gate_quantile=0.25, batch_size=4)
    assert d.needs_fit()
    with pytest.raises(RuntimeError, match="gate threshold is not set"):
        d.embed(chips[:2], IDS[:2])
    tau = d.fit(chips, IDS)
    taus = d.drifts(chips, d.seeds(IDS)).numpy()
    assert tau == pytest.approx(float(np.quantile(taus, 0.25)), rel=1e-6)
    assert not d.needs_fit()
    cfg = d.config()
    assert cfg["tau"] == tau and "quantile 0.25" in cfg["gate_rule"] and cfg["gate_fit"]["images"] == 10
    d.embed(chips, IDS)  # a quarter of these very images fall below their own quantile
    assert d.last_stats["counterattacked"] == pytest.approx(0.25, abs=1 / 10 + 1e-9)
    other = create_defense("counter-attack", model, steps=1, gate_quantile=0.25, batch_size=4)
    other.fit(chips.flip(0), IDS[::-1])
    assert other.config() != cfg  # another fit, another cache key
    with pytest.raises(ValueError, match="at least 10"):
        other.fit(chips[:3], IDS[:3])


def test_open_and_closed_gate(model, chips):
    x = chips[:4]
    seeds = [11, 12, 13, 14]
    open_ = CounterAttack(model, eps=4, steps=2, tau=0.0, batch_size=4)  # tau >= 0 always: never counter-attacked
    closed = CounterAttack(model, eps=4, steps=2, tau=1e9, batch_size=4)  # always counter-attacked
    noise = open_._noise(x, seeds)
    y_open, _, c_open = open_._run(x, seeds)
    assert not c_open.any() and torch.equal(y_open, (x + noise).clamp(0, 1))
    y_closed, tau, c_closed = closed._run(x, seeds)
    assert c_closed.all()
    assert (y_closed - x).abs().max() <= 4 / 255 + 1e-6 and y_closed.min() >= 0 and y_closed.max() <= 1
    with torch.no_grad():
        clean, e_open, e_closed = model(x), model(y_open), model(y_closed)
    assert torch.allclose(tau, drift(e_open, clean), rtol=1e-4)  # tau is the drift of x + n
    # The counter-attack maximises the drift: further from f(x) than the noise alone.
    assert (drift(e_closed, clean) > drift(e_open, clean)).all()


def test_the_gate_aware_gradient_is_autograd_through_its_terms(model, chips):
    d = CounterAttack(model, tau=0.05, batch_size=4)
    wrapped = GateAwareModel(d, samples=2)
    x = chips[:2]
    target = F.normalize(torch.randn(2, 128, generator=torch.Generator().manual_seed(0)), dim=1)
    attack = PGD(wrapped, eps=4, steps=1)
    attack._row_seeds, attack._draw = [5, 6], 0  # what Attack.__call__ sets up before the hook runs
    grad, sim = attack.loss_and_grad(x, target, lambda s: -s)
    xr = x.clone().requires_grad_(True)
    emb, pen = wrapped.terms(xr, [5, 6], 0)
    loss = -(F.normalize(emb, dim=1) * target).sum(1) + pen
    (ref,) = torch.autograd.grad(loss.sum(), xr)
    assert torch.allclose(grad, ref, rtol=1e-4, atol=1e-8 * ref.abs().max().item())
    assert (pen < 0).any()  # tau 0.05 sits above these chips' drift: the hinge is active
    assert wrapped.config()["attacker"] == "gate-aware" and wrapped.config()["defense"]["tau"] == 0.05


def test_the_gate_aware_attack_gets_past_the_gate(model, ci_pair_chips):
    """With the gate at the 0.8 quantile of clean tau (16 clean chips), a gate-blind PGD on f(x + n) leaves most images
    below it (counter-attacked); the gate-aware one lifts more of them past it, still flipping decisions.
    Deterministic by seed."""
    q, g = ci_pair_chips
    q = torch.from_numpy(q[:8]).permute(0, 3, 1, 2).float().div(255.0)  # the 8 matched pairs
    g = torch.from_numpy(g[:8]).permute(0, 3, 1, 2).float().div(255.0)
    ids = [f"q/{i}" for i in range(8)]
    d = CounterAttack(model, steps=1, gate_quantile=0.8, batch_size=8)
    d.fit(torch.cat([q, g]), ids + [f"g/{i}" for i in range(8)])
    with torch.no_grad():
        gal = model(g)
        thr = torch.full((8,), float(F.cosine_similarity(model(q), gal).min()) - 0.02)  # every clean pair accepted
    same = torch.ones(8, dtype=torch.bool)
    seeds = list(range(8))
    past = {}
    for weight in (0.0, 1.0):  # kappa: the verification margin stops pulling once 0.1 past, the gate term goes on
        attack = PGD(GateAwareModel(d, samples=2, weight=weight), eps=4, steps=10, kappa=0.1, seed=0)
        x = attack(q, gal, same, thr, sample_seeds=seeds)
        past[weight] = (d.drifts(x, d.seeds(ids)) >= d.tau).float().mean().item()
        with torch.no_grad():
            assert (F.cosine_similarity(model(x), gal) < thr).float().mean() >= 0.75
        if weight:
            again = PGD(GateAwareModel(d, samples=2, weight=weight), eps=4, steps=10, kappa=0.1, seed=0)(
                q, gal, same, thr, sample_seeds=seeds)
            assert torch.equal(again, x)
    assert past[1.0] > past[0.0], past

"""Every registered defense through the Defense protocol on real lfw_ci chips (dlib-resnet): the
embeddings' shape and dtype, independence of batch, shard and order by per-image seeds, the model's
mode restored, the on-disk store and a clean calibration; the `none` entry is the plain model; a
user's defense by ``package.module:factory``; BPDA through a surrogate pulls the gradient back
exactly; the adaptive attacker breaks a defense that does not resist it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _tolerances import FP32_NET, close_to_scale
from advface_fast.attacks import PGD
from advface_fast.defenses import (AttackAsDefense, DefendedModel, Defense, MedianFilter, adaptive_attack,
                                   create_defense, list_defenses)
from advface_fast.defenses.median import median_filter
from advface_fast.experiments.defended import DefendedStore, StoredDefenseVerifier
from advface_fast.models import create_model

sys.path.insert(0, str(Path(__file__).resolve().parent))  # example_defense.py, a "user's" module

# Small settings per defense so the whole module runs in seconds.
PARAMS = {"none": {}, "jpeg": {"quality": 50}, "bit-depth": {"bits": 3}, "median": {"size": 3},
          "gaussian-smoothing": {"sigma": 8, "samples": 2}, "counter-attack": {"steps": 1, "tau": 0.02},
          "attack-as-defense": {"attack": "pgd", "eps": 4, "steps": (1, 2), "precision": "fp32"}}


def close(a, b, rel=FP32_NET):
    """Equal up to float rounding relative to the embeddings' scale (oneDNN may pick other kernels)."""
    return close_to_scale(a, b, rel)


@pytest.fixture(scope="module")
def model():
    return create_model("dlib-resnet")


@pytest.fixture(scope="module")
def chips(ci_chips):
    return torch.from_numpy(ci_chips[:6]).permute(0, 3, 1, 2).float().div(255.0)


IDS = [f"img/{i}" for i in range(6)]


def test_every_family_is_registered():
    assert set(PARAMS) <= set(list_defenses())


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_defense_through_the_interface(model, chips, name):
    d = create_defense(name, model, seed=3, batch_size=4, **PARAMS[name])
    assert isinstance(d, Defense) and d.name == name
    model.train()  # the defense runs the model in eval mode and restores the caller's mode
    whole = d.embed(chips, IDS)
    assert model.training
    model.eval()
    assert set(whole) == set(d.variants)
    for v, emb in whole.items():
        assert emb.shape == (6, 128) and emb.dtype == torch.float32 and torch.isfinite(emb).all()
    order = [4, 1, 5]  # other batch mates, another order, a partial batch: a shard of the images
    part = d.embed(chips[order], [IDS[i] for i in order])
    rest = d.embed(chips[[0, 2, 3]], [IDS[i] for i in (0, 2, 3)])
    # The counter-attack's sign step can flip a pixel where its gradient is ~0 and the batch mates move the
    # float rounding (2 of 67,500 values of one image here): equal up to that, not bit for bit.
    rel = 1e-4 if name == "counter-attack" else FP32_NET
    for v in d.variants:
        assert close(part[v], whole[v][order], rel), v
        assert close(rest[v], whole[v][[0, 2, 3]], rel), v
    again = create_defense(name, model, seed=3, batch_size=4, **PARAMS[name]).embed(chips, IDS)
    other = create_defense(name, model, seed=4, batch_size=4, **PARAMS[name]).embed(chips, IDS)
    v = d.variants[-1]
    assert close(again[v], whole[v])
    if d.randomized:  # another run seed: other draws
        assert not close(other[v], whole[v], rel=1e-3)
    else:
        assert close(other[v], whole[v])
    # The config keys the cache: JSON-able, names the defense and its settings.
    import json

    cfg = json.loads(json.dumps(d.variant_config(v)))
    assert cfg["defense"] == name
    assert d.cost_per_image(v) >= 1


def test_none_is_the_plain_model(model, chips):
    d = create_defense("none", model, batch_size=6)
    with torch.no_grad():
        plain = model(chips)
    assert torch.equal(d.embed(chips, IDS)["default"], plain)  # the same batch: the same floats


def test_transforms_do_what_they_say(model, chips):
    x = chips[:2]
    bits = create_defense("bit-depth", model, bits=2).transform(x, [0, 0])
    assert set(torch.unique(torch.round(bits * 3)).tolist()) <= {0.0, 1.0, 2.0, 3.0}
    med = create_defense("median", model, size=3).transform(x, [0, 0])
    i, j = 40, 50  # an interior pixel: the median of its 3x3 neighbourhood
    assert torch.equal(med[0, 1, i, j], x[0, 1, i - 1 : i + 2, j - 1 : j + 2].reshape(-1).median())
    jpeg = create_defense("jpeg", model, quality=30).transform(x, [0, 0])
    assert torch.equal(torch.round(jpeg * 255) / 255, jpeg) and not torch.equal(jpeg, x)
    assert (jpeg - x).abs().mean() < 0.05  # a compressed photo, not noise
    g = create_defense("gaussian-smoothing", model, sigma=8)
    a, b = g.transform(x, [1, 2]), g.transform(x, [1, 2])
    assert torch.equal(a, b) and not torch.equal(a, g.transform(x, [1, 3]))
    assert 6 / 255 < (a - x).std() < 10 / 255  # sigma 8 levels, a little less where clamped


def test_store_and_calibration_are_generic(model, chips, tmp_path):
    d = create_defense("jpeg", model, quality=50, batch_size=4)
    u8 = (chips * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    store = DefendedStore(d, root=tmp_path, align="test", chunk=4)
    first = store.embed(u8, IDS)["default"]
    assert store.computed == 6
    again = DefendedStore(d, root=tmp_path, align="test").embed(u8[::-1], IDS[::-1])["default"]
    assert np.array_equal(again, first[::-1])  # read back from disk, not recomputed
    verifier = StoredDefenseVerifier(store, "default")
    assert verifier.config()["kind"] == "jpeg" and verifier.config()["quality"] == 50
    assert close(verifier.embed(u8, IDS), d.embed(chips, IDS)["default"])


def test_a_users_defense_by_module_and_factory(model, chips, tmp_path):
    d = create_defense("example_defense:build", model, shift=3, seed=1)
    assert d.name == "example-random-shift" and d.randomized
    emb = d.embed(chips, IDS)["default"]
    assert close(d.embed(chips[[3]], IDS[3:4])["default"], emb[[3]])
    u8 = (chips * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(DefendedStore(d, root=tmp_path).embed(u8, IDS)["default"].shape, (6, 128))
    attack = adaptive_attack("pgd", d, eps=4, steps=2, samples=2, seed=0)
    with torch.no_grad():
        gallery = model(chips.flip(0))
    x = attack(chips, gallery, torch.zeros(6, dtype=torch.bool), torch.full((6,), 0.5))
    assert (torch.round(x * 255) - torch.round(chips * 255)).abs().max() <= 4
    with pytest.raises(ValueError, match="cannot load"):
        create_defense("example_defense:nothing_here", model)
    with pytest.raises(KeyError, match="unknown defense"):
        create_defense("no-such-defense", model)


def test_bpda_through_the_surrogate_is_the_exact_gradient(model, chips):
    """For the median filter the surrogate is the filter itself: the attacker's gradient through
    DefendedModel equals autograd through f(median(x))."""
    d = MedianFilter(model, size=3)
    wrapped = DefendedModel(d)
    x = chips[:2]
    target = F.normalize(torch.randn(2, 128, generator=torch.Generator().manual_seed(0)), dim=1)
    attack = PGD(wrapped, eps=4, steps=1)
    attack._row_seeds, attack._draw = [0, 1], 0  # what Attack.__call__ sets up before the hook runs
    grad, _ = attack.loss_and_grad(x, target, lambda s: s)
    xr = x.clone().requires_grad_(True)
    sim = (F.normalize(model(median_filter(xr, 3)), dim=1) * target).sum(1)
    (ref,) = torch.autograd.grad(sim.sum(), xr)
    assert close(grad, ref, rel=1e-4)
    identity = DefendedModel(create_defense("bit-depth", model, bits=4))
    assert not hasattr(identity, "pullback") and identity.config()["bpda"] == "identity"
    assert wrapped.config()["bpda"] == "the filter itself"


def test_attack_as_defense_keeps_its_keys(model):
    """The protocol adds names, not keys: attack-as-defense's variant config is its step config
    and the adaptive wrapper's config is what it was (cached adaptive rows stay valid)."""
    d = AttackAsDefense(model, "pgd", eps=4, steps=(2, 4), seed=0)
    assert d.variants == (2, 4) and d.variant_config(2) == d.step_config(2)
    cfg = DefendedModel(d, samples=2, steps=1).config()
    assert cfg["copy_steps"] == 1 and cfg["bpda"] == "identity"
    assert cfg["defense"] == d.step_config(4) | {"copy": d.attack_at(1).config()}


def test_the_adaptive_attacker_breaks_jpeg(model, ci_pair_chips):
    """BPDA through JPEG: PGD at eps 8 flips most matched pairs' decisions at the plain model's
    threshold (the transform barely changes a clean chip's embedding, so it blocks nothing)."""
    q, g = ci_pair_chips
    q = torch.from_numpy(q[:8]).permute(0, 3, 1, 2).float().div(255.0)
    g = torch.from_numpy(g[:8]).permute(0, 3, 1, 2).float().div(255.0)
    d = create_defense("jpeg", model, quality=75, batch_size=8)
    ids = [f"q/{i}" for i in range(8)]
    with torch.no_grad():
        gal = d.embed(g, [f"g/{i}" for i in range(8)])["default"]
    clean = F.cosine_similarity(d.embed(q, ids)["default"], gal)
    thr = torch.full((8,), float(clean.min()) - 0.05)  # every clean matched pair accepted
    x = adaptive_attack("pgd", d, eps=8, steps=5, seed=0)(q, gal, torch.ones(8, dtype=torch.bool), thr)
    after = F.cosine_similarity(d.embed(x, ids)["default"], gal)
    assert (after < thr).float().mean() >= 0.75, after

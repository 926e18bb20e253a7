"""Attack-as-defense on a tiny model: per-image determinism (any batch, any order), eps = 0 is
the plain model, one run's step counts equal separate runs, label-free objectives do what they
say, and the config records what ran."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _tolerances import FP32_NET, assert_close_to_scale
from advface_fast.attacks import PGD, AwayFromSelf, RandomDirection, make_objective
from advface_fast.seeds import derive_seed
from advface_fast.defenses import AttackAsDefense


def uint8_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, size=(n, 3, size, size))).float() / 255.0


IDS = [f"person_{i}/img_{i:04d}.jpg" for i in range(6)]


@pytest.mark.parametrize("attack", ["pgd", "cw", "fgsm"])
def test_defended_image_does_not_depend_on_batch_or_order(tiny, attack):
    images = uint8_images(6)
    d = AttackAsDefense(tiny, attack=attack, eps=8, steps=(2, 4), seed=5, batch_size=3)
    whole = d.defend(images, IDS)
    order = [4, 1, 5, 0]  # other batch mates, another order, a partial last batch
    part = d.defend(images[order], [IDS[i] for i in order])
    single = d.defend(images[2:3], IDS[2:3])
    for k in (2, 4):
        assert torch.equal(part[k], whole[k][order]), k
        assert torch.equal(single[k], whole[k][2:3]), k
        assert not torch.equal(whole[k], images)  # D did change the images
    # Another run seed changes D's random start, hence the result.
    other = AttackAsDefense(tiny, attack=attack, eps=8, steps=(2, 4), seed=6).defend(images, IDS)
    assert not torch.equal(other[4], whole[4])


def test_defended_images_stay_in_d_budget_on_the_grid(tiny):
    images = uint8_images(4)
    out = AttackAsDefense(tiny, eps=3, steps=(1, 3)).defend(images, IDS[:4])
    for x in out.values():
        ints = torch.round(x * 255)
        assert torch.equal(ints / 255, x)
        assert (ints - torch.round(images * 255)).abs().max() <= 3


@pytest.mark.parametrize("attack", ["pgd", "cw", "fgsm"])
def test_eps_zero_is_the_plain_model(tiny, attack):
    images = uint8_images(5)
    d = AttackAsDefense(tiny, attack=attack, eps=0, steps=(3,))
    assert torch.equal(d.defend(images, IDS[:5])[3], images)
    with torch.no_grad():
        plain = tiny(images)
    # D embeds in batches padded to batch_size (32), the plain model here runs on 5 images: another
    # batch size, which oneDNN may compute with other kernels, so equal up to float32 rounding.
    assert_close_to_scale(d.embed(images, IDS[:5])[3], plain, FP32_NET)


@pytest.mark.parametrize("attack", ["pgd", "cw"])
def test_one_run_records_every_step_count(tiny, attack):
    images = uint8_images(6)
    both = AttackAsDefense(tiny, attack=attack, eps=8, steps=(2, 5), seed=1).defend(images, IDS)
    for k in (2, 5):
        alone = AttackAsDefense(tiny, attack=attack, eps=8, steps=(k,), seed=1).defend(images, IDS)
        assert torch.equal(both[k], alone[k]), k
    assert not torch.equal(both[2], both[5])


def test_fgsm_defense_is_one_step_at_every_count(tiny):
    d = AttackAsDefense(tiny, attack="fgsm", eps=4, steps=(10, 20))
    out = d.defend(uint8_images(3), IDS[:3])
    assert torch.equal(out[10], out[20]) and d.last_stats["image_steps"] == 32  # 3 images padded to a batch


def test_away_from_self_lowers_similarity_to_the_clean_embedding(tiny):
    images = uint8_images(6)
    with torch.no_grad():
        clean = tiny(images)
    for attack in ("pgd", "cw"):
        d = AttackAsDefense(tiny, attack=attack, eps=8, steps=(1, 5))
        cos = {k: F.cosine_similarity(e, clean) for k, e in d.embed(images, IDS).items()}
        assert (cos[1] < 1).all() and (cos[5] < cos[1]).all(), attack
    fgsm = AttackAsDefense(tiny, attack="fgsm", eps=8, steps=(1,)).embed(images, IDS)[1]
    noise = AttackAsDefense(tiny, attack="pgd", eps=8, steps=(1,), alpha=0).embed(images, IDS)[1]  # start only
    assert (F.cosine_similarity(fgsm, clean) < F.cosine_similarity(noise, clean)).all()


def test_away_from_self_gradient_vanishes_at_the_clean_image(tiny):
    # Why every D starts at a random point of its box: at x0 the gradient is float noise.
    images = uint8_images(4)
    with torch.no_grad():
        clean = tiny(images)

    def grad_at(x):
        x = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cosine_similarity(tiny(x), clean).sum(), x)
        return g.abs().flatten(1).sum(1)

    start = (images + (torch.rand(images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 4 / 255)
    assert (grad_at(images) < 1e-4 * grad_at(start.clamp(0, 1))).all()
    for attack in ("pgd", "cw", "fgsm"):
        assert AttackAsDefense(tiny, attack=attack).config()["attack"]["random_start"] is True
    assert "random_start" not in AttackAsDefense(tiny, attack="cw", random_start=False).config()["attack"]


def test_random_direction_moves_towards_a_per_image_direction(tiny):
    images = uint8_images(6)
    seeds = [derive_seed(0, i) for i in IDS]
    attack = PGD(tiny, eps=8, steps=5, objective="random-direction", random_start=False)
    x = attack(images, sample_seeds=seeds)
    # The directions are drawn per image: the same whichever batch, and not the random start's stream.
    from advface_fast.attacks.base import SeededNoise

    noise = SeededNoise(6, torch.device("cpu"), None, seeds)
    directions = RandomDirection().prepare_target(None, lambda: torch.zeros(6, 8), noise)
    again = RandomDirection().prepare_target(None, lambda: torch.zeros(2, 8),
                                             SeededNoise(2, torch.device("cpu"), None, seeds[3:5]))
    assert torch.equal(directions[3:5], again)
    assert torch.allclose(directions.norm(dim=1), torch.ones(6))
    with torch.no_grad():
        before = F.cosine_similarity(tiny(images), directions)
        after = F.cosine_similarity(tiny(x), directions)
    assert (after > before).all()


def test_config_records_objective_and_steps(tiny):
    d = AttackAsDefense(tiny, attack="pgd", eps=4, steps=(40, 10, 20), seed=3)
    config = d.config()
    assert config["steps"] == [10, 20, 40] and config["defense"] == "attack-as-defense"
    assert config["attack"]["objective"] == {"name": "away-from-self", "metric": "cosine"}
    assert config["attack"]["steps"] == 40 and config["attack"]["seed"] == 3 and config["attack"]["eps"] == 4
    # One step count's config is that of a separate run with that many steps.
    assert d.step_config(10) == AttackAsDefense(tiny, eps=4, steps=(10,), seed=3).step_config(10)
    assert config["batch_size"] == 32 and d.step_config(10) != AttackAsDefense(
        tiny, eps=4, steps=(10,), seed=3, batch_size=8).step_config(10)
    assert d.step_config(10) != d.step_config(20)
    other = AttackAsDefense(tiny, eps=4, steps=(10,), seed=3, objective="random-direction")
    assert other.step_config(10) != d.step_config(10)
    import json

    json.dumps(config)
    with pytest.raises(ValueError, match="not one of"):
        d.step_config(5)


def test_bad_input_is_one_clear_error(tiny):
    with pytest.raises(ValueError, match="defense attack"):
        AttackAsDefense(tiny, attack="deepfool")
    with pytest.raises(ValueError, match="label-free"):
        AttackAsDefense(tiny, objective="verification")
    with pytest.raises(ValueError, match="steps"):
        AttackAsDefense(tiny, steps=(0, 10))
    d = AttackAsDefense(tiny, steps=(1,))
    with pytest.raises(ValueError, match="ids"):
        d.defend(uint8_images(3), IDS[:2])
    with pytest.raises(ValueError, match="uint8 grid"):
        d.defend((uint8_images(2) + 0.3 / 255).clamp(0, 1), IDS[:2])


def test_uint8_hwc_images_are_accepted(tiny):
    images = uint8_images(3)
    chips = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    d = AttackAsDefense(tiny, eps=4, steps=(2,))
    assert torch.equal(d.defend(chips, IDS[:3])[2], d.defend(images, IDS[:3])[2])


def test_make_objective_specs():
    assert make_objective("away-from-self") == AwayFromSelf()
    assert make_objective({"name": "verification", "metric": "l2"}).config() == {"name": "verification", "metric": "l2"}
    with pytest.raises(ValueError, match="available"):
        make_objective("bogus")
    with pytest.raises(ValueError, match="cosine"):
        make_objective({"name": "away-from-self", "metric": "l2"})


def test_verifiers_per_step_count_share_one_run(tiny):
    images = uint8_images(4)
    chips = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    d = AttackAsDefense(tiny, eps=4, steps=(2, 5), batch_size=4)
    calls = []
    d.attack = _Counting(d.attack, calls)
    v2, v5 = d.verifier(2), d.verifier(5)
    e2, e5 = v2.embed(chips, IDS[:4]), v5.embed(chips, IDS[:4])
    assert len(calls) == 1  # one run of D served both step counts
    want = AttackAsDefense(tiny, eps=4, steps=(2, 5), batch_size=4).embed(images, IDS[:4])
    assert e2.dtype == np.float32 and np.array_equal(e2, want[2].numpy()) and np.array_equal(e5, want[5].numpy())
    v2.embed(chips[::-1].copy(), IDS[:4])  # other images under the same ids: computed again
    assert len(calls) == 2
    assert v2.config()["steps"] == 2 and v2.config()["kind"] == "attack-as-defense" and v2.config() != v5.config()


class _Counting:
    """Wraps D's attack and counts its calls (D runs)."""

    def __init__(self, attack, calls):
        self.attack, self.calls = attack, calls

    def __call__(self, *args, **kwargs):
        self.calls.append(1)
        return self.attack(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.attack, name)

"""Square attack (score-based black box, L-inf): the budget on the uint8 grid, strength against
PGD and noise, per-sample seeding, query budgets, forward passes only, and the score hook."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from _images import uint8_images
from advface_fast.attacks import PGD, Noise, Square, VerificationObjective, make_attack
from advface_fast.attacks.square import p_selection


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Square makes thousands of forward passes of a few 16 x 16 images: intra-op threads only add
    synchronisation (4x slower on a busy 2-core runner), so this module runs single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def similarities(model, x, gallery):
    with torch.no_grad():
        return VerificationObjective().similarity(model(x), gallery)


def as_int(x: torch.Tensor) -> np.ndarray:
    return torch.round(x * 255).to(torch.int64).numpy()


def setup_pairs(model, n: int = 16, gap: float = 0.03, size: int = 16, seed: int = 0):
    """Queries, gallery embeddings, half matched / half mismatched, and per-pair thresholds
    ``gap`` past the clean similarity (the attacker must move every pair by more than ``gap``)."""
    queries = uint8_images(n, size, seed)
    with torch.no_grad():
        gallery = model(uint8_images(n, size, seed + 1))
    is_same = torch.arange(n) % 2 == 0
    clean = similarities(model, queries, gallery)
    thresholds = torch.where(is_same, clean - gap, clean + gap)
    return queries, gallery, is_same, thresholds


def flipped(model, x, gallery, is_same, thresholds) -> torch.Tensor:
    return VerificationObjective().success(similarities(model, x, gallery), is_same, thresholds)


# ----------------------------------------------------------------------------- budget on the grid


class GridRecorder(nn.Module):
    """Records every image the attack queries (to check the model only sees deliverable images)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.inner(x)


@pytest.mark.parametrize("eps", [1, 2.5, 4, 8])
def test_eps_holds_on_the_uint8_grid(tiny, eps):
    model = GridRecorder(tiny)
    queries, gallery, is_same, _ = setup_pairs(tiny, n=4)
    unreachable = torch.where(is_same, torch.full((4,), -2.0), torch.full((4,), 2.0))  # runs every query
    attack = Square(model, eps=eps, n_queries=60, seed=1)
    x_adv = attack(queries, gallery, is_same, unreachable)
    adv, clean, levels = as_int(x_adv), as_int(queries), int(np.floor(eps))
    assert torch.equal(torch.from_numpy(adv).float() / 255.0, x_adv)  # exactly k/255 in float32
    assert adv.min() >= 0 and adv.max() <= 255
    assert np.abs(adv - clean).max() == levels  # the bound holds, and the stripes use all of it
    assert attack.last_stats["queries"] == [60] * 4 and len(model.seen) == 60
    for seen in model.seen:  # every query is itself a deliverable image: on the grid, within the budget
        assert torch.equal(torch.round(seen * 255) / 255, seen)
        assert np.abs(as_int(seen) - clean).max() <= levels
    # Without rounding: float values x0 +- eps/255, clamped to [0, 1].
    x_float = Square(tiny, eps=eps, n_queries=20, round_output=False)(queries, gallery, is_same, unreachable)
    assert (x_float - queries).abs().max() <= eps / 255 + 1e-6 and 0 <= x_float.min() and x_float.max() <= 1


# ----------------------------------------------------------------------------- strength


def test_square_breaks_what_pgd_breaks(tiny):
    # 16 pairs of 16 x 16 random images, thresholds 0.03 past each clean similarity. Measured on the
    # development machine (CPU, default p_init 0.1): PGD (eps 8, 20 steps; also 40) flips 15/16;
    # Square (eps 8) flips 15/16 with n_queries=1000 (mean 345 queries spent per pair), 15/16 at
    # 2000 and 3000, 14/16 at 500, 1/16 at 200 (the schedule, rescaled to a 200-query budget,
    # shrinks the window to 1 px after 10 queries); uniform noise at eps 8 flips 0/16.
    queries, gallery, is_same, thresholds = setup_pairs(tiny, n=16, gap=0.03)
    seeds = list(range(16))
    pgd = flipped(tiny, PGD(tiny, eps=8, steps=20)(queries, gallery, is_same), gallery, is_same, thresholds)
    square = Square(tiny, eps=8, n_queries=1000, seed=0)
    x_sq = square(queries, gallery, is_same, thresholds, sample_seeds=seeds)
    sq = flipped(tiny, x_sq, gallery, is_same, thresholds)
    noise = flipped(tiny, Noise(tiny, eps=8)(queries, gallery, is_same), gallery, is_same, thresholds)
    assert pgd.sum() >= 14
    assert sq.sum() >= 0.8 * pgd.sum(), (int(sq.sum()), int(pgd.sum()))
    assert noise.sum() <= 2
    # The attack's own bookkeeping agrees with an independent judgement (same fp32 model).
    stats = square.last_stats
    assert stats["success"] == sq.tolist() and stats["success_rate"] == pytest.approx(sq.float().mean().item())
    q = stats["queries"]
    assert all(1 <= k <= 1000 for k in q) and all(k == 1000 for k, ok in zip(q, sq.tolist()) if not ok)
    assert stats["queries_total"] == sum(q) == stats["image_steps"] and stats["image_steps_full"] == 16 * 1000
    assert stats["queries_mean"] == pytest.approx(sum(q) / 16)
    assert sum(q) < 16 * 1000  # finished pairs stopped spending queries


def test_more_queries_never_help_the_defender(tiny):
    queries, gallery, is_same, thresholds = setup_pairs(tiny, n=16, gap=0.04)
    seeds = [7 * i + 3 for i in range(16)]
    short_model, long_model = GridRecorder(tiny), GridRecorder(tiny)
    short, long = Square(short_model, eps=8, n_queries=200, seed=5), Square(long_model, eps=8, n_queries=2000, seed=5)
    x_short = short(queries, gallery, is_same, thresholds, sample_seeds=seeds)
    x_long = long(queries, gallery, is_same, thresholds, sample_seeds=seeds)
    ok_short, ok_long = (flipped(tiny, x, gallery, is_same, thresholds) for x in (x_short, x_long))
    # Measured: 1/16 pairs flipped with 200 queries, 14/16 with 2000 (PGD-20 at eps 8: 14/16).
    assert ok_long.sum() >= ok_short.sum()  # the property
    assert ok_long.sum() >= ok_short.sum() + 8  # and by a wide margin here
    assert max(short.last_stats["queries"]) <= 200 and max(long.last_stats["queries"]) <= 2000
    # The random draws are a prefix (iteration t draws the same whatever n_queries), but the window
    # side follows p's schedule rescaled to n_queries, so the runs are not prefixes of each other:
    # both query the same stripes (query 1) and the same 5 px windows (query 2); at query 3 the
    # 200-query schedule has already halved p (4 px windows), the 2000-query one not (5 px).
    assert torch.equal(short_model.seen[0], long_model.seen[0])
    assert torch.equal(short_model.seen[1], long_model.seen[1])
    assert not torch.equal(short_model.seen[2], long_model.seen[2])


# ----------------------------------------------------------------------------- seeding and batching


def test_deterministic_by_seed_and_independent_of_batching(tiny):
    queries, gallery, is_same, thresholds = setup_pairs(tiny, n=6, gap=0.02)
    kwargs = {"eps": 8, "n_queries": 150}
    a = Square(tiny, seed=3, **kwargs)(queries, gallery, is_same, thresholds)
    b = Square(tiny, seed=3, **kwargs)(queries, gallery, is_same, thresholds)
    c = Square(tiny, seed=4, **kwargs)(queries, gallery, is_same, thresholds)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # A progress bar shows queries and pairs left; it changes nothing, nor the config (cache keys).
    shown = Square(tiny, seed=3, progress="square test", **kwargs)
    assert torch.equal(shown(queries, gallery, is_same, thresholds), a)
    assert shown.config() == Square(tiny, seed=3, **kwargs).config()
    # Per-sample seeds: a pair's result (and its query count) does not depend on its batch mates or order.
    seeds = [101, 202, 303, 404, 505, 606]
    attack = Square(tiny, seed=0, **kwargs)
    whole = attack(queries, gallery, is_same, thresholds, sample_seeds=seeds)
    whole_queries = attack.last_stats["queries"]
    assert 1 < len(set(whole_queries))  # some pairs finish early, so the batch changes along the way
    order = [4, 1, 5, 0]
    shuffled = attack(queries[order], gallery[order], is_same[order], thresholds[order],
                      sample_seeds=[seeds[i] for i in order])
    assert torch.equal(shuffled, whole[order])
    assert attack.last_stats["queries"] == [whole_queries[i] for i in order]
    for i in (2, 3):
        alone = attack(queries[i:i + 1], gallery[i:i + 1], is_same[i:i + 1], thresholds[i:i + 1],
                       sample_seeds=[seeds[i]])
        assert torch.equal(alone[0], whole[i]) and attack.last_stats["queries"] == [whole_queries[i]]


def test_p_schedule_is_the_papers_rescaled_to_the_budget():
    assert p_selection(0.05, 0, 10000) == 0.05 and p_selection(0.05, 10, 10000) == 0.05
    assert p_selection(0.05, 11, 10000) == 0.025 and p_selection(0.05, 51, 10000) == 0.0125
    assert p_selection(0.05, 8001, 10000) == 0.05 / 512 and p_selection(0.05, 9999, 10000) == 0.05 / 512
    assert p_selection(0.1, 100, 1000) == p_selection(0.1, 1000, 10000) == 0.1 / 16


# ----------------------------------------------------------------------------- forward passes only


class ForwardOnly(nn.Module):
    """Fails the test if the attack ever asks for a gradient of (or through) the model."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0
        self.weight = nn.Parameter(torch.zeros(()))  # a parameter that would get a .grad

    def forward(self, x):
        self.calls += 1
        assert not torch.is_grad_enabled(), "Square ran the model with autograd on"
        assert not x.requires_grad
        return self.inner(x) + self.weight


def test_only_forward_passes(tiny, monkeypatch):
    model = ForwardOnly(tiny)

    def refuse(*args, **kwargs):
        raise AssertionError("Square asked for a gradient")

    monkeypatch.setattr(torch.autograd, "grad", refuse)
    monkeypatch.setattr(torch.autograd, "backward", refuse)
    monkeypatch.setattr(torch.Tensor, "backward", refuse)
    queries, gallery, is_same, thresholds = setup_pairs(tiny, n=4)
    attack = Square(model, eps=8, n_queries=100)
    attack.loss_and_grad = refuse  # the gradient hook is never used
    attack(queries, gallery, is_same, thresholds)
    assert model.calls == max(attack.last_stats["queries"]) > 1  # one model call per query round
    assert model.weight.grad is None and all(p.grad is None for p in tiny.parameters())


# ----------------------------------------------------------------------------- the score hook and defended models


class RandomizedDefense(nn.Module):
    """A randomized preprocessing defense in the BPDA/EOT hook's shape: ``views`` adds seeded noise
    (fresh per evaluation ``draw``), ``embedder`` embeds; ``step_cost`` passes per evaluation."""

    step_cost = 3

    def __init__(self, embedder):
        super().__init__()
        self.embedder, self.calls = embedder, []

    def views(self, x, seeds, draw=0):
        self.calls.append((draw, list(seeds)))
        noise = torch.stack([torch.rand(x.shape[1:], generator=torch.Generator().manual_seed(s + 1000 * draw))
                             for s in seeds])
        return [(x + (noise - 0.5) / 255).clamp(0, 1)]

    def forward(self, x):
        return self.embedder(x)

    def config(self):
        return {"defense": "uniform noise +-0.5/255"}


def test_every_query_goes_through_the_score_hook_of_a_defended_model(tiny):
    queries, gallery, is_same, thresholds = setup_pairs(tiny, n=6, gap=0.05)
    seeds = [11, 12, 13, 14, 15, 16]
    defended = RandomizedDefense(tiny)
    attack = Square(defended, eps=8, n_queries=120)
    whole = attack(queries, gallery, is_same, thresholds, sample_seeds=seeds)
    stats = attack.last_stats
    # One evaluation per query round, fresh draws each time, each row with its own seed.
    assert [d for d, _ in defended.calls] == list(range(max(stats["queries"])))
    assert defended.calls[0][1] == seeds
    for t, (_, row_seeds) in enumerate(defended.calls):  # rows still attacked at round t
        assert row_seeds == [s for s, q in zip(seeds, stats["queries"]) if q > t]
    # step_cost scales the image passes only; queries and the success rate are counts and a rate.
    assert stats["image_steps"] == 3 * stats["queries_total"] == 3 * sum(stats["queries"])
    assert stats["image_steps_full"] == 3 * 6 * 120 and 0 <= stats["success_rate"] <= 1
    assert all(isinstance(k, int) for k in stats["queries"]) and len(stats["queries"]) == 6
    # Even against the randomized defense a pair's result does not depend on its batch.
    alone = attack(queries[3:4], gallery[3:4], is_same[3:4], thresholds[3:4], sample_seeds=seeds[3:4])
    assert torch.equal(alone[0], whole[3])
    assert attack.config()["defended_model"] == defended.config()


class NoisyDefense(RandomizedDefense):
    """A randomised defense whose decisions are noisy: uniform noise of ``amp`` (in [0, 1] units,
    several times eps) added to the image at every evaluation, the draw fixed by (seed, draw)."""

    randomized = True

    def __init__(self, embedder, amp: float = 0.2):
        super().__init__(embedder)
        self.amp = amp

    def views(self, x, seeds, draw=0):
        self.calls.append((draw, list(seeds)))
        gens = [torch.Generator().manual_seed((s * 7919 + draw * 104729) % 2 ** 63) for s in seeds]
        noise = torch.stack([torch.rand(x.shape[1:], generator=g) for g in gens])
        return [x + (noise - 0.5) * self.amp]


def fresh_flip_rate(defense, embedder, x, gallery, is_same, thresholds, draws: int = 40) -> torch.Tensor:
    """Per pair, the fraction of ``draws`` fresh draws of the defense (draw indices the attack never used)
    under which the decision is wrong: how the defended pipeline judges ``x``."""
    seeds = list(range(1000, 1000 + x.shape[0]))
    rate = torch.zeros(x.shape[0])
    for t in range(draws):
        view = defense.views(x, seeds, 10 ** 6 + t)[0]
        rate += flipped(embedder, view, gallery, is_same, thresholds).float()
    return rate / draws


def test_against_a_randomised_defense_one_lucky_draw_does_not_end_the_search(tiny):
    # 16 pairs, thresholds 0.01 past each clean similarity, noise of +-0.1 (+-25 levels) at every
    # evaluation: a single draw often flips a decision the next draw does not. Measured on the development
    # machine: stopping a pair at its first flipped draw (confirm=0, the rule for deterministic models)
    # reports 94% success after 50 queries per pair, but fresh draws flip 15% of the decisions (clean: 9%);
    # the default search (incumbent and candidate under one draw, stop after 8 flipped draws in a row) has
    # fresh draws flip 89% (93% of the pairs it reports broken).
    queries, gallery, is_same, thresholds = setup_pairs(tiny, n=16, gap=0.01)
    defense = NoisyDefense(tiny)
    seeds = list(range(16))
    judged = {}
    for confirm in (0, None):
        attack = Square(defense, eps=8, n_queries=600, seed=0, confirm=confirm)
        x = attack(queries, gallery, is_same, thresholds, sample_seeds=seeds)
        assert np.abs(as_int(x) - as_int(queries)).max() <= 8
        judged[confirm] = fresh_flip_rate(defense, tiny, x, gallery, is_same, thresholds), attack.last_stats
    clean = fresh_flip_rate(defense, tiny, queries, gallery, is_same, thresholds).mean()
    lucky, stats_lucky = judged[0]
    rate, stats = judged[None]
    assert stats_lucky["success_rate"] > lucky.mean() + 0.4  # the lucky-draw rule's own count is not what holds
    assert rate.mean() >= 0.7 and rate.mean() > lucky.mean() + 0.4 and rate.mean() > clean + 0.4
    broken = torch.tensor(stats["success"])
    assert broken.any() and rate[broken].mean() >= 0.8  # what it reports broken stays broken on fresh draws
    q = stats["queries"]
    assert all(k <= 600 for k in q) and all(k == 599 for k, ok in zip(q, broken.tolist()) if not ok)
    assert all(k % 2 == 1 for k in q)  # the stripes, then two queries (incumbent and candidate) per iteration


def test_randomised_search_scores_incumbent_and_candidate_under_one_draw(tiny):
    queries, gallery, is_same, thresholds = setup_pairs(tiny, n=6, gap=0.01)
    seeds = [21, 22, 23, 24, 25, 26]
    defense = NoisyDefense(tiny)
    attack = Square(defense, eps=8, n_queries=81)
    assert attack.confirm == Square.CONFIRM and attack.config()["confirm"] == Square.CONFIRM
    whole = attack(queries, gallery, is_same, thresholds, sample_seeds=seeds)
    stats = attack.last_stats
    # Evaluation t scores every pair still attacked twice (incumbent, then candidate) with the pair's seed and draw t.
    assert [d for d, _ in defense.calls] == list(range(len(defense.calls)))
    assert defense.calls[0][1] == seeds
    for t, (_, row_seeds) in enumerate(defense.calls[1:], start=1):
        active = [s for s, q in zip(seeds, stats["queries"]) if q > 2 * t - 1]
        assert row_seeds == active + active
    assert stats["queries_total"] == sum(len(r) for _, r in defense.calls) and stats["image_steps"] == 3 * sum(stats["queries"])
    # A pair's result and query count do not depend on its batch mates.
    for i in (1, 4):
        alone = attack(queries[i:i + 1], gallery[i:i + 1], is_same[i:i + 1], thresholds[i:i + 1],
                       sample_seeds=[seeds[i]])
        assert torch.equal(alone[0], whole[i]) and attack.last_stats["queries"] == [stats["queries"][i]]
    # confirm is part of the config (the cache key) for randomised models and rebuilds; deterministic ones omit it.
    def rebuilt(a):  # the defended model is recorded in the config, not an argument
        return make_attack(model=defense, **{k: v for k, v in a.config().items() if k != "defended_model"})

    assert rebuilt(attack).config() == attack.config() and rebuilt(Square(defense, confirm=0)).confirm == 0
    assert "confirm" not in Square(tiny).config() and Square(tiny).confirm == 0
    with pytest.raises(ValueError, match="confirm"):
        Square(defense, confirm=-1)
    # Nothing to move (eps < 1 level) or no query left for an iteration: the stripes' query only.
    still = Square(defense, eps=0.5, n_queries=50)
    assert torch.equal(still(queries, gallery, is_same, thresholds), queries) and still.last_stats["queries"] == [1] * 6
    short = Square(defense, eps=4, n_queries=2)
    assert np.abs(as_int(short(queries, gallery, is_same, thresholds)) - as_int(queries)).max() == 4
    assert short.last_stats["queries"] == [1] * 6


class CountingScore(Square):
    def score(self, x, target, rows=None):
        self.scored = getattr(self, "scored", 0) + x.shape[0]
        return super().score(x, target, rows)


def test_score_hook_counts_every_query(tiny):
    queries, gallery, is_same, thresholds = setup_pairs(tiny, n=5, gap=0.05)
    attack = CountingScore(tiny, eps=8, n_queries=80)
    attack(queries, gallery, is_same, thresholds)
    assert attack.scored == attack.last_stats["queries_total"]


# ----------------------------------------------------------------------------- arguments and config


def test_thresholds_required_and_config_round_trip(tiny):
    queries, gallery, is_same, _ = setup_pairs(tiny, n=2)
    with pytest.raises(ValueError, match="threshold"):
        Square(tiny, n_queries=5)(queries, gallery, is_same)
    with pytest.raises(ValueError, match="threshold"):  # label-free objectives too: success needs them
        Square(tiny, n_queries=5, objective="away-from-self")(queries)
    x = Square(tiny, eps=4, n_queries=20, objective="away-from-self")(queries, thresholds=torch.zeros(2))
    assert np.abs(as_int(x) - as_int(queries)).max() <= 4
    with pytest.raises(ValueError, match="n_queries"):
        Square(tiny, n_queries=0)
    with pytest.raises(ValueError, match="p_init"):
        Square(tiny, p_init=0.0)
    attack = make_attack("square", tiny, eps=2.5, n_queries=300, p_init=0.1, seed=9, metric="l2")
    config = attack.config()
    assert {k: config[k] for k in ("name", "eps", "n_queries", "p_init", "seed", "objective", "round_output")} == \
        {"name": "square", "eps": 2.5, "n_queries": 300, "p_init": 0.1, "seed": 9,
         "objective": {"name": "verification", "metric": "l2"}, "round_output": True}
    assert make_attack(model=tiny, **config).config() == config
    assert Square(tiny).config()["n_queries"] == 5000 and Square(tiny).config()["p_init"] == 0.1
    assert Square(tiny).eps == 4


def test_eps_zero_returns_the_clean_image(tiny):
    queries, gallery, is_same, thresholds = setup_pairs(tiny, n=3)
    attack = Square(tiny, eps=0.5, n_queries=50)  # floor(0.5) = 0 levels: nothing can move
    assert torch.equal(attack(queries, gallery, is_same, thresholds), queries)
    assert attack.last_stats["queries"] == [1, 1, 1]

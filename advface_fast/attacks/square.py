"""Square attack: score-based black-box random search under an L-inf budget (forward passes only)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from advface_fast.attacks.active_set import select_rows
from advface_fast.attacks.base import Attack, SeededNoise

# The reference implementation's milestones (in units of a 10,000-query budget) at which p halves.
P_MILESTONES = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_selection(p_init: float, it: int, n_queries: int) -> float:
    """Fraction of pixels in the window at iteration ``it`` (0-based) of a ``n_queries`` budget:
    the paper's piece-wise constant schedule, its milestones rescaled to the budget exactly as
    the reference code does (``it -> int(it / n_queries * 10000)``; halving after 10, 50, 200,
    500, 1000, 2000, 4000, 6000, 8000 of 10,000)."""
    it = int(it / n_queries * 10000)
    return p_init / 2 ** sum(it > m for m in P_MILESTONES)


class Square(Attack):
    r"""
    Square Attack in the paper 'Square Attack: a query-efficient black-box adversarial attack via
    random search' (Andriushchenko, Croce, Flammarion, Hein, ECCV 2020)
    [https://arxiv.org/abs/1912.00049], L-inf version, on face verification.

    Distance Measure : Linf

    Score-based black box: the attack only ever sees forward similarities, every one through the
    base class hook :meth:`~advface_fast.attacks.base.Attack.score` (a defended model's
    ``views`` / ``embedder`` apply; a randomised defense redraws at every query, the t-th query
    of the call being its t-th evaluation). No gradient is taken, anywhere.

    Loss: the objective's ``margin_loss`` with the per-pair thresholds (kappa 0): ``max(s - tau,
    0)`` for matched pairs (dodging: push the similarity to or below the threshold),
    ``max(tau - s, 0)`` for mismatched pairs (impersonation: push it above). A pair is finished
    as soon as a query flips its decision (``objective.success``); it then leaves the batch and
    spends no more queries. Thresholds are therefore required (ValueError without them).

    A randomised model (``model.randomized``, e.g. a
    :class:`~advface_fast.defenses.DefendedModel` of a randomised defense; ``confirm`` > 0): one
    draw's decision is not the pipeline's, so neither "stop at the first flipped query" nor
    "keep a candidate whose one draw scored lower" holds (a lucky draw would end the search, or
    freeze it at an incumbent whose score was luck). There every iteration scores the incumbent
    and the candidate under the same fresh draw (common random numbers: two queries in one
    evaluation), keeps the candidate when that draw finds it more adversarial (the objective's
    ``ascent_loss``: not clipped at the threshold, as further past it flips more draws), and
    stops a pair once its incumbent has flipped the decision on ``confirm`` fresh draws in a row
    (the draw that selected it not counted). A pair's queries stay within ``n_queries``: the
    stripes, then two per iteration, so at most ``(n_queries - 1) // 2`` iterations, over which
    the p schedule runs. On a toy defense adding +-25 levels of noise per evaluation
    (``tests/test_square.py``) the first-flip rule ended pairs after 50 queries with 94% reported
    broken but 15% flipped on fresh draws; this search flips 89%.

    Algorithm (paper, Alg. 1 with the L-inf sampling of Alg. 2):

    * query 1: vertical stripes, every column of every channel at ``x0 + eps`` or ``x0 - eps``
      (uniform sign), clamped to [0, 1];
    * queries 2..n_queries: a square window of side ``s = round(sqrt(p * H * W))`` (clamped to
      ``[1, min(H, W) - 1]``) at a uniform position (every position with the window inside the
      image; the reference code never draws the last row/column); inside it each channel gets one
      uniform sign, i.e. the value ``x0 ± eps``. The candidate is kept only if its margin loss
      is strictly lower than the best so far (or it succeeds). As in the reference code a sign
      choice that would leave the window unchanged is never drawn (the reference resamples
      until the window changes; here the one excluded sign pattern is removed from the draw,
      the same distribution without a data-dependent number of draws).
    * ``p`` follows the paper's schedule: ``p_init`` halved at the iteration milestones 10, 50,
      200, 500, 1000, 2000, 4000, 6000, 8000 of 10,000, rescaled to ``n_queries``
      (:func:`p_selection`).

    Default ``p_init = 0.1`` (the paper uses 0.05 on ImageNet). ``p`` is a fraction of the
    image's pixels: at 150 x 150 the first window is 47 px (0.05: 34 px), about an eye with its
    brow, halved down to 1-2 px by the end of the schedule. Face embeddings respond to such
    coarse windows: in a scratch comparison on 16 lfw_ci pairs with dlib-resnet (eps 4 and 8, up
    to 3,000 queries; not a committed result) 0.1 flipped more pairs than 0.05 at every budget,
    and 0.2 / 0.3 were within one pair of 0.1. Measure it on your data before relying on it.

    The uint8 grid. Every candidate is ``x0 ± floor(eps)/255`` per pixel, computed in integers
    (``clamp(round(255 x0) ± floor(eps), 0, 255) / 255``) exactly as
    :func:`~advface_fast.attacks.base.round_to_uint8_grid` delivers it: the model is queried at
    the image that is delivered, which lies on the grid with ``||255 (x - x0)||_inf <=
    floor(eps)`` exactly (``eps=2.5`` uses 2 levels). With ``round_output=False`` the values are
    ``clamp(x0 ± eps/255, 0, 1)`` in float instead (any x0 in [0, 1]).

    Randomness. All draws come from the call's :class:`~advface_fast.attacks.base.SeededNoise`,
    forked into "square/init" (the stripe signs) and "square/search" (three uniforms per
    iteration: window row, window column, sign pattern), drawn on CPU generators in chunks of
    ``chunk`` iterations for every pair of the call (finished or not). With ``sample_seeds`` each
    pair's draws depend on its own seed only, so its result does not depend on which pairs share
    its batch or their order (nor do its draws depend on the device). The draws of iteration t
    are the same whatever ``n_queries``, but the window side depends on ``t / n_queries`` (the
    rescaled schedule), so a shorter run is not the prefix of a longer one.

    Cost. ``last_stats`` (every call):

    * ``"queries"``: per pair, in batch order, the model queries spent, the stripe
      initialisation included: ``n_queries`` (for a randomised model ``n_queries`` rounded down
      to an odd number), or fewer for a pair that succeeded (it stops);
      ``"queries_total"`` and ``"queries_mean"``;
    * ``"success"`` (per pair: the attack's own last score flipped the decision; for a
      randomised model, its last ``confirm`` scores did) and
      ``"success_rate"``;
    * ``"image_steps"``: image passes computed, one FORWARD pass per query and image, so equal
      to ``queries_total``; ``"image_steps_full"``: ``N * n_queries``, without early stops.
      A query is cheaper than a PGD step (forward + input gradient), so compare wall time, not
      image_steps, across kinds of attack: dlib-resnet on CPU, 8 chips, one thread: forward
      0.19-0.21 s, PGD step 0.46 s, Square query 0.22 s.

    With a model that has ``step_cost`` (BPDA / EOT wrappers: image passes per evaluation) only
    the two image_steps counters are multiplied by it; a query is one evaluation of the
    defended model.

    Arguments:
        model (nn.Module): embedding model, N x 3 x H x W in [0, 1] -> N x D.
        eps (float): L-inf budget in 0-255 pixel units (floor(eps) levels on the grid). (Default: 4)
        n_queries (int): query budget per pair, the initialisation included. (Default: 5000)
        p_init (float): initial fraction of pixels in the window, in (0, 1]. (Default: 0.1)
        objective (Objective | str | dict): whose margin to minimise. (Default: verification, cosine)
        seed (int | None): seed of the random search (unless sample_seeds). (Default: 0)
        round_output (bool): deliver (and query) the uint8-grid image. (Default: True)
        precision (str): "fp32", "bf16" or "auto", the model's precision for scores. (Default: "fp32")
        progress (bool | str): a progress bar over the search's iterations (queries/s, ETA, pairs still
            attacked); a string names it. Not part of the config. (Default: False)
        confirm (int | None): fresh draws in a row on which a randomised model's decision must flip
            before a pair stops; 0 = the deterministic search (stop at the first flipped query).
            None = 8 (``CONFIRM``) for a model with ``randomized`` True, else 0. In the config
            for randomised models. (Default: None)

    Shape:
        - queries: (N, 3, H, W) in [0, 1], on the uint8 grid when rounding.
        - target: (N, D) gallery embeddings, is_same: (N,) bool, thresholds: (N,) or a scalar
          (required), each pair's clean threshold.
        - output: (N, 3, H, W) float32.

    Examples::
        >>> attack = Square(model, eps=4, n_queries=5000, seed=0)
        >>> x_adv = attack(queries, gallery_embeddings, is_same, thresholds, sample_seeds=seeds)
        >>> attack.last_stats["success_rate"], attack.last_stats["queries_mean"]
    """

    name = "square"
    accepts_start = False  # its own stripe initialisation
    needs_thresholds = True
    chunk = 256  # iterations whose random draws are made at once (fixed: part of the draw layout)
    CONFIRM = 8  # a randomised model's fresh draws in a row that must flip before a pair stops

    def __init__(self, model, eps: float = 4, n_queries: int = 5000, p_init: float = 0.1, objective=None,
                 seed: int | None = 0, round_output: bool = True, precision: str = "fp32",
                 progress: bool | str = False, confirm: int | None = None):
        super().__init__(model, eps, objective, seed, round_output, precision)
        self.progress = progress
        if int(n_queries) != n_queries or n_queries < 1:
            raise ValueError(f"n_queries must be an integer >= 1, got {n_queries}")
        if not 0 < p_init <= 1:
            raise ValueError(f"p_init must be in (0, 1], got {p_init}")
        self.n_queries = int(n_queries)
        self.p_init = float(p_init)
        if confirm is None:  # against a randomised model one lucky draw must not end a pair's search
            confirm = self.CONFIRM if self._randomized() else 0
        if int(confirm) != confirm or confirm < 0:
            raise ValueError(f"confirm must be an integer >= 0, got {confirm}")
        self.confirm = int(confirm)
        self._stats: dict | None = None

    def _config(self) -> dict:
        # confirm only on a randomised model or when set, so the keys of the attacks on deterministic ones stay
        return {"n_queries": self.n_queries, "p_init": self.p_init,
                **({"confirm": self.confirm} if self.confirm or self._randomized() else {})}

    def _randomized(self) -> bool:
        return bool(getattr(self.model, "randomized", False))

    def _final_steps(self) -> int:
        return self.n_queries

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        out = super().__call__(*args, **kwargs)
        # The base class multiplies every counter by a model's step_cost; only image passes scale.
        scale = getattr(self.model, "step_cost", 1)
        stats = dict(self._stats)
        stats["image_steps"] *= scale
        stats["image_steps_full"] *= scale
        self.last_stats, self._stats = stats, None
        return out

    # ------------------------------------------------------------------ the search

    def _window_side(self, it: int, h: int, w: int, schedule: int) -> int:
        p = p_selection(self.p_init, it, schedule)
        s = round(math.sqrt(p * h * w))
        return min(max(s, 1), min(h, w) - 1) if min(h, w) > 1 else 1

    @staticmethod
    def _cpu_stream(noise: SeededNoise, tag: str) -> SeededNoise:
        """``noise.fork(tag)`` drawn on CPU generators: device-independent, and sequential draws
        are prefixes of longer ones."""
        f = noise.fork(tag)
        return SeededNoise(f.n, torch.device("cpu"), f.seed, f.sample_seeds)

    def perturb(self, x0, target, is_same, thresholds, noise):
        if thresholds is None:
            raise ValueError("square needs each pair's clean threshold (thresholds=...): it minimises the "
                             "margin to it and stops a pair once its decision flips")
        n, c, h, w = x0.shape
        dev = x0.device
        if self.round_output:  # integers: every candidate is exactly what round_to_uint8_grid delivers
            base, step, top, div = torch.round(x0 * 255.0), float(math.floor(self.eps)), 255.0, 255.0
        else:
            base, step, top, div = x0, self.eps / 255.0, 1.0, 1.0

        def image(base_, sign_):
            return (base_ + sign_ * step).clamp_(0.0, top).div_(div)

        obj = self.objective
        # Query 1: vertical stripes, one sign per (channel, column).
        init = self._cpu_stream(noise, "square/init").rand((c, 1, w)).to(dev)
        sign = torch.where(init < 0.5, -1.0, 1.0).expand(n, c, h, w).contiguous()
        all_rows = torch.arange(n, device=dev)
        sim = self.score(image(base, sign), target, all_rows)
        done = obj.success(sim, is_same, thresholds)
        queries = torch.ones(n, dtype=torch.int64, device=dev)
        propose = _Proposals(self, self._cpu_stream(noise, "square/search"), (c, h, w), dev)
        if self.confirm:
            return self._search_randomized(image, base, sign, sim, target, is_same, thresholds, propose, queries,
                                           moves=step > 0)

        rows = all_rows[~done]  # full-batch positions of the pairs still attacked
        loss = obj.margin_loss(sim, is_same, thresholds)
        sign_a, base_a, tgt_a, same_a, thr_a, loss_a = select_rows(rows, sign, base, target, is_same, thresholds, loss)
        ran = 0  # iterations (queries after the first) made
        iterations = self.n_queries - 1 if step > 0 else 0
        bar = self._bar(iterations, rows.numel(), n)
        for it in range(iterations):
            if rows.numel() == 0:
                break
            bar.update(1)
            cand = propose(it, self.n_queries, rows, sign_a)
            sim = self.score(image(base_a, cand), tgt_a, rows)
            ran += 1
            cand_loss = obj.margin_loss(sim, same_a, thr_a)
            ok = obj.success(sim, same_a, thr_a)
            better = (cand_loss < loss_a) | ok
            sign_a = torch.where(better[:, None, None, None], cand, sign_a)
            loss_a = torch.where(better, cand_loss, loss_a)
            if bool(ok.any()):  # finished pairs leave the batch (one host sync per iteration)
                rows, (sign_a, base_a, tgt_a, same_a, thr_a, loss_a) = _retire(
                    ok, 1 + ran, rows, sign, done, queries, sign_a, base_a, tgt_a, same_a, thr_a, loss_a)
                bar.set_postfix(pairs=f"{rows.numel()}/{n}", refresh=False)
        self._finish(bar, 1 + ran, rows, sign, sign_a, queries, done)
        return image(base, sign)

    def _search_randomized(self, image, base, sign, sim, target, is_same, thresholds, propose, queries, moves):
        """The search against a randomised model (``confirm`` > 0): every iteration scores the
        incumbent and the candidate under the same fresh draw (two queries, one evaluation: the
        same seeds and draw index per pair), keeps the candidate if it is more adversarial under
        that draw (``objective.ascent_loss``, not clipped at the threshold: past it, further is
        safer), and stops a pair once its incumbent has flipped the decision on ``confirm`` fresh
        draws in a row (the draw that selected it not counted)."""
        obj, n = self.objective, base.shape[0]
        # Every pair still attacked has spent 1 + 2 * ran queries: the budget bounds the iterations.
        iterations = (self.n_queries - 1) // 2 if moves else 0
        streak = obj.success(sim, is_same, thresholds).long()  # the stripes were not selected: their draw counts
        done = torch.zeros(n, dtype=torch.bool, device=base.device)
        rows = torch.arange(n, device=base.device)
        sign_a, base_a, tgt_a, same_a, thr_a, streak_a = sign.clone(), base, target, is_same, thresholds, streak

        def doubled():  # incumbent and candidate of each pair in one evaluation: (rows, base, target, labels) x 2
            return [torch.cat([t, t]) for t in (rows, base_a, tgt_a, same_a)]

        rows2, base2, tgt2, same2 = doubled()
        ran = 0
        bar = self._bar(iterations, n, n)
        for it in range(iterations):
            if rows.numel() == 0:
                break
            bar.update(1)
            a = rows.numel()
            cand = propose(it, iterations + 1, rows, sign_a)
            sim = self.score(image(base2, torch.cat([sign_a, cand])), tgt2, rows2)
            ran += 1
            ascent = obj.ascent_loss(sim, same2)
            accept = ascent[a:] > ascent[:a]
            held = obj.success(sim[:a], same_a, thr_a)
            streak_a = torch.where(accept, 0, torch.where(held, streak_a + 1, 0))
            sign_a = torch.where(accept[:, None, None, None], cand, sign_a)
            ok = streak_a >= self.confirm
            if bool(ok.any()):
                rows, (sign_a, base_a, tgt_a, same_a, thr_a, streak_a) = _retire(
                    ok, 1 + 2 * ran, rows, sign, done, queries, sign_a, base_a, tgt_a, same_a, thr_a, streak_a)
                rows2, base2, tgt2, same2 = doubled()
                bar.set_postfix(pairs=f"{rows.numel()}/{n}", refresh=False)
        self._finish(bar, 1 + 2 * ran, rows, sign, sign_a, queries, done)
        return image(base, sign)

    def _bar(self, iterations: int, active: int, n: int):
        bar = tqdm(total=iterations, unit="query", leave=False, disable=not self.progress or not iterations,
                   desc=self.progress if isinstance(self.progress, str) else "square")
        bar.set_postfix(pairs=f"{active}/{n}")
        return bar

    def _finish(self, bar, spent: int, rows, sign, sign_a, queries: torch.Tensor, done: torch.Tensor) -> None:
        """The pairs still attacked write their signs and ``spent`` queries back; the call's statistics
        are recorded."""
        bar.close()
        sign.index_copy_(0, rows, sign_a)
        queries.index_fill_(0, rows, spent)
        n = queries.numel()
        q = queries.tolist()
        total = int(sum(q))
        self._stats = {"queries": q, "queries_total": total, "queries_mean": total / n,
                       "success": done.tolist(), "success_rate": float(done.float().mean()),
                       "image_steps": total, "image_steps_full": n * self.n_queries}
        self.last_stats = None  # set by __call__ (the base class would scale every entry)


def _retire(ok, spent, rows, sign, done, queries, sign_a, *state):
    """The active pairs marked ``ok`` (broken) leave the batch: their signs, success and ``spent``
    queries are written back at their full-batch positions ``rows``; returns the rows kept and the
    active state's rows kept (``sign_a`` first)."""
    gone = rows[ok]
    sign.index_copy_(0, gone, sign_a[ok])
    done.index_fill_(0, gone, True)
    queries.index_fill_(0, gone, spent)
    keep = (~ok).nonzero().squeeze(1)
    return rows.index_select(0, keep), select_rows(keep, sign_a, *state)


class _Proposals:
    """The random search's candidates: at iteration ``it`` of a ``schedule``-iteration search, a
    square window (side from the p schedule, uniform position) whose channels each take one uniform
    sign, never the pattern the window already has. Draws come in chunks of ``Square.chunk``
    iterations for every pair of the call, so a pair's candidates depend on its own seed only."""

    def __init__(self, attack: Square, stream: SeededNoise, shape: tuple[int, int, int], dev: torch.device):
        self.attack, self.stream, self.dev = attack, stream, dev
        self.c, self.h, self.w = shape
        # The 2^c sign patterns of a window (one sign per channel): pattern k has +1 where bit c of k is set.
        bits = torch.arange(self.c, device=dev)
        self.patterns = ((torch.arange(2 ** self.c, device=dev)[:, None] >> bits) & 1).float().mul_(2).sub_(1)
        self.pow2 = (2 ** bits).float()
        self.bands: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # side -> row/column masks by window start

    def _band(self, size: int, side: int) -> torch.Tensor:  # (size - side + 1, size): row t marks t .. t + side - 1
        ar = torch.arange(size, device=self.dev)
        return (ar[None, :] >= ar[: size - side + 1, None]) & (ar[None, :] < ar[: size - side + 1, None] + side)

    def __call__(self, it: int, schedule: int, rows: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
        c, h, w, chunk = self.c, self.h, self.w, self.attack.chunk
        j = it % chunk
        if j == 0:  # the next chunk's draws, for every pair of the call: (N, chunk, 3) uniforms
            u = self.stream.rand((chunk, 3)).to(self.dev)
            self.side_list = [self.attack._window_side(it + k, h, w, schedule) for k in range(chunk)]
            sides = torch.tensor(self.side_list, device=self.dev)
            # window start row / column: uniform over every position inside the image
            start_h = torch.minimum((u[..., 0] * (h - sides + 1)).long(), h - sides)
            start_w = torch.minimum((u[..., 1] * (w - sides + 1)).long(), w - sides)
            self.starts, self.pattern_u = torch.stack([start_h, start_w], dim=-1), u[..., 2]
        s = self.side_list[j]
        if s not in self.bands:
            self.bands[s] = self._band(h, s), self._band(w, s)
        d = self.starts[:, j].index_select(0, rows)  # (a, 2)
        window = (self.bands[s][0].index_select(0, d[:, 0])[:, None, :, None]
                  & self.bands[s][1].index_select(0, d[:, 1])[:, None, None, :])  # (a, 1, h, w)
        # A pattern the window already has everywhere would change nothing: it is not drawn.
        wsum = (sign * window).sum(dim=(2, 3))  # (a, c)
        uniform = (wsum.abs() == s * s).all(dim=1)
        current = ((wsum > 0).float() @ self.pow2).long()
        choices = 2 ** c - uniform.long()
        pick = torch.minimum((self.pattern_u[:, j].index_select(0, rows) * choices).long(), choices - 1)
        pick += uniform & (pick >= current)
        return torch.where(window, self.patterns.index_select(0, pick)[:, :, None, None], sign)

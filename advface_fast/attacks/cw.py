"""Carlini-Wagner attacks on verification: an L-inf-bounded margin attack and the L2 tanh-space one."""

from __future__ import annotations

import torch

from advface_fast.attacks.active_set import select_rows, split_finished
from advface_fast.attacks.base import Attack, check_record_steps
from advface_fast.kernels import cw_step

# Box for the tanh-space variable w: tanh(±10) is ±1 in float32, so the clamp never binds in
# practice; it only keeps Adam from walking w off into regions with zero gradient.
_W_LIMIT = 10.0
# Clean pixels are pulled this far inside (0, 1) so atanh stays finite.
_TANH_EDGE = 1e-6


class CW(Attack):
    r"""
    The margin attack of 'Towards Evaluating the Robustness of Neural Networks'
    (Carlini & Wagner, IEEE S&P 2017) [https://arxiv.org/abs/1608.04644], L-inf bounded:
    Adam on the image minimising the objective's ``margin_loss`` against each pair's clean
    threshold, projected onto the eps-box (and [0, 1]) after every step.

    Distance Measure : Linf

    The Adam update and the projection are fused in ``advface_fast.kernels.cw_step``. A pair
    whose margin is met (loss 0: flipped by at least ``kappa``) is frozen at that iterate: its
    gradient is zeroed and its image restored after each step, all batched with a ``done``
    mask. Done pairs then leave the batch (active-set compaction, ``compact_every`` steps apart,
    one host sync each): the remaining rows, with their Adam state, are ``index_select``-ed
    into a smaller batch, so the model stops computing pairs that are finished; the loop ends
    when every pair is done. This changes no pair's algorithm, only which rows share a batch
    (float results can differ at the rounding level where the model's kernels depend on the
    batch size). With ``compact = False`` the old behaviour: frozen rows stay in the batch and
    the loop stops when all are done (checked every 10 steps). Each pair delivers its best
    iterate (lowest margin loss seen), which is the frozen one for pairs that succeeded. NaN
    gradient entries are set to 0. Every call sets ``last_stats = {"image_steps",
    "image_steps_full"}`` (forward + backward image passes computed, and N * steps); the
    forward-only pass that scores the last update is not counted.

    ``kappa`` > 0 keeps the flip alive through the final uint8 rounding, which moves cosine
    similarities by about 0.005 on average and up to about 0.02 (dlib-resnet, lfw_ci chips);
    with kappa = 0 a loss of 0 at ``s == tau`` would not even be a success for a mismatched pair
    (the rule is strict). Defaults, measured on the 40 lfw_ci pairs at eps=2 (the harder
    budget): kappa 0 / 0.01 / 0.02 / 0.05 kept 32 / 36 / 38 / 38 of 38 float successes after
    rounding; 20 / 40 / 80 steps gave 37 / 38 / 38 successes; lr eps/8, eps/4, eps/2 gave
    37 / 38 / 38. At eps=4 all 40 pairs flip with the defaults.

    Iterates at several step counts. ``record_steps=(10, 20)`` with ``steps=40`` keeps, from ONE
    run, what a separate 10- and 20-step run would deliver (``last_iterates``): each pair's best
    iterate among the first k updates. ``lr`` does not depend on ``steps`` and Adam's bias
    correction depends on the step index only, so the k-step prefix of the run IS the k-step run
    (the score of the k-th update is the loss computed at the start of step k + 1).

    Label-free objectives (a defense's C&W). Without thresholds their margin loss is the
    distance still to go (away-from-self: ``1 + s``), never zero: C&W is then Adam minimising the
    similarity to the clean embedding within the budget for all ``steps`` steps. The
    away-from-self gradient vanishes at the clean image (it is float noise there, which Adam
    would normalise into full-size steps), so such a C&W wants ``random_start=True``: start
    uniformly in the eps-box, seeded like PGD's start (the start then counts as iterate 0).

    Arguments:
        model (nn.Module): embedding model, N x 3 x H x W in [0, 1] -> N x D.
        eps (float): L-inf budget in 0-255 pixel units. (Default: 4)
        steps (int): Adam steps. (Default: 40)
        lr (float): Adam step size in 0-255 units. (Default: eps / 4)
        kappa (float): required margin past the threshold, in similarity units. (Default: 0.02)
        objective (Objective | str | dict): similarity and margin. (Default: verification, cosine)
        seed (int | None): seed of the random start (unused without it). (Default: 0)
        round_output (bool): deliver the uint8-grid image. (Default: True)
        record_steps (tuple[int]): step counts whose results to keep (see above). (Default: ())
        random_start (bool): start uniformly in the eps-box, not at x0. (Default: False)

    Shape:
        - queries: (N, 3, H, W) in [0, 1], on the uint8 grid when rounding.
        - target: (N, D) gallery embeddings (verification) or None (label-free objectives),
          is_same: (N,) bool (verification), thresholds: (N,) REQUIRED with verification.
        - output: (N, 3, H, W) float32.

    Examples::
        >>> attack = CW(model, eps=4, steps=40, kappa=0.02)
        >>> x_adv = attack(queries, gallery_embeddings, is_same, thresholds)
    """

    name = "cw"
    needs_thresholds = True
    check_every = 10  # without compaction: steps between host-side "all pairs done?" checks
    compact = True  # finished pairs leave the batch (active-set compaction)
    compact_every = 1  # steps between compactions (one host sync each)

    def __init__(self, model, eps: float = 4, steps: int = 40, lr: float | None = None, kappa: float = 0.02,
                 objective=None, seed: int | None = 0, round_output: bool = True, precision: str = "fp32",
                 record_steps=(), random_start: bool = False):
        super().__init__(model, eps, objective, seed, round_output, precision)
        self.random_start = bool(random_start)
        if steps < 0 or kappa < 0:
            raise ValueError(f"need steps >= 0 and kappa >= 0, got steps={steps}, kappa={kappa}")
        self.steps = int(steps)
        self.lr = eps / 4 if lr is None else lr
        self.kappa = float(kappa)
        self.record_steps = check_record_steps(record_steps, self.steps)

    def _config(self) -> dict:
        config = {"steps": self.steps, "lr": self.lr, "kappa": self.kappa}
        if self.random_start:  # only when on, so default configs are unchanged
            config["random_start"] = True
        return config

    def perturb(self, x0, target, is_same, thresholds, noise):
        n = x0.shape[0]
        lo, hi = self._eps_box(x0)
        lr = self.lr / 255.0
        x = self._start(x0, lo, hi, noise)
        m, v = torch.zeros_like(x), torch.zeros_like(x)
        best_x = x.clone()
        best_loss = torch.full((n,), float("inf"), device=x0.device)
        done = torch.zeros(n, dtype=torch.bool, device=x0.device)
        out = x0.clone()  # the full-size result: rows that left the batch are written here
        rows = torch.arange(n, device=x0.device)  # full-batch positions of the rows in the batch
        record = {k for k in self.record_steps if k < self.steps}
        iterates: dict[int, torch.Tensor] = {}

        def snapshot():  # every pair's best so far, full size
            return out.index_copy(0, rows, best_x)

        image_steps = 0
        for step in range(1, self.steps + 1):
            margin = _margin_fn(self.objective, is_same, thresholds, self.kappa)
            grad, sim = self.loss_and_grad(x, target, margin, rows)
            image_steps += x.shape[0]
            loss = margin(sim)
            best_x, best_loss = _keep_lower(x, loss, best_x, best_loss)
            if step - 1 in record:  # best among the first step-1 updates: the (step-1)-step run's result
                iterates[step - 1] = snapshot()
            done |= loss <= 0
            frozen = done.view(-1, 1, 1, 1)
            grad.masked_fill_(frozen, 0.0)
            cw_step(x, grad, m, v, step, lr, lo, hi)  # in place, Adam + projection
            x.copy_(torch.where(frozen, best_x, x))  # frozen pairs do not drift on momentum
            if self.compact and step % self.compact_every == 0:
                keep, gone = split_finished(done)  # the host sync
                if gone.numel() == 0:
                    continue
                out.index_copy_(0, rows.index_select(0, gone), best_x.index_select(0, gone))
                rows = rows.index_select(0, keep)
                if rows.numel() == 0:
                    break
                # Every row's Adam state, box and target travel with it: the rows left compute
                # exactly what they computed in the full batch (up to the model's batch-size
                # dependent float rounding).
                x, m, v, lo, hi, best_x, best_loss, done, target, is_same, thresholds = select_rows(
                    keep, x, m, v, lo, hi, best_x, best_loss, done, target, is_same, thresholds)
            elif not self.compact and step % self.check_every == 0 and bool(done.all()):
                break
        if rows.numel():
            loss = _margin_fn(self.objective, is_same, thresholds, self.kappa)(self.score(x, target, rows))
            best_x, _ = _keep_lower(x, loss, best_x, best_loss)  # the last update has not been scored yet
            out.index_copy_(0, rows, best_x)
        self.last_stats = {"image_steps": image_steps, "image_steps_full": n * self.steps}
        # Counts not reached because every pair finished earlier: nothing changed after that.
        self._recorded = {**{k: out for k in self.record_steps if k != self.steps}, **iterates}
        return out


class CWL2(Attack):
    r"""
    The L2 attack of 'Towards Evaluating the Robustness of Neural Networks'
    (Carlini & Wagner, IEEE S&P 2017) [https://arxiv.org/abs/1608.04644], on verification:
    in tanh space ``x = (tanh(w) + 1) / 2`` minimise ``||x - x0||_2^2 + c * margin_loss``
    with Adam (the fused ``cw_step`` kernel), and binary-search ``c`` per pair.

    Distance Measure : L2 (NOT eps-bounded: the perturbation is as large as it needs to be;
    ``config()["eps"]`` is None and rounding only clamps to [0, 255].)

    ``search_steps`` rounds, each restarting from the clean query with a fresh Adam state and
    ``steps`` iterations. After a round, a pair that succeeded (margin loss 0 at some iterate)
    lowers its ``c`` to the midpoint of its bracket; one that failed raises it (x10 while no
    upper bound is known). Each pair delivers its smallest-L2 successful iterate over all rounds;
    a pair that never succeeded delivers its lowest-margin iterate. NaN gradients are set to 0.
    Distances are measured in [0, 1] pixel units on the float iterate, before rounding.

    Arguments:
        model (nn.Module): embedding model, N x 3 x H x W in [0, 1] -> N x D.
        steps (int): Adam steps per search round; 100 gave only ~1% smaller L2 than 50 on
            16 lfw_ci pairs at twice the cost. (Default: 50)
        search_steps (int): binary-search rounds over c; 1 = fixed c. (Default: 5)
        c_init (float): initial trade-off constant; on 16 lfw_ci pairs c_init 1 and 10 end at
            the same L2 after 5 rounds, 10 needs fewer rounds to first succeed. (Default: 10)
        lr (float): Adam step size in tanh space (w units). (Default: 0.01)
        kappa (float): required margin past the threshold, in similarity units. (Default: 0.02)
        objective (Objective | str | dict): similarity and margin. (Default: verification, cosine)
        seed (int | None): unused, kept for a uniform signature. (Default: 0)
        round_output (bool): deliver the uint8-grid image. (Default: True)

    Shape:
        - queries: (N, 3, H, W) in [0, 1], on the uint8 grid when rounding.
        - target: (N, D) gallery embeddings (verification) or None (label-free objectives),
          is_same: (N,) bool (verification), thresholds: (N,) REQUIRED with verification.
        - output: (N, 3, H, W) float32.

    Examples::
        >>> attack = CWL2(model, steps=50, search_steps=5, c_init=10.0)
        >>> x_adv = attack(queries, gallery_embeddings, is_same, thresholds)
    """

    name = "cw-l2"
    needs_thresholds = True

    def __init__(self, model, steps: int = 50, search_steps: int = 5, c_init: float = 10.0, lr: float = 0.01,
                 kappa: float = 0.02, objective=None, seed: int | None = 0, round_output: bool = True,
                 eps: None = None, precision: str = "fp32"):
        if eps is not None:  # accepted only so that make_attack(**config()) round-trips
            raise ValueError("CWL2 is not eps-bounded; use CW for an L-inf budget")
        super().__init__(model, None, objective, seed, round_output, precision)
        if steps < 1 or search_steps < 1 or c_init <= 0 or kappa < 0:
            raise ValueError("need steps >= 1, search_steps >= 1, c_init > 0, kappa >= 0")
        self.steps = int(steps)
        self.search_steps = int(search_steps)
        self.c_init = float(c_init)
        self.lr = float(lr)
        self.kappa = float(kappa)

    def _config(self) -> dict:
        return {"steps": self.steps, "search_steps": self.search_steps, "c_init": self.c_init,
                "lr": self.lr, "kappa": self.kappa}

    def perturb(self, x0, target, is_same, thresholds, noise):
        n, device = x0.shape[0], x0.device
        w0 = torch.atanh(x0.clamp(_TANH_EDGE, 1.0 - _TANH_EDGE) * 2.0 - 1.0)
        w_lo, w_hi = torch.full_like(w0, -_W_LIMIT), torch.full_like(w0, _W_LIMIT)
        c = torch.full((n,), self.c_init, device=device)
        c_lo = torch.zeros(n, device=device)
        c_hi = torch.full((n,), float("inf"), device=device)
        inf = torch.full((n,), float("inf"), device=device)
        best_l2, best_l2_x = inf.clone(), x0.clone()  # smallest successful perturbation
        best_margin, best_margin_x = inf.clone(), x0.clone()  # fallback: most adversarial
        margin_fn = _margin_fn(self.objective, is_same, thresholds, self.kappa)
        for _ in range(self.search_steps):
            w = w0.clone()
            m, v = torch.zeros_like(w), torch.zeros_like(w)
            succeeded = torch.zeros(n, dtype=torch.bool, device=device)
            for step in range(1, self.steps + 2):
                t = torch.tanh(w)
                x = (t + 1.0) * 0.5
                dist = (x - x0).square().flatten(1).sum(dim=1)
                if step <= self.steps:
                    # The model's part through the hook (so BPDA / EOT apply), the distance's
                    # part and the tanh chain rule by hand: d/dw = (d/dx) * (1 - tanh^2) / 2.
                    grad_x, sim = self.loss_and_grad(x, target, lambda s, c=c: c * margin_fn(s))
                    grad = (grad_x + 2.0 * (x - x0)).mul_((1.0 - t * t) * 0.5)
                else:  # the extra pass only scores the last update
                    sim = self.score(x, target)
                margin = margin_fn(sim)
                hit = margin <= 0
                succeeded |= hit
                smaller = hit & (dist < best_l2)
                best_l2_x = torch.where(smaller.view(-1, 1, 1, 1), x, best_l2_x)
                best_l2 = torch.where(smaller, dist, best_l2)
                best_margin_x, best_margin = _keep_lower(x, margin, best_margin_x, best_margin)
                if step <= self.steps:
                    cw_step(w, grad.contiguous(), m, v, step, self.lr, w_lo, w_hi)
            # Binary search on c, per pair: success -> smaller c, failure -> larger c.
            c_hi = torch.where(succeeded, torch.minimum(c_hi, c), c_hi)
            c_lo = torch.where(succeeded, c_lo, torch.maximum(c_lo, c))
            c = torch.where(torch.isinf(c_hi), c * 10.0, (c_lo + c_hi) * 0.5)
        cost = n * self.steps * self.search_steps  # forward + backward passes; scoring passes not counted
        self.last_stats = {"image_steps": cost, "image_steps_full": cost}
        found = torch.isfinite(best_l2).view(-1, 1, 1, 1)
        return torch.where(found, best_l2_x, best_margin_x)


def _margin_fn(objective, is_same, thresholds, kappa):
    """similarities -> the objective's margin loss for these rows (what C&W minimises)."""
    return lambda sim: objective.margin_loss(sim, is_same, thresholds, kappa)


def _keep_lower(x, loss, best_x, best_loss):
    """Per pair, keep (x, loss) where loss is strictly lower than the best so far."""
    better = loss < best_loss
    return torch.where(better.view(-1, 1, 1, 1), x, best_x), torch.where(better, loss, best_loss)

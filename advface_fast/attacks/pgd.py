"""PGD: projected gradient ascent under an L-inf budget."""

from __future__ import annotations

import torch

from advface_fast.attacks.active_set import select_rows, split_finished
from advface_fast.attacks.base import Attack, check_record_steps
from advface_fast.kernels import pgd_step


class PGD(Attack):
    r"""
    PGD in the paper 'Towards Deep Learning Models Resistant to Adversarial Attacks'
    (Madry et al., ICLR 2018) [https://arxiv.org/abs/1706.06083], on face verification.

    Distance Measure : Linf

    Each step ascends the objective's ``ascent_loss`` (dodging for matched pairs,
    impersonation for mismatched) by ``alpha * sign(grad)`` and projects onto the eps-box
    intersected with the image box, fused in ``advface_fast.kernels.pgd_step``. NaN gradient
    entries are set to 0 before the step (those pixels stay put). With ``restarts > 1`` every
    restart begins at a fresh random start and each pair keeps the final iterate of the restart
    with the highest ascent loss (the most adversarial one).

    Early stop (opt-in, for "accuracy after attack" only). With ``early_stop=True`` a pair is
    finished as soon as the similarity scored at its current iterate is past its clean threshold
    by ``early_stop_margin`` (``margin_loss(sim, is_same, thresholds, kappa=margin) == 0``): that
    iterate becomes its result and the pair leaves the batch (active-set compaction: the still
    active rows are ``index_select``-ed into a smaller batch, so the model computes less). Pairs
    that never finish get the full run's iterate (exactly, up to the model's batch-size
    dependent float rounding, since their batch mates change). A pair finished in one restart
    is not restarted; at the end of a restart the scoring pass also finishes pairs past the
    margin. Random starts are drawn for all N pairs, so every pair's start is the full run's.
    NEVER use early stop for queries that later feed a defense: the delivered perturbation only
    just crosses the threshold (by the margin) and is much weaker than the budget allows, so a
    defense evaluated on it would look better than it is. The margin (default 0.05, cosine) is
    there to survive the uint8 rounding, which moves dlib-resnet cosine similarities by up to
    about 0.02 (and the error of bf16 similarities): a finished pair stays a success after
    rounding, so accuracy after attack is not higher than the full run's (on 64 lfw_ci pairs,
    PGD-40 at eps 2 and 4 and PGD-10 at eps 1 and 2: the same decisions for every pair).
    Thresholds are required when early stop is on.

    Iterates at several step counts. ``record_steps=(10, 20, 40)`` with ``steps=40`` keeps, from
    ONE run, the iterate after 10, 20 and 40 steps (``last_iterates``, rounded like the output).
    The step size ``alpha`` does not depend on ``steps`` (default eps / 4), and the random start
    is drawn before the first step, so the iterate recorded at k is exactly what a separate
    k-step run with the same seed delivers (the paper's "iterations" columns are one run
    observed at several iteration counts). With ``restarts > 1`` each recorded count keeps, per
    pair, its best restart at that count (one extra forward pass per restart and count). Not
    with early stop.

    Best iterate (``best_iterate=True``, opt-in). Sign-PGD does not ascend monotonically: against
    a randomised defense (EOT) the last iterate can be worse than an earlier one, and a warm start
    can be walked away from. With ``best_iterate`` each pair delivers the iterate with the highest
    loss the attack itself scored (the loss at x_t comes with the gradient taken there; the final
    iterate of each restart costs one extra forward pass), over all steps and restarts, the start
    included, as APGD keeps its best point (Croce & Hein, 2020). Against a randomised defense
    that loss is the attacker's own EOT estimate, not the defender's draw. Not with early stop or
    ``record_steps`` (the extra scoring passes would shift the draws of later steps).

    High confidence (``kappa``). By default PGD ascends the unbounded ``ascent_loss``: it pushes
    every pair as far past its threshold as the budget and steps allow. With ``kappa`` set it
    ascends ``-margin_loss(s, ..., kappa)`` instead (the C&W margin): a pair stops being pushed
    (zero gradient, so sign-PGD leaves it where it is) once it is ``kappa`` past its clean
    threshold, in similarity units. A kappa sweep therefore controls how far past the boundary
    the delivered queries are; kappa needs thresholds. ``kappa=None`` is the limit of large kappa.

    Cost. Every call sets ``last_stats = {"image_steps", "image_steps_full"}``: the forward +
    backward image passes actually computed, and what the full run costs (N * steps * restarts).
    The forward-only scoring pass at the end of each restart (restarts > 1) is not counted.

    Arguments:
        model (nn.Module): embedding model, N x 3 x H x W in [0, 1] -> N x D.
        eps (float): L-inf budget in 0-255 pixel units. (Default: 4)
        alpha (float): step size in 0-255 units. (Default: eps / 4)
        steps (int): number of steps per restart. (Default: 40)
        restarts (int): random restarts, best per pair kept. (Default: 1)
        random_start (bool): start uniformly in the eps-box (clamped to [0, 1]). (Default: True)
        objective (Objective | str | dict): what to ascend. (Default: verification, cosine)
        seed (int | None): seed of the random start. (Default: 0)
        round_output (bool): deliver the uint8-grid image. (Default: True)
        early_stop (bool): finish pairs past their threshold by the margin (see above). (Default: False)
        early_stop_margin (float): that margin, in similarity units. (Default: 0.05)
        kappa (float | None): stop pushing a pair this far past its threshold (see above);
            None = unbounded ascent. (Default: None)
        record_steps (tuple[int]): step counts whose iterates to keep (see above). (Default: ())
        best_iterate (bool): deliver each pair's highest-loss iterate, not the last (see above). (Default: False)
        precision (str): "fp32", "bf16" or "auto", the model's precision for gradients. (Default: "fp32")

    Shape:
        - queries: (N, 3, H, W) in [0, 1], on the uint8 grid when rounding.
        - target: (N, D) gallery embeddings (verification) or None (label-free objectives),
          is_same: (N,) bool (verification), thresholds: (N,) or None (unused unless early_stop
          or kappa; then required by the verification objective).
        - output: (N, 3, H, W) float32.

    Examples::
        >>> attack = PGD(model, eps=4, steps=40, objective={"name": "verification", "metric": "cosine"}, seed=0)
        >>> x_adv = attack(queries, gallery_embeddings, is_same, thresholds)
        >>> defense = PGD(model, eps=4, steps=40, objective="away-from-self", record_steps=(10, 20))
        >>> x_40 = defense(images, sample_seeds=seeds); x_10 = defense.last_iterates[10]
    """

    name = "pgd"
    # Steps between active-set compactions (each needs one host sync). 1 was cheapest on CPU
    # (no sync cost; any k > 1 keeps computing finished rows until the next compaction).
    compact_every = 1

    def __init__(self, model, eps: float = 4, alpha: float | None = None, steps: int = 40, restarts: int = 1,
                 random_start: bool = True, objective=None, seed: int | None = 0, round_output: bool = True,
                 early_stop: bool = False, early_stop_margin: float = 0.05, precision: str = "fp32",
                 kappa: float | None = None, record_steps=(), best_iterate: bool = False):
        super().__init__(model, eps, objective, seed, round_output, precision)
        if steps < 0 or restarts < 1:
            raise ValueError(f"need steps >= 0 and restarts >= 1, got steps={steps}, restarts={restarts}")
        if not early_stop_margin >= 0:
            raise ValueError(f"early_stop_margin must be >= 0 (similarity units), got {early_stop_margin}")
        if kappa is not None and not kappa >= 0:
            raise ValueError(f"kappa must be >= 0 (similarity units) or None, got {kappa}")
        self.early_stop = bool(early_stop)
        self.early_stop_margin = float(early_stop_margin)
        self.kappa = None if kappa is None else float(kappa)
        self.needs_thresholds = self.early_stop or self.kappa is not None
        self.alpha = eps / 4 if alpha is None else alpha
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.random_start = bool(random_start)
        self.record_steps = check_record_steps(record_steps, self.steps)
        self.best_iterate = bool(best_iterate)
        if self.best_iterate and (self.early_stop or self.record_steps):
            raise ValueError("best_iterate cannot be combined with early_stop or record_steps")
        if self.record_steps and self.early_stop:
            raise ValueError("record_steps cannot be combined with early_stop (early-stopped iterates "
                             "are not the iterates of a fixed step count)")

    def _config(self) -> dict:
        # record_steps is not part of the config: it adds observations, it changes no result.
        config = {"alpha": self.alpha, "steps": self.steps, "restarts": self.restarts,
                  "random_start": self.random_start}
        if self.early_stop:  # only when on, so the default config (and cache keys built from it) is unchanged
            config.update(early_stop=True, early_stop_margin=self.early_stop_margin)
        if self.kappa is not None:
            config["kappa"] = self.kappa
        if self.best_iterate:
            config["best_iterate"] = True
        return config

    def _threshold_user(self) -> str:
        return "PGD(early_stop=True)" if self.early_stop else f"PGD(kappa={self.kappa})"

    def _loss_fn(self, is_same, thresholds):
        """What the steps ascend: the objective's ascent loss, or minus its kappa-margin."""
        if self.kappa is None:
            return lambda sim: self.objective.ascent_loss(sim, is_same)
        return lambda sim: -self.objective.margin_loss(sim, is_same, thresholds, self.kappa)

    def perturb(self, x0, target, is_same, thresholds, noise):
        if self.early_stop:
            return self._perturb_early_stop(x0, target, is_same, thresholds, noise)
        if self.best_iterate:
            return self._perturb_best_iterate(x0, target, is_same, thresholds, noise)
        full_cost = x0.shape[0] * self.steps * self.restarts
        self.last_stats = {"image_steps": full_cost, "image_steps_full": full_cost}
        lo, hi = self._eps_box(x0)
        alpha = self.alpha / 255.0
        loss_fn = self._loss_fn(is_same, thresholds)
        record = set(self.record_steps) | {self.steps}
        best: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # step count -> (best x, its loss)

        def observe(k, x):
            if self.restarts == 1:
                best[k] = (x.clone(), None)
                return
            loss = loss_fn(self.score(x, target))
            if k not in best:
                best[k] = (x.clone(), loss)
                return
            better = loss > best[k][1]
            best[k] = (torch.where(better.view(-1, 1, 1, 1), x, best[k][0]), torch.where(better, loss, best[k][1]))

        for _ in range(self.restarts):
            x = self._start(x0, lo, hi, noise)
            if 0 in record:
                observe(0, x)
            for step in range(1, self.steps + 1):
                grad, _ = self.loss_and_grad(x, target, loss_fn)
                pgd_step(x, grad, lo, hi, alpha, overwrite_grad=True)  # in place: x <- clamp(x + alpha*sign(grad), lo, hi)
                if step in record:
                    observe(step, x)
        self._recorded = {k: v[0] for k, v in best.items() if k != self.steps}
        return best[self.steps][0]

    def _perturb_best_iterate(self, x0, target, is_same, thresholds, noise):
        """PGD whose result is, per pair, the highest-loss iterate it scored (see "Best iterate")."""
        n = x0.shape[0]
        lo, hi = self._eps_box(x0)
        alpha = self.alpha / 255.0
        loss_fn = self._loss_fn(is_same, thresholds)
        best_x, best_loss = x0.clone(), torch.full((n,), float("-inf"), device=x0.device)

        def keep(x, loss):
            nonlocal best_x, best_loss
            better = loss > best_loss
            best_x = torch.where(better.view(-1, 1, 1, 1), x, best_x)
            best_loss = torch.where(better, loss, best_loss)

        for _ in range(self.restarts):
            x = self._start(x0, lo, hi, noise)
            for _step in range(self.steps):
                grad, sim = self.loss_and_grad(x, target, loss_fn)
                keep(x, loss_fn(sim).detach())  # the loss at x, before x moves (in place) below
                pgd_step(x, grad, lo, hi, alpha, overwrite_grad=True)
            keep(x, loss_fn(self.score(x, target)))
        self.last_stats = {"image_steps": n * self.steps * self.restarts, "image_steps_full": n * self.steps * self.restarts}
        return best_x

    def _perturb_early_stop(self, x0, gallery, is_same, thresholds, noise):
        """PGD that drops pairs from the batch once they are past their threshold by the margin."""
        if thresholds is None and self.objective.margin_needs_thresholds:
            raise ValueError("PGD(early_stop=True) needs each pair's clean threshold (thresholds=...) "
                             "to know when a pair is finished")
        n = x0.shape[0]
        lo, hi = self._eps_box(x0)
        alpha = self.alpha / 255.0
        out = x0.clone()  # each pair's result, written when it finishes or its restart ends
        best_loss = torch.full((n,), float("-inf"), device=x0.device)  # across restarts, unfinished pairs
        active = torch.arange(n, device=x0.device)  # full-batch positions of the pairs still attacked
        image_steps = 0
        for _ in range(self.restarts):
            if active.numel() == 0:
                break
            start = self._start(x0, lo, hi, noise)  # drawn for all N: each pair's start is the full run's
            rows = active
            x, lo_a, hi_a, gallery_a, same_a, thr_a = select_rows(rows, start, lo, hi, gallery, is_same, thresholds)
            finished = torch.zeros(rows.numel(), dtype=torch.bool, device=x0.device)
            for step in range(1, self.steps + 1):
                grad, sim = self.loss_and_grad(x, gallery_a, self._loss_fn(same_a, thr_a), rows)
                image_steps += x.shape[0]
                finished |= self.objective.margin_loss(sim, same_a, thr_a, self.early_stop_margin) <= 0
                # A zero gradient is a zero step: finished rows stay at the iterate just scored
                # until the next compaction removes them (only matters for compact_every > 1).
                grad.masked_fill_(finished.view(-1, 1, 1, 1), 0.0)
                pgd_step(x, grad, lo_a, hi_a, alpha, overwrite_grad=True)
                if step % self.compact_every and step < self.steps:
                    continue
                keep, gone = split_finished(finished)  # the host sync
                if gone.numel() == 0:
                    continue
                out.index_copy_(0, rows.index_select(0, gone), x.index_select(0, gone))
                rows = rows.index_select(0, keep)
                if rows.numel() == 0:
                    break
                x, lo_a, hi_a, gallery_a, same_a, thr_a = select_rows(keep, x, lo_a, hi_a, gallery_a, same_a, thr_a)
                finished = finished.index_select(0, keep)
            if rows.numel() == 0:
                active = rows
                continue
            if self.restarts == 1:  # unfinished pairs: the full run's final iterate
                out.index_copy_(0, rows, x)
                break
            sim = self.score(x, gallery_a, rows)
            loss = self._loss_fn(same_a, thr_a)(sim)
            met = self.objective.margin_loss(sim, same_a, thr_a, self.early_stop_margin) <= 0
            better = (loss > best_loss.index_select(0, rows)) | met
            kept = torch.where(better.view(-1, 1, 1, 1), x, out.index_select(0, rows))
            out.index_copy_(0, rows, kept)
            best_loss.index_copy_(0, rows, torch.where(better, loss, best_loss.index_select(0, rows)))
            keep, _ = split_finished(met)  # a pair past the margin now is not restarted
            active = rows.index_select(0, keep)
        self.last_stats = {"image_steps": image_steps, "image_steps_full": n * self.steps * self.restarts}
        return out

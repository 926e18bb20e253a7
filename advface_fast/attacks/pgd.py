"""PGD: projected gradient ascent under an L-inf budget."""

from __future__ import annotations

import torch

from advface_fast.attacks.base import Attack
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

    Arguments:
        model (nn.Module): embedding model, N x 3 x H x W in [0, 1] -> N x D.
        eps (float): L-inf budget in 0-255 pixel units. (Default: 4)
        alpha (float): step size in 0-255 units. (Default: eps / 4)
        steps (int): number of steps per restart. (Default: 40)
        restarts (int): random restarts, best per pair kept. (Default: 1)
        random_start (bool): start uniformly in the eps-box (clamped to [0, 1]). (Default: True)
        objective (VerificationObjective): what to ascend. (Default: cosine)
        seed (int | None): seed of the random start. (Default: 0)
        round_output (bool): deliver the uint8-grid image. (Default: True)

    Shape:
        - queries: (N, 3, H, W) in [0, 1], on the uint8 grid when rounding.
        - gallery_embeddings: (N, D), is_same: (N,) bool, thresholds: (N,) or None (unused).
        - output: (N, 3, H, W) float32.

    Examples::
        >>> attack = PGD(model, eps=4, steps=40, objective=VerificationObjective("cosine"), seed=0)
        >>> x_adv = attack(queries, gallery_embeddings, is_same, thresholds)
    """

    name = "pgd"

    def __init__(self, model, eps: float = 4, alpha: float | None = None, steps: int = 40, restarts: int = 1,
                 random_start: bool = True, objective=None, seed: int | None = 0, round_output: bool = True):
        super().__init__(model, eps, objective, seed, round_output)
        if steps < 0 or restarts < 1:
            raise ValueError(f"need steps >= 0 and restarts >= 1, got steps={steps}, restarts={restarts}")
        self.alpha = eps / 4 if alpha is None else alpha
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.random_start = bool(random_start)

    def _config(self) -> dict:
        return {"alpha": self.alpha, "steps": self.steps, "restarts": self.restarts,
                "random_start": self.random_start}

    def perturb(self, x0, gallery, is_same, thresholds, noise):
        lo, hi = self._eps_box(x0)
        alpha = self.alpha / 255.0
        best_x, best_loss = None, None
        for _ in range(self.restarts):
            x = self._start(x0, lo, hi, noise)
            for _ in range(self.steps):
                grad, _ = self._ascent_gradient(x, gallery, is_same)
                pgd_step(x, grad, lo, hi, alpha)  # in place: x <- clamp(x + alpha*sign(grad), lo, hi)
            if self.restarts == 1:
                return x
            with torch.no_grad():
                loss = self.objective.ascent_loss(self._similarity(x, gallery), is_same)
            if best_x is None:
                best_x, best_loss = x, loss
            else:
                better = loss > best_loss
                best_x = torch.where(better.view(-1, 1, 1, 1), x, best_x)
                best_loss = torch.where(better, loss, best_loss)
        return best_x

    def _start(self, x0, lo, hi, noise):
        if not self.random_start:
            return x0.clone()
        uniform = noise.rand(x0.shape[1:]).mul_(2.0).sub_(1.0)  # U[-1, 1)
        return torch.minimum(torch.maximum(x0 + uniform * (self.eps / 255.0), lo), hi)

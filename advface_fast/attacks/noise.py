"""Uniform-noise baseline at the same budget as the attacks."""

from __future__ import annotations

import torch

from advface_fast.attacks.base import Attack


class Noise(Attack):
    r"""
    Random uniform noise: the sanity baseline for the gradient attacks. A perturbation of the
    same L-inf size that ignores the model should barely change similarities or accuracy.

    Distance Measure : Linf

    ``x = clamp(x0 + U[-eps, eps], 0, 1)``, rounded to the uint8 grid by default. Uses no
    gradient; the objective is only reported.

    Arguments:
        model (nn.Module): embedding model (only its device is used).
        eps (float): L-inf budget in 0-255 pixel units. (Default: 4)
        objective (Objective | str | dict): reported in ``config()``. (Default: verification, cosine)
        seed (int | None): seed of the noise. (Default: 0)
        round_output (bool): deliver the uint8-grid image. (Default: True)

    Shape:
        - queries: (N, 3, H, W) in [0, 1], on the uint8 grid when rounding.
        - gallery_embeddings: (N, D), is_same: (N,) bool, thresholds: (N,) or None (unused).
        - output: (N, 3, H, W) float32.

    Examples::
        >>> attack = Noise(model, eps=4, seed=0)
        >>> x_noisy = attack(queries, gallery_embeddings, is_same)
    """

    name = "noise"
    accepts_start = False  # a draw around the clean image, not a search

    def __init__(self, model, eps: float = 4, objective=None, seed: int | None = 0, round_output: bool = True,
                 precision: str = "fp32"):
        super().__init__(model, eps, objective, seed, round_output, precision)

    def perturb(self, x0, target, is_same, thresholds, noise):
        lo, hi = self._eps_box(x0)
        self.last_stats = {"image_steps": 0, "image_steps_full": 0}  # no model pass at all
        uniform = noise.rand(x0.shape[1:]).mul_(2.0).sub_(1.0)  # U[-1, 1)
        return torch.minimum(torch.maximum(x0 + uniform * (self.eps / 255.0), lo), hi)

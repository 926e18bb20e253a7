"""Gaussian noise with the embedding averaged over draws: randomised smoothing of the embedding
(after Cohen, Rosenfeld and Kolter, ICML 2019; here the smoothed quantity is the embedding, not a
class vote, and no certificate is claimed)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from advface_fast.attacks.base import SeededNoise
from advface_fast.defenses.base import Defense
from advface_fast.defenses.registry import register_defense
from advface_fast.seeds import derive_seed


class GaussianSmoothing(Defense):
    r"""
    Gaussian noise, embeddings averaged: ``e(x) = mean_j f(clamp(x + sigma * n_j, 0, 1))`` over
    ``samples`` draws ``n_j ~ N(0, I)``, each image's draws from its own seed.

    Randomised: the adaptive attacker averages gradients over fresh draws (EOT); one draw is
    differentiable almost everywhere, so BPDA's identity is exact there (the clamp aside).

    Arguments:
        model (nn.Module): the embedding model f.
        sigma (float): noise standard deviation in 0-255 levels. (Default: 8)
        samples (int): draws n averaged per embedding. (Default: 8)
        seed, batch_size: as :class:`~advface_fast.defenses.base.Defense`.

    Cost: ``samples`` forward passes per image.

    Shape:
        - images: (N, 3, H, W) float in [0, 1], ids: N strings.
        - transform (one draw): (N, 3, H, W) float32; embed: {"default": (N, D) float32}.

    Examples::
        >>> d = GaussianSmoothing(model, sigma=8, samples=8, seed=0)
        >>> emb = d.embed(images, ids)["default"]
    """

    name = "gaussian-smoothing"
    paper = "after Cohen, Rosenfeld, Kolter, ICML 2019 (smoothing the embedding)"
    randomized = True

    def __init__(self, model, sigma: float = 8.0, samples: int = 8, seed: int = 0, batch_size: int = 32):
        super().__init__(model, seed=seed, batch_size=batch_size)
        if float(sigma) <= 0:
            raise ValueError(f"sigma must be positive (0-255 levels), got {sigma}")
        if int(samples) < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        self.sigma, self.samples = float(sigma), int(samples)

    def settings(self) -> dict:
        return {"sigma": self.sigma, "samples": self.samples}

    def cost_per_image(self, variant=None) -> float:
        return float(self.samples)

    def transform(self, x: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        # Drawn on the CPU whatever x's device: the same draws (and cached embeddings) on every device.
        noise = SeededNoise(x.shape[0], torch.device("cpu"), None, list(seeds)).normal(x.shape[1:]).to(x.device)
        return (x.detach() + noise.mul_(self.sigma / 255.0)).clamp_(0.0, 1.0)

    def embed(self, images, ids: Sequence[str]) -> dict:
        x, ids = self._inputs(images, ids)
        seeds = self.seeds(ids)
        total = None
        with torch.no_grad():
            for j in range(self.samples):
                draw = self.transform(x, [derive_seed(s, f"draw/{j}") for s in seeds])
                emb = self.embed_images(draw)
                total = emb if total is None else total.add_(emb)
        self.last_stats = {"images": x.shape[0], "image_steps": self.cost_per_image() * x.shape[0]}
        return {v: total / self.samples for v in self.variants}


register_defense("gaussian-smoothing", GaussianSmoothing)

__all__ = ["GaussianSmoothing"]

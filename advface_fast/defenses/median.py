"""Median filtering of the input (feature squeezing: Xu, Evans and Qi, NDSS 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from advface_fast.defenses.base import Defense
from advface_fast.defenses.registry import register_defense
from advface_fast.kernels.median3x3 import median3x3, median_filter_reference


def median_filter(x: torch.Tensor, size: int) -> torch.Tensor:
    """Per-channel ``size x size`` median of N x C x H x W images, reflect padding (differentiable:
    the gradient reaches the pixel each median selects): ``F.unfold`` windows and ``median``."""
    return median_filter_reference(x, size)


class MedianFilter(Defense):
    r"""
    Median filter: every channel replaced by its ``size x size`` median (reflect padding).

    The filter is piecewise differentiable (its gradient flows to the selected pixel), so the
    adaptive attacker's surrogate is the filter itself: BPDA with the exact gradient wherever it
    exists. Deterministic.

    Arguments:
        model (nn.Module): the embedding model f.
        size (int): window side, odd, >= 3. (Default: 3)
        seed, batch_size: as :class:`~advface_fast.defenses.base.Defense`.

    Shape:
        - images: (N, 3, H, W) float in [0, 1], ids: N strings.
        - transform: (N, 3, H, W) float32; embed: {"default": (N, D) float32}.

    Examples::
        >>> d = MedianFilter(model, size=3)
        >>> emb = d.embed(images, ids)["default"]
    """

    name = "median"
    paper = "Xu, Evans, Qi: Feature Squeezing, NDSS 2018"
    surrogate_name = "the filter itself"

    def __init__(self, model, size: int = 3, seed: int = 0, batch_size: int = 32):
        super().__init__(model, seed=seed, batch_size=batch_size)
        if int(size) < 3 or int(size) % 2 == 0:
            raise ValueError(f"the median window must be odd and >= 3, got {size}")
        self.size = int(size)

    def settings(self) -> dict:
        return {"size": self.size}

    def transform(self, x: torch.Tensor, seeds: Sequence[int] = ()) -> torch.Tensor:
        with torch.no_grad():  # 3 x 3: the sorting-network kernel, the same values 16x faster
            return median3x3(x) if self.size == 3 else median_filter(x, self.size)

    def surrogate(self, x: torch.Tensor) -> torch.Tensor:
        return median_filter(x, self.size)


register_defense("median", MedianFilter)

__all__ = ["MedianFilter", "median_filter"]

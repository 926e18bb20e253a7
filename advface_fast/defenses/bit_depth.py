"""Bit-depth reduction of the input (feature squeezing: Xu, Evans and Qi, NDSS 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from advface_fast.defenses.base import Defense
from advface_fast.defenses.registry import register_defense


class BitDepth(Defense):
    r"""
    Bit-depth reduction: each colour channel quantised to ``bits`` bits,
    ``x -> round(x * (2^bits - 1)) / (2^bits - 1)``.

    Its gradient is zero almost everywhere: the adaptive attacker uses BPDA with the identity
    (straight-through), as Athalye et al. (2018) did. Deterministic.

    Arguments:
        model (nn.Module): the embedding model f.
        bits (int): bits per channel, 1-7. (Default: 4)
        seed, batch_size: as :class:`~advface_fast.defenses.base.Defense`.

    Shape:
        - images: (N, 3, H, W) float in [0, 1], ids: N strings.
        - transform: (N, 3, H, W) float32; embed: {"default": (N, D) float32}.

    Examples::
        >>> d = BitDepth(model, bits=4)
        >>> emb = d.embed(images, ids)["default"]
    """

    name = "bit-depth"
    paper = "Xu, Evans, Qi: Feature Squeezing, NDSS 2018"

    def __init__(self, model, bits: int = 4, seed: int = 0, batch_size: int = 32):
        super().__init__(model, seed=seed, batch_size=batch_size)
        if not 1 <= int(bits) <= 7:
            raise ValueError(f"bits must be in 1..7 (8 is the identity), got {bits}")
        self.bits = int(bits)

    def settings(self) -> dict:
        return {"bits": self.bits}

    def transform(self, x: torch.Tensor, seeds: Sequence[int] = ()) -> torch.Tensor:
        levels = float(2 ** self.bits - 1)
        return x.detach().mul(levels).round_().div_(levels)


register_defense("bit-depth", BitDepth)

__all__ = ["BitDepth"]

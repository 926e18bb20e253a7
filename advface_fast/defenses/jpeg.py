"""JPEG compression of the input (Dziugaite et al., 2016; Guo et al., ICLR 2018)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from advface_fast.defenses.base import Defense
from advface_fast.defenses.registry import register_defense


class JPEG(Defense):
    r"""
    JPEG compression: every image is rounded to uint8, encoded as JPEG at ``quality`` (PIL,
    4:2:0 chroma subsampling, PIL's standard tables) and decoded before the model sees it.

    Not differentiable: the adaptive attacker uses BPDA with the identity (Athalye et al., 2018),
    the standard choice for JPEG. Deterministic.

    Arguments:
        model (nn.Module): the embedding model f.
        quality (int): JPEG quality 1-95. (Default: 75)
        seed, batch_size: as :class:`~advface_fast.defenses.base.Defense`.

    Shape:
        - images: (N, 3, H, W) float in [0, 1] on the uint8 grid (or uint8 N x H x W x 3), ids: N strings.
        - transform: (N, 3, H, W) float32 on the uint8 grid; embed: {"default": (N, D) float32}.

    Examples::
        >>> d = JPEG(model, quality=75)
        >>> emb = d.embed(images, ids)["default"]
    """

    name = "jpeg"
    paper = "Dziugaite et al. 2016, arXiv:1608.00853; Guo et al., ICLR 2018"

    def __init__(self, model, quality: int = 75, seed: int = 0, batch_size: int = 32):
        super().__init__(model, seed=seed, batch_size=batch_size)
        if not 1 <= int(quality) <= 95:
            raise ValueError(f"JPEG quality must be in 1..95, got {quality}")
        self.quality = int(quality)

    def settings(self) -> dict:
        return {"quality": self.quality}

    def transform(self, x: torch.Tensor, seeds: Sequence[int] = ()) -> torch.Tensor:
        u8 = x.detach().mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out = np.empty_like(u8)
        for i, img in enumerate(u8):
            buf = io.BytesIO()
            Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=self.quality)
            buf.seek(0)
            with Image.open(buf) as decoded:
                out[i] = np.asarray(decoded.convert("RGB"))
        return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0).to(x.device)


register_defense("jpeg", JPEG)

__all__ = ["JPEG"]

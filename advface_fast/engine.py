"""Embedding engines: aligned uint8 chips in, float32 embeddings out, batched.

The torch engine runs any registry model; faster engines (onnxruntime, bf16) plug in beside it
and must match it (parity is tested). Decision numbers (scores, thresholds, accuracy) are always
computed from float32 embeddings.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm


def chips_to_tensor(chips: np.ndarray, device=None) -> torch.Tensor:
    """N x H x W x 3 uint8 RGB -> N x 3 x H x W float32 in [0, 1]."""
    if chips.dtype != np.uint8 or chips.ndim != 4 or chips.shape[-1] != 3:
        raise ValueError(f"expected N x H x W x 3 uint8 chips, got {chips.dtype} {chips.shape}")
    # A copy: chips may be a read-only memory map of the chip cache.
    x = torch.from_numpy(np.array(chips, copy=True)).to(device)
    return x.permute(0, 3, 1, 2).float().div_(255.0)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def embed_chips(model: torch.nn.Module, chips: np.ndarray, batch_size: int = 64, flip: bool = False,
                progress: bool | str = False) -> np.ndarray:
    """Embed aligned chips with ``model``; returns N x D float32.

    ``flip=True`` averages the raw embeddings of each chip and its horizontal mirror, a
    common test-time augmentation (the mean of raw embeddings serves cosine and L2 alike).
    """
    device = model_device(model)
    out = []
    desc = progress if isinstance(progress, str) else "embedding"
    for start in tqdm(range(0, len(chips), batch_size), desc=desc, unit="batch", disable=not progress):
        x = chips_to_tensor(chips[start : start + batch_size], device)
        emb = model(x).float()
        if flip:
            emb = (emb + model(torch.flip(x, dims=[3])).float()) / 2
        out.append(emb.cpu().numpy())
    dim = getattr(model, "embedding_dim", 0)
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)

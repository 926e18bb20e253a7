"""A weights identity every model has: the sha256 of its state dict (names, dtypes, shapes, bytes).

Caches key results by it (ONNX exports, attack rows), so two models with equal weights share
entries and any change to any weight gives a new key. The digest is memoised on the module and
recomputed when a tensor changes (torch bumps a tensor's version counter on every in-place
write, which is how optimisers and ``load_state_dict`` update weights).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def _versions(state: dict) -> tuple:
    return tuple((name, t.data_ptr(), t._version) for name, t in state.items())


def weights_id(model: nn.Module) -> str:
    """Hex sha256 of ``model.state_dict()`` in name order (names, dtypes, shapes and bytes)."""
    state = model.state_dict()
    versions = _versions(state)
    memo = getattr(model, "_advface_weights_id", None)
    if memo is not None and memo[0] == versions:
        return memo[1]
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(state[name].shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    model._advface_weights_id = (versions, digest)
    return digest


__all__ = ["weights_id"]

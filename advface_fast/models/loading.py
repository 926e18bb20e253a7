"""Loading user-supplied PyTorch weights safely and strictly.

``read_state_dict(path)`` reads a ``.pt/.pth`` file with ``torch.load(weights_only=True)`` (no
arbitrary code is ever unpickled) or a ``.safetensors`` file, unwraps the usual containers
(``{"state_dict": ...}``, ``{"model": ...}``) and the ``module.`` prefix that
``nn.DataParallel`` adds. ``load_strict(model, state)`` loads it requiring every key and shape to
match, and otherwise raises one error naming the missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "net")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, loaded without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # an UnpicklingError names the refused global
            raise ValueError(f"{path.name}: cannot be read as a plain state dict with weights_only=True "
                             f"({type(err).__name__}: {str(err).splitlines()[0]}); save model.state_dict() "
                             "or convert it to safetensors") from None
    for key in CONTAINER_KEYS:  # {"state_dict": {...}, "epoch": ...}
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path.name}: expected a state dict (name -> tensor), got {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):  # saved from nn.DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str = "weights",
                ignore_prefixes: tuple[str, ...] = ()) -> nn.Module:
    """Load ``state`` into ``model``: every key present with its shape, nothing else (keys under
    ``ignore_prefixes``, e.g. a classifier head, are dropped first). One clear error otherwise."""
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)} if ignore_prefixes else state
    own = model.state_dict()
    # BatchNorm's step counter is unused in eval mode and absent from checkpoints of old PyTorch versions.
    state = {**{k: v for k, v in own.items() if k.endswith(".num_batches_tracked") and k not in state}, **state}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def listing(title, items):
            return f"{title} ({len(items)}): " + ", ".join(items[:6]) + (" ..." if len(items) > 6 else "")

        parts = [listing(t, i) for t, i in (("missing", missing), ("unexpected", unexpected),
                                            ("wrong shape", shapes)) if i]
        raise ValueError(f"{what} do not match {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return model


@torch.no_grad()
def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.modules.batchnorm._BatchNorm):
    """(W', b') of a conv / linear layer followed by eval-mode batch norm: one layer, same function."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
    w = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    b = (bias if bias is not None else torch.zeros_like(scale)) * scale + shift
    return w, b


def weights_from_env(name: str, weights, env: str, where: str):
    """``weights`` or ``$env``; a one-line error saying where to get them when neither is given."""
    weights = weights or os.environ.get(env) or None
    if weights is None:
        raise FileNotFoundError(f"model '{name}' needs its weights file: create_model('{name}', weights=PATH) "
                                f"or set {env}=PATH (get them from {where})")
    return weights


__all__ = ["fold_bn", "load_strict", "read_state_dict", "weights_from_env"]

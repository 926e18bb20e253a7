"""Loading your own weights into a registry model: ``create_model("dlib-resnet", weights=PATH)``.

The file must be safetensors (no pickle is ever loaded) holding exactly the model's state dict:
the same names (strict, no missing or extra keys), shapes and dtypes. The model's weights
identity (:func:`advface_fast.models.identity.weights_id`, the hash of its state dict) changes
with the weights, so caches keyed by it never mix results of different weights.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn


def load_weights_file(model: nn.Module, path) -> nn.Module:
    """Load the safetensors file ``path`` into ``model`` in place (strict); returns ``model``."""
    from safetensors.torch import load_file

    from ..fileio import sha256_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: weights must be a .safetensors file (pickled checkpoints are not loaded)")
    state = load_file(str(path))
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"{path}: keys do not match the model ({len(missing)} missing, e.g. {missing[:3]}; "
                         f"{len(extra)} unexpected, e.g. {extra[:3]})")
    for name, t in state.items():
        if t.shape != own[name].shape or t.dtype != own[name].dtype:
            raise ValueError(f"{path}: {name} is {t.dtype} {tuple(t.shape)}, the model's is "
                             f"{own[name].dtype} {tuple(own[name].shape)}")
    model.load_state_dict(state, strict=True)
    model.weights_path = str(path)
    model.weights_sha256 = sha256_file(path)
    return model


__all__ = ["load_weights_file"]

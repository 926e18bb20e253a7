"""Training checkpoints: one safetensors file with everything a resume needs.

Tensors: ``model.*`` (weights), ``head.*`` (the identity head), ``optim.<param index>.<name>``
(optimiser state, e.g. AdamW's step / exp_avg / exp_avg_sq), ``method.*`` (a method's own
state, e.g. free AT's perturbation) and ``rng.torch`` (torch's global CPU RNG state). The
safetensors metadata holds one JSON document under ``"advface"``: the training config, epoch,
batch and global step, the running sums of the unfinished epoch, the per-epoch history and the
optimiser's param groups. Written atomically (unique temp + fsync + rename): a checkpoint is the
old one or the new one, never half of each. Loading never unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..fileio import atomic_write

FORMAT = "advface-train-checkpoint-v1"


def _flat(prefix: str, tensors: dict) -> dict:
    return {f"{prefix}{k}": v.detach().clone().contiguous() for k, v in tensors.items()}


def save_checkpoint(path, *, model, head, optimizer, method_state: dict, meta: dict) -> Path:
    """Write the checkpoint at ``path`` atomically."""
    tensors = {**_flat("model.", model.state_dict()), **_flat("head.", head.state_dict()),
               **_flat("method.", method_state)}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value.detach().clone().contiguous()
            elif value is not None:
                raise TypeError(f"optimiser state {name!r} is not a tensor ({type(value).__name__})")
    tensors["rng.torch"] = torch.get_rng_state().clone()
    doc = {"format": FORMAT, **meta, "optimizer": {"class": type(optimizer).__name__,
                                                   "param_groups": opt["param_groups"]}}
    path = Path(path)
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata={"advface": json.dumps(doc)})
    return path


def read_checkpoint(path) -> tuple[dict, dict]:
    """(tensors, metadata document) of a checkpoint file."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("advface")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if raw is None:
        raise ValueError(f"{path}: not an advface training checkpoint (no metadata)")
    doc = json.loads(raw)
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {doc.get('format')!r}")
    return tensors, doc


def _part(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_checkpoint(path, *, model, head, optimizer) -> tuple[dict, dict]:
    """Restore model, head, optimiser and torch's RNG in place (strict keys); returns
    (method state tensors, metadata document)."""
    tensors, doc = read_checkpoint(path)
    model.load_state_dict(_part(tensors, "model."), strict=True)
    head.load_state_dict(_part(tensors, "head."), strict=True)
    state: dict = {}
    for key, value in _part(tensors, "optim.").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    saved = doc["optimizer"]
    if saved["class"] != type(optimizer).__name__:
        raise ValueError(f"checkpoint was made with {saved['class']}, not {type(optimizer).__name__}")
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    return _part(tensors, "method."), doc


__all__ = ["FORMAT", "load_checkpoint", "read_checkpoint", "save_checkpoint"]

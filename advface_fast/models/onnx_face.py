"""A face-embedding ONNX model as a library model: float32 N x 3 x H x W RGB in [0, 1] -> N x D.

``OnnxFaceModel(path, input_size=(112, 112), channel_order="rgb", mean=127.5, std=128.0)`` runs
the graph with ``OnnxModule`` (differentiable, see ``onnx_torch``) after the preprocessing the
model was trained with: pixels scaled to 0..255, ``(x - mean) / std`` per channel, channels
reversed for BGR models. Settings not given are read from the model's metadata
(``metadata_props`` keys ``input_size`` "112,112", ``channel_order`` rgb|bgr, ``mean``, ``std``,
``aligner``) and otherwise take the defaults above. ``weights_sha256`` is the sha256 of the
file (``models.identity.weights_id`` hashes the dequantised state dict, like every model's).

Example::

    model = create_model("onnx:/models/arcface.onnx", input_size=(112, 112), mean=127.5, std=127.5)
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..fileio import sha256_file
from .registry import MTCNN_ARCFACE_112, ONNX_PREFIX, ModelSpec, register_prefix


def _floats(value, n=3) -> list[float]:
    if isinstance(value, str):
        value = [float(v) for v in value.replace(" ", "").split(",") if v]
    if isinstance(value, (int, float)):
        value = [float(value)]
    value = [float(v) for v in value]
    if len(value) == 1:
        value = value * n
    if len(value) != n:
        raise ValueError(f"expected 1 or {n} numbers, got {value}")
    return value


def onnx_metadata(path) -> dict[str, str]:
    """The model's ``metadata_props`` as a dict (empty when it has none)."""
    import onnx  # here, not at import: the registry imports this file, and onnx is slow to import

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


class OnnxFaceModel(nn.Module):
    """See the module docstring. Args: path; input_size (H, W); channel_order "rgb" or "bgr" (what
    the network wants; the library's images are RGB); mean, std (one number or three, in the
    network's channel order, in 0..255 units); embedding_dim (checked against the graph output if
    given). Shapes: N x 3 x H x W float in [0, 1] -> N x D float32."""

    def __init__(self, path, input_size=None, channel_order=None, mean=None, std=None,
                 embedding_dim=None):
        from .onnx_torch import OnnxModule, graph_input_shape

        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        meta = onnx_metadata(path)
        if input_size is None and "input_size" in meta:
            input_size = tuple(int(v) for v in meta["input_size"].split(","))
        if input_size is None:  # fall back on the graph's declared input shape
            shape = graph_input_shape(path)
            if len(shape) == 4 and all(isinstance(s, int) and s > 0 for s in shape[2:]):
                input_size = (shape[2], shape[3])
        if input_size is None:
            raise ValueError(f"{path.name}: give input_size=(H, W); the model does not declare it")
        channel_order = (channel_order or meta.get("channel_order", "rgb")).lower()
        if channel_order not in ("rgb", "bgr"):
            raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
        self.input_size = tuple(int(v) for v in input_size)
        self.channel_order = channel_order
        self.net = OnnxModule(path)
        if len(self.net.input_names) != 1:
            raise ValueError(f"{path.name}: a face model takes one image input, this graph takes "
                             f"{self.net.input_names}")
        mean = _floats(meta.get("mean", 0.0) if mean is None else mean)
        std = _floats(meta.get("std", 1.0) if std is None else std)
        if any(s == 0 for s in std):
            raise ValueError(f"std must be non-zero, got {std}")
        # x01 * 255 then (x - mean) / std as one affine map: x01 * (255 / std) - mean / std.
        self.register_buffer("scale", torch.tensor([255.0 / s for s in std]).view(1, 3, 1, 1))
        self.register_buffer("shift", torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1))
        self.aligner = meta.get("aligner")
        self.weights_sha256 = sha256_file(path)  # the file's identity; caches use weights_id(model)
        self.onnx_path = str(path)
        self.memory_format = torch.contiguous_format
        with torch.no_grad():
            out = self.forward(torch.zeros(1, 3, *self.input_size))
        if out.dim() != 2:
            raise ValueError(f"{path.name}: expected an N x D embedding output, got shape {tuple(out.shape)}")
        self.embedding_dim = out.shape[1]
        if embedding_dim is not None and embedding_dim != self.embedding_dim:
            raise ValueError(f"{path.name}: embedding_dim {embedding_dim} given, the model outputs {self.embedding_dim}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != self.input_size:
            raise ValueError(f"expected N x 3 x {self.input_size[0]} x {self.input_size[1]} images, "
                             f"got {tuple(images.shape)}")
        if self.channel_order == "bgr":
            images = images.flip(1)
        x = images * self.scale.to(images.dtype) + self.shift.to(images.dtype)
        return self.net(x.contiguous(memory_format=self.memory_format))


ARITHMETIC_VERSION = 1  # the fast copy's arithmetic beyond fold_bn / channels_last (cache keys; see make_fast)


def make_fast(model: OnnxFaceModel, fold_bn: bool = True, channels_last: bool = True,
              dilated_grad: bool = True) -> OnnxFaceModel:
    """A new, frozen, eval-mode fast copy of an ``OnnxFaceModel`` (``model`` is not changed):
    Conv -> BatchNormalization pairs folded into one Conv (``fold_batchnorm``), activations and
    4-D weights in channels_last order, and (``dilated_grad``) strided grouped convolutions taking
    their input gradient as a forward convolution (``dilate_strided_grouped_convs``; SFace's stride-2
    depthwise layers, whose oneDNN backward-data kernel is slow in bf16). Same function up to float
    rounding. A copy with rewritten nodes carries an ``arithmetic`` record (its bf16 gradients may
    round differently, so cached attacks made with it are new entries); otherwise none (keys as before)."""
    from .onnx_torch import dilate_strided_grouped_convs, fold_batchnorm

    if not isinstance(model, OnnxFaceModel):
        raise TypeError(f"make_fast supports OnnxFaceModel, got {type(model).__name__}")
    fast = copy.deepcopy(model)
    if fold_bn:
        fast.net = fold_batchnorm(fast.net)
    rewritten = 0
    if dilated_grad:
        fast.net, rewritten = dilate_strided_grouped_convs(fast.net)
    if channels_last:
        fast.memory_format = torch.channels_last
        for name, buf in fast.net.named_buffers():
            if buf.dim() == 4 and buf.is_floating_point():
                setattr(fast.net, name, buf.contiguous(memory_format=torch.channels_last))
    fast.switches = {"fold_bn": fold_bn, "channels_last": channels_last, "dilated_grad": dilated_grad}
    if rewritten:  # only a copy whose arithmetic changed gets new cache keys
        fast.arithmetic = {"version": ARITHMETIC_VERSION, **fast.switches}
    return fast.eval().requires_grad_(False)


def _onnx_spec(name: str, aligner: str | None = None, **settings) -> ModelSpec:
    """``onnx:PATH``: any ONNX face model, its spec read from the file (and ``settings``)."""
    path = name[len(ONNX_PREFIX):]
    if not path:
        raise ValueError("give the model file after 'onnx:', e.g. onnx:/models/face.onnx")
    probe = OnnxFaceModel(path, **settings)  # checks the file, the op set and the settings now
    aligner = aligner or probe.aligner or "mtcnn"
    alignment = dict(MTCNN_ARCFACE_112, size=probe.input_size[0]) if aligner == "mtcnn" else {"aligner": aligner}
    return ModelSpec(name=name, build=partial(OnnxFaceModel, path, **settings), input_size=probe.input_size,
                     embedding_dim=probe.embedding_dim, alignment=alignment, make_fast=make_fast,
                     description=f"ONNX model {path} (sha256 {probe.weights_sha256[:12]}...)")


register_prefix(ONNX_PREFIX, _onnx_spec)


__all__ = ["OnnxFaceModel", "make_fast", "onnx_metadata"]

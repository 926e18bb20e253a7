"""dlib's face-recognition ResNet (dlib_face_recognition_resnet_model_v1.dat) in PyTorch.

The network (dlib's dnn_face_recognition_ex.cpp, "anet_type"), input a 150x150 RGB chip:

    conv 7x7/2 (no padding) -> affine -> relu -> max-pool 3x3/2
    residual stages: 3 x 32, (down + 3) x 64, (down + 2) x 128, (down + 2) x 256, down x 256
    global average pool -> fc 256 -> 128 (no bias)

A block is conv 3x3 -> affine -> relu -> conv 3x3 -> affine, plus the shortcut, then relu.
In a downsampling block the first conv has stride 2 and NO padding and the shortcut is a
2x2/2 average pool; dlib's residual add zero-pads the smaller tensor (channels and
height/width, aligned top-left), so e.g. a 3x3 block output plus a 4x4 shortcut is 4x4.
"affine" is dlib's batch norm with the statistics folded in: a per-channel scale and shift.

The embedding is the raw 128-d fc output. dlib compares two faces by the Euclidean distance of
raw embeddings ("same person" if < 0.6, the loss layer's distance threshold); cosine similarity
of L2-normalised embeddings works as well and is the library's default score.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .dlib_format import DlibFormatError, DlibLayer, read_dlib_net
from .registry import ModelSpec, register_model

DAT_NAME = "dlib_face_recognition_resnet_model_v1.dat"
CHIP_SIZE = 150
DISTANCE_THRESHOLD = 0.6


class ChannelAffine(nn.Module):
    """dlib's affine_ layer in CONV mode: y = gamma[c] * x + beta[c]."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Apply in the activation's dtype: fp32 parameters would promote bf16 activations.
        g = self.gamma.to(x.dtype).view(1, -1, 1, 1)
        b = self.beta.to(x.dtype).view(1, -1, 1, 1)
        return torch.addcmul(b, x, g)


def add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: sum of two NCHW tensors, the smaller zero-padded at the end of each dim."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t):
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return pad(a) + pad(b)


class ResidualBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, downsample: bool):
        super().__init__()
        stride, padding = (2, 0) if downsample else (1, 1)
        self.downsample = downsample
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=padding)
        self.affine1 = ChannelAffine(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1)
        self.affine2 = ChannelAffine(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.affine1(self.conv1(x)))
        y = self.affine2(self.conv2(y))
        shortcut = F.avg_pool2d(x, 2, 2) if self.downsample else x
        return F.relu(add_zero_padded(y, shortcut))


# (channels, downsample) for each residual block, input side first.
DLIB_RESNET_BLOCKS = (
    [(32, False)] * 3
    + [(64, True)] + [(64, False)] * 3
    + [(128, True)] + [(128, False)] * 2
    + [(256, True)] + [(256, False)] * 2
    + [(256, True)]
)


class DlibResNet(nn.Module):
    """dlib's face-recognition ResNet: N x 3 x 150 x 150 RGB in [0, 1] -> N x 128 raw embeddings."""

    embedding_dim = 128
    input_size = (CHIP_SIZE, CHIP_SIZE)

    def __init__(self, mean_rgb=(122.782, 117.001, 104.298)):
        super().__init__()
        # dlib's input layer computes (pixel - mean) / 256 on 0-255 values.
        self.register_buffer("mean_rgb", torch.tensor(mean_rgb, dtype=torch.float32).view(1, 3, 1, 1))
        self.stem_conv = nn.Conv2d(3, 32, 7, stride=2, padding=0)
        self.stem_affine = ChannelAffine(32)
        blocks, in_ch = [], 32
        for out_ch, down in DLIB_RESNET_BLOCKS:
            blocks.append(ResidualBlock(in_ch, out_ch, down))
            in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(256, self.embedding_dim, bias=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return (images * 255.0 - self.mean_rgb.to(images.dtype)) / 256.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        x = F.relu(self.stem_affine(self.stem_conv(x)))
        x = F.max_pool2d(x, 3, 2)
        x = self.blocks(x)
        x = x.mean(dim=(2, 3))
        return self.fc(x)


# ---------------------------------------------------------------------------------------------
# Loading the weights from dlib's file


def _expect(layer: DlibLayer, kind: str, **attrs) -> DlibLayer:
    if layer.kind != kind or any(layer.attrs.get(k) != v for k, v in attrs.items()):
        raise DlibFormatError(f"expected {kind} {attrs}, found {layer.kind} {layer.attrs}")
    return layer


def _load_conv(conv: nn.Conv2d, layer: DlibLayer) -> None:
    pad = conv.padding[0]
    _expect(layer, "con_4", num_filters=conv.out_channels, nr=conv.kernel_size[0],
            stride_y=conv.stride[0], padding_y=pad, padding_x=pad)
    conv.weight.data.copy_(torch.from_numpy(layer.arrays["weight"]))
    conv.bias.data.copy_(torch.from_numpy(layer.arrays["bias"]))


def _load_affine(aff: ChannelAffine, layer: DlibLayer) -> None:
    _expect(layer, "affine_")
    if layer.attrs.get("mode", 0) != 0:
        raise DlibFormatError("affine_ layer is in FC mode; expected per-channel (CONV) mode")
    aff.gamma.data.copy_(torch.from_numpy(layer.arrays["gamma"]))
    aff.beta.data.copy_(torch.from_numpy(layer.arrays["beta"]))


def state_dict_from_dat(path: str | Path) -> tuple[dict, dict]:
    """Parse dlib's .dat into a DlibResNet state dict (+ metadata), checking every layer."""
    net = read_dlib_net(path)
    if net.input != "input_rgb_image_sized" or (net.input_attrs["nr"], net.input_attrs["nc"]) != (150, 150):
        raise DlibFormatError(f"{path}: expected a 150x150 input layer, found {net.input} {net.input_attrs}")
    model = DlibResNet(mean_rgb=net.input_attrs["mean_rgb"])
    layers = iter(net.layers)
    _load_conv(model.stem_conv, next(layers))
    _load_affine(model.stem_affine, next(layers))
    _expect(next(layers), "relu_")
    _expect(next(layers), "max_pool_2", nr=3, nc=3, stride_y=2, padding_y=0)
    for block in model.blocks:
        _load_conv(block.conv1, next(layers))
        _load_affine(block.affine1, next(layers))
        _expect(next(layers), "relu_")
        _load_conv(block.conv2, next(layers))
        _load_affine(block.affine2, next(layers))
        if block.downsample:
            _expect(next(layers), "avg_pool_2", nr=2, nc=2, stride_y=2, padding_y=0)
        _expect(next(layers), "add_prev_")
        _expect(next(layers), "relu_")
    _expect(next(layers), "avg_pool_2", nr=0, nc=0)  # nr = nc = 0: pool over everything
    # bias_mode 1 is dlib's FC_NO_BIAS (fc_no_bias<128>).
    fc = _expect(next(layers), "fc_2", num_inputs=256, num_outputs=128, bias_mode=1)
    model.fc.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(fc.arrays["weight"].T)))
    leftover = list(layers)
    if leftover:
        raise DlibFormatError(f"{path}: {len(leftover)} unexpected trailing layers ({leftover[0].kind})")
    meta = {"loss": net.loss, **{k: float(v) for k, v in net.loss_attrs.items()},
            "mean_rgb": [float(m) for m in net.input_attrs["mean_rgb"]]}
    return model.state_dict(), meta


def load_dlib_resnet(dat_path: str | Path | None = None, cache_dir: str | Path | None = None) -> DlibResNet:
    """Build the model from dlib's .dat, converting once and caching the weights as safetensors.

    The cache file is keyed by the .dat's sha256, so a different file never reuses stale weights.
    """
    from safetensors.torch import load_file, save_file

    from ..cache import default_cache_root
    from ..fileio import atomic_write, sha256_file
    from .assets import model_file

    dat_path = Path(dat_path) if dat_path is not None else model_file(DAT_NAME)
    digest = sha256_file(dat_path)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_root() / "models"
    cached = cache_dir / f"dlib-resnet-{digest[:16]}.safetensors"
    if cached.exists():
        try:
            state = load_file(cached)
            meta = json.loads(state.pop("__meta__").numpy().tobytes().decode())
            if meta.get("dat_sha256") == digest:
                return _build(state, meta)
        except Exception:  # a damaged cache file is rebuilt, never trusted
            pass
    state, meta = state_dict_from_dat(dat_path)
    meta["dat_sha256"] = digest
    blob = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
    with atomic_write(cached) as tmp:
        save_file({**{k: v.contiguous() for k, v in state.items()}, "__meta__": blob}, str(tmp))
    return _build(state, meta)


def _build(state: dict, meta: dict) -> DlibResNet:
    model = DlibResNet(mean_rgb=tuple(meta["mean_rgb"]))
    model.load_state_dict(state)
    model.dat_sha256 = meta["dat_sha256"]
    model.distance_threshold = meta.get("distance_threshold", DISTANCE_THRESHOLD)
    return model


def _build_dlib_resnet(dat_path=None, cache_dir=None, weights=None):
    """dlib's weights from the .dat file; ``weights=PATH``: your own safetensors (e.g. from
    ``advface advtrain``) loaded over them, strict keys (see models/weights.py)."""
    model = load_dlib_resnet(dat_path, cache_dir)
    if weights is not None:
        from .weights import load_weights_file

        load_weights_file(model, weights)
    return model


register_model(ModelSpec(
    name="dlib-resnet",
    build=_build_dlib_resnet,
    input_size=(CHIP_SIZE, CHIP_SIZE),
    embedding_dim=128,
    alignment={"size": CHIP_SIZE, "padding": 0.25},
    distance_threshold=DISTANCE_THRESHOLD,
    description="dlib's face-recognition ResNet-29 (dlib_face_recognition_resnet_model_v1, CC0; "
                "99.38% on LFW per dlib), ported to PyTorch from the .dat file",
))  # its fast copy is registered by models/fast.py, which builds on this file

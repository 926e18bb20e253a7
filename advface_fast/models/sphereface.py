"""CosFace on the SphereFace-20 network (Wang et al. 2018, "CosFace: Large Margin Cosine Loss";
Liu et al. 2017, "SphereFace"), 112 x 96 -> 512-d.

The network and parameter names of the public CosFace PyTorch port (MuggleWang/CosFace_pytorch,
``net.py: sphere20``; its README reports 99.08-99.23% on LFW for sphere20 trained on
CASIA-WebFace), so a state dict saved by it loads as it is:

    4 stages (64, 128, 256, 512 channels), each: conv 3x3/2 (with bias) -> PReLU, then
    1, 2, 4, 1 residual blocks x + PReLU(conv3x3(PReLU(conv3x3(x)))) (convs without bias)
    -> flatten (512 x 7 x 6) -> Linear 21504 -> 512.

Keys: ``layer{1..4}.0.{weight,bias}`` (stage conv), ``layer{i}.1.weight`` (PReLU),
``layer{i}.{2..}.{conv1,prelu1,conv2,prelu2}.weight`` (blocks), ``fc.{weight,bias}``.

Input geometry: the port is trained and evaluated on 112 x 96 (H x W) chips aligned onto the
SphereFace five-point template, which is the ArcFace 112 x 112 template shifted 8 px left
(the ArcFace template was made from it by padding 8 px each side). So this model takes the
standard MTCNN ArcFace 112 x 112 chip (aligner "mtcnn", template "arcface") and crops columns
8..103 inside ``forward``: exactly the 112 x 96 SphereFace chip, and the attack perturbs the
whole 112 x 112 chip (the 16 outer columns get zero gradient). Normalisation as the port's
lfw_eval.py: RGB, (x - 0.5) / 0.5. Output: the raw 512-d feature (compare by cosine).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .loading import load_strict, read_state_dict
from .registry import MTCNN_ARCFACE_112, ModelSpec, register_model

INPUT_SIZE = (112, 112)  # the chip this model takes; the network itself sees NET_INPUT
NET_INPUT = (112, 96)
CROP_LEFT = 8
EMBEDDING_DIM = 512
STAGES = (64, 128, 256, 512)
BLOCKS = (1, 2, 4, 1)  # sphere20


class PReLU(nn.PReLU):
    """nn.PReLU (same parameter, same state-dict key) whose backward, when the slopes are frozen,
    computes only the input gradient (``advface_fast.kernels.prelu``)."""

    def forward(self, x):
        from advface_fast.kernels.prelu import prelu

        return prelu(x, self.weight)


class Block(nn.Module):
    """x + PReLU(conv(PReLU(conv(x)))), 3 x 3 convs without bias."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.prelu1 = PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.prelu2 = PReLU(channels)

    def forward(self, x):
        return x + self.prelu2(self.conv2(self.prelu1(self.conv1(x))))


def _stage(cin: int, cout: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), PReLU(cout), *(Block(cout) for _ in range(blocks)))


class SphereFace20(nn.Module):
    """N x 3 x 112 x 112 RGB in [0, 1] (ArcFace chip) -> N x 512 (see the module docstring)."""

    input_size = INPUT_SIZE
    embedding_dim = EMBEDDING_DIM

    def __init__(self, blocks=BLOCKS):
        super().__init__()
        channels = (3,) + STAGES
        for i, n in enumerate(blocks):
            setattr(self, f"layer{i + 1}", _stage(channels[i], channels[i + 1], n))
        self.fc = nn.Linear(STAGES[-1] * 7 * 6, EMBEDDING_DIM)
        self.memory_format = torch.contiguous_format

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != INPUT_SIZE:
            raise ValueError(f"expected N x 3 x 112 x 112 images (ArcFace chips), got {tuple(images.shape)}")
        x = images[:, :, :, CROP_LEFT : CROP_LEFT + NET_INPUT[1]] * 2.0 - 1.0  # 112 x 96, (x - 0.5) / 0.5
        x = x.contiguous(memory_format=self.memory_format)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        # Flatten in (C, H, W) order as the port does, whatever the memory layout.
        return self.fc(x.contiguous().flatten(1))


def load_sphereface(weights) -> SphereFace20:
    """SphereFace20 with a CosFace_pytorch sphere20 state dict (``.pt/.pth`` via weights_only, or safetensors)."""
    model = SphereFace20()
    load_strict(model, read_state_dict(weights), what=f"cosface-sphere20 weights {weights}")
    model.weights_path = str(weights)
    return model.eval()


def make_fast(model: SphereFace20, channels_last: bool = True) -> SphereFace20:
    """A new, frozen, eval-mode copy in channels_last layout (``model`` is not changed). The
    network has no batch norm, so there is nothing to fold."""
    if not isinstance(model, SphereFace20):
        raise TypeError(f"make_fast supports SphereFace20, got {type(model).__name__}")
    fast = copy.deepcopy(model).eval()
    if channels_last:
        fast.memory_format = torch.channels_last
        fast.to(memory_format=torch.channels_last)
    fast.switches = {"channels_last": channels_last}
    return fast.requires_grad_(False)


COSFACE_WEIGHTS_ENV = "ADVFACE_COSFACE_WEIGHTS"


def _build_cosface(weights=None):
    from .loading import weights_from_env

    return load_sphereface(weights_from_env("cosface-sphere20", weights, COSFACE_WEIGHTS_ENV,
                                            "https://github.com/MuggleWang/CosFace_pytorch (README: the "
                                            "sphere20 CASIA-WebFace model)"))


register_model(ModelSpec(
    name="cosface-sphere20",
    build=_build_cosface,
    input_size=(112, 112),
    embedding_dim=EMBEDDING_DIM,
    alignment=MTCNN_ARCFACE_112,  # the model crops the 112x96 SphereFace chip out of it
    description="CosFace on SphereFace-20 (512-d; 112x96 SphereFace chip cut from the ArcFace 112x112 "
                "chip) from a CosFace_pytorch sphere20 state dict (user-supplied: weights=PATH or $"
                + COSFACE_WEIGHTS_ENV + ")",
    make_fast=make_fast,
))


__all__ = ["EMBEDDING_DIM", "INPUT_SIZE", "NET_INPUT", "SphereFace20", "load_sphereface", "make_fast"]

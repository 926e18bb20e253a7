"""FaceNet: Inception-ResNet-v1 (Szegedy et al. 2017; Schroff et al. 2015), 160 x 160 -> 512-d.

The architecture and parameter names of facenet-pytorch's ``InceptionResnetV1`` (MIT; the
TensorFlow models of davidsandberg/facenet converted to PyTorch), so its published state dicts
load as they are: ``20180402-114759-vggface2.pt`` (VGGFace2) and
``20180408-102900-casia-webface.pt`` (CASIA-WebFace), from the facenet-pytorch releases
(https://github.com/timesler/facenet-pytorch/releases, v2.2.9). Their classifier head
(``logits.*``) is not part of the embedding and is dropped on load; every other key must match.

Stem (conv 3x3/2, conv 3x3, conv 3x3, maxpool, conv 1x1, conv 3x3, conv 3x3/2) -> 5 x Block35
(scale 0.17) -> Mixed_6a -> 10 x Block17 (scale 0.10) -> Mixed_7a -> 5 x Block8 (scale 0.20) ->
Block8 (no ReLU) -> global average pool -> Linear 1792 -> 512 (no bias) -> BatchNorm1d -> L2
normalisation. Every conv is conv (no bias) + BatchNorm (eps 1e-3) + ReLU, except each block's
1x1 "up" projection (conv with bias, no BN).

Input: N x 3 x 160 x 160 RGB in [0, 1]; the model applies facenet-pytorch's
``fixed_image_standardization``, (x * 255 - 127.5) / 128. Chips: MTCNN box + 14 px margin,
resized to 160 x 160 (facenet-pytorch's ``MTCNN(image_size=160, margin=14)``; aligner "mtcnn",
template "facenet"). Output: L2-normalised 512-d embeddings (as facenet-pytorch returns them).

Example::

    model = create_model("facenet", weights="20180402-114759-vggface2.pt")
    emb = model(torch.rand(2, 3, 160, 160))  # 2 x 512, unit norm
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .loading import fold_bn, load_strict, read_state_dict
from .registry import ModelSpec, register_model

INPUT_SIZE = (160, 160)
EMBEDDING_DIM = 512
HEAD_PREFIX = "logits."  # the classifier of the published checkpoints


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _branch(*convs) -> nn.Sequential:
    return nn.Sequential(*(BasicConv2d(*c[:3], **c[3]) if len(c) > 3 else BasicConv2d(*c) for c in convs))


class Block35(nn.Module):
    """35 x 35 residual block (256 channels), branches 1x1 | 1x1-3x3 | 1x1-3x3-3x3."""

    def __init__(self, scale=0.17):
        super().__init__()
        self.scale = scale
        self.branch0 = BasicConv2d(256, 32, 1)
        self.branch1 = _branch((256, 32, 1), (32, 32, 3, {"padding": 1}))
        self.branch2 = _branch((256, 32, 1), (32, 32, 3, {"padding": 1}), (32, 32, 3, {"padding": 1}))
        self.conv2d = nn.Conv2d(96, 256, 1)

    def forward(self, x):
        out = self.conv2d(torch.cat([self.branch0(x), self.branch1(x), self.branch2(x)], 1))
        return F.relu(out * self.scale + x)


class Block17(nn.Module):
    """17 x 17 residual block (896 channels), branches 1x1 | 1x1-1x7-7x1."""

    def __init__(self, scale=0.10):
        super().__init__()
        self.scale = scale
        self.branch0 = BasicConv2d(896, 128, 1)
        self.branch1 = _branch((896, 128, 1), (128, 128, (1, 7), {"padding": (0, 3)}),
                               (128, 128, (7, 1), {"padding": (3, 0)}))
        self.conv2d = nn.Conv2d(256, 896, 1)

    def forward(self, x):
        out = self.conv2d(torch.cat([self.branch0(x), self.branch1(x)], 1))
        return F.relu(out * self.scale + x)


class Block8(nn.Module):
    """8 x 8 residual block (1792 channels), branches 1x1 | 1x1-1x3-3x1; the last one has no ReLU."""

    def __init__(self, scale=0.20, relu=True):
        super().__init__()
        self.scale, self.relu = scale, relu
        self.branch0 = BasicConv2d(1792, 192, 1)
        self.branch1 = _branch((1792, 192, 1), (192, 192, (1, 3), {"padding": (0, 1)}),
                               (192, 192, (3, 1), {"padding": (1, 0)}))
        self.conv2d = nn.Conv2d(384, 1792, 1)

    def forward(self, x):
        out = self.conv2d(torch.cat([self.branch0(x), self.branch1(x)], 1)) * self.scale + x
        return F.relu(out) if self.relu else out


class Mixed6a(nn.Module):
    """Reduction 35 -> 17: conv 3x3/2 | 1x1-3x3-3x3/2 | maxpool 3/2 (256 -> 896 channels)."""

    def __init__(self):
        super().__init__()
        self.branch0 = BasicConv2d(256, 384, 3, stride=2)
        self.branch1 = _branch((256, 192, 1), (192, 192, 3, {"padding": 1}), (192, 256, 3, {"stride": 2}))

    def forward(self, x):
        return torch.cat([self.branch0(x), self.branch1(x), F.max_pool2d(x, 3, 2)], 1)


class Mixed7a(nn.Module):
    """Reduction 17 -> 8: three conv branches and a maxpool (896 -> 1792 channels)."""

    def __init__(self):
        super().__init__()
        self.branch0 = _branch((896, 256, 1), (256, 384, 3, {"stride": 2}))
        self.branch1 = _branch((896, 256, 1), (256, 256, 3, {"stride": 2}))
        self.branch2 = _branch((896, 256, 1), (256, 256, 3, {"padding": 1}), (256, 256, 3, {"stride": 2}))

    def forward(self, x):
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), F.max_pool2d(x, 3, 2)], 1)


class InceptionResNetV1(nn.Module):
    """N x 3 x 160 x 160 RGB in [0, 1] -> N x 512 unit-norm embeddings (see the module docstring)."""

    input_size = INPUT_SIZE
    embedding_dim = EMBEDDING_DIM

    def __init__(self):
        super().__init__()
        self.conv2d_1a = BasicConv2d(3, 32, 3, stride=2)
        self.conv2d_2a = BasicConv2d(32, 32, 3)
        self.conv2d_2b = BasicConv2d(32, 64, 3, padding=1)
        self.conv2d_3b = BasicConv2d(64, 80, 1)
        self.conv2d_4a = BasicConv2d(80, 192, 3)
        self.conv2d_4b = BasicConv2d(192, 256, 3, stride=2)
        self.repeat_1 = nn.Sequential(*(Block35(0.17) for _ in range(5)))
        self.mixed_6a = Mixed6a()
        self.repeat_2 = nn.Sequential(*(Block17(0.10) for _ in range(10)))
        self.mixed_7a = Mixed7a()
        self.repeat_3 = nn.Sequential(*(Block8(0.20) for _ in range(5)))
        self.block8 = Block8(1.0, relu=False)
        self.last_linear = nn.Linear(1792, EMBEDDING_DIM, bias=False)
        self.last_bn = nn.BatchNorm1d(EMBEDDING_DIM, eps=1e-3)
        self.memory_format = torch.contiguous_format

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2d_2b(self.conv2d_2a(self.conv2d_1a(x)))
        x = F.max_pool2d(x, 3, 2)
        x = self.conv2d_4b(self.conv2d_4a(self.conv2d_3b(x)))
        x = self.repeat_3(self.mixed_7a(self.repeat_2(self.mixed_6a(self.repeat_1(x)))))
        return self.block8(x).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != INPUT_SIZE:
            raise ValueError(f"expected N x 3 x 160 x 160 images, got {tuple(images.shape)}")
        x = (images * 255.0 - 127.5) / 128.0  # fixed_image_standardization
        x = self.last_bn(self.last_linear(self.features(x.contiguous(memory_format=self.memory_format))))
        return F.normalize(x, p=2, dim=1)


def load_facenet(weights) -> InceptionResNetV1:
    """InceptionResNetV1 with a facenet-pytorch state dict (``.pt`` via weights_only, or safetensors)."""
    model = InceptionResNetV1()
    load_strict(model, read_state_dict(weights), what=f"facenet weights {weights}", ignore_prefixes=(HEAD_PREFIX,))
    model.weights_path = str(weights)
    return model.eval()


class _FoldedConv(nn.Module):
    """A BasicConv2d with its batch norm folded into the conv: conv (with bias) -> ReLU."""

    def __init__(self, basic: BasicConv2d):
        super().__init__()
        w, b = fold_bn(basic.conv.weight, None, basic.bn)
        c = basic.conv
        self.conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, stride=c.stride, padding=c.padding,
                              bias=True, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.conv.weight.copy_(w)
            self.conv.bias.copy_(b)

    def forward(self, x):
        return F.relu(self.conv(x))


def make_fast(model: InceptionResNetV1, fold_bn_layers: bool = True, channels_last: bool = True) -> InceptionResNetV1:
    """A new, frozen, eval-mode copy (``model`` is not changed): every conv's BatchNorm folded into
    the conv, the final BatchNorm1d into the linear layer, weights and activations channels_last.
    Same function up to float rounding."""
    if not isinstance(model, InceptionResNetV1):
        raise TypeError(f"make_fast supports InceptionResNetV1, got {type(model).__name__}")
    fast = copy.deepcopy(model).eval()
    if fold_bn_layers:
        for name, module in list(fast.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, BasicConv2d):
                    setattr(module, child_name, _FoldedConv(child))
        w, b = fold_bn(fast.last_linear.weight, None, fast.last_bn)
        linear = nn.Linear(1792, EMBEDDING_DIM, bias=True, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            linear.bias.copy_(b)
        fast.last_linear, fast.last_bn = linear, nn.Identity()
    if channels_last:
        fast.memory_format = torch.channels_last
        fast.to(memory_format=torch.channels_last)
    fast.switches = {"fold_bn": fold_bn_layers, "channels_last": channels_last}
    return fast.requires_grad_(False)


FACENET_WEIGHTS_ENV = "ADVFACE_FACENET_WEIGHTS"


def _build_facenet(weights=None):
    from .loading import weights_from_env

    return load_facenet(weights_from_env("facenet", weights, FACENET_WEIGHTS_ENV,
                                         "https://github.com/timesler/facenet-pytorch/releases/tag/v2.2.9: "
                                         "20180402-114759-vggface2.pt or 20180408-102900-casia-webface.pt"))


register_model(ModelSpec(
    name="facenet",
    build=_build_facenet,
    input_size=INPUT_SIZE,
    embedding_dim=EMBEDDING_DIM,
    # facenet-pytorch's MTCNN(image_size=160, margin=14): the MTCNN box plus a margin, resized.
    alignment={"aligner": "mtcnn", "size": 160, "template": "facenet", "margin": 14},
    description="FaceNet Inception-ResNet-v1 (512-d, 160x160) from facenet-pytorch's VGGFace2 or "
                "CASIA-WebFace state dict (user-supplied: weights=PATH or $" + FACENET_WEIGHTS_ENV + ")",
    make_fast=make_fast,
))


__all__ = ["EMBEDDING_DIM", "INPUT_SIZE", "InceptionResNetV1", "load_facenet", "make_fast"]

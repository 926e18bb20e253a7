"""A faster copy of dlib-resnet for attacks: same function, cheaper memory traffic.

``make_fast(model)`` returns a new module (the original is untouched) with these switches:

* ``fold_affine``: each ChannelAffine (dlib's folded batch norm, y = gamma * conv(x) + beta)
  is folded into the convolution before it: W' = W * gamma[c_out], b' = b * gamma + beta. In
  fp32 this is the same function up to rounding; under bf16 autocast it also removes a pass
  over every activation.
* ``channels_last``: weights and activations in NHWC order, which oneDNN (CPU) and cuDNN
  (tensor cores) convolve fastest. The input may be in either layout; the output is a
  contiguous N x 128 tensor.
* ``inplace``: ReLUs and the same-shape residual add write into the convolution's output,
  which autograd does not keep, so fewer activation tensors are allocated and input gradients
  still work. (Measured: at most a few percent, within the noise of a shared machine.)
* ``stem``: "plain" (PyTorch's operations), "polyphase" (the stem convolution becomes a
  :class:`~advface_fast.models.frozen_conv.FrozenConv2d` whose input gradient is one stride-1
  forward convolution of the four polyphase sub-kernels: oneDNN's backward-data kernel for this
  7x7 / 2, 3 <- 32 channel shape was a quarter of a bf16 attack step) or "fused" (default: shift,
  convolution and max-pool in cache-sized chunks of images with the polyphase input gradient,
  :class:`~advface_fast.models.stem.ChunkedStem`; "plain" without ``fold_affine``). See
  ``benchmarks/fast_path_switches.py``.
* ``frozen_convs``: every other convolution becomes a ``FrozenConv2d`` with PyTorch's own input
  gradient (weights kept in the autocast dtype, no per-step weight cast; measured no faster, off).
* ``packed`` (CPU; needs ``fold_affine``): the convolutions on weights prepacked once for oneDNN
  (:mod:`~advface_fast.models.packed_conv`: no weight reorder per step), each residual block one
  autograd Function both ways (:mod:`~advface_fast.models.packed_block`). "off"; "weights" (prepacked
  only); "fused" (the default with ``fold_affine`` and ``channels_last``: bias + ReLU and the residual add + ReLU as post-ops, the input gradient's
  shortcut add fused, the stem's ReLU inside its chunks); "fused-mul" (also the ReLU-backward mask as a
  fused multiply). No weight reorder per step (``tests/test_packed.py`` counts them in oneDNN's log);
  on a 2-core AVX512-BF16 EPYC the step time is unchanged within the noise
  (benchmarks/results/fast_path_switches_packed.json); on AMX Xeons a prepacked 3x3 convolution + ReLU
  ran 1.15-1.25x faster than ``F.conv2d`` + ReLU. Elsewhere than a CPU the plain operations run.

Parameters are frozen (attacks need input gradients only) and the model is in eval mode.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .dlib_resnet import ChannelAffine, DlibResNet, ResidualBlock, add_zero_padded
from .frozen_conv import FrozenConv2d, compute_dtype, freeze_convs
from .packed_block import check_block, packed_block
from .packed_conv import PackedConv, packing_supported, to_nhwc
from .registry import register_fast_copy
from .stem import ChunkedStem

STEMS = ("plain", "polyphase", "fused")
PACKED = ("off", "weights", "fused", "fused-mul")
ARITHMETIC_VERSION = 2  # 2: pool before ReLU, input scale in the stem weights, stem switch (packed: its own key)


@torch.no_grad()
def fold_affine_into_conv(conv: nn.Conv2d, affine: ChannelAffine) -> nn.Conv2d:
    """A new conv computing ``affine(conv(x))``: W' = W * gamma[c_out], b' = b * gamma + beta."""
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                       padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                       padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    gamma, beta = affine.gamma.detach(), affine.beta.detach()
    folded.weight.copy_(conv.weight * gamma.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(gamma)
    folded.bias.copy_(bias * gamma + beta)
    return folded


def add_zero_padded_(y: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev (see ``add_zero_padded``), writing into ``y`` when the shapes match.

    ``y`` must be a tensor that autograd does not need (a convolution's output): it may be
    modified in place. When a zero pad is needed (the four downsampling blocks) the sum is
    made out of place: adding in place into a channel slice of ``y`` was measured about 3%
    slower per attack step (bf16, channels_last), probably because autograd's backward of an
    in-place write into a view (CopySlices) copies the whole gradient of ``y``.
    """
    if y.shape == shortcut.shape:
        return y.add_(shortcut)
    return add_zero_padded(y, shortcut)


class FastResidualBlock(nn.Module):
    def __init__(self, block: ResidualBlock, fold_affine: bool, inplace: bool, packed: str = "off"):
        super().__init__()
        self.downsample = block.downsample
        self.inplace = inplace
        self.packed = packed
        if fold_affine:
            self.conv1 = fold_affine_into_conv(block.conv1, block.affine1)
            self.conv2 = fold_affine_into_conv(block.conv2, block.affine2)
            self.affine1 = self.affine2 = nn.Identity()
        else:
            self.conv1, self.affine1 = _copy(block.conv1), _copy(block.affine1)
            self.conv2, self.affine2 = _copy(block.conv2), _copy(block.affine2)

    def pack(self) -> None:
        """Prepack the convolutions (after the last change to the module's convolutions)."""
        self.packed_convs = (PackedConv(self.conv1), PackedConv(self.conv2))
        check_block(*self.packed_convs, self.downsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed != "off":
            dtype = compute_dtype(x)
            if packing_supported(x, dtype):
                with torch.autocast(x.device.type, enabled=False):
                    return packed_block(to_nhwc(x, dtype), *self.packed_convs, self.downsample,
                                        fuse=self.packed != "weights",
                                        relu_backward="mul" if self.packed == "fused-mul" else "threshold")
        # In place is safe: a conv / affine output is not saved for backward; ReLU saves its
        # own output, which nothing modifies afterwards.
        y = F.relu(self.affine1(self.conv1(x)), inplace=self.inplace)
        y = self.affine2(self.conv2(y))
        shortcut = F.avg_pool2d(x, 2, 2) if self.downsample else x
        if self.inplace:
            return add_zero_padded_(y, shortcut).relu_()
        return F.relu(add_zero_padded(y, shortcut))


class FastDlibResNet(nn.Module):
    """dlib-resnet with the affine layers folded, channels_last and in-place activations
    (each optional): N x 3 x 150 x 150 RGB in [0, 1] -> N x 128, like ``DlibResNet``."""

    embedding_dim = DlibResNet.embedding_dim
    input_size = DlibResNet.input_size

    def __init__(self, model: DlibResNet, fold_affine: bool = True, channels_last: bool = True,
                 inplace: bool = True, stem: str | None = None, frozen_convs: bool = False, packed: str | None = None):
        super().__init__()
        if packed is None:  # the default: fused where the copy folds its affines in channels_last
            packed = "fused" if fold_affine and channels_last else "off"
        stem = stem or ("fused" if fold_affine else "plain")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if stem != "plain" and not fold_affine:
            raise ValueError(f"stem={stem!r} needs fold_affine=True (the stem's affine folded into its convolution)")
        if packed not in PACKED:
            raise ValueError(f"packed must be one of {PACKED}, got {packed!r}")
        if packed != "off" and not (fold_affine and channels_last):
            raise ValueError(f"packed={packed!r} needs fold_affine=True and channels_last=True")
        # "packed" only when on, so the keys of copies without it stay what they were
        self.switches = {"fold_affine": fold_affine, "channels_last": channels_last, "inplace": inplace,
                         "stem": stem, "frozen_convs": frozen_convs, **({"packed": packed} if packed != "off" else {})}
        # what cache keys record of this copy's arithmetic (models.arithmetic_key): the switches and a
        # version, bumped whenever the same switches start computing differently
        self.arithmetic = {"version": ARITHMETIC_VERSION, **self.switches}
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.inplace = inplace
        mean = model.mean_rgb.detach().clone()
        # dlib's input layer (x * 255 - mean) / 256 as one op, x * (255/256) - mean/256, fp32 even
        # under autocast. Folded: (255/256) * (x - mean/255), the scale inside the stem's weights
        # (exact for its zero padding), so the input gradient passes the add untouched.
        self.pixel_scale = 1.0 if fold_affine else 255.0 / 256.0
        self.register_buffer("pixel_shift", -mean / (255.0 if fold_affine else 256.0))
        if fold_affine:
            self.stem_conv = fold_affine_into_conv(model.stem_conv, model.stem_affine)
            with torch.no_grad():
                self.stem_conv.weight.mul_(255.0 / 256.0)
            self.stem_affine = nn.Identity()
        else:
            self.stem_conv, self.stem_affine = _copy(model.stem_conv), _copy(model.stem_affine)
        self.blocks = nn.Sequential(*(FastResidualBlock(b, fold_affine, inplace, packed) for b in model.blocks))
        self.fc = _copy(model.fc)
        for name in ("spec", "dat_sha256", "distance_threshold"):
            if hasattr(model, name):
                setattr(self, name, getattr(model, name))
        self.stem = None
        if stem == "polyphase":  # takes the input in any layout, convolves in self.memory_format
            self.stem_conv = FrozenConv2d(self.stem_conv, "polyphase", memory_format=self.memory_format)
        elif stem == "fused":  # shift + stem convolution + max-pool (the ReLU follows the pool)
            self.stem = ChunkedStem(self.stem_conv, self.pixel_shift, pool=(3, 2), memory_format=self.memory_format,
                                    packed=packed != "off", relu=packed in ("fused", "fused-mul"))
            del self.stem_conv
        if frozen_convs:  # the other convolutions, PyTorch's own input gradient (FrozenConv2d modules stay)
            freeze_convs(self, "aten")
        if packed != "off":
            for block in self.blocks:
                block.pack()
        self.to(memory_format=self.memory_format)
        self.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # max-pool before the ReLU: the same function and input gradient (ReLU is monotone, so
        # both pick the same maximum and zero the same gradients), with the ReLU and its backward
        # on the pooled tensor, a quarter of the stem's output.
        if self.stem is not None:
            x = self.stem(images)
        else:
            x = torch.add(self.pixel_shift.to(images.dtype), images, alpha=self.pixel_scale)
            if not (isinstance(self.stem_conv, FrozenConv2d) and self.stem_conv.memory_format is not None):
                x = x.contiguous(memory_format=self.memory_format)
            x = F.max_pool2d(self.stem_affine(self.stem_conv(x)), 3, 2)
        if not (self.stem is not None and self.stem.relu):
            x = F.relu(x, inplace=self.inplace)
        x = self.blocks(x)
        x = x.mean(dim=(2, 3))
        return self.fc(x).contiguous()


def _copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).requires_grad_(False)


def make_fast(model: nn.Module, fold_affine: bool = True, channels_last: bool = True,
              inplace: bool = True, stem: str | None = None, frozen_convs: bool = False,
              packed: str | None = None) -> FastDlibResNet:
    """A new, frozen, eval-mode fast copy of a ``DlibResNet`` (see the module docstring);
    ``model`` itself is not changed. The copy lives on the model's device."""
    if isinstance(model, FastDlibResNet):
        raise TypeError("the model is already a fast copy")
    if not isinstance(model, DlibResNet):
        raise TypeError(f"make_fast supports DlibResNet, got {type(model).__name__}")
    return FastDlibResNet(model, fold_affine=fold_affine, channels_last=channels_last, inplace=inplace,
                          stem=stem, frozen_convs=frozen_convs, packed=packed)


register_fast_copy("dlib-resnet", make_fast)

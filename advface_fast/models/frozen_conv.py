"""A frozen convolution for attacks: the input gradient through the FORWARD convolution kernel.

An attack needs the gradient with respect to the image only; the weights never change. For a
stride-1, dilation-1 convolution the input gradient is itself a convolution:

    dL/dx = conv2d(dL/dy, W.flip(2, 3).transpose(0, 1), padding = k - 1 - p)

so ``FrozenConv2d`` keeps that flipped, transposed weight once and runs the backward pass with
the same oneDNN forward kernel (measured faster on CPU than the backward-data kernel for some
layer shapes; see ``benchmarks/step_variants.py``). It also keeps a copy of both weights in the
autocast dtype, so a bf16 attack step casts no weight (autocast would re-cast every frozen weight
at every step). The image's master copy and every decision stay fp32; in fp32 the result equals
``nn.Conv2d`` up to summation order (tested <= 1e-5), in bf16 the gradients are those of
autocast's bf16 convolution up to rounding.

Other convolutions (stride 2, groups, dilation) keep PyTorch's backward; only the weight cast
is saved there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _FlippedBackwardConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, flipped, bias, padding):
        ctx.save_for_backward(flipped)
        ctx.back_padding = tuple(k - 1 - p for k, p in zip(weight.shape[2:], padding))
        return F.conv2d(x, weight, bias, padding=padding)

    @staticmethod
    def backward(ctx, grad):
        (flipped,) = ctx.saved_tensors
        grad_x = F.conv2d(grad, flipped, padding=ctx.back_padding) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None


class FrozenConv2d(nn.Module):
    """``conv`` (an ``nn.Conv2d``) frozen for input-gradient attacks (see the module docstring)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("FrozenConv2d supports zero padding given as numbers")
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.flip_backward = self.stride == (1, 1) and self.dilation == (1, 1) and self.groups == 1
        self._cache: dict = {}

    def _weights(self, dtype: torch.dtype, memory_format) -> tuple:
        key = (dtype, self.weight.device, memory_format, self.weight._version)
        if key not in self._cache:
            self._cache.clear()
            w = self.weight.detach().to(dtype).contiguous(memory_format=memory_format)
            flipped = (self.weight.detach().flip(2, 3).transpose(0, 1).to(dtype).contiguous(memory_format=memory_format)
                       if self.flip_backward else None)
            b = None if self.bias is None else self.bias.detach().to(dtype)
            self._cache[key] = (w, flipped, b)
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        memory_format = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4
                         and not x.is_contiguous() else torch.contiguous_format)
        w, flipped, b = self._weights(dtype, memory_format)
        x = x.to(dtype)
        with torch.autocast(device_type, enabled=False):
            if self.flip_backward and torch.is_grad_enabled() and x.requires_grad:
                return _FlippedBackwardConv.apply(x, w, flipped, b, self.padding)
            return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1]}, {self.weight.shape[0]}, kernel_size={tuple(self.weight.shape[2:])}, "
                f"stride={self.stride}, padding={self.padding}, flip_backward={self.flip_backward}")


def freeze_convs(module: nn.Module) -> nn.Module:
    """Replace every ``nn.Conv2d`` inside ``module`` by a ``FrozenConv2d`` (in place; returns it)."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            setattr(module, name, FrozenConv2d(child))
        else:
            freeze_convs(child)
    return module


__all__ = ["FrozenConv2d", "freeze_convs"]

"""A frozen convolution for attacks: the input gradient computed as a FORWARD convolution.

An attack needs the gradient with respect to the image only; the weights never change, so the
input gradient of a convolution (a transposed convolution of dL/dy) can be rewritten, once, as an
ordinary convolution that oneDNN runs with its fast forward kernels:

* stride 1 (``input_grad="flipped"``): dL/dx = conv2d(dL/dy, W.flip(2, 3).transpose(0, 1),
  padding = k - 1 - p).
* stride s > 1 (``input_grad="polyphase"``): every input pixel's phase (r + p) mod s sees only
  the taps kh = phase + s*u, so the s*s phases are s*s stride-1 convolutions of dL/dy with
  ceil(k / s)-tap sub-kernels. Stacked along the output channels they are ONE stride-1 convolution
  (C_out' = s*s*C_in); a depth-to-space shuffle, written straight into the input's dtype and
  layout, interleaves the phases. This matters for dlib-resnet's stem (3 <- 32 channels, 7x7,
  stride 2): oneDNN's backward-data kernel for it ran at 121 GFLOP/s in bf16, a quarter of the
  step's time, the polyphase form at 280 (benchmarks/results/stem_input_grad.json).

``FrozenConv2d`` also keeps its weights (and the rewritten ones) in the autocast dtype, so a bf16
attack step casts no weight. The image's master copy and every decision stay fp32; in fp32 the
result equals ``nn.Conv2d`` up to summation order (tested <= 1e-5), in bf16 the gradients are
those of autocast's bf16 convolution up to rounding. ``input_grad="aten"`` keeps PyTorch's own
backward (only the weight cast is saved); ``"auto"`` picks the polyphase form for strided
convolutions with few input channels (an image stem) and PyTorch's backward otherwise: for a
3x3 stride-2 convolution between wide layers the polyphase form does 16/9 the work and oneDNN's
own kernel is already fast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

INPUT_GRADS = ("auto", "aten", "flipped", "polyphase")
POLYPHASE_BELOW_CHANNELS = 16  # "auto": polyphase input gradients for strided convs with fewer input channels


def flipped_weight(weight: torch.Tensor) -> torch.Tensor:
    """C_in x C_out x kh x kw: the stride-1 input gradient's kernel."""
    return weight.flip(2, 3).transpose(0, 1)


def polyphase_weight(weight: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    """(s_h * s_w * C_in) x C_out x T_h x T_w, T = ceil(k / s): the strided input gradient's kernel.

    Output channel (a, b, c) holds, for input phase (a, b) and input channel c, the taps
    W[:, c, a + s_h*u, b + s_w*v] at position (T_h - 1 - u, T_w - 1 - v) (a correlation), zero where
    a + s*u runs past the kernel.
    """
    c_out, c_in, kh, kw = weight.shape
    sh, sw = stride
    th, tw = math.ceil(kh / sh), math.ceil(kw / sw)
    out = weight.new_zeros(sh, sw, c_in, c_out, th, tw)
    w = weight.transpose(0, 1)  # C_in x C_out x kh x kw
    for a in range(sh):
        for b in range(sw):
            taps = w[:, :, a::sh, b::sw]  # u = 0 .. ceil((k - a) / s) - 1
            out[a, b, :, :, th - taps.shape[2]:, tw - taps.shape[3]:] = taps.flip(2, 3)
    return out.reshape(sh * sw * c_in, c_out, th, tw)


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor laid out NHWC (and not also NCHW-contiguous), else contiguous."""
    return (torch.channels_last if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
            and not t.is_contiguous() else torch.contiguous_format)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution of ``x`` runs in: autocast's where it is on, else ``x``'s."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def polyphase_input_grad(grad: torch.Tensor, weight_p: torch.Tensor | None, stride: tuple[int, int],
                         padding: tuple[int, int], out: torch.Tensor, phases: torch.Tensor | None = None) -> torch.Tensor:
    """dL/dx of a stride-s convolution from dL/dy (see the module docstring), written into ``out``
    (the input's shape, dtype and layout) and returned. ``weight_p`` is ``polyphase_weight(W, stride)``
    in ``grad``'s dtype; or ``phases``, its convolution with ``grad`` computed by the caller (a prepacked one)."""
    n, c_in, h, w = out.shape
    sh, sw = stride
    if phases is None:
        th, tw = weight_p.shape[2:]
        phases = F.conv2d(grad, weight_p, padding=(th - 1, tw - 1))  # N x (sh*sw*C_in) x OH' x OW'
    oh, ow = phases.shape[2:]
    exact = (oh * sh, ow * sw) == (h, w) and tuple(padding) == (0, 0)
    # the phases cover padded rows / columns [0, oh*sh) x [0, ow*sw); rows past them get no gradient
    buf = out if exact else torch.zeros((n, c_in, max(oh * sh, h + padding[0]), max(ow * sw, w + padding[1])),
                                        dtype=out.dtype, device=out.device).contiguous(memory_format=memory_format_of(out))
    # N x C x OH' x sh x OW' x sw  <-  N x sh x sw x C x OH' x OW'. The cast first, then the shuffle:
    # measured faster than one copy that casts while it shuffles.
    phases = phases.to(out.dtype)
    buf[:, :, :oh * sh, :ow * sw].unflatten(3, (ow, sw)).unflatten(2, (oh, sh)).copy_(
        phases.view(n, sh, sw, c_in, oh, ow).permute(0, 3, 4, 1, 5, 2))
    if buf is not out:
        out.copy_(buf[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + w])
    return out


class _InputGradAsConv(torch.autograd.Function):
    """conv2d(x in w's dtype and layout, w, b) whose backward gives dL/dx through a forward
    convolution, in x's own dtype and layout."""

    @staticmethod
    def forward(ctx, x, weight, rewritten, bias, stride, padding, polyphase):
        ctx.save_for_backward(rewritten)
        ctx.stride, ctx.padding, ctx.polyphase = stride, padding, polyphase
        ctx.back_padding = tuple(k - 1 - p for k, p in zip(weight.shape[2:], padding))
        ctx.x_meta = (x.shape, x.dtype, x.device, memory_format_of(x))
        x = x.to(weight.dtype).contiguous(memory_format=memory_format_of(weight))
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        (rewritten,) = ctx.saved_tensors
        shape, dtype, device, memory_format = ctx.x_meta
        grad = grad.to(rewritten.dtype)
        out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
        if ctx.polyphase:
            grad_x = polyphase_input_grad(grad, rewritten, ctx.stride, ctx.padding, out)
        else:
            grad_x = out.copy_(F.conv2d(grad, rewritten, padding=ctx.back_padding))
        return grad_x, None, None, None, None, None, None


class FrozenConv2d(nn.Module):
    """``conv`` (an ``nn.Conv2d``) frozen for input-gradient attacks (see the module docstring).

    ``input_grad``: "aten" (PyTorch's backward), "flipped" (stride 1 only), "polyphase" (any stride,
    groups 1, dilation 1) or "auto" (polyphase for strided convolutions on < 16 input channels, otherwise aten).
    ``memory_format``: the layout the convolution runs in (None: the input's); the input gradient
    comes back in the input's own dtype and layout either way.
    """

    def __init__(self, conv: nn.Conv2d, input_grad: str = "auto", memory_format: torch.memory_format | None = None):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("FrozenConv2d supports zero padding given as numbers")
        if input_grad not in INPUT_GRADS:
            raise ValueError(f"input_grad must be one of {INPUT_GRADS}, got {input_grad!r}")
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        plain = self.dilation == (1, 1) and self.groups == 1
        strided = self.stride != (1, 1)
        if input_grad == "auto":  # measured: oneDNN's backward-data kernel starves on few input channels
            input_grad = "polyphase" if strided and plain and conv.in_channels < POLYPHASE_BELOW_CHANNELS else "aten"
        if input_grad == "flipped" and (strided or not plain):
            raise ValueError("input_grad='flipped' needs stride 1, dilation 1 and groups 1")
        if input_grad == "polyphase" and not plain:
            raise ValueError("input_grad='polyphase' needs dilation 1 and groups 1")
        self.input_grad = input_grad
        self.memory_format = memory_format
        self._cache: dict = {}

    def _rewritten(self, weight: torch.Tensor) -> torch.Tensor | None:
        if self.input_grad == "flipped":
            return flipped_weight(weight)
        if self.input_grad == "polyphase":
            return polyphase_weight(weight, self.stride)
        return None

    def weights(self, dtype: torch.dtype, memory_format) -> tuple:
        """(weight, rewritten weight or None, bias) in ``dtype`` and ``memory_format``, built once and cached."""
        key = (dtype, self.weight.device, memory_format, self.weight._version)
        if key not in self._cache:
            self._cache.clear()
            # normal tensors even when first built under inference_mode: an attack saves them for backward
            with torch.inference_mode(False):
                weight = self.weight.detach()
                rewritten = self._rewritten(weight)
                self._cache[key] = (
                    weight.to(dtype).contiguous(memory_format=memory_format),
                    None if rewritten is None else rewritten.to(dtype).contiguous(memory_format=memory_format),
                    None if self.bias is None else self.bias.detach().to(dtype))
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        dtype = compute_dtype(x)
        memory_format = self.memory_format or memory_format_of(x)
        w, rewritten, b = self.weights(dtype, memory_format)
        with torch.autocast(device_type, enabled=False):
            if rewritten is not None and torch.is_grad_enabled() and x.requires_grad:
                return _InputGradAsConv.apply(x, w, rewritten, b, self.stride, self.padding,
                                              self.input_grad == "polyphase")
            x = x.to(dtype).contiguous(memory_format=memory_format)
            return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1]}, {self.weight.shape[0]}, kernel_size={tuple(self.weight.shape[2:])}, "
                f"stride={self.stride}, padding={self.padding}, input_grad={self.input_grad!r}")


def freeze_convs(module: nn.Module, input_grad: str = "auto") -> nn.Module:
    """Replace every ``nn.Conv2d`` inside ``module`` by a ``FrozenConv2d`` (in place; returns it)."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            setattr(module, name, FrozenConv2d(child, input_grad))
        else:
            freeze_convs(child, input_grad)
    return module


__all__ = ["INPUT_GRADS", "FrozenConv2d", "compute_dtype", "flipped_weight", "memory_format_of", "freeze_convs", "polyphase_input_grad", "polyphase_weight"]

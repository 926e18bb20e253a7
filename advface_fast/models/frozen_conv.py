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
* stride s > 1, any groups (``input_grad="dilated"``): dL/dy with s - 1 zeros inserted between its
  entries (and up to s - 1 more at the end, where the forward dropped the input's last rows), then
  the stride-1 rule: a grouped convolution with each group's weights transposed and flipped. It does
  s*s times the multiplications of the transposed convolution, but runs oneDNN's forward kernel: for
  SFace's stride-2 depthwise convolutions (bf16, channels_last, batch 64) oneDNN's backward-data
  kernel took 142-213 ms per layer on an AVX512-BF16 EPYC, this form 3.7-17.8; in fp32 oneDNN's
  was 2.3-2.6x faster than this form (benchmarks/results/strided_depthwise_grad.json). The ONNX
  fast copy uses it in bf16 only (``onnx_ops.op_conv_dilated_grad``); "auto" never picks it.

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

INPUT_GRADS = ("auto", "aten", "flipped", "polyphase", "dilated")
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


def dilated_padding_ok(padding, kernel_size) -> bool:
    """The dilated form's condition on padding: at most kernel - 1 on each side (the stride-1
    convolution's padding, kernel - 1 - padding, is then >= 0)."""
    return all(p <= k - 1 for p, k in zip(padding, kernel_size))


def dilated_weight(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """C_in x (C_out / groups) x kh x kw: each group's weights transposed and flipped, the kernel of
    the strided input gradient's stride-1 convolution over the zero-inserted dL/dy."""
    c_out, c_in_g, kh, kw = weight.shape
    w = weight.reshape(groups, c_out // groups, c_in_g, kh, kw).transpose(1, 2)
    return w.reshape(groups * c_in_g, c_out // groups, kh, kw).flip(2, 3)


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


def dilated_input_grad(grad: torch.Tensor, weight_d: torch.Tensor, stride: tuple[int, int],
                       padding: tuple[int, int], groups: int, input_size: tuple[int, int]) -> torch.Tensor:
    """dL/dx (spatial size ``input_size``) of a stride-s convolution from dL/dy by the zero-inserted
    form (see the module docstring), in ``grad``'s dtype and layout. ``weight_d`` is
    ``dilated_weight(W, groups)`` in ``grad``'s dtype; needs padding <= kernel - 1."""
    h, w = input_size
    kh, kw = weight_d.shape[2:]
    (sh, sw), (ph, pw) = stride, padding
    if not dilated_padding_ok(padding, (kh, kw)):
        raise ValueError(f"the dilated input gradient needs padding <= kernel - 1, got {padding} for {(kh, kw)}")
    # rows (oh - 1) * s + 1 + the rows the forward's floor dropped: h + 2p - k + 1
    up = torch.empty((grad.shape[0], grad.shape[1], h + 2 * ph - kh + 1, w + 2 * pw - kw + 1), dtype=grad.dtype,
                     device=grad.device, memory_format=memory_format_of(grad)).zero_()
    up[:, :, ::sh, ::sw] = grad
    return F.conv2d(up, weight_d, padding=(kh - 1 - ph, kw - 1 - pw), groups=groups)


class _InputGradAsConv(torch.autograd.Function):
    """conv2d(x in w's dtype and layout, w, b) whose backward gives dL/dx through a forward
    convolution, in x's own dtype and layout."""

    @staticmethod
    def forward(ctx, x, weight, rewritten, bias, stride, padding, groups, mode, memory_format):
        ctx.save_for_backward(rewritten)
        ctx.stride, ctx.padding, ctx.groups, ctx.mode = stride, padding, groups, mode
        ctx.back_padding = tuple(k - 1 - p for k, p in zip(weight.shape[2:], padding))
        ctx.x_meta = (x.shape, x.dtype, x.device, memory_format_of(x))
        x = x.to(weight.dtype).contiguous(memory_format=memory_format)
        return F.conv2d(x, weight, bias, stride, padding, 1, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        (rewritten,) = ctx.saved_tensors
        shape, dtype, device, memory_format = ctx.x_meta
        grad = grad.to(rewritten.dtype)
        if ctx.mode == "polyphase":
            out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
            grad_x = polyphase_input_grad(grad, rewritten, ctx.stride, ctx.padding, out)
        else:
            if ctx.mode == "dilated":
                grad_x = dilated_input_grad(grad, rewritten, ctx.stride, ctx.padding, ctx.groups, shape[2:])
            else:
                grad_x = F.conv2d(grad, rewritten, padding=ctx.back_padding)
            grad_x = grad_x.to(dtype).contiguous(memory_format=memory_format)  # no copy when they already match
        return grad_x, *(None,) * 8


def conv2d_input_grad_as_conv(x: torch.Tensor, weight: torch.Tensor, rewritten: torch.Tensor, bias: torch.Tensor | None,
                              stride: tuple[int, int], padding: tuple[int, int], groups: int, mode: str,
                              memory_format: torch.memory_format | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, 1, groups)`` in ``weight``'s dtype and in
    ``memory_format`` (None: ``x``'s) whose input gradient is the ``mode`` rewrite ("flipped",
    "polyphase" or "dilated") with ``rewritten`` its kernel (``flipped_weight`` / ``polyphase_weight`` /
    ``dilated_weight``, in ``weight``'s dtype); the gradient comes back in ``x``'s dtype and layout."""
    if mode not in ("flipped", "polyphase", "dilated"):
        raise ValueError(f"mode must be flipped, polyphase or dilated, got {mode!r}")
    if groups != 1 and mode != "dilated":
        raise ValueError(f"mode {mode!r} needs groups 1 (got {groups}); the dilated form takes any groups")
    return _InputGradAsConv.apply(x, weight, rewritten, bias, stride, padding, groups, mode,
                                  memory_format or memory_format_of(x))


class FrozenConv2d(nn.Module):
    """``conv`` (an ``nn.Conv2d``) frozen for input-gradient attacks (see the module docstring).

    ``input_grad``: "aten" (PyTorch's backward), "flipped" (stride 1, groups 1 only), "polyphase" (any stride,
    groups 1, dilation 1), "dilated" (any stride and groups, dilation 1, padding < kernel) or "auto"
    (polyphase for strided convolutions on < 16 input channels, otherwise aten).
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
        if input_grad == "dilated" and (self.dilation != (1, 1) or not dilated_padding_ok(self.padding, conv.kernel_size)):
            raise ValueError("input_grad='dilated' needs dilation 1 and padding < kernel size")
        self.input_grad = input_grad
        self.memory_format = memory_format
        self._cache: dict = {}

    def _rewritten(self, weight: torch.Tensor) -> torch.Tensor | None:
        if self.input_grad == "flipped":
            return flipped_weight(weight)
        if self.input_grad == "dilated":
            return dilated_weight(weight, self.groups)
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
                return conv2d_input_grad_as_conv(x, w, rewritten, b, self.stride, self.padding, self.groups,
                                                 self.input_grad, memory_format)
            x = x.to(dtype).contiguous(memory_format=memory_format)
            return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1]}, {self.weight.shape[0]}, kernel_size={tuple(self.weight.shape[2:])}, "
                f"stride={self.stride}, padding={self.padding}, input_grad={self.input_grad!r}")


def dilated_supported(stride, padding, dilation, groups: int, kernel_size) -> bool:
    """Where the ONNX fast copy uses the dilated input gradient: strided grouped 2-D convolutions
    (dilation 1, padding < kernel), whose oneDNN bf16 backward-data kernel is the slow one."""
    return (tuple(stride) != (1, 1) and groups > 1 and tuple(dilation) == (1, 1) and len(tuple(kernel_size)) == 2
            and dilated_padding_ok(padding, kernel_size))


def freeze_convs(module: nn.Module, input_grad: str = "auto") -> nn.Module:
    """Replace every ``nn.Conv2d`` inside ``module`` by a ``FrozenConv2d`` (in place; returns it)."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            setattr(module, name, FrozenConv2d(child, input_grad))
        else:
            freeze_convs(child, input_grad)
    return module


__all__ = ["INPUT_GRADS", "FrozenConv2d", "compute_dtype", "conv2d_input_grad_as_conv", "dilated_input_grad",
           "dilated_padding_ok", "dilated_supported", "dilated_weight", "flipped_weight", "freeze_convs", "memory_format_of",
           "polyphase_input_grad", "polyphase_weight"]

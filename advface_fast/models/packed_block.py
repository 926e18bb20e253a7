"""dlib-resnet's residual block on prepacked convolutions, with the work between them fused in.

A block is ``relu(conv2(relu(conv1(x))) + shortcut(x))`` (biases folded in; see ``fast.py``). With
``PackedConv`` (prepacked oneDNN weights) one autograd Function runs it both ways:

forward (``fuse``: bias + ReLU and the residual add + ReLU as post-ops of the two convolutions)::

    y1  = conv1(x) + b1, ReLU                   one primitive
    out = conv2(y1) + b2 + shortcut, ReLU       one primitive (two when the shortcut is larger)

backward (dL/dx only; the weights are frozen)::

    g_s  = dL/dout * [out > 0]                  threshold_backward
    g_y1 = conv2^T(g_s) * [y1 > 0]              a forward primitive of flipped weights, then the mask
                                                (``relu_backward="mul"``: the mask as a fused multiply)
    g_x  = conv1^T(g_y1) + shortcut^T(g_s)      one primitive with the add fused (stride 1);
                                                a prepacked transposed convolution (downsampling),
                                                the average pool's gradient added in place

Without ``fuse`` the same primitives run without post-ops, the bias, ReLUs and add separately (the
"prepacked weights only" switch). Saved for backward: ``y1`` and ``out`` (``out`` is the next
block's input, kept anyway) and ``x`` for the downsampling shortcut's pooling. In fp32 the result
equals the plain block up to summation order; in bf16 the fused post-ops round once where the plain
path rounds after each operation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .packed_conv import PackedConv, to_nhwc

RELU_BACKWARDS = ("threshold", "mul")


def _threshold(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.threshold_backward(grad, out, 0)


def _pad_to(t: torch.Tensor, shape) -> torch.Tensor:
    """``t`` zero-padded at the end of the channel, height and width dims to ``shape`` (dlib's add_prev), NHWC."""
    if tuple(t.shape) == tuple(shape):
        return t
    pad = (0, shape[3] - t.shape[3], 0, shape[2] - t.shape[2], 0, shape[1] - t.shape[1])
    return F.pad(t, pad).contiguous(memory_format=torch.channels_last)


class _PackedBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, conv1: PackedConv, conv2: PackedConv, downsample: bool, fuse: bool, relu_backward: str):
        if fuse:
            y1 = conv1.forward(x, "relu")
        else:
            y1 = conv1.forward(x).relu_()
        shortcut = F.avg_pool2d(x, 2, 2) if downsample else x
        out_shape = conv2.out_shape(y1.shape)
        if fuse and all(a <= b for a, b in zip(shortcut.shape[2:], out_shape[2:])):
            out = conv2.forward(y1, "relu", add=_pad_to(shortcut, out_shape))
        else:
            y2 = conv2.forward(y1)
            shape = [y2.shape[0]] + [max(a, b) for a, b in zip(y2.shape[1:], shortcut.shape[1:])]
            out = _pad_to(y2, shape).add_(_pad_to(shortcut, shape)).relu_()
        ctx.save_for_backward(x, y1, out)
        ctx.convs, ctx.downsample, ctx.relu_backward = (conv1, conv2), downsample, relu_backward
        return out

    @staticmethod
    @once_differentiable  # the primitives have no derivatives of their own: no double backward
    def backward(ctx, grad):
        x, y1, out = ctx.saved_tensors
        conv1, conv2 = ctx.convs
        g_s = _threshold(to_nhwc(grad, out.dtype), out)
        y2_shape = conv2.out_shape(y1.shape)
        g_y2 = g_s if tuple(g_s.shape) == tuple(y2_shape) else \
            g_s[:, :, :y2_shape[2], :y2_shape[3]].contiguous(memory_format=torch.channels_last)
        if ctx.relu_backward == "mul":  # [y1 > 0] as a multiply fused into the primitive
            g_y1 = conv2.input_grad(g_y2, y1.shape, mul=torch.sign(y1))
        else:
            g_y1 = _threshold(conv2.input_grad(g_y2, y1.shape), y1)
        if not ctx.downsample:
            return conv1.input_grad(g_y1, x.shape, add=g_s), None, None, None, None, None
        c, h, w = x.shape[1], x.shape[2] // 2, x.shape[3] // 2
        g_x = conv1.input_grad(g_y1, x.shape)
        # the shortcut's 2 x 2 average pool: g / 4 added in place to each window's four inputs (an odd
        # input's last row / column is in no window); one pass, where avg_pool2d_backward zero-fills,
        # scatters and is then added. Same bits: g * 0.25 is exact and rounds once with the add.
        g_x[:, :, :2 * h, :2 * w].unflatten(3, (w, 2)).unflatten(2, (h, 2)).add_(
            g_s[:, :c, :h, None, :w, None], alpha=0.25)
        return g_x, None, None, None, None, None


def check_block(conv1: PackedConv, conv2: PackedConv, downsample: bool) -> None:
    """The shapes this Function supports: dlib's blocks (the shortcut never has more channels than the output)."""
    c_in, c_out = conv1.conv.weight.shape[1], conv1.conv.weight.shape[0]
    if tuple(conv2.conv.weight.shape[:2]) != (c_out, c_out) or (c_in > c_out if downsample else c_in != c_out):
        raise ValueError(f"packed block: conv1 {c_in}->{c_out}, conv2 {tuple(conv2.conv.weight.shape[1::-1])} "
                         f"with downsample={downsample} is not a dlib residual block (shortcut channels <= output's)")


def packed_block(x: torch.Tensor, conv1: PackedConv, conv2: PackedConv, downsample: bool, fuse: bool = True,
                 relu_backward: str = "threshold") -> torch.Tensor:
    """One residual block on prepacked convolutions (see the module docstring); ``x`` NHWC in the compute dtype."""
    if relu_backward not in RELU_BACKWARDS:
        raise ValueError(f"relu_backward must be one of {RELU_BACKWARDS}, got {relu_backward!r}")
    return _PackedBlockFunction.apply(x, conv1, conv2, downsample, fuse, relu_backward)


__all__ = ["RELU_BACKWARDS", "check_block", "packed_block"]

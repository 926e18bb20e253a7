"""An image stem for attacks: shift -> strided convolution -> max-pool, in cache-sized chunks.

The stem of a face network is the part of an attack step that the GEMM rate does not predict: its
tensors are the largest (dlib-resnet: 32 x 72 x 72 per image after a 7 x 7 / 2 convolution on
3 channels) and its arithmetic the thinnest (3 input channels forward, 3 output channels in the
input gradient). Profiled on a 2-core AVX512-BF16 machine it took about a third of a bf16 step for
9% of the FLOPs, most of it streaming those tensors through memory one operation at a time.

``ChunkedStem`` computes ``max_pool(conv(x + shift))`` for a few images at a time, so that each
chunk's convolution output, pooling indices and gradients stay in cache between the operations
that make and use them, and gives the input gradient through the polyphase forward convolution of
:mod:`~advface_fast.models.frozen_conv` (oneDNN's backward-data kernel starves on 3 output
channels), written straight into the fp32 gradient of the image in the image's own layout. The
shift is added in fp32 before the cast to the compute dtype (bf16 keeps 8 bits of mantissa, so
the centred image keeps finer steps than the raw [0, 1] one).

In fp32 the output and the input gradient equal the plain operations up to summation order (the
pooling picks the same maxima, so the same pixels receive gradient); in bf16 they are autocast's
up to rounding. The image's master copy and every decision stay fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .frozen_conv import FrozenConv2d, compute_dtype, memory_format_of, polyphase_input_grad
from .packed_conv import PackedConv, packing_supported

DEFAULT_CHUNK = 8  # images per chunk: 2-4 slower, 8-32 within 2% of each other (benchmarks/results/stem_input_grad.json)


def _prepare(images: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype, memory_format) -> torch.Tensor:
    return (images + shift).to(dtype).contiguous(memory_format=memory_format)


class _ChunkedStemFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images, shift, weight, weight_p, bias, conv_stride, pool, chunk, packed, relu):
        memory_format = memory_format_of(weight)
        kernel, stride = pool
        outs, saved = [], []
        for start in range(0, images.shape[0], chunk):
            x = _prepare(images[start:start + chunk], shift, weight.dtype, memory_format)
            y = packed.forward(x) if packed is not None else F.conv2d(x, weight, bias, conv_stride)
            pooled, indices = torch.ops.aten.max_pool2d_with_indices(y, [kernel, kernel], [stride, stride])
            outs.append(pooled.relu_() if relu else pooled)
            saved.append(indices)
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        ctx.save_for_backward(weight_p, out if relu else None, *saved)
        ctx.meta = (images.shape, images.dtype, images.device, memory_format_of(images), y.shape[1:], memory_format,
                    conv_stride, pool, chunk, packed)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return (None,) * 10
        weight_p, out_relu, *saved = ctx.saved_tensors
        shape, dtype, device, images_format, conv_shape, memory_format, conv_stride, pool, chunk, packed = ctx.meta
        kernel, stride = pool
        grad = grad.to(weight_p.dtype)
        out = torch.empty(shape, dtype=dtype, device=device, memory_format=images_format)
        # the pooling backward's "self": read for its shape and layout only, allocated once
        like = torch.empty((min(chunk, shape[0]), *conv_shape), dtype=weight_p.dtype, device=device,
                           memory_format=memory_format)
        for i, start in enumerate(range(0, shape[0], chunk)):
            g = grad[start:start + chunk]
            if out_relu is not None:  # the ReLU after the pool, chunk by chunk
                g = torch.ops.aten.threshold_backward(g, out_relu[start:start + chunk], 0)
            g_conv = torch.ops.aten.max_pool2d_with_indices_backward(
                g, like[:g.shape[0]], [kernel, kernel], [stride, stride], [0, 0], [1, 1], False, saved[i])
            target = out[start:start + chunk]
            phases = None if packed is None else packed.input_grad(g_conv, target.shape)
            polyphase_input_grad(g_conv, weight_p, conv_stride, (0, 0), target, phases=phases)
        return (out,) + (None,) * 9


class ChunkedStem(nn.Module):
    """``max_pool2d(conv(images + shift), kernel, stride)`` for input-gradient attacks (see the
    module docstring). ``conv``: an ``nn.Conv2d`` with zero padding, stride > 1, groups 1;
    ``shift``: a 1 x C x 1 x 1 fp32 offset added to the images first. Runs in ``memory_format``
    and in the autocast dtype when autocast is on (weights cached in that dtype). ``packed``: the
    convolution and its polyphase input gradient on prepacked oneDNN weights (CPU; see
    :mod:`~advface_fast.models.packed_conv`); ``relu``: a ReLU after the pool, chunk by chunk both
    ways. No gradient needed: the plain operations on the whole batch.
    """

    def __init__(self, conv: nn.Conv2d, shift: torch.Tensor, pool: tuple[int, int] = (3, 2), chunk: int = DEFAULT_CHUNK,
                 memory_format: torch.memory_format = torch.channels_last, packed: bool = False, relu: bool = False):
        super().__init__()
        if conv.padding != (0, 0) or conv.groups != 1 or conv.dilation != (1, 1) or conv.stride == (1, 1):
            raise ValueError("ChunkedStem needs a strided convolution without padding, groups or dilation")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        # the convolution's weights and polyphase kernel, cached in the compute dtype by FrozenConv2d
        self.conv = FrozenConv2d(conv, "polyphase", memory_format=memory_format)
        self.packed = PackedConv(self.conv, "polyphase") if packed else None
        self.register_buffer("shift", shift.detach().clone().float().reshape(1, -1, 1, 1))
        self.stride, self.pool, self.chunk, self.memory_format = conv.stride, tuple(pool), chunk, memory_format
        self.relu = relu

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(images)
        w, w_p, b = self.conv.weights(dtype, self.memory_format)
        packed = self.packed if self.packed is not None and packing_supported(images, dtype) \
            and self.memory_format == torch.channels_last else None
        with torch.autocast(images.device.type, enabled=False):
            if torch.is_grad_enabled() and images.requires_grad and images.shape[0] > 0:
                return _ChunkedStemFunction.apply(images, self.shift, w, w_p, b, self.stride, self.pool, self.chunk,
                                                  packed, self.relu)
            x = _prepare(images, self.shift, dtype, self.memory_format)
            y = F.max_pool2d(packed.forward(x) if packed is not None else F.conv2d(x, w, b, self.stride),
                             self.pool[0], self.pool[1])
            return y.relu_() if self.relu else y

    def extra_repr(self) -> str:
        return f"pool={self.pool}, chunk={self.chunk}, packed={self.packed is not None}, relu={self.relu}"


__all__ = ["DEFAULT_CHUNK", "ChunkedStem"]

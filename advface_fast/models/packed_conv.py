"""Prepacked oneDNN convolutions for frozen CPU model copies: weights re-packed once, post-ops fused.

PyTorch's eager ``F.conv2d`` hands oneDNN the weights in PyTorch's layout at every call, and oneDNN
re-packs them into the blocked layout its kernel wants: on a 2-core AVX512-BF16 EPYC the fast
dlib-resnet step performed 72 such weight reorders (benchmarks/results/reorders_per_step_*.json);
on an AMX Xeon they were about a fifth of the convolution time. A frozen copy's weights never
change, so ``PackedConv`` packs them once per (dtype, input shape) with PyTorch's own inductor
primitives (``torch._C._nn.mkldnn_reorder_conv2d_weight`` and
``torch.ops.mkldnn._reorder_convolution_transpose_weight``) and runs

* the forward convolution with an optional fused post-op (``torch.ops.mkldnn._convolution_pointwise``):
  bias + ReLU, or bias + a residual tensor added (+ ReLU);
* the input gradient as a forward primitive of prepacked rewritten weights: the flipped kernel
  for a stride-1 convolution (with an optional fused add of another gradient), a prepacked
  transposed convolution for a strided one, or the polyphase kernel of an image stem
  (see :mod:`~advface_fast.models.frozen_conv`).

A pack is keyed by the weight tensor's identity, version and storage (which the pack holds, so its
address cannot be reused while the pack lives), so a changed weight (training, a ``load_state_dict``,
``param.data = ...``) is re-packed, never met with a stale pack; copies and pickles drop their packs.
CPU only (``packing_supported``); elsewhere the callers run their plain operations.
"""

from __future__ import annotations

import torch

from .frozen_conv import flipped_weight, polyphase_weight

INPUT_GRADS = ("flipped", "transposed", "polyphase")


def packing_supported(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """True where oneDNN's prepacked primitives run ``x`` in ``dtype``: CPU, oneDNN on, fp32 / bf16."""
    return (x.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def to_nhwc(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, NHWC (a no-op when it already is)."""
    return t.to(dtype).contiguous(memory_format=torch.channels_last)


class PackedConv:
    """A frozen convolution's weights, prepacked for the forward pass and the input gradient.

    ``conv``: a module with ``weight``, ``bias``, ``stride``, ``padding`` (an ``nn.Conv2d`` or a
    ``FrozenConv2d``; groups 1, dilation 1, zero padding), read when a pack is (re)built.
    ``input_grad``: "flipped" (stride 1), "transposed" (any stride) or "polyphase" (strided, few
    input channels; :meth:`input_grad` then returns the phases, which the caller interleaves).
    Activations are NHWC in the pack's dtype; outputs are NHWC.
    """

    def __init__(self, conv, input_grad: str | None = None):
        if tuple(conv.dilation) != (1, 1) or conv.groups != 1:
            raise ValueError("PackedConv supports dilation 1 and groups 1")
        if input_grad is None:
            input_grad = "flipped" if tuple(conv.stride) == (1, 1) else "transposed"
        if input_grad not in INPUT_GRADS:
            raise ValueError(f"input_grad must be one of {INPUT_GRADS}, got {input_grad!r}")
        if input_grad == "flipped" and tuple(conv.stride) != (1, 1):
            raise ValueError("input_grad='flipped' needs stride 1")
        self.conv, self.input_grad_kind = conv, input_grad
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.kernel = list(conv.weight.shape[2:])
        self._packs: dict = {}

    # copies and pickles share the module's weights, never its packs
    def __getstate__(self):
        return {**self.__dict__, "_packs": {}}

    def out_shape(self, in_shape) -> list[int]:
        n, _, h, w = in_shape
        oh, ow = ((s + 2 * p - k) // st + 1 for s, p, k, st in zip((h, w), self.padding, self.kernel, self.stride))
        return [n, self.conv.weight.shape[0], oh, ow]

    def _pack(self, dtype: torch.dtype, in_shape) -> dict:
        weight, bias = self.conv.weight, self.conv.bias
        key = (dtype, tuple(in_shape[1:]), id(weight), weight._version, weight.data_ptr(),
               None if bias is None else (bias._version, bias.data_ptr()))
        pack = self._packs.get(key)
        if pack is not None:
            return pack
        for old in [k for k in self._packs if k[:2] == key[:2]]:  # this shape's pack of an earlier weight
            del self._packs[old]
        if len(self._packs) >= 8:  # a few input shapes (e.g. the last partial batch's chunk) at most
            self._packs.clear()
        with torch.inference_mode(False), torch.no_grad():
            w = weight.detach().to(dtype).contiguous()
            in_shape, out_shape = list(in_shape), self.out_shape(in_shape)
            # the weight's storage is held by its pack, so no other tensor can take its address while the
            # pack lives: a key with the same address is the same storage (``param.data = ...`` re-packs)
            pack = {"source": (weight.detach(), None if bias is None else bias.detach()),
                    "bias": None if bias is None else bias.detach().to(dtype),
                    "forward": torch._C._nn.mkldnn_reorder_conv2d_weight(
                        w.to_mkldnn(), self.padding, self.stride, [1, 1], 1, in_shape)}
            if self.input_grad_kind == "flipped":
                pack["grad_padding"] = [k - 1 - p for k, p in zip(self.kernel, self.padding)]
                pack["grad"] = torch._C._nn.mkldnn_reorder_conv2d_weight(
                    flipped_weight(w).contiguous().to_mkldnn(), pack["grad_padding"], [1, 1], [1, 1], 1, out_shape)
            elif self.input_grad_kind == "transposed":
                # rows / columns of the input that no output window reaches at the far edge
                pack["output_padding"] = [s - ((o - 1) * st + k - 2 * p) for s, o, k, p, st in
                                          zip(in_shape[2:], out_shape[2:], self.kernel, self.padding, self.stride)]
                pack["grad"] = torch.ops.mkldnn._reorder_convolution_transpose_weight(
                    w, self.padding, pack["output_padding"], self.stride, [1, 1], 1, out_shape)
            else:
                w_p = polyphase_weight(w, tuple(self.stride)).contiguous()
                pack["grad_padding"] = [t - 1 for t in w_p.shape[2:]]
                pack["grad"] = torch._C._nn.mkldnn_reorder_conv2d_weight(
                    w_p.to_mkldnn(), pack["grad_padding"], [1, 1], [1, 1], 1, out_shape)
        self._packs[key] = pack
        return pack

    def forward(self, x: torch.Tensor, unary: str = "none", add: torch.Tensor | None = None) -> torch.Tensor:
        """conv(x) + bias [+ add] [then ReLU when ``unary="relu"``], in one oneDNN primitive.
        ``x`` (and ``add``, the output's shape) NHWC in the compute dtype."""
        pack = self._pack(x.dtype, x.shape)
        if add is None:
            return torch.ops.mkldnn._convolution_pointwise(x, pack["forward"], pack["bias"], self.padding, self.stride,
                                                           [1, 1], 1, unary, [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, add, pack["forward"], pack["bias"], self.padding, self.stride, [1, 1], 1, "add", 1.0,
            None if unary == "none" else unary, [], None if unary == "none" else "")

    def input_grad(self, grad: torch.Tensor, in_shape, add: torch.Tensor | None = None,
                   mul: torch.Tensor | None = None) -> torch.Tensor:
        """dL/dx (NHWC, ``grad``'s dtype) of this convolution at an input of ``in_shape`` from
        dL/dy; "flipped" fuses ``+ add`` or ``* mul`` (the input's shape) into the primitive, the
        others add it after. For "polyphase": the phases (see ``frozen_conv.polyphase_input_grad``)."""
        if add is not None and mul is not None:
            raise ValueError("one fused post-op at a time: add or mul")
        pack = self._pack(grad.dtype, in_shape)
        if self.input_grad_kind == "flipped" and (add is not None or mul is not None):  # fused into the primitive
            op, other = ("add", add) if add is not None else ("mul", mul)
            return torch.ops.mkldnn._convolution_pointwise.binary(
                grad, other, pack["grad"], None, pack["grad_padding"], [1, 1], [1, 1], 1, op,
                1.0 if op == "add" else None, None, [], None)
        if self.input_grad_kind == "transposed":
            out = torch.ops.mkldnn._convolution_transpose_pointwise(
                grad, pack["grad"], None, self.padding, pack["output_padding"], self.stride, [1, 1], 1, "none", [], "")
        else:
            out = torch.ops.mkldnn._convolution_pointwise(grad, pack["grad"], None, pack["grad_padding"], [1, 1],
                                                          [1, 1], 1, "none", [], "")
        return out.add_(add) if add is not None else out.mul_(mul) if mul is not None else out

__all__ = ["INPUT_GRADS", "PackedConv", "packing_supported", "to_nhwc"]

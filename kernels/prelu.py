"""PReLU with a fused input-gradient backward: y = x if x > 0 else a[c] * x.

Attacks differentiate w.r.t. the input only; the slopes are frozen. ATen's PReLU backward
(``_prelu_kernel_backward``) always computes the slope gradient too - a full-size tensor that is
then reduced - and its CPU loop is not vectorised: measured ~28% of SFace's whole attack step
(``benchmarks/model_attack_step.py``, 1 thread, batch 16), 10-30x a PReLU forward. Here the
backward computes only ``grad_x = g if x > 0 else a[c] * g``:

  "triton"    one 1-D Triton kernel over the flattened tensor (channel of element i from the
              layout: NCHW ``(i // (H*W)) % C``, channels_last ``i % C``): CUDA tensors, or CPU
              tensors under TRITON_INTERPRET=1.
  "fused"     vectorised ATen ops (no bool tensors, whose CPU loops are the slow part). bf16 / fp16:
              two passes, ``h = leaky_relu_backward(g, x, slope=0)`` (g where x > 0, else g * 0)
              and ``grad_x = lerp(h, g, a)`` (= h + a * (g - h); ATen computes it in fp32, where
              a * g of two 8- or 11-bit mantissas is exact, so it rounds once, as the reference).
              fp32 (where that lerp is one ulp off): ``t = 2 * sign(relu(x)) - 1`` (+1 where
              x > 0, else -1; NaN and 0 give -1), ``d = prelu(t, a) * t`` (exactly 1 or a),
              ``grad_x = d * g``: seven passes. bf16, 64 x 64 x 112 x 112, 2 threads: two passes
              32.4 ms channels_last / 17.5 NCHW vs seven 51.0 / 49.4 (ATen's autograd 171 / 174;
              benchmarks/results/bench_prelu_bf16.json).
  "reference" the plain eager formula ``torch.where(x > 0, g, a * g)`` (ATen's own rule).
  "auto"      triton for CUDA tensors when Triton is importable, else fused.

Every path gives the reference's values (1 * g and a * g are single roundings, NaN and zero
inputs take the slope branch as in ATen), for fp32 and bf16, NCHW and channels_last; the fp32
paths and "triton" bit for bit. The bf16 / fp16 "fused" path differs in two corners: the sign of a
zero result (h + a * (g - h) gives +0 where the reference may give -0: equal values, and sign(+-0)
is 0 for the attacks) and infinite upstream gradients, which give NaN (inf - inf) where the
reference gives +-inf (a bf16 gradient overflowing; the attacks then zero the NaN).

``prelu(x, a)`` is the drop-in: the forward is ``F.prelu`` itself; the fused backward is used
only when x needs a gradient and ``a`` does not (training the slopes falls back to ATen).

Example::

    y = prelu(x, slope)          # x: N x C x H x W (any layout), slope: C (or 1) values
    y.sum().backward()           # x.grad via the fused backward
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .pgd_step import BLOCK_SIZE, IMPLS, tl, triton
from .pgd_step import resolve_impl as _resolve_impl


if triton is not None:

    @triton.jit
    def _prelu_backward_kernel(g_ptr, x_ptr, a_ptr, out_ptr, n_elements, inner, channels,
                               CHANNELS_LAST: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        pid = tl.program_id(0)
        offsets = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_elements
        g = tl.load(g_ptr + offsets, mask=mask)
        x = tl.load(x_ptr + offsets, mask=mask)
        if CHANNELS_LAST:
            c = offsets % channels
        else:
            c = (offsets // inner) % channels
        a = tl.load(a_ptr + c, mask=mask)
        out = tl.where(x > 0, g, a * g)
        tl.store(out_ptr + offsets, out, mask=mask)

    _INTERPRETED = type(_prelu_backward_kernel).__name__ == "InterpretedFunction"
else:
    _INTERPRETED = False


def resolve_impl(device, impl: str = "auto") -> str:
    """The implementation that runs on `device` (the update kernels' rule, for this kernel's build)."""
    return _resolve_impl(device, impl, _INTERPRETED)


def _slope_view(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return a.reshape(1, -1, *([1] * (x.dim() - 2))) if x.dim() >= 2 and a.numel() > 1 else a.reshape(())


def _check(x: torch.Tensor, a: torch.Tensor) -> None:
    if a.dim() > 1 or (a.numel() != 1 and (x.dim() < 2 or a.numel() != x.shape[1])):
        raise ValueError(f"slope must hold 1 or C={x.shape[1] if x.dim() > 1 else '?'} values, got shape {tuple(a.shape)}")


def prelu_backward_reference(grad: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The input gradient of PReLU, as ATen defines it: g where x > 0, else a * g."""
    _check(x, a)
    return torch.where(x > 0, grad, _slope_view(a, x).to(grad.dtype) * grad)


def prelu_backward_two_pass(grad: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The bf16 / fp16 "fused" form: leaky_relu_backward with slope 0, then lerp (module docstring)."""
    _check(x, a)
    kept = torch.ops.aten.leaky_relu_backward(grad, x, 0.0, False)  # g where x > 0, else g * 0
    return torch.lerp(kept, grad, _slope_view(a, x).to(x.dtype))


def prelu_backward_sign(grad: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The fp32 "fused" form: the slope (1 or a) built from sign(relu(x)) (module docstring)."""
    _check(x, a)
    t = torch.relu(x).sign_().mul_(2).sub_(1)  # +1 where x > 0, -1 elsewhere (0, negative, NaN)
    d = F.prelu(t, a.to(t.dtype)).mul_(t)  # 1 or a, exactly
    return d.mul_(grad) if d.dtype == torch.promote_types(d.dtype, grad.dtype) else d * grad


def prelu_backward_fused(grad: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The same gradient from vectorised float ops only (see the module docstring)."""
    if x.dtype in (torch.bfloat16, torch.float16) and grad.dtype == x.dtype:
        return prelu_backward_two_pass(grad, x, a)
    return prelu_backward_sign(grad, x, a)


def prelu_backward_triton(grad: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The same gradient from one Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1)."""
    _check(x, a)
    resolve_impl(x.device, "triton")
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    grad = grad.to(x.dtype).contiguous(memory_format=fmt)
    slope = a.reshape(-1).to(device=x.device, dtype=x.dtype).contiguous()
    channels = slope.numel() if slope.numel() > 1 else 1
    inner = 1
    for s in x.shape[2:]:
        inner *= s
    out = torch.empty_like(x, memory_format=fmt)
    n = x.numel()
    if n:
        _prelu_backward_kernel[(triton.cdiv(n, BLOCK_SIZE),)](
            grad, x, slope, out, n, max(inner, 1), channels, CHANNELS_LAST=channels_last, BLOCK_SIZE=BLOCK_SIZE)
    return out


def prelu_backward(grad: torch.Tensor, x: torch.Tensor, a: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """The input gradient of ``F.prelu(x, a)`` for upstream gradient ``grad`` (see IMPLS)."""
    impl = resolve_impl(x.device, impl)
    fn = {"triton": prelu_backward_triton, "fused": prelu_backward_fused,
          "reference": prelu_backward_reference}[impl]
    return fn(grad, x, a)


class _PReLUInputGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, impl):
        ctx.save_for_backward(x, a)
        ctx.impl = impl
        return F.prelu(x, a)

    @staticmethod
    def backward(ctx, grad):
        x, a = ctx.saved_tensors
        return prelu_backward(grad, x, a, ctx.impl), None, None


def prelu(x: torch.Tensor, a: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """``F.prelu(x, a)`` whose backward computes the input gradient only (fused; see the module
    docstring). Falls back to ATen's PReLU when the slopes need a gradient or x does not."""
    if a.requires_grad or not (x.requires_grad and torch.is_grad_enabled()):
        return F.prelu(x, a)
    _check(x, a)
    return _PReLUInputGrad.apply(x, a, impl)


__all__ = ["IMPLS", "prelu", "prelu_backward", "prelu_backward_fused", "prelu_backward_reference",
           "prelu_backward_sign", "prelu_backward_triton", "prelu_backward_two_pass"]

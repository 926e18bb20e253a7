"""Fused Adam step for the C&W attack, projected onto a box, in place on x, m and v.

    m <- beta1 m + (1 - beta1) g             (as torch.optim.Adam: m.lerp_(g, 1 - beta1))
    v <- beta2 v + (1 - beta2) g^2
    x <- clamp(x - lr * m_hat / (sqrt(v_hat) + eps), lo, hi),  m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t)

`grad` is the gradient of the loss to MINIMISE and `step` is Adam's 1-based step count. The reference is
torch.optim.Adam's single-tensor update, op for op, followed by a clamp, so it equals Adam + clamp bitwise.

Implementations (dispatch as in pgd_step):
  "triton"    1-D flattened Triton kernel, one pass over memory, the reference's order of operations.
  "fused"     in-place ATen; folds the bias correction of v into eps and the step size
              (sqrt(v_hat) + eps = (sqrt(v) + eps * sqrt(bc2)) / sqrt(bc2)), which saves one pass and
              one temporary; m and v are bitwise equal to the reference, x agrees to float rounding (~1e-7).
  "reference" torch.optim.Adam's formula, eager.
A NaN gradient propagates into m, v and x, exactly as in torch.optim.Adam.
"""

from __future__ import annotations

import numbers

import torch

from .pgd_step import BLOCK_SIZE, NUM_WARPS, check_tensors, resolve_impl, tl, triton

if triton is not None:

    @triton.jit
    def _cw_step_kernel(
        x_ptr,
        grad_ptr,
        m_ptr,
        v_ptr,
        lo_ptr,
        hi_ptr,
        n_elements,
        weight1,  # 1 - beta1, the lerp weight of m
        beta2,
        one_minus_beta2,
        bias_correction2_sqrt,
        neg_step_size,  # -lr / (1 - beta1^t)
        eps,
        SMALL_WEIGHT: tl.constexpr,  # weight1 < 0.5: selects ATen's lerp formula
        BLOCK_SIZE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offsets = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_elements

        x = tl.load(x_ptr + offsets, mask=mask)
        g = tl.load(grad_ptr + offsets, mask=mask)
        m = tl.load(m_ptr + offsets, mask=mask)
        v = tl.load(v_ptr + offsets, mask=mask)
        lo = tl.load(lo_ptr + offsets, mask=mask)
        hi = tl.load(hi_ptr + offsets, mask=mask)

        # ATen's lerp picks the formula that is exact at the nearer end point.
        if SMALL_WEIGHT:
            m = m + weight1 * (g - m)
        else:
            m = g - (g - m) * (1.0 - weight1)
        v = v * beta2 + (one_minus_beta2 * g) * g  # addcmul: self + (value * t1) * t2
        # IEEE sqrt and division (not the approximate GPU defaults) to stay close to ATen.
        denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
        x = x + neg_step_size * tl.div_rn(m, denom)
        x = tl.where(x != x, x, tl.minimum(tl.maximum(x, lo), hi))

        tl.store(m_ptr + offsets, m, mask=mask)
        tl.store(v_ptr + offsets, v, mask=mask)
        tl.store(x_ptr + offsets, x, mask=mask)

    _INTERPRETED = type(_cw_step_kernel).__name__ == "InterpretedFunction"
else:
    _INTERPRETED = False


def _check_hyper(step, lr, beta1, beta2, eps) -> None:
    if not isinstance(step, numbers.Integral) or isinstance(step, bool) or step < 1:
        raise ValueError(f"cw_step: step must be an int >= 1 (Adam's 1-based step count), got {step!r}")
    for name, value in (("lr", lr), ("eps", eps)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise TypeError(f"cw_step: {name} must be a float, got {type(value).__name__}")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not isinstance(beta, numbers.Real) or not 0.0 <= beta < 1.0:
            raise ValueError(f"cw_step: {name} must be a float in [0, 1), got {beta!r}")


# ----------------------------------------------------------------------------------------------------------
# Implementations (no input checks: go through cw_step)
# ----------------------------------------------------------------------------------------------------------
def cw_step_triton(x, grad, m, v, step, lr, lo, hi, beta1, beta2, eps, block_size: int = BLOCK_SIZE):
    """Launch the Triton kernel over the flattened tensors; updates x, m, v in place."""
    n = x.numel()
    if n == 0:
        return x
    # Scalars in double on the host, as torch.optim.Adam computes them, rounded to float32 at the launch.
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    weight1 = 1 - beta1
    grid = (triton.cdiv(n, block_size),)
    args = (x, grad, m, v, lo, hi, n, weight1, beta2, 1 - beta2, bias_correction2**0.5, -(lr / bias_correction1), eps)
    kwargs = dict(SMALL_WEIGHT=weight1 < 0.5, BLOCK_SIZE=block_size, num_warps=NUM_WARPS)
    if x.is_cuda:
        with torch.cuda.device(x.device):
            _cw_step_kernel[grid](*args, **kwargs)
    else:
        _cw_step_kernel[grid](*args, **kwargs)
    return x


def cw_step_fused(x, grad, m, v, step, lr, lo, hi, beta1, beta2, eps):
    """In-place ATen with the bias correction of v folded into eps and the step size: one temporary."""
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = v.sqrt().add_(eps * bias_correction2_sqrt)
    x.addcdiv_(m, denom, value=-(lr / (1 - beta1**step)) * bias_correction2_sqrt)
    return x.clamp_(lo, hi)


def cw_step_reference(x, grad, m, v, step, lr, lo, hi, beta1, beta2, eps):
    """torch.optim.Adam's single-tensor update (torch/optim/adam.py), op for op, then the box clamp."""
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (v.sqrt() / bias_correction2**0.5).add_(eps)
    x.addcdiv_(m, denom, value=-step_size)
    return x.clamp_(lo, hi)


_CW_IMPLS = {"triton": cw_step_triton, "fused": cw_step_fused, "reference": cw_step_reference}


@torch.no_grad()
def cw_step(x, grad, m, v, step, lr, lo, hi, beta1=0.9, beta2=0.999, eps=1e-8, impl: str = "auto"):
    """One projected Adam step, in place on x, m and v; returns x.

    x, grad, m, v, lo, hi: contiguous float32 tensors of one shape on one device (m, v start at zero).
    step: 1-based Adam step count. lr, beta1, beta2, eps: as torch.optim.Adam.
    impl: "auto", "triton", "fused" or "reference" (see the module docstring).
    """
    check_tensors("cw_step", x, grad=grad, m=m, v=v, lo=lo, hi=hi)
    _check_hyper(step, lr, beta1, beta2, eps)
    return _CW_IMPLS[resolve_impl(x.device, impl, _INTERPRETED)](
        x, grad, m, v, step, float(lr), lo, hi, float(beta1), float(beta2), float(eps)
    )

"""Fused L-inf PGD update: x <- clamp(x + alpha * sign(grad), lo, hi), in place.

lo = max(x0 - eps, 0) and hi = min(x0 + eps, 1) are computed once per attack (see `linf_bounds`), so the
two projections of the usual chain (onto the eps-ball, then onto [0, 1]) collapse into a single clamp.

Three implementations behind one dispatcher, Liger-Kernel style (kernel, launcher and dispatch in one file):
  "triton"    1-D flattened Triton kernel: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
  "fused"     in-place ATen ops on CPU (or CUDA without Triton): one temporary (the sign), no copies.
  "reference" the plain eager expression, the ground truth of the tests.
  "auto"      triton for CUDA tensors when Triton is importable, else fused.

NaN gradients: torch.sign(NaN) is 0 (ATen computes sign as (0 < g) - (g < 0)), so a NaN gradient entry
gives a zero step; the kernel uses the same formula, so all paths agree bitwise, NaN entries included.
A NaN already in x stays NaN (torch.clamp propagates it; the kernel keeps the NaN it loaded).
"""

from __future__ import annotations

import numbers

import torch

try:  # Triton is optional: the fused and reference paths need only torch.
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

IMPLS = ("auto", "triton", "fused", "reference")
BLOCK_SIZE = 1024
NUM_WARPS = 4


# ----------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _pgd_step_kernel(
        x_ptr,
        grad_ptr,
        lo_ptr,
        hi_ptr,
        alpha_ptr,  # per-sample step sizes (read only when PER_SAMPLE)
        alpha,  # scalar step size (used only when not PER_SAMPLE)
        n_elements,
        alpha_inner,  # elements that share one alpha entry
        PER_SAMPLE: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        # int64 offsets: a batch of large images can exceed 2**31 elements.
        offsets = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_elements

        x = tl.load(x_ptr + offsets, mask=mask)
        g = tl.load(grad_ptr + offsets, mask=mask)
        lo = tl.load(lo_ptr + offsets, mask=mask)
        hi = tl.load(hi_ptr + offsets, mask=mask)

        # Same formula as ATen's sign: NaN -> 0, -0.0 -> +0.0.
        sign = (g > 0).to(tl.float32) - (g < 0).to(tl.float32)
        if PER_SAMPLE:
            step = tl.load(alpha_ptr + offsets // alpha_inner, mask=mask)
        else:
            step = alpha
        # alpha * sign is exact (sign is -1, 0 or 1), so an FMA contraction cannot change the result.
        x = x + step * sign
        # torch.clamp(x, lo, hi) == min(max(x, lo), hi), and keeps a NaN x as it is.
        x = tl.where(x != x, x, tl.minimum(tl.maximum(x, lo), hi))
        tl.store(x_ptr + offsets, x, mask=mask)

    _INTERPRETED = type(_pgd_step_kernel).__name__ == "InterpretedFunction"
else:
    _INTERPRETED = False


def triton_usable(device: torch.device, interpreted: bool = _INTERPRETED) -> bool:
    """True when the Triton kernels can run on tensors living on `device`."""
    return triton is not None and (device.type == "cuda" or interpreted)


def resolve_impl(device: torch.device | str, impl: str = "auto", interpreted: bool = _INTERPRETED) -> str:
    """Map `impl` to the implementation that will run on `device`; raise if it cannot run there.

    `interpreted` says whether the caller's Triton kernel was built by the interpreter (TRITON_INTERPRET=1).
    """
    device = torch.device(device)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        # The interpreter is for testing only: never pick it automatically.
        return "triton" if triton is not None and device.type == "cuda" and not interpreted else "fused"
    if impl == "triton":
        if triton is None:
            raise RuntimeError("impl='triton' needs the triton package, which is not installed")
        if not triton_usable(device, interpreted):
            raise RuntimeError(
                f"impl='triton' needs CUDA tensors (got {device.type}); CPU tensors run only under the Triton "
                "interpreter, enabled by TRITON_INTERPRET=1 set before triton is first imported"
            )
    return impl


def check_tensors(op: str, x: torch.Tensor, **others: torch.Tensor) -> None:
    """Validate x and its companion tensors: float32, same shape/device, contiguous."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise TypeError(
            f"{op}: x must be float32, got {x.dtype}; keep a float32 master copy of the adversarial image "
            "(cast to half precision only for the model)"
        )
    for name, t in others.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != x.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, x has {tuple(x.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}, x has {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device}, x is on {x.device}")
    for name, t in (("x", x), *others.items()):
        # Rejected rather than copied: the update is in place, and the kernels index the flat storage.
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (call .contiguous() once, outside the attack loop)")


def _check_alpha(x: torch.Tensor, alpha) -> None:
    if isinstance(alpha, torch.Tensor):
        if alpha.dtype != torch.float32:
            raise TypeError(f"pgd_step: alpha tensor must be float32, got {alpha.dtype}")
        if alpha.device != x.device:
            raise ValueError(f"pgd_step: alpha is on {alpha.device}, x is on {x.device}")
        per_sample = x.dim() >= 1 and alpha.numel() == x.shape[0]
        if not (alpha.numel() == 1 or per_sample):
            raise ValueError(
                f"pgd_step: alpha tensor must hold 1 value or one per sample ({x.shape[0] if x.dim() else 1}), "
                f"got shape {tuple(alpha.shape)}"
            )
    elif not isinstance(alpha, numbers.Real) or isinstance(alpha, bool):
        raise TypeError(f"pgd_step: alpha must be a float or a float32 tensor, got {type(alpha).__name__}")


def _alpha_view(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """alpha reshaped to broadcast over every dimension of x but the first."""
    return alpha.reshape(-1, *([1] * max(x.dim() - 1, 0))) if x.dim() >= 1 else alpha.reshape(())


def linf_bounds(x0: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-pixel box of the L-inf ball around x0 intersected with [0, 1]: (max(x0-eps, 0), min(x0+eps, 1))."""
    return (x0 - eps).clamp_(min=0.0), (x0 + eps).clamp_(max=1.0)


# ----------------------------------------------------------------------------------------------------------
# Implementations (no input checks: go through pgd_step)
# ----------------------------------------------------------------------------------------------------------
def pgd_step_triton(x, grad, lo, hi, alpha, overwrite_grad: bool = False, block_size: int = BLOCK_SIZE):
    """Launch the Triton kernel over the flattened tensors; updates x in place (``grad`` is only read)."""
    n = x.numel()
    if n == 0:
        return x
    per_sample = isinstance(alpha, torch.Tensor)
    if per_sample:
        alpha_flat = alpha.reshape(-1).contiguous()
        alpha_scalar, alpha_inner = 0.0, n // alpha_flat.numel()
    else:
        alpha_flat, alpha_scalar, alpha_inner = x, float(alpha), n  # x is a dummy pointer here
    grid = (triton.cdiv(n, block_size),)
    args = (x, grad, lo, hi, alpha_flat, alpha_scalar, n, alpha_inner)
    if x.is_cuda:
        with torch.cuda.device(x.device):  # launch on x's GPU, not the current one
            _pgd_step_kernel[grid](*args, PER_SAMPLE=per_sample, BLOCK_SIZE=block_size, num_warps=NUM_WARPS)
    else:
        _pgd_step_kernel[grid](*args, PER_SAMPLE=per_sample, BLOCK_SIZE=block_size, num_warps=NUM_WARPS)
    return x


def pgd_step_fused(x, grad, lo, hi, alpha, overwrite_grad: bool = False):
    """In-place ATen: 3 passes over memory (sign, add, clamp) and one temporary, or none when
    ``overwrite_grad`` (the sign written over ``grad``: an attack's fresh gradient, still in cache
    and never read again)."""
    step = grad.sign_() if overwrite_grad else grad.sign()
    if isinstance(alpha, torch.Tensor):
        x.addcmul_(step, _alpha_view(x, alpha))  # 1 * sign * alpha: exact, same bits as add_(alpha * sign)
    else:
        x.add_(step, alpha=alpha)
    return x.clamp_(lo, hi)


def pgd_step_reference(x, grad, lo, hi, alpha, overwrite_grad: bool = False):
    """Plain eager reference: x <- clamp(x + alpha * sign(grad), lo, hi) (``grad`` is only read)."""
    if isinstance(alpha, torch.Tensor):
        alpha = _alpha_view(x, alpha)
    return x.copy_(torch.clamp(x + alpha * grad.sign(), lo, hi))


def pgd_step_torchattacks(x, x0, grad, alpha, eps):
    """The torchattacks PGD update chain (out of place), kept for benchmarks and agreement tests.

    It can differ from pgd_step by one ulp of x0, where x0 + (x' - x0) rounds differently from x'.
    """
    adv = x.detach() + alpha * grad.sign()
    delta = torch.clamp(adv - x0, min=-eps, max=eps)
    return torch.clamp(x0 + delta, min=0, max=1).detach()


_PGD_IMPLS = {"triton": pgd_step_triton, "fused": pgd_step_fused, "reference": pgd_step_reference}


@torch.no_grad()
def pgd_step(x, grad, lo, hi, alpha, impl: str = "auto", overwrite_grad: bool = False):
    """In place x <- clamp(x + alpha * sign(grad), lo, hi); returns x.

    x, grad, lo, hi: contiguous float32 tensors of one shape on one device.
    alpha: a float, or a float32 tensor with one value per sample (shape (N,), broadcast over C, H, W) or 1 value.
    impl: "auto", "triton", "fused" or "reference" (see the module docstring).
    overwrite_grad: the caller never reads ``grad`` again; "fused" may then write the sign over it.
    """
    check_tensors("pgd_step", x, grad=grad, lo=lo, hi=hi)
    _check_alpha(x, alpha)
    return _PGD_IMPLS[resolve_impl(x.device, impl)](x, grad, lo, hi, alpha, overwrite_grad)

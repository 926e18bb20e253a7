"""The fused attack-update kernels vs the eager chains they replace.

pgd_step (fused, in place) vs the torchattacks update chain; cw_step (fused Adam + projection)
vs ``torch.optim.Adam.step()`` followed by a clamp. Same tensors, a fixed gradient.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..kernels import cw_step, linf_bounds, pgd_step, pgd_step_torchattacks
from .context import BenchContext
from .harness import BenchRow, Variant, time_variants, timing_dict

TARGET_PGD_KERNEL = 4.0  # baseline time / ours
CW_LR = 0.01


def torch_adam_step(x: torch.Tensor, grad: torch.Tensor, lr: float, lo: torch.Tensor,
                    hi: torch.Tensor) -> Callable[[], None]:
    """The baseline of ``cw_step``: torch.optim.Adam.step() on a copy of ``x`` with a fixed gradient, then clamp."""
    param = x.clone().requires_grad_(True)
    param.grad = grad.clone()
    adam = torch.optim.Adam([param], lr=lr)

    def step():
        adam.step()
        with torch.no_grad():
            param.clamp_(lo, hi)

    return step


def kernel_variants(ctx: BenchContext) -> dict[str, Variant]:
    """pgd_step fused vs the torchattacks chain; cw_step fused vs torch.optim.Adam.step() + clamp."""
    shape = (ctx.cfg.kernel_batch, 3, 150, 150)
    gen = torch.Generator().manual_seed(ctx.cfg.seed)
    eps, alpha = ctx.cfg.eps / 255, ctx.cfg.eps / 4 / 255
    x0 = torch.rand(shape, generator=gen)
    lo, hi = linf_bounds(x0, eps)
    x_start = torch.clamp(x0 + (torch.rand(shape, generator=gen) * 2 - 1) * eps, 0, 1)
    grad = torch.randn(shape, generator=gen)
    state = {"fused": x_start.clone(), "chain": x_start.clone(), "x": x_start.clone(),
             "m": torch.zeros(shape), "v": torch.zeros(shape), "t": 0}

    def pgd_chain():
        state["chain"] = pgd_step_torchattacks(state["chain"], x0, grad, alpha, eps)

    def cw_fused():
        state["t"] += 1
        cw_step(state["x"], grad, state["m"], state["v"], state["t"], CW_LR, lo, hi)

    return {
        "pgd_fused": Variant("pgd_step fused", lambda: pgd_step(state["fused"], grad, lo, hi, alpha)),
        "pgd_chain": Variant("torchattacks chain", pgd_chain),
        "cw_fused": Variant("cw_step fused", cw_fused),
        "cw_adam": Variant("Adam.step + clamp", torch_adam_step(x_start, grad, CW_LR, lo, hi)),
    }


def section_kernels(ctx: BenchContext) -> list[BenchRow]:
    cfg = ctx.cfg
    t = time_variants(kernel_variants(ctx), cfg.rounds, cfg.warmup, min_sample_s=0.005 if cfg.quick else 0.05)
    shape = f"{cfg.kernel_batch}x3x150x150"
    ms = {k: t[k].median_s * 1e3 for k in t}
    return [
        BenchRow("kernels", f"pgd_step fused vs torchattacks chain ({shape})", ms["pgd_fused"], ms["pgd_chain"],
                 "ms", higher_is_better=False, target=TARGET_PGD_KERNEL,
                 details=timing_dict(t, ("pgd_fused", "pgd_chain"))),
        BenchRow("kernels", f"cw_step fused vs Adam.step+clamp ({shape})", ms["cw_fused"], ms["cw_adam"], "ms",
                 higher_is_better=False, details=timing_dict(t, ("cw_fused", "cw_adam"))),
    ]

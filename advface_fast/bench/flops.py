"""One attack step's effective FLOP rate against the GEMM rates measured in the same run.

The attack step (forward, input gradient of the objective, fused update) is a step of a PGD-K run
of the PGD class (``context.pgd_one_step``, K = the config's PGD steps, 10 by default): the run's
time over K, so the attack's setup (eps box, start, result copy) is shared by its K steps as in
every real attack. Its FLOPs are the model's forward + backward to the input, counted by
FlopCounterMode. GEMMs and runs are timed in the same interleaved rounds.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import precision as _precision  # module attribute: the CPU flags stay patchable
from .context import BenchContext, pgd_one_step
from .harness import BenchRow, Variant, time_variants, timing_dict

TARGET_FLOP_FRACTION = 0.70  # fast step GFLOP/s over the bf16 GEMM rate (any other device)
# per CPU kind: AMX's GEMM rate is ~7x fp32 and harder to approach than AVX512-BF16's ~2-4x
CPU_FLOP_FRACTION_TARGETS = {"amx_bf16": 0.50, "avx512_bf16": 0.80}


def flop_fraction_target(device: torch.device) -> float:
    """The step's target fraction of the bf16 GEMM rate on ``device`` (see CPU_FLOP_FRACTION_TARGETS)."""
    if device.type == "cpu":
        flags = _precision.cpu_features()["flags"]
        for flag, target in CPU_FLOP_FRACTION_TARGETS.items():  # AMX first: its CPUs also have AVX512-BF16
            if flags.get(flag):
                return target
    return TARGET_FLOP_FRACTION


def count_fwd_bwd_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward + backward to the INPUT only, as counted by FlopCounterMode.

    The model is frozen, so the backward computes no weight gradients: convolution_backward runs
    (and is counted) for grad_input only. A plain ``.backward()`` on the output is counted because
    FlopCounterMode rejects ``autograd.grad`` on a leaf input (what an attack step calls); both run
    the same convolution kernels. Only the count comes from here; no attack uses this gradient.
    """
    from torch.utils.flop_counter import FlopCounterMode

    x = x.detach().clone().requires_grad_(True)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).float().pow(2).sum().backward()
    return int(counter.get_total_flops())


def gemm_variants(n: int, device: torch.device) -> dict[str, Variant]:
    """An n x n x n matrix product in fp32 and in bf16."""
    gen = torch.Generator(device=device).manual_seed(0)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, generator=gen, device=device).to(dtype)
        b = torch.randn(n, n, generator=gen, device=device).to(dtype)
        out[name] = Variant(f"GEMM {n}^3 {name}", (lambda a=a, b=b: torch.matmul(a, b)))
    return out


def fwd_bwd_variants(ctx: BenchContext) -> dict[str, Variant]:
    """One PGD-K run on the attack batch (K = the config's PGD steps): the plain model in fp32, and
    the fast path."""
    data = ctx.data()
    fast_model, precision = ctx.fast()
    args = (data.queries, data.gallery, data.is_same, ctx.cfg.eps, ctx.cfg.pgd_steps)
    out = {"fp32": Variant("fp32 eager", pgd_one_step(ctx.model, "fp32", *args)),
           "fast": Variant(f"{precision} fast", pgd_one_step(fast_model, precision, *args),
                           info={"precision": precision})}
    if getattr(fast_model, "switches", {}).get("packed", "off") != "off":  # the fast path before prepacking
        from ..models.fast import make_fast

        unpacked = make_fast(ctx.model, packed="off")
        out["fast_unpacked"] = Variant(f"{precision} fast, unpacked", pgd_one_step(unpacked, precision, *args),
                                       info={"precision": precision})
    return out


def section_flops(ctx: BenchContext) -> list[BenchRow]:
    cfg, data = ctx.cfg, ctx.data()
    flops = count_fwd_bwd_flops(ctx.model, data.queries)
    gemm_v = gemm_variants(cfg.gemm_size, ctx.device)
    step_v = fwd_bwd_variants(ctx)
    # GEMMs and model steps in the same interleaved rounds, so both see the same machine load.
    t = time_variants({**{f"gemm_{k}": v for k, v in gemm_v.items()}, **step_v}, cfg.rounds, cfg.warmup,
                      min_sample_s=0.02 if cfg.quick else 0.2)
    gemm_rate = {k: 2 * cfg.gemm_size**3 / t[f"gemm_{k}"].median_s / 1e9 for k in gemm_v}
    steps = cfg.pgd_steps
    eff = {k: flops * steps / t[k].median_s / 1e9 for k in step_v}
    common = {"fwd_bwd_gflop_per_batch": flops / 1e9, "batch": len(data.is_same), "steps_per_run": steps,
              "gemm_gflops": gemm_rate, "gemm_size": cfg.gemm_size,
              "step_s": {k: t[k].median_s / steps for k in eff}, "timing": timing_dict(t)}
    name = "fwd+bwd effective GFLOP/s: {} vs {} GEMM (fraction)"
    return [
        BenchRow("flops", f"GEMM {cfg.gemm_size}^3: bf16 vs fp32 (GFLOP/s)", gemm_rate["bf16"], gemm_rate["fp32"],
                 "GFLOP/s", details={"timing": timing_dict(t, ("gemm_fp32", "gemm_bf16"))}),
        BenchRow("flops", name.format(step_v["fast"].label, "bf16"), eff["fast"], gemm_rate["bf16"], "GFLOP/s",
                 target=flop_fraction_target(ctx.device), details=common),
        BenchRow("flops", name.format("fp32 eager", "fp32"), eff["fp32"], gemm_rate["fp32"], "GFLOP/s",
                 details=common),
        *([BenchRow("flops", name.format(step_v["fast_unpacked"].label, "bf16"), eff["fast_unpacked"],
                    gemm_rate["bf16"], "GFLOP/s", details=common)] if "fast_unpacked" in step_v else []),
    ]

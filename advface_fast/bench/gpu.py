"""CUDA only: Triton update bandwidth vs a device copy; one PGD step in bf16 + CUDA graph vs fp32 eager.

Without CUDA both rows are "pending (no GPU)". The CPU sections keep their models: the GPU rows
work on copies moved to the device.
"""

from __future__ import annotations

import copy

import torch

from ..kernels import linf_bounds, pgd_step, triton_usable
from .context import BenchContext, pgd_one_step
from .harness import BenchRow, pending, time_side_by_side

TARGET_TRITON_BANDWIDTH = 0.85  # fraction of the device-copy bandwidth
NAMES = ("Triton pgd_step bandwidth vs device copy (fraction)",
         "PGD step: bf16 + CUDA graph vs fp32 eager (img-steps/s)")


def section_gpu(ctx: BenchContext) -> list[BenchRow]:
    if not torch.cuda.is_available():
        return [BenchRow("gpu", n, status="pending (no GPU)") for n in NAMES]
    rows = []
    for name, measure in zip(NAMES, (_bandwidth, _graph_step)):
        try:
            rows.append(measure(ctx, name))
        except Exception as err:  # one failing row must not hide the other
            rows.append(BenchRow("gpu", name, status=f"error: {type(err).__name__}: {err}"))
    return rows


def _bandwidth(ctx: BenchContext, name: str) -> BenchRow:
    dev = torch.device("cuda")
    if not triton_usable(dev):
        return pending("gpu", name, "triton not importable", target=TARGET_TRITON_BANDWIDTH)
    shape = (max(ctx.cfg.kernel_batch, 32) * 4, 3, 150, 150)  # big enough to hide launch latency
    gen = torch.Generator(device=dev).manual_seed(0)
    x0 = torch.rand(shape, device=dev, generator=gen)
    lo, hi = linf_bounds(x0, ctx.cfg.eps / 255)
    x, grad, dst = x0.clone(), torch.randn(shape, device=dev, generator=gen), torch.empty_like(x0)
    fns = {"triton": lambda: pgd_step(x, grad, lo, hi, 1 / 255, impl="triton"), "copy": lambda: dst.copy_(x0)}
    t = time_side_by_side(fns, ctx.cfg.rounds, ctx.cfg.warmup, min_sample_s=0.02, sync=torch.cuda.synchronize)
    nbytes = x0.numel() * x0.element_size()
    bw = {"triton": 5 * nbytes / t["triton"].median_s / 1e9, "copy": 2 * nbytes / t["copy"].median_s / 1e9}
    return BenchRow("gpu", name, bw["triton"], bw["copy"], "GB/s", target=TARGET_TRITON_BANDWIDTH,
                    note="update moves x, grad, lo, hi in and x out",
                    details={"shape": list(shape), "device": torch.cuda.get_device_name(0)})


def _graph_step(ctx: BenchContext, name: str) -> BenchRow:
    dev = torch.device("cuda")
    fast_model, precision = ctx.fast()
    data = ctx.data()
    x0 = data.queries.to(dev).contiguous()
    args = (x0, data.gallery.to(dev), data.is_same.to(dev), ctx.cfg.eps)
    eager = pgd_one_step(copy.deepcopy(ctx.model).to(dev), "fp32", *args)
    fast = pgd_one_step(copy.deepcopy(fast_model).to(dev), precision, *args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture requires
        for _ in range(3):
            fast()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fast()
    t = time_side_by_side({"graph": graph.replay, "eager": eager}, ctx.cfg.rounds, ctx.cfg.warmup,
                          min_sample_s=0.02, sync=torch.cuda.synchronize)
    n = x0.shape[0]
    return BenchRow("gpu", name.replace("bf16", precision), n / t["graph"].median_s, n / t["eager"].median_s,
                    "img-steps/s", details={"device": torch.cuda.get_device_name(0), "pairs": n})

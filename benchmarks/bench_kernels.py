"""CPU timings of the attack-update kernels on a 32x3x150x150 float32 batch (pytest-benchmark).

    python -m pytest benchmarks/bench_kernels.py --benchmark-enable -q

pgd_step: fused (in-place ATen) vs the eager reference vs the torchattacks update chain.
cw_step:  fused vs the eager reference (torch.optim.Adam's formula) vs torch.optim.Adam.step() + clamp.
ADVFACE_BENCH_COMPILE=1 adds torch.compile versions of the same updates (compilation takes seconds per op,
done before timing); they are opt-in because the library does not use torch.compile.
Runs on ADVFACE_BENCH_THREADS torch threads (default 1: on a small shared machine a busy core stalls every
multi-threaded ATen loop, which makes medians meaningless).
"""

from __future__ import annotations

import os

import pytest
import torch

from advface_fast.bench import torch_adam_step
from advface_fast.kernels import cw_step, linf_bounds, pgd_step, pgd_step_torchattacks

SHAPE = (32, 3, 150, 150)
EPS, ALPHA, LR = 8 / 255, 2 / 255, 0.01
WARMUP_CALLS = 5
WITH_COMPILE = os.environ.get("ADVFACE_BENCH_COMPILE") == "1"
THREADS = int(os.environ.get("ADVFACE_BENCH_THREADS", "1"))


@pytest.fixture(scope="module", autouse=True)
def torch_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(SHAPE, generator=gen)
    lo, hi = linf_bounds(x0, EPS)
    x = torch.clamp(x0 + (torch.rand(SHAPE, generator=gen) * 2 - 1) * EPS, 0, 1)
    grad = torch.randn(SHAPE, generator=gen)
    return x, x0, grad, lo, hi


def _run(benchmark, fn):
    for _ in range(WARMUP_CALLS):  # settle the allocator before timing
        fn()
    benchmark(fn)


# ------------------------------------------------------------------------------------------------------------
# PGD
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.benchmark(group="pgd_step")
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_pgd_step(benchmark, batch, impl):
    x, _, grad, lo, hi = batch
    x = x.clone()
    _run(benchmark, lambda: pgd_step(x, grad, lo, hi, ALPHA, impl=impl))


@pytest.mark.benchmark(group="pgd_step")
def test_pgd_step_torchattacks_chain(benchmark, batch):
    x, x0, grad, _, _ = batch
    state = {"x": x.clone()}

    def step():
        state["x"] = pgd_step_torchattacks(state["x"], x0, grad, ALPHA, EPS)

    _run(benchmark, step)


@pytest.mark.benchmark(group="pgd_step")
@pytest.mark.skipif(not WITH_COMPILE, reason="set ADVFACE_BENCH_COMPILE=1")
def test_pgd_step_torch_compile(benchmark, batch):
    x, _, grad, lo, hi = batch
    x = x.clone()

    def update(x, grad, lo, hi, alpha):
        sign = (grad > 0).to(grad.dtype) - (grad < 0).to(grad.dtype)
        x.copy_(torch.minimum(torch.maximum(x + alpha * sign, lo), hi))

    compiled = torch.compile(update, dynamic=False, fullgraph=True)
    alpha = torch.tensor(ALPHA)
    _run(benchmark, lambda: compiled(x, grad, lo, hi, alpha))


# ------------------------------------------------------------------------------------------------------------
# C&W (Adam)
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.benchmark(group="cw_step")
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_cw_step(benchmark, batch, impl):
    x, _, grad, lo, hi = batch
    x, m, v = x.clone(), torch.zeros(SHAPE), torch.zeros(SHAPE)
    count = {"t": 0}

    def step():
        count["t"] += 1
        cw_step(x, grad, m, v, count["t"], LR, lo, hi, impl=impl)

    _run(benchmark, step)


@pytest.mark.benchmark(group="cw_step")
def test_cw_step_torch_adam(benchmark, batch):
    x, _, grad, lo, hi = batch
    _run(benchmark, torch_adam_step(x, grad, LR, lo, hi))


@pytest.mark.benchmark(group="cw_step")
@pytest.mark.skipif(not WITH_COMPILE, reason="set ADVFACE_BENCH_COMPILE=1")
def test_cw_step_torch_compile(benchmark, batch):
    x, _, grad, lo, hi = batch
    x, m, v = x.clone(), torch.zeros(SHAPE), torch.zeros(SHAPE)
    count = {"t": 0}

    def update(x, grad, m, v, lo, hi, neg_step_size, bias_correction2_sqrt):
        m.copy_(m + 0.1 * (grad - m))
        v.copy_(v * 0.999 + (0.001 * grad) * grad)
        denom = v.sqrt() / bias_correction2_sqrt + 1e-8
        x.copy_(torch.minimum(torch.maximum(x + neg_step_size * (m / denom), lo), hi))

    compiled = torch.compile(update, dynamic=False, fullgraph=True)

    def step():
        count["t"] += 1
        t = count["t"]
        # Tensors, not floats, so that a new step count does not recompile.
        neg_step_size = torch.tensor(-LR / (1 - 0.9**t))
        compiled(x, grad, m, v, lo, hi, neg_step_size, torch.tensor((1 - 0.999**t) ** 0.5))

    _run(benchmark, step)

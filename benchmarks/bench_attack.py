"""pytest-benchmark timings of PGD on the benchmark pairs: ours fp32, ours fast path, torchattacks fp32.

    python -m pytest benchmarks/bench_attack.py --benchmark-enable -q
    ADVFACE_BENCH_QUICK=1 ADVFACE_BENCH_THREADS=1 python -m pytest benchmarks/bench_attack.py --benchmark-enable -q

The callables are advface_fast.bench.pgd_variants, the ones `benchmarks/run_all.py` (and
`advface bench`) time side by side; see benchmarks/common.py for the environment variables.
Without --benchmark-enable every test here skips (benchmarks/conftest.py).
Each benchmark's extra_info holds the success rate of its delivered images (fixed cosine
threshold, fp32 model), so equal strength can be checked next to the speed.
"""

from __future__ import annotations

import pytest

from common import module_context, run_variant

from advface_fast.bench import deliver_torchattacks, pgd_variants, success_rate

ROUNDS = 3


@pytest.fixture(scope="module")
def ctx():
    yield from module_context()


@pytest.mark.parametrize("variant", ["ours_fp32", "ours_fast", "torchattacks"])
@pytest.mark.parametrize("steps", ["one", "full"])
def test_pgd(benchmark, ctx, variant, steps):
    n_steps = 1 if steps == "one" else ctx.cfg.pgd_steps
    benchmark.group = f"pgd-{n_steps}"
    v = pgd_variants(ctx, n_steps)[variant]
    x_adv = run_variant(benchmark, v, rounds=ROUNDS)
    if variant == "torchattacks":
        x_adv = deliver_torchattacks(x_adv, ctx.data().queries, ctx.cfg.eps)
    pairs = len(ctx.data().is_same)
    benchmark.extra_info.update(label=v.label, pairs=pairs, steps=n_steps,
                                image_steps_per_s=pairs * n_steps / benchmark.stats["median"],
                                success_rate=success_rate(ctx, x_adv))

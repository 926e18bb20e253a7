"""pytest-benchmark timings of the embedding engines: torch eager fp32, onnxruntime, fast torch path.

    python -m pytest benchmarks/bench_embedding.py --benchmark-enable -q
    ADVFACE_BENCH_QUICK=1 ADVFACE_BENCH_THREADS=1 python -m pytest benchmarks/bench_embedding.py --benchmark-enable -q

The callables are advface_fast.bench.embedding_variants (and fwd_bwd_variants for one attack step:
one step of the PGD class, forward + input gradient + update), the ones `benchmarks/run_all.py`
times side by side. Without --benchmark-enable every test here skips (benchmarks/conftest.py). extra_info holds
images/s and the max-abs difference of each engine's embeddings from torch fp32.
"""

from __future__ import annotations

import numpy as np
import pytest

from common import module_context, run_variant

from advface_fast.bench import embedding_variants, fwd_bwd_variants

ROUNDS = 5


@pytest.fixture(scope="module")
def ctx():
    yield from module_context()


@pytest.fixture(scope="module")
def reference(ctx):
    return np.asarray(embedding_variants(ctx)["torch_fp32"].fn(), dtype=np.float64)


@pytest.mark.benchmark(group="embedding")
@pytest.mark.parametrize("variant", ["torch_fp32", "onnxruntime", "fast"])
def test_embedding(benchmark, ctx, reference, variant):
    v = embedding_variants(ctx)[variant]
    emb = np.asarray(run_variant(benchmark, v, rounds=ROUNDS), dtype=np.float64)
    images = len(ctx.data().chips)
    benchmark.extra_info.update(label=v.label, images=images, images_per_s=images / benchmark.stats["median"],
                                parity_max_abs=float(np.abs(emb - reference).max()))


@pytest.mark.benchmark(group="forward+input-gradient")
@pytest.mark.parametrize("variant", ["fp32", "fast"])
def test_forward_backward(benchmark, ctx, variant):
    v = fwd_bwd_variants(ctx)[variant]
    run_variant(benchmark, v, rounds=ROUNDS)
    pairs = len(ctx.data().is_same)
    benchmark.extra_info.update(label=v.label, images=pairs, images_per_s=pairs / benchmark.stats["median"])

"""pytest-benchmark timing of the LFW protocol: 10-fold evaluation of 6,000 scored pairs.

    python -m pytest benchmarks/bench_verify.py --benchmark-enable -q

``advface_fast.metrics.evaluate`` is vectorised: on LFW's size it takes a few milliseconds.
"""

from __future__ import annotations

import numpy as np
import pytest

from advface_fast.metrics import evaluate


@pytest.mark.benchmark(group="verify")
def test_evaluate_lfw_size(benchmark):
    rng = np.random.default_rng(13)
    same = np.repeat([True, False], 3000)
    scores = rng.normal(size=6000) + 2.0 * same
    folds = np.tile(np.arange(1, 11), 600)
    result = benchmark(evaluate, scores, same, folds)
    benchmark.extra_info.update(pairs=len(same), accuracy=float(result.accuracy_mean))

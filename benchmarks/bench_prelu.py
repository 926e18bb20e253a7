"""PReLU input-gradient backward: ATen's autograd vs the fused CPU path vs the plain reference.

    python benchmarks/bench_prelu.py --threads 1 --out benchmarks/results/bench_prelu.json

Shapes are SFace-like activations (batch 16). "aten" is ``F.prelu(x, a).backward(g)`` minus the
forward (ATen computes the slope gradient too); "fused" / "reference" are
``advface_fast.kernels.prelu.prelu_backward_fused / _reference``. Medians of 21 runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, write_json  # noqa: E402

from advface_fast.kernels.prelu import prelu_backward_fused, prelu_backward_reference

SHAPES = ((16, 64, 56, 56), (16, 128, 28, 28), (16, 512, 7, 7))


def median_ms(fn, repeats=21) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 3)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {"benchmark": "prelu backward (input gradient)", "threads": args.threads,
           "load_average_before": load_average(), "rows": []}
    g = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        for layout in ("nchw", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            x = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
            grad = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
            a = torch.rand(shape[1], generator=g) * 0.3

            def aten():
                xr = x.detach().requires_grad_(True)
                F.prelu(xr, a).backward(grad)

            forward = median_ms(lambda: F.prelu(x, a))
            row = {"shape": list(shape), "layout": layout, "forward_ms": forward,
                   "aten_backward_ms": round(median_ms(aten) - forward, 3),
                   "fused_ms": median_ms(lambda: prelu_backward_fused(grad, x, a)),
                   "reference_ms": median_ms(lambda: prelu_backward_reference(grad, x, a))}
            out["rows"].append(row)
            print(row, file=sys.stderr)
    out["load_average_after"] = load_average()
    if args.out:
        write_json(out, args.out)
    return out


if __name__ == "__main__":
    main()

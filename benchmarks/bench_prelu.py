"""PReLU input-gradient backward: ATen's autograd vs the fused CPU paths vs the plain reference.

    python benchmarks/bench_prelu.py --threads 1 --out benchmarks/results/bench_prelu.json
    python benchmarks/bench_prelu.py --threads 2 --batch 64 --dtypes bf16 \
        --out benchmarks/results/bench_prelu_bf16.json

Shapes are SFace's activations (``--batch``, default 16). "aten" is ``F.prelu(x, a).backward(g)``
minus the forward (ATen computes the slope gradient too); "fused" / "reference" are
``advface_fast.kernels.prelu.prelu_backward_fused / _reference``; "sign" and "two_pass" the two
forms "fused" picks between by dtype (fp32: sign, bf16: two_pass). Medians of 21 runs, with the
command-line tools' allocator setting (``keep_freed_memory``).
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
from common import command_line, load_average, write_json  # noqa: E402

from advface_fast.allocator import keep_freed_memory
from advface_fast.kernels.prelu import (prelu_backward_fused, prelu_backward_reference, prelu_backward_sign,
                                        prelu_backward_two_pass)

SHAPES = ((64, 112, 112), (64, 56, 56), (128, 28, 28), (512, 7, 7))  # C, H, W (the batch is --batch)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dtypes", default="fp32", help="comma-separated: fp32, bf16 (default: %(default)s)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    allocator = keep_freed_memory()
    torch.set_num_threads(args.threads)
    out = {"benchmark": "prelu backward (input gradient)", "command": command_line(argv), "threads": args.threads,
           "batch": args.batch, **allocator, "load_average_before": load_average(), "rows": []}
    g = torch.Generator().manual_seed(0)
    for dtype_name, shape, layout in [(d, s, layout) for d in args.dtypes.split(",") for s in SHAPES
                                      for layout in ("nchw", "channels_last")]:
        dtype, shape = DTYPES[dtype_name], (args.batch, *shape)
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=fmt)
        grad = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=fmt)
        a = (torch.rand(shape[1], generator=g) * 0.3).to(dtype)

        def aten():
            xr = x.detach().requires_grad_(True)
            F.prelu(xr, a).backward(grad)

        forward = median_ms(lambda: F.prelu(x, a))
        row = {"dtype": dtype_name, "shape": list(shape), "layout": layout, "forward_ms": forward,
               "aten_backward_ms": round(median_ms(aten) - forward, 3),
               "fused_ms": median_ms(lambda: prelu_backward_fused(grad, x, a)),
               "sign_ms": median_ms(lambda: prelu_backward_sign(grad, x, a)),
               "two_pass_ms": median_ms(lambda: prelu_backward_two_pass(grad, x, a)),
               "reference_ms": median_ms(lambda: prelu_backward_reference(grad, x, a))}
        out["rows"].append(row)
        print(row, file=sys.stderr)
    out["load_average_after"] = load_average()
    if args.out:
        write_json(out, args.out)
    return out


if __name__ == "__main__":
    main()

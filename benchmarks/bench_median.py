"""The 3 x 3 median filter (the median defense's forward): unfold + median vs the sorting network,
and what a Square query through the median defense costs in forward passes of the model.

    python benchmarks/bench_median.py --threads 2 --out benchmarks/results/bench_median.json

Per model (its chip size, ``--batch`` images of random uint8-grid pixels): the reference
(``F.unfold`` + ``median``), the fused CPU path (``kernels/median3x3.py``), checked bit-equal first,
and the model's fp32 fast copy's forward (what Square's queries run through), interleaved rounds,
medians. ``passes per query`` = (filter + forward) / forward. The allocator setting of the
command-line tools is applied.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, run_record, write_json  # noqa: E402

from advface_fast.allocator import keep_freed_memory
from advface_fast.kernels.median3x3 import median3x3_fused, median3x3_reference
from advface_fast.models import create_model, get_model_spec


def model_row(name: str, batch: int, rounds: int) -> dict:
    spec = get_model_spec(name)
    fast = spec.make_fast(create_model(name))
    x = torch.randint(0, 256, (batch, 3, *spec.input_size), generator=torch.Generator().manual_seed(0)).float().div_(255)
    if not torch.equal(median3x3_fused(x), median3x3_reference(x)):
        raise AssertionError("the fused median differs from the reference")
    fns = {"reference": lambda: median3x3_reference(x), "fused": lambda: median3x3_fused(x), "forward": lambda: fast(x)}
    times = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(rounds):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    ms = {k: round(statistics.median(v) * 1e3, 2) for k, v in times.items()}
    return {"model": name, "chip": list(spec.input_size), "batch": batch, "ms": ms,
            "speedup": round(ms["reference"] / ms["fused"], 1),
            "passes_per_query": {k: round((ms[k] + ms["forward"]) / ms["forward"], 2) for k in ("reference", "fused")}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--models", default="dlib-resnet,sface")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    allocator = keep_freed_memory()
    torch.set_num_threads(args.threads)
    out = {**run_record(argv), "benchmark": "3x3 median filter", "threads": args.threads, **allocator,
           "load_average_before": load_average(),
           "rows": [model_row(m, args.batch, args.rounds) for m in args.models.split(",")]}
    out["load_average_after"] = load_average()
    for r in out["rows"]:
        print(f"{r['model']}: reference {r['ms']['reference']} ms, fused {r['ms']['fused']} ms ({r['speedup']}x), "
              f"forward {r['ms']['forward']} ms; passes per query {r['passes_per_query']['reference']} -> "
              f"{r['passes_per_query']['fused']}")
    write_json(out, args.out)
    return out


if __name__ == "__main__":
    main()

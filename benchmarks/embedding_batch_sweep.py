"""Embedding engines across batch sizes, against the GEMM rate: how much room each one has.

    python benchmarks/embedding_batch_sweep.py --lfw <LFW> --threads 2 --out benchmarks/results/embedding_batch_sweep.json

Embeds the same real LFW chips (fold 1) with torch eager fp32 (the plain model, NCHW),
onnxruntime fp32 and torch bf16 (the fast copy) at several batch sizes, all interleaved in the
same rounds with an fp32 and a bf16 GEMM (2048^3), so every rate sees the same machine load.
Each engine's images/s is also given as GFLOP/s (forward FLOPs from FlopCounterMode) and as a
fraction of the GEMM rate of its precision: an fp32 engine near 100% of the fp32 GEMM rate has
little left to gain without lower precision.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_lfw, load_average, run_record, write_json  # noqa: E402

from advface_fast.bench import gemm_variants, time_side_by_side  # noqa: E402
from advface_fast.engine import OrtEngine, TorchEngine, chips_to_tensor  # noqa: E402
from advface_fast.models import create_model  # noqa: E402
from advface_fast.onnx_export import export_onnx  # noqa: E402
from advface_fast.pair_chips import prepare_pairs  # noqa: E402
from advface_fast.precision import autocast, device_features, resolve_precision  # noqa: E402


def forward_gflop_per_image(model) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.rand(1, 3, 150, 150))
    return counter.get_total_flops() / 1e9


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lfw", default=default_lfw(), help="LFW folder (default: $ADVFACE_LFW or the copy beside the repo)")
    ap.add_argument("--threads", type=int, default=2, help="torch / onnxruntime threads (default: %(default)s)")
    ap.add_argument("--images", type=int, default=128, help="chips embedded per call (default: %(default)s)")
    ap.add_argument("--batches", default="16,32,64,128", help="batch sizes (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default: %(default)s)")
    ap.add_argument("--out", type=Path, help="write the JSON here")
    args = ap.parse_args(argv)
    if not args.lfw:
        ap.error("no LFW folder: pass --lfw or set ADVFACE_LFW")
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]

    pairs = prepare_pairs(args.lfw, "dlib-resnet", folds=[1], progress=False)
    rows = np.unique(np.concatenate([pairs.query, pairs.gallery]))[: args.images]
    chips = pairs.chips.chips[rows]
    plain = create_model("dlib-resnet")
    fast = create_model("dlib-resnet", fast=True)
    bf16 = resolve_precision("auto", "cpu")
    torch_engine, ort_engine = TorchEngine(plain), OrtEngine(export_onnx(plain), num_threads=args.threads)

    @torch.inference_mode()
    def embed_fast(batch):
        for start in range(0, len(chips), batch):
            with autocast(bf16, "cpu"):
                fast(chips_to_tensor(chips[start : start + batch], "cpu"))

    engines = {"torch fp32": lambda b: torch_engine.embed(chips, batch_size=b),
               "onnxruntime fp32": lambda b: ort_engine.embed(chips, batch_size=b),
               f"torch {bf16} fast": embed_fast}
    fns = {f"{name}|{b}": (lambda fn=fn, b=b: fn(b)) for name, fn in engines.items() for b in batches}
    gemm = gemm_variants(2048, torch.device("cpu"))
    fns.update({f"gemm|{k}": v.fn for k, v in gemm.items()})

    load_before = load_average()
    timing = time_side_by_side(fns, rounds=args.rounds)
    gemm_rate = {k: 2 * 2048**3 / timing[f"gemm|{k}"].median_s / 1e9 for k in gemm}
    rate = {(name, b): len(chips) / timing[f"{name}|{b}"].median_s for name in engines for b in batches}
    gflop = forward_gflop_per_image(plain)
    table = []
    for (name, b), r in rate.items():
        dtype = "bf16" if name.endswith("fast") else "fp32"
        table.append({"engine": name, "batch": b, "images_per_s": round(r, 1), "gflops": round(r * gflop, 1),
                      f"fraction_of_{dtype}_gemm": round(r * gflop / gemm_rate[dtype], 3)})
    best = {name: max(rate[name, b] for b in batches) for name in engines}
    result = {
        "what": "embedding images/s of real LFW chips by engine and batch size, with the GEMM rates of the same run",
        **run_record(argv, args.lfw),
        "threads": args.threads, "images": len(chips), "rounds": args.rounds, "torch": torch.__version__,
        "device": device_features("cpu"), "load_average_before": load_before, "load_average_after": load_average(),
        "forward_gflop_per_image": gflop, "gemm_gflops": gemm_rate, "rows": table,
        "best_images_per_s": {name: round(r, 1) for name, r in best.items()},
        "onnxruntime_vs_torch_fp32": {
            "at_each_batch": {b: round(rate["onnxruntime fp32", b] / rate["torch fp32", b], 2) for b in batches},
            "best_vs_best": round(best["onnxruntime fp32"] / best["torch fp32"], 2)},
    }
    print(format_table(result))
    write_json(result, args.out)
    return result


def format_table(result: dict) -> str:
    lines = [f"fp32 GEMM {result['gemm_gflops']['fp32']:.0f} GFLOP/s, bf16 GEMM {result['gemm_gflops']['bf16']:.0f}"
             f" GFLOP/s; forward {result['forward_gflop_per_image']:.3f} GFLOP per image",
             "| engine | batch | images/s | GFLOP/s | of its GEMM rate |", "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        frac = next(v for k, v in r.items() if k.startswith("fraction_of_"))
        lines.append(f"| {r['engine']} | {r['batch']} | {r['images_per_s']:.0f} | {r['gflops']:.0f} | {100 * frac:.0f}% |")
    ratio = result["onnxruntime_vs_torch_fp32"]
    lines.append(f"onnxruntime / torch fp32 at each batch: {ratio['at_each_batch']}; best vs best: {ratio['best_vs_best']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Where one attack step's time goes, and how fast it could be: a torch.profiler breakdown.

    python benchmarks/profile_attack_step.py --threads 2 --out benchmarks/results/profile_attack_step.json

One attack step is ``Attack._ascent_gradient`` (forward, cosine similarity to fixed gallery
embeddings, input gradient) on a batch of N x 3 x 150 x 150 images, for the fp32 plain model
(the eager baseline) and the fast path (folded, channels_last copy with the fused stem under bf16
autocast where the CPU has native bf16); ``--plain-stem`` and ``--frozen-convs`` add the fast
path with PyTorch's own stem (the "before" of the fused stem) and with FrozenConv2d, in the same
run. The stem's polyphase input gradient is a forward convolution, so it counts in "conv forward".
For each, the profiler's self CPU time per step
is summed into groups (convolution forward, convolution backward, dtype casts, layout reorders,
element-wise, pooling, the rest), and the step's useful FLOPs (FlopCounterMode: convolutions
forward and to-input backward) are divided by

* the convolution time alone: how close oneDNN's convolutions get to the GEMM rate, and
* the whole step: the effective rate the benchmark's FLOP row reports.

GEMM rates (2048^3, fp32 and bf16) are measured in the same process. The ceiling row says how
many image-steps/s the step would reach if all its FLOPs ran at the bf16 GEMM rate and nothing
else took time: the most any implementation of this model can do on this CPU without
changing the arithmetic. Compare it with 4x torchattacks' fp32 PGD (the performance target).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, run_record, write_json  # noqa: E402

from advface_fast.allocator import keep_freed_memory
from advface_fast.attacks import PGD
from advface_fast.bench import count_fwd_bwd_flops
from advface_fast.models import create_model
from advface_fast.models.fast import make_fast
from advface_fast.precision import device_features, resolve_precision

# Profiler op name -> group. First matching substring wins; everything else is "other".
GROUPS = (
    # the prepacked oneDNN primitives of the packed fast path run both ways (models/packed_conv.py)
    ("mkldnn::_convolution", "conv prepacked (forward + input gradient)"),
    ("convolution_backward", "conv backward"),
    ("mkldnn_convolution", "conv forward"),
    ("convolution", "conv forward"),
    ("copy", "casts / copies / reorders"),  # _to_copy + copy_: autocast's casts and layout changes
    ("contiguous", "casts / copies / reorders"),
    ("clone", "casts / copies / reorders"),
    ("pool", "pooling"),
    ("relu", "element-wise"),
    ("threshold", "element-wise"),
    ("add", "element-wise"),
    ("mul", "element-wise"),
    ("fill_", "element-wise"),
    ("zero", "element-wise"),
    ("nan_to_num", "element-wise"),
)


def group_of(name: str) -> str:
    return next((g for key, g in GROUPS if key in name), "other")


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_rates(n: int, repeats: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(n, n, generator=gen).to(dtype) for _ in range(2))
        out[name] = 2 * n**3 / median_seconds(lambda: torch.matmul(a, b), repeats) / 1e9
    return out


def profile_step(attack: PGD, x, gallery, is_same, steps: int) -> dict:
    for _ in range(2):  # warm-up: oneDNN primitive creation, allocator
        attack._ascent_gradient(x, gallery, is_same)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            attack._ascent_gradient(x, gallery, is_same)
    wall = median_seconds(lambda: attack._ascent_gradient(x, gallery, is_same), steps)
    ops: dict[str, float] = {}
    for event in prof.key_averages():
        if event.self_cpu_time_total > 0:
            ops[event.key] = ops.get(event.key, 0.0) + event.self_cpu_time_total / 1e6 / steps
    groups: dict[str, float] = {}
    for name, seconds in ops.items():
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + seconds
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:12]
    return {"step_s_unprofiled": wall, "profiled_step_s": sum(ops.values()),
            "groups_s": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
            "top_ops_s": {k: v for k, v in top}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=32, help="images per step (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=5, help="profiled steps per configuration (default: %(default)s)")
    ap.add_argument("--gemm-size", type=int, default=2048, help="GEMM side for the reference rates")
    ap.add_argument("--torchattacks-rate", type=float,
                    help="torchattacks' fp32 PGD image-steps/s measured on this machine (for the ceiling ratio)")
    ap.add_argument("--frozen-convs", action="store_true",
                    help="also profile the fast path with FrozenConv2d (make_fast(frozen_convs=True))")
    ap.add_argument("--plain-stem", action="store_true",
                    help="also profile the fast path with PyTorch's own stem (make_fast(stem='plain')): the "
                         "fast path before the fused stem, in the same run")
    ap.add_argument("--packed", action="append", default=[], choices=("off", "weights", "fused-mul"),
                    help="also profile the fast path with make_fast(packed=MODE) (the default is \"fused\"); "
                         "off: the fast path before prepacked weights; repeatable")
    ap.add_argument("--out", type=Path, help="write the JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the command-line tools do

    precision = resolve_precision("auto", "cpu")
    plain = create_model("dlib-resnet")
    configs = {"fp32 eager (plain model, NCHW)": PGD(plain, eps=4, precision="fp32")}
    if args.plain_stem:
        configs[f"fast path, plain stem ({precision})"] = PGD(make_fast(plain, stem="plain", packed="off"), eps=4,
                                                              precision=precision)
    configs[f"fast path ({precision}, channels_last, folded, fused stem, packed)"] = PGD(make_fast(plain), eps=4,
                                                                                precision=precision)
    if args.frozen_convs:  # the switch under test: the fast path with FrozenConv2d (before / after in one run)
        configs[f"fast path + frozen convs ({precision})"] = PGD(make_fast(plain, frozen_convs=True, packed="off"),
                                                                 eps=4, precision=precision)
    for mode in args.packed:
        configs[f"fast path, packed={mode} ({precision})"] = PGD(make_fast(plain, packed=mode), eps=4,
                                                                 precision=precision)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch, 3, 150, 150), generator=gen).float().div_(255.0)
    with torch.no_grad():
        gallery = plain(torch.randint(0, 256, (args.batch, 3, 150, 150), generator=gen).float().div_(255.0))
    is_same = torch.arange(args.batch) % 2 == 0

    load_before = load_average()
    flops = count_fwd_bwd_flops(plain, x)
    gemm = gemm_rates(args.gemm_size, repeats=5)
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, attack in configs.items():
            print(f"profiling {label}", file=sys.stderr, flush=True)
            r = profile_step(attack, x, gallery, is_same, args.steps)
            conv_s = sum(s for g, s in r["groups_s"].items() if g.startswith("conv"))
            r["image_steps_per_s"] = args.batch / r["step_s_unprofiled"]
            r["conv_share"] = conv_s / r["profiled_step_s"]
            r["conv_gflops"] = flops / conv_s / 1e9 if conv_s else None
            r["step_gflops"] = flops / r["step_s_unprofiled"] / 1e9
            results[label] = r

    ceiling = gemm["bf16"] * 1e9 / (flops / args.batch)  # image-steps/s with every FLOP at the bf16 GEMM rate
    result = {
        "what": "one attack step (forward + input gradient) of dlib-resnet, profiled with torch.profiler",
        **run_record(argv),
        "threads": args.threads, "batch": args.batch, "profiled_steps": args.steps, "torch": torch.__version__,
        "device": device_features("cpu"),
        "load_average_before": load_before, "load_average_after": load_average(),
        "fwd_bwd_gflop_per_step": flops / 1e9,
        "gemm_gflops": gemm,
        "ceiling_image_steps_per_s_at_bf16_gemm_rate": ceiling,
        "torchattacks_fp32_image_steps_per_s": args.torchattacks_rate,
        "ceiling_vs_torchattacks": ceiling / args.torchattacks_rate if args.torchattacks_rate else None,
        "configs": results,
    }
    print(format_report(result))
    write_json(result, args.out)
    return result


def format_report(result: dict) -> str:
    labels = list(result["configs"])
    groups = sorted({g for r in result["configs"].values() for g in r["groups_s"]},
                    key=lambda g: -max(r["groups_s"].get(g, 0) for r in result["configs"].values()))
    lines = [f"batch {result['batch']}, {result['threads']} threads, {result['fwd_bwd_gflop_per_step']:.1f} "
             f"GFLOP per step; GEMM {result['gemm_gflops']['fp32']:.0f} (fp32) / "
             f"{result['gemm_gflops']['bf16']:.0f} (bf16) GFLOP/s",
             "", "| ms per step | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for g in groups:
        cells = []
        for label in labels:
            r = result["configs"][label]
            s = r["groups_s"].get(g, 0.0)
            cells.append(f"{1e3 * s:.1f} ({100 * s / r['profiled_step_s']:.0f}%)")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    lines.append("| outside convolutions | " + " | ".join(
        f"{100 * (1 - result['configs'][l]['conv_share']):.1f}%" for l in labels) + " |")
    for key, fmt in (("image_steps_per_s", "{:.0f}"), ("conv_gflops", "{:.0f}"), ("step_gflops", "{:.0f}")):
        name = {"image_steps_per_s": "image-steps/s (unprofiled)", "conv_gflops": "GFLOP/s inside convolutions",
                "step_gflops": "GFLOP/s over the whole step"}[key]
        lines.append(f"| {name} | " + " | ".join(fmt.format(result["configs"][l][key]) for l in labels) + " |")
    lines.append("")
    lines.append(f"ceiling (every FLOP at the bf16 GEMM rate, nothing else): "
                 f"{result['ceiling_image_steps_per_s_at_bf16_gemm_rate']:.0f} image-steps/s")
    if result["ceiling_vs_torchattacks"]:
        lines.append(f"  = {result['ceiling_vs_torchattacks']:.2f}x torchattacks' fp32 PGD "
                     f"({result['torchattacks_fp32_image_steps_per_s']:.0f} image-steps/s)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

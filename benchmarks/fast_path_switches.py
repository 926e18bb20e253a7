"""What each switch of the fast dlib-resnet path buys: attack image-steps per second.

    python benchmarks/fast_path_switches.py --threads 2 --out benchmarks/results/fast_path_switches.json

One attack step is what PGD / FGSM / C&W do per iteration: ``Attack._ascent_gradient`` (forward
at the attack's precision, cosine similarity to fixed gallery embeddings, input gradient, made
contiguous for the fused update kernel) on an N x 3 x 150 x 150 fp32 NCHW batch on the uint8
grid. Configurations, each a switch on top of the one before:

    fp32 NCHW plain           the ported model as is
    fp32 CL                   channels_last weights and activations
    fp32 CL folded            + ChannelAffine folded into the convolution before it
    fp32 CL folded in-place   + in-place ReLU / residual add (the full fast copy)
    ... polyphase-stem        + the stem's input gradient as one forward convolution of its
                              polyphase sub-kernels (FrozenConv2d, input_grad="polyphase")
    ... fused-stem            instead: shift, stem convolution and max-pool in cache-sized chunks
                              of images, polyphase input gradient (ChunkedStem; the default)
    ... frozen-convs          + every convolution a FrozenConv2d: weights kept in the autocast
                              dtype (no per-step weight cast)
    ... torch.compile         the fast copy with PyTorch's stem under torch.compile (inductor)
    ... packed-weights        instead of frozen-convs: the convolutions on weights prepacked once
                              for oneDNN, each residual block one autograd Function (packed="weights")
    ... packed-fused          + bias + ReLU and residual add + ReLU as post-ops, the input
                              gradient's shortcut add fused, the stem's ReLU in its chunks (the default)
    ... packed-fused-mul      + the ReLU-backward mask as a fused multiply

(every configuration before the packed ones says packed="off": the default copy is packed-fused)
    bf16 ...                  the same under bf16 autocast

Everything runs in ONE process, interleaved: every round times every (configuration, batch
size) with a few steps after one untimed warm-up step, rotating the order between rounds, so
that load from other processes hits all configurations alike. The table reports the median
step time over all rounds. The machine's load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, run_record, write_json  # noqa: E402

from advface_fast.allocator import keep_freed_memory
from advface_fast.attacks import PGD
from advface_fast.models import create_model
from advface_fast.models.fast import make_fast
from advface_fast.precision import device_features

_SWITCHES = (  # label suffix, make_fast switches; each adds one switch to the one before
    ("CL", dict(fold_affine=False, inplace=False, stem="plain")),
    ("CL folded", dict(fold_affine=True, inplace=False, stem="plain", packed="off")),
    ("CL folded in-place", dict(fold_affine=True, inplace=True, stem="plain", packed="off")),
    ("CL folded in-place polyphase-stem", dict(fold_affine=True, inplace=True, stem="polyphase", packed="off")),
    ("CL folded in-place fused-stem", dict(fold_affine=True, inplace=True, stem="fused", packed="off")),
    ("CL folded in-place fused-stem frozen-convs", dict(fold_affine=True, inplace=True, stem="fused", frozen_convs=True,
                                                                   packed="off")),
    # torch.compile (inductor, CPU; needs a C++ compiler) of the fast copy with PyTorch's own stem,
    # whose element-wise work and pooling inductor may fuse: measured against the eager switches
    ("CL folded in-place torch.compile", dict(fold_affine=True, inplace=True, stem="plain", packed="off",
                                                         compile=True)),
    ("CL folded in-place fused-stem packed-weights", dict(fold_affine=True, inplace=True, stem="fused", packed="weights")),
    ("CL folded in-place fused-stem packed-fused", dict(fold_affine=True, inplace=True, stem="fused", packed="fused")),
    ("CL folded in-place fused-stem packed-fused-mul",
     dict(fold_affine=True, inplace=True, stem="fused", packed="fused-mul")),
)
CONFIGS = tuple(  # label, precision, make_fast switches (None: the plain model)
    item for precision in ("fp32", "bf16")
    for item in [(f"{precision} NCHW plain", precision, None)]
    + [(f"{precision} {suffix}", precision, switches) for suffix, switches in _SWITCHES])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    ap.add_argument("--batches", default="16,32,64", help="batch sizes (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=2,
                    help="timed steps per config, batch and round (default: %(default)s)")
    ap.add_argument("--configs", help="comma-separated subset of the configuration labels")
    ap.add_argument("--out", type=Path, help="write the JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the command-line tools do
    batches = [int(b) for b in args.batches.split(",")]
    wanted = args.configs.split(",") if args.configs else [c[0] for c in CONFIGS]
    unknown = [w for w in wanted if w not in {c[0] for c in CONFIGS}]
    if unknown:
        ap.error(f"unknown --configs {unknown}; choose from: {', '.join(c[0] for c in CONFIGS)}")
    configs = [c for c in CONFIGS if c[0] in wanted]

    plain = create_model("dlib-resnet")
    attacks = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # emulated bf16 warns; the numbers say how slow it is
        for label, precision, switches in configs:
            switches = dict(switches or {})
            compile_model = switches.pop("compile", False)
            model = plain if not switches else make_fast(plain, **switches)
            if compile_model:  # compiled once here, before any timing (the warm-up step compiles)
                model = torch.compile(model)
            attacks[label] = PGD(model, eps=4, precision=precision)

    gen = torch.Generator().manual_seed(0)
    n_max = max(batches)
    x_all = torch.randint(0, 256, (n_max, 3, 150, 150), generator=gen).float().div_(255.0)
    with torch.no_grad():
        gallery_all = plain(torch.randint(0, 256, (n_max, 3, 150, 150), generator=gen).float().div_(255.0))
    is_same_all = torch.arange(n_max) % 2 == 0

    load_before = load_average()
    times: dict[tuple[str, int], list[float]] = {(c[0], b): [] for c in configs for b in batches}
    t_start = time.perf_counter()
    for r in range(args.rounds):
        order = configs[r % len(configs):] + configs[: r % len(configs)]
        for b in batches:
            x, gallery, is_same = x_all[:b].contiguous(), gallery_all[:b], is_same_all[:b]
            for label, _, _ in order:
                attack = attacks[label]
                for i in range(1 + args.steps):
                    t0 = time.perf_counter()
                    attack._ascent_gradient(x, gallery, is_same)
                    if i:
                        times[label, b].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds} done ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    load_after = load_average()

    rows = []
    for label, precision, switches in configs:
        row = {"config": label, "precision": precision,
               "switches": switches if switches is not None else "plain model"}
        for b in batches:
            median = statistics.median(times[label, b])
            row[f"batch_{b}"] = round(b / median, 1)
        rows.append(row)
    result = {
        "what": "attack image-steps/s (forward + input gradient, Attack._ascent_gradient), dlib-resnet 150x150",
        **run_record(argv),
        "threads": args.threads,
        "rounds": args.rounds,
        "timed_steps_per_round": args.steps,
        "statistic": "median step time over all rounds -> batch / median",
        "load_average_before": load_before,
        "load_average_after": load_after,
        "torch": torch.__version__,
        "device": device_features("cpu"),
        "rows": rows,
        "raw_step_seconds": {f"{label}|{b}": [round(t, 5) for t in ts] for (label, b), ts in times.items()},
    }
    print(format_table(result))
    write_json(result, args.out)
    return result


def format_table(result: dict) -> str:
    keys = [k for k in result["rows"][0] if k.startswith("batch_")]
    lines = ["| config | " + " | ".join(k.replace("batch_", "batch ") for k in keys) + " |",
             "|---|" + "---:|" * len(keys)]
    for row in result["rows"]:
        lines.append(f"| {row['config']} | " + " | ".join(f"{row[k]:.1f}" for k in keys) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

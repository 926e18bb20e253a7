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
    ... frozen-convs          + FrozenConv2d: weights kept in the autocast dtype, stride-1 input
                              gradients through the forward kernel on flipped weights
    bf16 ...                  the same under bf16 autocast

Everything runs in ONE process, interleaved: every round times every (configuration, batch
size) with a few steps after one untimed warm-up step, rotating the order between rounds, so
that load from other processes hits all configurations alike. The table reports the median
step time over all rounds. The machine's load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, write_json  # noqa: E402

from advface_fast.attacks import PGD
from advface_fast.models import create_model
from advface_fast.models.fast import make_fast
from advface_fast.precision import device_features

CONFIGS = (  # label, precision, make_fast switches (None: the plain model)
    ("fp32 NCHW plain", "fp32", None),
    ("fp32 CL", "fp32", dict(fold_affine=False, inplace=False)),
    ("fp32 CL folded", "fp32", dict(fold_affine=True, inplace=False)),
    ("fp32 CL folded in-place", "fp32", dict(fold_affine=True, inplace=True)),
    ("fp32 CL folded in-place frozen-convs", "fp32", dict(fold_affine=True, inplace=True, frozen_convs=True)),
    ("bf16 NCHW plain", "bf16", None),
    ("bf16 CL", "bf16", dict(fold_affine=False, inplace=False)),
    ("bf16 CL folded", "bf16", dict(fold_affine=True, inplace=False)),
    ("bf16 CL folded in-place", "bf16", dict(fold_affine=True, inplace=True)),
    ("bf16 CL folded in-place frozen-convs", "bf16", dict(fold_affine=True, inplace=True, frozen_convs=True)),
)


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
    batches = [int(b) for b in args.batches.split(",")]
    configs = [c for c in CONFIGS if not args.configs or c[0] in args.configs.split(",")]

    plain = create_model("dlib-resnet")
    attacks = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # emulated bf16 warns; the numbers say how slow it is
        for label, precision, switches in configs:
            model = plain if switches is None else make_fast(plain, **switches)
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
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
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

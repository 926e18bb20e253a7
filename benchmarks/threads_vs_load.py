"""Torch threads vs the load of other processes: the attack step at 1..N threads, interleaved.

    python benchmarks/threads_vs_load.py --threads 1,2 --out benchmarks/results/threads_vs_load.json

The evidence behind ``advface_fast.threads.default_threads`` (usable cores minus the tasks other
processes keep runnable now, at least 1): run it on an idle machine and next to other jobs. One attack
step is ``Attack._ascent_gradient`` of PGD (bf16 where native, the fast dlib-resnet) on a batch of
N x 3 x 150 x 150 images; every round times every thread count (warm-up step first, order rotated),
so load changes hit all counts alike. Reports median and worst step time per thread count, the
load average before and after, and the thread count the default rule picks at the start.
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

from advface_fast.attacks import PGD
from advface_fast.models import create_model
from advface_fast.models.fast import make_fast
from advface_fast.precision import device_features, resolve_precision
from advface_fast.threads import default_threads


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="thread counts to compare (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=32, help="images per step (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per count and round (default: %(default)s)")
    ap.add_argument("--out", type=Path, help="write the JSON here")
    args = ap.parse_args(argv)
    counts = [int(t) for t in args.threads.split(",")]
    picked, why = default_threads()
    load_before = load_average()
    precision = resolve_precision("auto")
    plain = create_model("dlib-resnet")
    attack = PGD(make_fast(plain), eps=4, precision=precision)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch, 3, 150, 150), generator=gen).float().div_(255.0)
    with torch.no_grad():
        gallery = plain(torch.randint(0, 256, (args.batch, 3, 150, 150), generator=gen).float().div_(255.0))
    is_same = torch.arange(args.batch) % 2 == 0
    times: dict[int, list[float]] = {n: [] for n in counts}
    for r in range(args.rounds):
        for n in counts[r % len(counts):] + counts[: r % len(counts)]:
            torch.set_num_threads(n)
            for i in range(1 + args.steps):
                t0 = time.perf_counter()
                attack._ascent_gradient(x, gallery, is_same)
                if i:
                    times[n].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
    rows = [{"threads": n, "median_step_s": round(statistics.median(v), 4), "worst_step_s": round(max(v), 4),
             "image_steps_per_s": round(args.batch / statistics.median(v), 1)} for n, v in times.items()]
    best = min(rows, key=lambda r: r["median_step_s"])
    result = {"what": "attack step time vs torch threads under the machine's current load",
              **run_record(argv),
              "precision": precision, "batch": args.batch, "load_average_before": load_before,
              "load_average_after": load_average(), "default_rule_picked": picked, "default_rule_why": why,
              "fastest_threads": best["threads"],
              "rule_vs_fastest": round(next(r["median_step_s"] for r in rows if r["threads"] == picked)
                                       / best["median_step_s"], 3) if picked in counts else None,
              "torch": torch.__version__, "device": device_features("cpu"), "rows": rows,
              "raw_step_seconds": {str(n): [round(t, 4) for t in v] for n, v in times.items()}}
    for r in rows:
        print(f"{r['threads']} threads: median {1000 * r['median_step_s']:.0f} ms/step "
              f"({r['image_steps_per_s']} image-steps/s), worst {1000 * r['worst_step_s']:.0f} ms")
    print(f"default rule: {why}; fastest here: {best['threads']} threads")
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()

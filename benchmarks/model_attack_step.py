"""Attack-step speed of every registered model: plain fp32 vs its fast copy (fp32 and bf16), and
the share of PReLU (forward + backward) in each step, from torch.profiler.

    python benchmarks/model_attack_step.py --threads 1 --batch 16 --out benchmarks/results/model_attack_step.json

One attack step is ``PGD._ascent_gradient`` (forward, cosine similarity to fixed gallery
embeddings, input gradient) on N random chips of the model's input size. The configurations are
timed interleaved, one step each per round, ``--repeats`` rounds (the median reported). A fast
copy with the dilated input gradient (SFace's; ``make_fast(dilated_grad=)``) is also timed
without it in the same rounds. The allocator setting of the command-line tools is applied
(``keep_freed_memory``; ``ADVFACE_KEEP_FREED_MEMORY`` chooses) and recorded. facenet and
cosface-sphere20 need user weights; speed does not depend on the weight values, so without
weights they are timed with random weights (marked "random weights" in the output).
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
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, load_average, write_json  # noqa: E402

from advface_fast.allocator import keep_freed_memory
from advface_fast.attacks import PGD
from advface_fast.models import create_model, get_model_spec
from advface_fast.precision import resolve_precision


def build(name: str):
    try:
        return create_model(name), "published weights"
    except FileNotFoundError:  # user weights not given: the architecture with random weights
        from advface_fast.models.facenet import InceptionResNetV1
        from advface_fast.models.sphereface import SphereFace20

        net = {"facenet": InceptionResNetV1, "cosface-sphere20": SphereFace20}[name]().eval().requires_grad_(False)
        net.spec = get_model_spec(name)
        return net, "random weights"


def interleaved_step_seconds(attacks: dict, x, gallery, same, repeats: int) -> dict:
    """label -> median seconds of one step, the labels taking turns (one step each per round)."""
    for attack in attacks.values():
        for _ in range(2):
            attack._ascent_gradient(x, gallery, same)
    times = {label: [] for label in attacks}
    for _ in range(repeats):
        for label, attack in attacks.items():
            t0 = time.perf_counter()
            attack._ascent_gradient(x, gallery, same)
            times[label].append(time.perf_counter() - t0)
    return {label: statistics.median(ts) for label, ts in times.items()}


def prelu_share(attack, x, gallery, same, steps: int = 2) -> dict:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            attack._ascent_gradient(x, gallery, same)
    total = prelu = prelu_bwd = 0.0
    for e in prof.key_averages():
        t = e.self_cpu_time_total / 1e6 / steps
        total += t
        if "prelu" in e.key.lower():
            prelu += t
            if "backward" in e.key.lower():
                prelu_bwd += t
    return {"profiled_step_s": round(total, 4), "prelu_s": round(prelu, 4), "prelu_backward_s": round(prelu_bwd, 4),
            "prelu_share": round(prelu / total, 3) if total else None,
            "prelu_backward_share": round(prelu_bwd / total, 3) if total else None}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="dlib-resnet,sface,facenet,cosface-sphere20")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    allocator = keep_freed_memory()
    torch.set_num_threads(args.threads)
    bf16 = resolve_precision("auto", "cpu")
    out = {"benchmark": "attack step per model", "command": command_line(argv), "threads": args.threads, "batch": args.batch,
           "repeats": args.repeats, "statistic": "median over interleaved rounds", **allocator,
           "load_average_before": load_average(), "auto_precision": bf16,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "models": {}}
    gen = torch.Generator().manual_seed(0)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        net, weights = build(name)
        spec = get_model_spec(name)
        fast = spec.make_fast(net)
        h, w = spec.input_size
        x = torch.rand(args.batch, 3, h, w, generator=gen)
        with torch.no_grad():
            gallery = net(torch.rand(args.batch, 3, h, w, generator=gen)).float()
        same = torch.arange(args.batch) % 2 == 0
        row = {"weights": weights, "input": [h, w]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            copies = {"fast": fast}
            if "dilated_grad" in getattr(fast, "switches", {}):
                copies["fast without dilated_grad"] = spec.make_fast(net, dilated_grad=False)
            configs = {"plain fp32": PGD(net, eps=4, precision="fp32")}
            configs.update({f"{label} fp32": PGD(copy, eps=4, precision="fp32") for label, copy in copies.items()})
            if bf16 == "bf16":
                configs.update({f"{label} bf16": PGD(copy, eps=4, precision="bf16") for label, copy in copies.items()})
            print(f"{name}: {', '.join(configs)}", file=sys.stderr, flush=True)
            for label, s in interleaved_step_seconds(configs, x, gallery, same, args.repeats).items():
                row[label] = {"step_s": round(s, 4), "image_steps_per_s": round(args.batch / s, 1)}
            row["speedup_fast_fp32"] = round(row["plain fp32"]["step_s"] / row["fast fp32"]["step_s"], 2)
            if "fast bf16" in row:
                row["speedup_fast_bf16"] = round(row["plain fp32"]["step_s"] / row["fast bf16"]["step_s"], 2)
            row["profile_plain_fp32"] = prelu_share(configs["plain fp32"], x, gallery, same)
        out["models"][name] = row
        print(name, {k: v for k, v in row.items() if k != "profile_plain_fp32"}, row["profile_plain_fp32"],
              file=sys.stderr, flush=True)
    out["load_average_after"] = load_average()
    if args.out:
        write_json(out, args.out)
    return out


if __name__ == "__main__":
    main()

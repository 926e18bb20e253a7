"""Square's query rate through the undefended pipeline: the plain fp32 model vs its fp32 fast copy.

    python benchmarks/square_query_rate.py --threads 2 --pairs 64 --queries 50 \
        --out benchmarks/results/square_query_rate.json

The leaderboard's black-box row queries the deployed pipeline in fp32; with the fast model (the
default) it queries the fast copy, the plain model's function up to summation order. Per model: Square
(eps 4, ``--queries`` queries) on ``--pairs`` random on-grid image pairs (half matched, a threshold
no pair meets, so no pair finishes early and every query is spent), through ``DefendedModel`` of the
``none`` defense with each embedder, interleaved rounds (median), and how many of the final queries'
decisions the two agree on (scored by the plain model). The allocator setting of the command-line
tools is applied.
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
from advface_fast.attacks import make_attack
from advface_fast.defenses import create_defense
from advface_fast.defenses.adaptive import DefendedModel
from advface_fast.models import create_model, get_model_spec


def model_row(name: str, pairs: int, queries: int, rounds: int) -> dict:
    spec = get_model_spec(name)
    net = create_model(name)
    fast = spec.make_fast(net)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (pairs, 3, *spec.input_size), generator=gen).float().div_(255)
    with torch.no_grad():
        gallery = torch.nn.functional.normalize(net(torch.rand(pairs, 3, *spec.input_size, generator=gen)), dim=1)
    same = torch.arange(pairs) % 2 == 0
    thresholds = torch.where(same, torch.tensor(-2.0), torch.tensor(2.0))  # unreachable: every query is spent
    defense = create_defense("none", net)
    attacks = {label: make_attack("square", DefendedModel(defense, embedder=emb), eps=4, n_queries=queries, seed=0)
               for label, emb in (("plain fp32", None), ("fast copy fp32", fast))}
    times = {label: [] for label in attacks}
    outs = {}
    for r in range(rounds):
        for label, attack in (attacks.items() if r % 2 == 0 else reversed(attacks.items())):
            t0 = time.perf_counter()
            outs[label] = attack(x, gallery, same, thresholds)
            times[label].append(time.perf_counter() - t0)
    with torch.no_grad():
        sims = {k: (torch.nn.functional.normalize(net(v), dim=1) * gallery).sum(1) for k, v in outs.items()}
    row = {label: {"seconds": round(statistics.median(ts), 3),
                   "queries_per_s": round(pairs * queries / statistics.median(ts), 1)} for label, ts in times.items()}
    row["speedup"] = round(row["plain fp32"]["seconds"] / row["fast copy fp32"]["seconds"], 2)
    row["final_queries_equal"] = bool(torch.equal(outs["plain fp32"], outs["fast copy fp32"]))
    row["max_similarity_difference"] = float((sims["plain fp32"] - sims["fast copy fp32"]).abs().max())
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    ap.add_argument("--pairs", type=int, default=64, help="pairs (default: %(default)s)")
    ap.add_argument("--queries", type=int, default=50, help="Square queries per pair (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    ap.add_argument("--models", default="dlib-resnet,sface", help="comma list (default: %(default)s)")
    ap.add_argument("--out", type=Path, help="write the JSON here")
    args = ap.parse_args(argv)
    allocator = keep_freed_memory()
    torch.set_num_threads(args.threads)
    out = {"what": "Square queries per second through the undefended pipeline, plain fp32 model vs fp32 fast copy",
           **run_record(argv),
           "threads": args.threads, "pairs": args.pairs, "queries": args.queries, "rounds": args.rounds, **allocator,
           "statistic": "median over interleaved rounds", "load_average_before": load_average(), "models": {}}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        out["models"][name] = model_row(name, args.pairs, args.queries, args.rounds)
        print(name, out["models"][name], file=sys.stderr)
    out["load_average_after"] = load_average()
    write_json(out, args.out)
    return out


if __name__ == "__main__":
    main()

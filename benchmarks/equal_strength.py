"""Are bf16-gradient attacks as strong as fp32-gradient ones? PGD and C&W on real LFW pairs.

    python benchmarks/equal_strength.py --lfw PATH/TO/lfw --fold 3 \
        --attack pgd:eps=1,steps=3 --attack cw:eps=1,steps=5 \
        --out benchmarks/results/equal_strength.json

Protocol (the same as Table 1):

* clean embeddings of every pair image with the plain fp32 model; one cosine threshold per
  fold fitted on the OTHER folds (``evaluate_embeddings``); the attacked fold's threshold
  judges every attacked pair and is never refitted;
* the pairs of ``--fold`` are attacked (query = first image, gallery = the second's clean
  embedding; matched pairs dodge, mismatched pairs impersonate), with per-pair seeds from
  (run seed, pair id), the same for every variant;
* variants of each attack: gradients from the fast copy in fp32, from the fast copy in bf16,
  and (``--with-plain``) from the plain model in fp32;
* every delivered (uint8) image is judged with the plain fp32 model: accuracy after attack and
  the mean similarity shift toward the attacker's goal.

Pick attack settings that do not saturate (accuracy after attack between 20% and 80%): at 0%
any weaker attack still looks equal.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, run_record, write_json  # noqa: E402

from advface_fast.allocator import keep_freed_memory
from advface_fast.attacks import DEFAULT_ATTACK_BATCH, VerificationObjective, make_attack
from advface_fast.seeds import derive_seed
from advface_fast.engine import chips_to_tensor, embed_chips
from advface_fast.models import create_model
from advface_fast.models.fast import make_fast
from advface_fast.pair_chips import prepare_pairs
from advface_fast.precision import device_features
from advface_fast.metrics import evaluate_embeddings


def parse_attack(text: str) -> tuple[str, dict]:
    """"pgd:eps=2,steps=3" -> ("pgd", {"eps": 2.0, "steps": 3})."""
    name, _, rest = text.partition(":")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        kwargs[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
    return name.strip(), kwargs


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lfw", required=True, help="LFW folder (pairs.txt + images)")
    ap.add_argument("--fold", type=int, default=3, help="1-based fold to attack (default: %(default)s)")
    ap.add_argument("--attack", action="append", type=parse_attack, required=True,
                    help="name:key=value,... e.g. pgd:eps=2,steps=3 (repeatable)")
    ap.add_argument("--max-pairs", type=int, help="only the first N pairs of the fold")
    ap.add_argument("--batch-size", type=int, default=DEFAULT_ATTACK_BATCH)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--with-plain", action="store_true", help="also attack with the plain fp32 model")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the command-line tools do
    load_before = load_average()
    t_start = time.perf_counter()

    pairs = prepare_pairs(args.lfw, progress=False)
    plain = create_model("dlib-resnet")
    fast = make_fast(plain)
    emb = embed_chips(plain, pairs.chips.chips, batch_size=64)
    clean = evaluate_embeddings(emb[pairs.query], emb[pairs.gallery], pairs.same, pairs.folds, metric="cosine")
    threshold = float(clean.threshold_map()[args.fold])
    t_clean = time.perf_counter() - t_start

    sel = np.flatnonzero(pairs.folds == args.fold)[: args.max_pairs]
    same = pairs.same[sel]
    pair_ids = [f"{p.a}|{p.b}" for p in (pairs.dataset.pairs[i] for i in sel)]
    seeds = [derive_seed(args.seed, pid) for pid in pair_ids]
    objective = VerificationObjective("cosine")
    gallery = torch.from_numpy(emb[pairs.gallery[sel]])
    clean_sim = objective.similarity(torch.from_numpy(emb[pairs.query[sel]]), gallery).double().numpy()
    goal = np.where(same, -1.0, 1.0)  # the direction each pair's attacker pushes the similarity

    def judge(sim: np.ndarray) -> dict:
        correct = (sim > threshold) == same
        return {"accuracy": float(correct.mean()),
                "matched_accuracy": float(correct[same].mean()) if same.any() else None,
                "mismatched_accuracy": float(correct[~same].mean()) if (~same).any() else None,
                "mean_shift": float(np.mean(goal * (sim - clean_sim)))}

    variants = [("fast fp32", fast, "fp32"), ("fast bf16", fast, "bf16")]
    if args.with_plain:
        variants.append(("plain fp32", plain, "fp32"))
    results = []
    for name, kwargs in args.attack:
        entry = {"attack": name, "params": kwargs, "variants": {}}
        decisions = {}
        for label, model, precision in variants:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                attack = make_attack(name, model, seed=args.seed, precision=precision, **kwargs)
            sims, seconds = [], 0.0
            for start in range(0, len(sel), args.batch_size):
                rows = slice(start, start + args.batch_size)
                queries = chips_to_tensor(pairs.chips.chips[pairs.query[sel[rows]]])
                t0 = time.perf_counter()
                x_adv = attack(queries, gallery[rows], torch.from_numpy(same[rows]),
                               torch.full((len(queries),), threshold), sample_seeds=seeds[rows])
                seconds += time.perf_counter() - t0
                with torch.no_grad():  # the decision: plain model, fp32, on the delivered image
                    sims.append(objective.similarity(plain(x_adv).float(), gallery[rows]).double().numpy())
            sim = np.concatenate(sims)
            decisions[label] = (sim > threshold) == same
            entry["variants"][label] = {**judge(sim), "attack_seconds": round(seconds, 2),
                                        "config": attack.config(), "precision": attack.precision}
            print(f"{name} {kwargs} {label}: accuracy {100 * entry['variants'][label]['accuracy']:.2f}%, "
                  f"shift {entry['variants'][label]['mean_shift']:.4f}, {seconds:.1f} s", file=sys.stderr)
        ref, bf = entry["variants"]["fast fp32"], entry["variants"]["fast bf16"]
        entry["bf16_minus_fp32"] = {
            "accuracy_points": round(100 * (bf["accuracy"] - ref["accuracy"]), 3),
            "mean_shift_relative": round((bf["mean_shift"] - ref["mean_shift"]) / ref["mean_shift"], 5),
            "decision_agreement": float(np.mean(decisions["fast bf16"] == decisions["fast fp32"])),
            "speedup": round(ref["attack_seconds"] / bf["attack_seconds"], 2),
        }
        results.append(entry)

    report = {
        "what": "bf16 vs fp32 attack gradients, judged in fp32 with a fixed clean threshold",
        **run_record(argv, args.lfw),
        "dataset_fingerprint": pairs.dataset.fingerprint,
        "fold": args.fold,
        "n_pairs": int(len(sel)),
        "n_matched": int(same.sum()),
        "threshold": {"metric": "cosine", "value": threshold, "fitted_on": "clean data, other folds"},
        "clean_accuracy": judge(clean_sim)["accuracy"],
        "judge": "plain dlib-resnet, fp32, on the delivered uint8 images",
        "seed": args.seed,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "clean_embedding_seconds": round(t_clean, 1),
        "torch": torch.__version__,
        "device": device_features("cpu"),
        "results": results,
    }
    for entry in results:
        d = entry["bf16_minus_fp32"]
        v = entry["variants"]
        print(f"{entry['attack']} {entry['params']}: fp32 {100 * v['fast fp32']['accuracy']:.2f}% / "
              f"bf16 {100 * v['fast bf16']['accuracy']:.2f}% (diff {d['accuracy_points']:+.2f} pts), "
              f"shift diff {100 * d['mean_shift_relative']:+.2f}%, agreement {100 * d['decision_agreement']:.1f}%, "
              f"speedup {d['speedup']}x")
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()

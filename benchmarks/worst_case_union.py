"""The per-pair worst case of one leaderboard entry over the rows of several runs.

An entry's worst case is taken over its own run's rows. When an entry meets stronger attacks in a
second run (``--adaptive-steps 40``, another ``--out``), each run's table has its own worst case;
this script takes it over the union: a pair counts as right only if it is right under every row
that attacked it, in any of the row ledgers given (``<out>/rows``). Rows are matched to the entry by
model and defense spec, and must share the defended thresholds (the same calibration), else it
stops. The same attack recorded by two runs (row name, attack config and start alike) counts once;
otherwise every row is a distinct attack, so a row name made with two configs
(say Square before and after a change of its stopping rule) counts twice: each is a real attack.

    python benchmarks/worst_case_union.py --rows runs/lb_full/rows runs/lb_aad_strong/rows \\
        --model dlib-resnet --defense attack-as-defense:attack=pgd,eps=4,steps=10 --out union.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

from advface_fast.experiments.leaderboard_rows import SCHEME  # noqa: E402
from advface_fast.store import Entry, entry_dirs  # noqa: E402


def is_matched(pair_id: str) -> bool:
    """LFW pair ids are ``person/image|person/image``: matched when both images are of one person."""
    a, b = pair_id.split("|")
    return a.split("/")[0] == b.split("/")[0]


def union(ledgers: list[Path], model: str, defense: str) -> dict:
    rows, thresholds, seen = [], None, set()
    for ledger in ledgers:
        for d in entry_dirs(ledger):
            config = json.loads((d / "meta.json").read_text())["config"]
            # the same attack (row, config, start) recorded by two runs counts once
            same = json.dumps([config.get("row"), config.get("attack"), config.get("start")], sort_keys=True)
            if config.get("model") != model or config.get("defense") != defense or "attack" not in config \
                    or same in seen:
                continue
            seen.add(same)
            if thresholds is None:
                thresholds = config["thresholds"]
            elif config["thresholds"] != thresholds:
                sys.exit(f"error: {d} was made under other defended thresholds: not the same entry")
            items = Entry(ledger, config, kind=SCHEME).read()
            if len(items):
                rows.append({"row": config["row"], "ledger": str(ledger), "key": d.name, "ids": list(items.ids),
                             "correct": np.asarray(items.arrays["correct"], dtype=bool)})
    if not rows:
        sys.exit(f"error: no rows of {model} + {defense} under {', '.join(map(str, ledgers))}")
    right: dict[str, bool] = {}
    for r in rows:
        for pid, ok in zip(r["ids"], r["correct"]):
            right[pid] = right.get(pid, True) and bool(ok)
    ids = sorted(right)
    ok = np.array([right[i] for i in ids])
    matched = np.array([is_matched(i) for i in ids])
    return {
        "model": model, "defense": defense, "pairs": len(ids), "matched": int(matched.sum()),
        "worst_case": float(ok.mean()), "dodging": float(ok[matched].mean()),
        "impersonation": float(ok[~matched].mean()),
        "rows": [{"row": r["row"], "ledger": r["ledger"], "key": r["key"], "pairs": len(r["ids"]),
                  "accuracy": float(r["correct"].mean())} for r in rows],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", type=Path, required=True, metavar="DIR", help="row ledgers (<out>/rows)")
    p.add_argument("--model", required=True, help="the entry's model label, as in its rows (e.g. dlib-resnet)")
    p.add_argument("--defense", required=True, help="the entry's defense spec, as in LEADERBOARD.md")
    p.add_argument("--out", type=Path, help="write the result as JSON here")
    args = p.parse_args(argv)
    result = union(args.rows, args.model, args.defense)
    result["command"] = "python benchmarks/worst_case_union.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for r in result["rows"]:
        print(f"{100 * r['accuracy']:5.1f}%  {r['row']}  ({r['pairs']} pairs, {r['ledger']})")
    print(f"worst case over {len(result['rows'])} rows: {100 * result['worst_case']:.1f}% on {result['pairs']} pairs "
          f"(dodging {100 * result['dodging']:.1f}, impersonation {100 * result['impersonation']:.1f})")
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

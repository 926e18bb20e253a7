"""Assemble a transfer matrix from Table 1 runs: rows = crafting model, columns = judging model.

    python benchmarks/transfer_matrix.py benchmarks/results/transfer_fold1

Reads every ``<craft>_on_<judge>/table1.json`` under the folder (made by
``advface attack --model JUDGE [--craft-model CRAFT] ...`` with the same pairs and attack
settings) and writes ``transfer.json`` and ``transfer.md`` there: for each attack row (attack,
eps, steps) the judge's accuracy after attack, white-box on the diagonal.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folder: str) -> dict:
    root = Path(folder)
    runs = {}
    for path in sorted(root.glob("*_on_*/table1.json")):
        craft, judge = path.parent.name.split("_on_")
        runs[(craft, judge)] = json.loads(path.read_text())
    models = sorted({m for pair in runs for m in pair})
    cells: dict = {}
    clean: dict = {}
    for (craft, judge), report in runs.items():
        for r in report["rows"]:
            if r["attack"] == "clean":
                clean[judge] = r["accuracy_mean"]
                continue
            key = f"{r['attack']}" + (f"-{r['params']['steps']}" if "steps" in r["params"] else "") + f" eps={r['eps']:g}"
            cells.setdefault(key, {})[f"{craft}->{judge}"] = r["accuracy_mean"]
    first = next(iter(runs.values()))
    out = {"models": models, "n_pairs": first["n_pairs"], "folds": first["folds"], "clean_accuracy": clean,
           "accuracy_after_attack": cells,
           "note": "rows of each block: crafting model; columns: judging model (its clean thresholds); diagonal = white-box"}
    lines = [f"Transfer matrix: accuracy (%) of the judging model (columns) on queries crafted on the crafting model "
             f"(rows), {first['n_pairs']} pairs of LFW fold(s) {first['folds']}; diagonal = white-box. Clean: "
             + ", ".join(f"{m} {100 * a:.1f}%" for m, a in sorted(clean.items())), ""]
    for key, values in cells.items():
        lines += [f"**{key}**", "", "| crafted on \\ judged by | " + " | ".join(models) + " |",
                  "|---|" + "---|" * len(models)]
        for craft in models:
            row = [values.get(f"{craft}->{judge}") for judge in models]
            lines.append(f"| {craft} | " + " | ".join("—" if v is None else f"{100 * v:.1f}" for v in row) + " |")
        lines.append("")
    (root / "transfer.json").write_text(json.dumps(out, indent=2) + "\n")
    (root / "transfer.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/transfer_fold1")

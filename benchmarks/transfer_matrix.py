"""Assemble a transfer matrix from Table 1 runs: rows = crafting model, columns = judging model.

    python benchmarks/transfer_matrix.py benchmarks/results/transfer_fold1

Reads every ``<craft>_on_<judge>/table1.json`` under the folder (made by
``advface attack --model JUDGE [--craft-model CRAFT] ...`` with the same pairs and attack
settings) and writes ``transfer.json`` and ``transfer.md`` there (the same matrix ``advface paper``
writes with ``--transfer-models``): for each attack row (attack, eps, steps) the judge's accuracy
after attack, white-box on the diagonal.
"""

from __future__ import annotations

import sys
from pathlib import Path

from advface_fast.experiments.transfer import matrix_from_folder, transfer_markdown, write_matrix


def main(folder: str) -> dict:
    matrix = matrix_from_folder(folder)
    write_matrix(matrix, Path(folder))
    print(transfer_markdown(matrix))
    return matrix


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/transfer_fold1")

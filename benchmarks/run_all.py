"""All the speed comparisons of advface-fast in one process, printed as one table of ratios.

    python benchmarks/run_all.py                      # LFW fold 1 beside the repo, all cores
    python benchmarks/run_all.py --threads 1 --quick  # a smoke run with tiny sizes
    python benchmarks/run_all.py --table1             # adds end-to-end Table 1 (tens of minutes)
    python benchmarks/run_all.py --synthetic          # random on-grid pairs instead of LFW

Writes benchmarks/results/bench_<host>.json (or --out FILE.json, or --out DIR: DIR/bench_<host>.json).
The measurements live in advface_fast.bench (the same code runs as `advface bench`); this script only
supplies the checkout's defaults.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, default_lfw  # noqa: E402

from advface_fast.bench import main  # noqa: E402

if __name__ == "__main__":  # the guard matters: a cold chip cache aligns in worker processes
    sys.exit(main(default_lfw=default_lfw(), default_out_dir=RESULTS_DIR, prog="run_all.py"))

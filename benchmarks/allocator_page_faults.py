"""What keeping freed memory buys an attack: page faults and kernel time per PGD step, with and without.

    python benchmarks/allocator_page_faults.py --threads 2 --out benchmarks/results/allocator_page_faults.json

``advface_fast.allocator.keep_freed_memory()`` is process-wide, so each setting runs in its own fresh
process (this script re-runs itself with ``--child``), alternating, ``--runs`` times each: one PGD-10 run
of the fast model (bf16 where the CPU has it, batch 64) for warm-up, then one timed PGD-10 run, with the
process's minor page faults and kernel (system) CPU time from ``getrusage`` around the timed run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, load_average, write_json  # noqa: E402


def child(threads: int, batch: int, steps: int, keep: bool) -> dict:
    import torch

    from advface_fast.allocator import allocator_info, keep_freed_memory
    from advface_fast.bench.context import pgd_one_step
    from advface_fast.models import create_model
    from advface_fast.precision import resolve_precision

    if keep:
        keep_freed_memory()
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    fast = create_model("dlib-resnet", fast=True)
    x = torch.randint(0, 256, (batch, 3, 150, 150), generator=gen).float().div_(255.0)
    gallery = torch.nn.functional.normalize(torch.randn(batch, 128, generator=gen), dim=1)
    precision = resolve_precision("auto", "cpu")
    run = pgd_one_step(fast, precision, x, gallery, torch.arange(batch) % 2 == 0, 4.0, steps)
    run()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    run()
    seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {"keep_freed_memory": keep, "allocator": allocator_info()["allocator"], "precision": precision,
            "step_ms": 1e3 * seconds / steps, "minor_faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
            "system_ms_per_step": 1e3 * (r1.ru_stime - r0.ru_stime) / steps}


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=64, help="images per attack batch (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=10, help="PGD steps per run (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=3, help="processes per setting (default: %(default)s)")
    ap.add_argument("--out", type=Path, help="write the JSON here")
    ap.add_argument("--child", choices=("keep", "default"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.threads, args.batch, args.steps, args.child == "keep")))
        return None
    load_before = load_average()
    runs = {"keep": [], "default": []}
    for _ in range(args.runs):
        for setting in ("default", "keep"):
            out = subprocess.run([sys.executable, __file__, "--child", setting, "--threads", str(args.threads),
                                  "--batch", str(args.batch), "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True, env={**os.environ, "ADVFACE_KEEP_FREED_MEMORY": "1"})
            runs[setting].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(setting, runs[setting][-1], file=sys.stderr)
    summary = {s: {k: round(statistics.median(r[k] for r in rs), 2)
                   for k in ("step_ms", "minor_faults_per_step", "system_ms_per_step")} for s, rs in runs.items()}
    result = {"what": "minor page faults and kernel time per PGD step, glibc's default vs keep_freed_memory()",
              "command": command_line(argv),
              "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "threads": args.threads, "batch": args.batch, "steps": args.steps, "runs": args.runs,
              "statistic": "median over processes", "load_average_before": load_before,
              "load_average_after": load_average(), "median": summary, "runs_detail": runs}
    for s, m in summary.items():
        print(f"{s:8s} step {m['step_ms']:7.1f} ms  faults/step {m['minor_faults_per_step']:8.1f}  "
              f"kernel {m['system_ms_per_step']:5.2f} ms/step")
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()

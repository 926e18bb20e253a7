"""What keeping freed memory buys an attack: page faults and kernel time per PGD step, per allocator setting.

    python benchmarks/allocator_page_faults.py --threads 2 --models dlib-resnet,sface \
        --out benchmarks/results/allocator_page_faults_heap.json

``advface_fast.allocator.keep_freed_memory()`` is process-wide, so each setting (glibc's default,
"threshold", "heap"; see advface_fast.allocator) runs in its own fresh process (this script re-runs
itself with ``--child``), alternating, ``--runs`` times each per model: one PGD-10 run of the fast
model (bf16 where the CPU has it, batch 64) for warm-up, then one timed PGD-10 run, with the process's
minor page faults and kernel (system) CPU time from ``getrusage`` around the timed run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, run_record, write_json  # noqa: E402


SETTINGS = ("default", "threshold", "heap")  # default: ADVFACE_KEEP_FREED_MEMORY=0


def child(model_name: str, threads: int, batch: int, steps: int, setting: str) -> dict:
    import torch

    from advface_fast.allocator import allocator_info, keep_freed_memory
    from advface_fast.bench.context import pgd_one_step
    from advface_fast.models import create_model, get_model_spec
    from advface_fast.precision import resolve_precision

    keep_freed_memory()  # the setting comes from ADVFACE_KEEP_FREED_MEMORY, set by the parent
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    spec = get_model_spec(model_name)
    fast = create_model(model_name, fast=True)
    x = torch.randint(0, 256, (batch, 3, *spec.input_size), generator=gen).float().div_(255.0)
    gallery = torch.nn.functional.normalize(torch.randn(batch, spec.embedding_dim, generator=gen), dim=1)
    precision = resolve_precision("auto", "cpu")
    run = pgd_one_step(fast, precision, x, gallery, torch.arange(batch) % 2 == 0, 4.0, steps)
    run()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    run()
    seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    info = allocator_info()
    return {"model": model_name, "setting": setting, "keep_freed_memory": info["keep_freed_memory"],
            "allocator": info["allocator"], "precision": precision,
            "step_ms": 1e3 * seconds / steps, "minor_faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
            "system_ms_per_step": 1e3 * (r1.ru_stime - r0.ru_stime) / steps,
            "peak_rss_mb": round(r1.ru_maxrss / 1024)}  # Linux: KiB


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=64, help="images per attack batch (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=10, help="PGD steps per run (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=3, help="processes per setting (default: %(default)s)")
    ap.add_argument("--models", default="dlib-resnet",
                    help="comma-separated registered models, each timed under every setting (default: %(default)s)")
    ap.add_argument("--out", type=Path, help="write the JSON here")
    ap.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    ap.add_argument("--model", default="dlib-resnet", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.model, args.threads, args.batch, args.steps, args.child)))
        return None
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    load_before = load_average()
    runs = {m: {s: [] for s in SETTINGS} for m in models}
    for model in models:
        for _ in range(args.runs):
            for setting in SETTINGS:
                env = {**os.environ, "ADVFACE_KEEP_FREED_MEMORY": "0" if setting == "default" else setting}
                out = subprocess.run([sys.executable, __file__, "--child", setting, "--model", model,
                                      "--threads", str(args.threads), "--batch", str(args.batch),
                                      "--steps", str(args.steps)], capture_output=True, text=True, check=True, env=env)
                runs[model][setting].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(model, setting, runs[model][setting][-1], file=sys.stderr)
    summary = {m: {s: {k: round(statistics.median(r[k] for r in rs), 2)
                       for k in ("step_ms", "minor_faults_per_step", "system_ms_per_step", "peak_rss_mb")}
                   for s, rs in by_setting.items()} for m, by_setting in runs.items()}
    result = {"what": "minor page faults and kernel time per PGD step under glibc's default and each "
                      "keep_freed_memory() setting",
              **run_record(argv),
              "threads": args.threads, "batch": args.batch, "steps": args.steps, "runs": args.runs,
              "statistic": "median over processes", "load_average_before": load_before,
              "load_average_after": load_average(), "median": summary, "runs_detail": runs}
    for model, by_setting in summary.items():
        for setting, m in by_setting.items():
            print(f"{model:12s} {setting:9s} step {m['step_ms']:7.1f} ms  faults/step "
                  f"{m['minor_faults_per_step']:8.1f}  kernel {m['system_ms_per_step']:5.2f} ms/step  "
                  f"peak RSS {m['peak_rss_mb']:6.0f} MB")
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()

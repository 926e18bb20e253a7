"""Gallery job throughput on real LFW images: the job's image-steps/s against the attack engine's
own rate on the same images (the job's overhead), and how much of the wall time the model was busy
(decode + align run in background threads, so the model should not wait).

    python benchmarks/gallery_throughput.py --lfw <LFW> --threads 1 --pgd5 500 --pgd40 100 \\
        --out benchmarks/results/gallery_throughput.json

For each defense (PGD-5 on a sample of ``--pgd5`` images, PGD-40 on ``--pgd40``; D = away-from-self,
eps 4, seed 0, batch 32): the sample (every k-th LFW image by id) is read once (warm OS cache),
then ``advface gallery`` runs on it from scratch (raw JPEGs: decode + dlib alignment in background
threads, D, embedding, shard commits) and reports images/s, useful image-steps/s (padding not
counted) and the model-busy fraction. The engine's own rate is D alone (AttackAsDefense.defend +
embed) on ``--engine-images`` of the same images, aligned beforehand, same batch size: the rate a
job could reach with free decoding and no writes. The 1-minute load average is recorded before and
after: on a shared machine every rate is lower than on a quiet one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_lfw, load_average, run_record, write_json  # noqa: E402

from advface_fast.environment import environment  # noqa: E402
from advface_fast.jobs import GalleryConfig, GalleryJob, run_local  # noqa: E402
from advface_fast.jobs.sources import list_images  # noqa: E402
from advface_fast.jobs.worker import ShardWorker  # noqa: E402
from advface_fast.threads import set_threads  # noqa: E402


def sample(refs, n):
    step = max(1, len(refs) // n)
    return refs[::step][:n]


def engine_rate(worker: ShardWorker, refs, n: int) -> dict:
    """D + embedding alone on n pre-aligned images (decoded and aligned before the clock starts)."""
    loaded = [worker.load(r) for r in refs[: n + 8]]
    good = [(r.id, c) for r, (c, status, _) in zip(refs, loaded) if status == "ok"][:n]
    x = torch.from_numpy(np.stack([c for _, c in good])).permute(0, 3, 1, 2).float() / 255
    ids = [i for i, _ in good]
    t0 = time.perf_counter()
    defended = worker.defense.defend(x, ids)[worker.config.steps]
    worker.embed(defended)
    seconds = time.perf_counter() - t0
    steps = len(ids) * worker.config.steps
    return {"images": len(ids), "seconds": round(seconds, 3), "image_steps_per_s": round(steps / seconds, 3),
            "images_per_s": round(len(ids) / seconds, 4)}


def align_sample(worker: ShardWorker, refs, folder: Path):
    """The sample's chips as PNG files (for the --aligned run: decoding only, no detection)."""
    from PIL import Image

    from advface_fast.jobs.sources import ImageRef

    out = []
    for r in refs:
        chip, status, _ = worker.load(r)
        if status == "ok":
            path = folder / (r.id.replace("/", "__") + ".png")
            Image.fromarray(chip).save(path)
            out.append(ImageRef(r.id, str(path)))
    return out


def job_rate(lfw: str, refs, steps: int, work: Path, decode_threads: int, aligned: bool = False,
             precision: str = "fp32") -> dict:
    name = f"pgd{steps}" + ("-aligned" if aligned else "")
    manifest = work / f"sample-{name}.csv"
    manifest.write_text("id,path\n" + "".join(f"{r.id},{r.path}\n" for r in refs))
    for r in refs:  # warm cache: the files are in the OS page cache, as in a long job's steady state
        Path(r.path).read_bytes()
    cfg = GalleryConfig(model="dlib-resnet", defense="pgd", eps=4, steps=steps, seed=0, shard_size=32, batch_size=32,
                        aligned=aligned, precision=precision)
    out = work / f"store-{name}"
    t0 = time.perf_counter()
    summary = run_local(GalleryJob(cfg, str(manifest), str(out), decode_threads=decode_threads, progress=True))
    wall = time.perf_counter() - t0
    import json
    import sqlite3

    record = json.loads(sqlite3.connect(out / "manifest.sqlite").execute(
        "SELECT record FROM runs ORDER BY run DESC LIMIT 1").fetchone()[0])
    return {"images": summary["images"], "ok": summary["ok"], "bad": summary["bad"], "no_face": summary["no_face"],
            "shards": summary["shards"], "job_seconds": round(record["seconds"], 3),
            "wall_seconds_with_model_load": round(wall, 3),
            "images_per_s": round(record["images"] / record["seconds"], 4),
            "image_steps_per_s": round(record["useful_image_steps"] / record["seconds"], 3),
            "computed_image_steps_per_s": round(record["image_steps"] / record["seconds"], 3),  # with padding
            "model_busy_fraction": round(record["model_busy_fraction"], 4),
            "decode_wait_seconds": round(record["decode_wait_seconds"], 3),
            "store_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
            "load_average_after": load_average()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lfw", default=default_lfw(), help="LFW folder (default: $ADVFACE_LFW or the copy beside the repo)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    ap.add_argument("--decode-threads", type=int, default=2, help="background decode/align threads (default: %(default)s)")
    ap.add_argument("--pgd5", type=int, default=500, help="images for the PGD-5 run (default: %(default)s)")
    ap.add_argument("--pgd40", type=int, default=96, help="images for the PGD-40 run (default: %(default)s)")
    ap.add_argument("--aligned-pgd5", type=int, default=256,
                    help="images for a PGD-5 run on pre-aligned chips (--aligned: decode only, no detection "
                         "competing for the cores) (default: %(default)s)")
    ap.add_argument("--engine-images", type=int, default=64, help="images for the engine's own rate (default: %(default)s)")
    ap.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="auto",
                    help="D's gradient precision, as `advface gallery --precision` (default: %(default)s)")
    ap.add_argument("--work", type=Path, help="scratch folder for the stores (default: a temporary one)")
    ap.add_argument("--out", type=Path, help="write the JSON here")
    args = ap.parse_args(argv)
    if not args.lfw:
        ap.error("no LFW folder: pass --lfw or set ADVFACE_LFW")
    set_threads(args.threads)
    refs = list_images(args.lfw)
    result = {"what": "gallery job throughput vs the attack engine's own rate; model-busy fraction",
              **run_record(argv, args.lfw),
              "lfw_images": len(refs), "threads": args.threads, "precision": args.precision, "decode_threads": args.decode_threads,
              "load_average_before": load_average(), "environment": environment(), "runs": []}
    if args.work is not None:
        Path(args.work).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        for steps, n, aligned in ((5, args.pgd5, False), (40, args.pgd40, False), (5, args.aligned_pgd5, True)):
            if n <= 0:
                continue
            refs_n = sample(refs, n)
            worker = ShardWorker(GalleryConfig(model="dlib-resnet", steps=steps, seed=0, batch_size=32,
                                               precision=args.precision))
            if aligned:
                chip_dir = work / "chips"
                chip_dir.mkdir(exist_ok=True)
                refs_n = align_sample(worker, refs_n, chip_dir)
                worker = ShardWorker(GalleryConfig(model="dlib-resnet", steps=steps, seed=0, batch_size=32,
                                                   aligned=True, precision=args.precision))
            load_before = load_average()
            job = job_rate(args.lfw, refs_n, steps, work, args.decode_threads, aligned, worker.config.precision)
            engine = engine_rate(worker, refs_n, min(args.engine_images, len(refs_n)))
            run = {"defense": f"PGD-{steps}, eps 4, away-from-self, batch 32, {worker.config.precision} gradients",
                   "input": "pre-aligned chips (--aligned)" if aligned else "LFW JPEGs (decode + dlib alignment)",
                   "sample": len(refs_n), "load_average_before": load_before, "job": job, "engine": engine,
                   "engine_load_average_after": load_average(),
                   "job_vs_engine_image_steps": round(job["image_steps_per_s"] / engine["image_steps_per_s"], 4),
                   "job_computed_vs_engine_image_steps": round(job["computed_image_steps_per_s"]
                                                               / engine["image_steps_per_s"], 4)}
            result["runs"].append(run)
            print(run, flush=True)
            write_json({**result, "partial": True}, args.out)
    result["load_average_after"] = load_average()
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()

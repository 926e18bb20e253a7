"""A gallery job: plan (ids -> shards -> what is left), run shards through a worker, summarise.

The executors (:mod:`advface_fast.jobs.executors`) decide WHO runs which shards; this module is what
every one of them does with a shard: decode ahead (prefetch), defend and embed (worker), commit
(store), and count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from .prefetch import BusyClock, prefetch
from .shard_store import GalleryStore, config_sha256, utc_now
from .sharding import make_shards
from .sources import ImageRef, fingerprint, list_images
from .worker import GalleryConfig, ShardWorker


@dataclass
class GalleryJob:
    """Everything a run needs: what to compute (``config``), from where, to where, and how."""

    config: GalleryConfig
    input: str
    out: str
    decode_threads: int = 2
    prefetch_depth: int = 2
    progress: bool = True
    device: str | None = None
    model_factory: Callable | None = None  # tests / Python users: a model not in the registry


@dataclass
class Plan:
    refs: dict[str, ImageRef]
    shards: list[list[str]]
    store_config: dict
    config_sha: str
    paths: dict[str, str] = field(default_factory=dict)

    def shard_refs(self, k: int) -> list[ImageRef]:
        return [self.refs[i] for i in self.shards[k]]


def make_plan(job: GalleryJob, worker: ShardWorker) -> Plan:
    refs = list_images(job.input)
    store_config = {**worker.store_config(), "ids_sha256": fingerprint(refs), "n_images": len(refs)}
    return Plan(refs={r.id: r for r in refs}, shards=make_shards([r.id for r in refs], job.config.shard_size),
                store_config=store_config, config_sha=config_sha256(store_config),
                paths={r.id: r.path for r in refs})


def check_inputs(worker: ShardWorker, plan: Plan, store: GalleryStore) -> None:
    """Unless bad files are to be skipped (--on-bad skip), look at the name, header and tail of every image
    still to do, so that a bad file stops the job with an error naming it before any work (as every
    command checks its images first). Damage only a full decode finds, and faces, are found in the run."""
    if worker.config.on_bad == "skip":
        return
    done = store.done_shards()
    for k, ids in enumerate(plan.shards):
        if k not in done:
            for image_id in ids:
                worker.check(plan.refs[image_id])


def prepare_store(store: GalleryStore, plan: Plan, worker: ShardWorker) -> dict:
    """Check the inputs (before the config is written, so that a rerun with other input rules is a
    fresh start, not a changed config) and the config (refuse a changed one), clear temporary files,
    adopt complete shards a crash left uncommitted. Returns what it found."""
    check_inputs(worker, plan, store)
    store.ensure_config(plan.store_config)
    removed = store.remove_temp_files()
    adopted = store.adopt(plan.config_sha, plan.shards, plan.paths)
    return {"temp_files_removed": len(removed), "shards_adopted": adopted}


def run_shards(worker: ShardWorker, plan: Plan, store: GalleryStore, shard_ids: list[int], job: GalleryJob,
               desc: str = "gallery", worker_name: str = "local") -> dict:
    """Compute and commit ``shard_ids`` (the ones not done yet); returns this run's counts."""
    done = store.done_shards()
    todo = [k for k in shard_ids if k not in done]
    total = sum(len(plan.shards[k]) for k in todo)
    stats = {"shards": 0, "images": 0, "ok": 0, "image_steps": 0, "useful_image_steps": 0, "model_seconds": 0.0}
    clock = BusyClock()
    bar = tqdm(total=total, desc=desc, unit="img", disable=not job.progress, dynamic_ncols=True)
    con = store.connect()
    try:
        for k, refs, loaded in prefetch(((k, plan.shard_refs(k)) for k in todo), worker.load,
                                        threads=job.decode_threads, depth=job.prefetch_depth, clock=clock):
            t0 = time.perf_counter()
            data, s = worker.compute(k, refs, loaded, plan.config_sha)
            clock.busy += time.perf_counter() - t0
            store.commit_shard(k, data, plan.paths, {**s, "worker": worker_name}, con=con)
            stats["shards"] += 1
            for key in ("images", "ok", "image_steps", "useful_image_steps"):
                stats[key] += s[key]
            stats["model_seconds"] += s["seconds"]
            bar.update(s["images"])
            elapsed = max(bar.format_dict["elapsed"], 1e-9)
            bar.set_postfix_str(
                                f"{stats['useful_image_steps'] / elapsed:.1f} image-steps/s", refresh=False)
    finally:
        con.close()
        bar.close()
    stats["seconds"] = time.perf_counter() - clock.start
    stats["model_busy_fraction"] = clock.busy / stats["seconds"] if stats["seconds"] > 0 else 0.0
    stats["decode_wait_seconds"] = clock.wait
    return stats


def run_record(job: GalleryJob, worker: ShardWorker, plan: Plan, stats: dict, *, executor: str,
               started: str, rank: int = 0, world_size: int = 1) -> dict:
    from ..environment import environment

    try:
        import safetensors
        st_version = safetensors.__version__
    except Exception:  # noqa: BLE001
        st_version = None
    return {"started": started, "executor": executor, "rank": rank, "world_size": world_size,
            "config": plan.store_config, "job": {"input": str(job.input), "out": str(job.out),
                                                 "decode_threads": job.decode_threads, "device": str(worker.device)},
            "precision": getattr(worker.defense, "precision", "fp32"), "environment": {**environment(), "safetensors": st_version},
            **stats}


def summary(store: GalleryStore, plan: Plan, runs: list[dict]) -> dict:
    """What the store holds now, and what this invocation did."""
    counts = store.counts()
    n_done = len(store.done_shards())
    seconds = max((r.get("seconds", 0.0) for r in runs), default=0.0)
    images = sum(r.get("images", 0) for r in runs)
    steps = sum(r.get("useful_image_steps", 0) for r in runs)
    busy = [r["model_busy_fraction"] for r in runs if r.get("images") and r.get("model_busy_fraction") is not None]
    return {"store": str(store.root), "images": len(plan.refs), "shards": len(plan.shards), "shards_done": n_done,
            "ok": counts.get("ok", 0), "bad": counts.get("bad", 0), "no_face": counts.get("no_face", 0),
            "pending": len(plan.refs) - sum(counts.values()), "input": plan.store_config["input"],
            "this_run": {"images": images, "seconds": seconds, "images_per_s": images / seconds if seconds else 0.0,
                         "image_steps_per_s": steps / seconds if seconds else 0.0,
                         "model_busy_fraction": min(busy) if busy else None, "workers": len(runs)}}


def format_summary(s: dict, limit: int = 10, bad_rows: list | None = None) -> str:
    r = s["this_run"]
    busy = "-" if r["model_busy_fraction"] is None else f"{100 * r['model_busy_fraction']:.0f}%"
    lines = [f"gallery store {s['store']}",
             f"  {'images':<22}{s['images']:>10}",
             f"  {'shards done':<22}{s['shards_done']:>10} / {s['shards']}",
             f"  {'embedded (ok)':<22}{s['ok']:>10}",
             f"  {'bad input':<22}{s['bad']:>10}",
             f"  {'no face':<22}{s['no_face']:>10}",
             f"  {'pending':<22}{s['pending']:>10}",
             f"  input rules: --on-bad {s['input']['on_bad']}, --no-face {s['input']['no_face']}",
             f"  this run: {r['images']} images in {r['seconds']:.1f} s on {r['workers']} worker(s): "
             f"{r['images_per_s']:.2f} img/s, {r['image_steps_per_s']:.1f} image-steps/s, model busy {busy}"]
    for image_id, status, error in (bad_rows or [])[:limit]:
        lines.append(f"  {status:<9}{image_id}: {error}")
    if bad_rows and len(bad_rows) > limit:
        lines.append(f"  ... and {len(bad_rows) - limit} more (manifest.sqlite: SELECT id, status, error FROM images "
                     "WHERE status != 'ok')")
    return "\n".join(lines)


def bad_rows(store: GalleryStore) -> list[tuple]:
    return [(i, status, err) for i, _, _, status, err, _ in store.rows() if status != "ok" or err]


def started_now() -> str:
    return utc_now()


__all__ = ["GalleryJob", "Plan", "bad_rows", "check_inputs", "format_summary", "make_plan", "prepare_store",
           "run_record", "run_shards", "summary"]

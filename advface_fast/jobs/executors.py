"""Who runs which shards: one process, torchrun ranks, or Ray tasks. The store is the same.

- ``run_local``: this process takes every shard not done yet, in order.
- ``run_torchrun``: under ``torchrun`` (RANK / WORLD_SIZE / MASTER_ADDR set), rank r takes the
  shards k with k % WORLD_SIZE == r (:func:`advface_fast.jobs.sharding.shards_of_rank`). Rank 0
  checks the config, clears temporary files and adopts stray shards before a barrier; every rank
  then writes its own shards and commits them to the shared SQLite manifest (its transactions are
  short; the store folder must be on a file system every node sees, with working POSIX locks).
  Process group: gloo on CPU, NCCL when CUDA is available (each rank on ``cuda:LOCAL_RANK``).
- ``run_ray``: one Ray task per shard (``max_retries`` re-runs a task whose worker or node died),
  each returning the shard's bytes; the driver writes and commits them as they arrive, so Ray
  workers need to read the images but never the store. ``ray.init(address)`` joins a cluster
  (``address="auto"`` inside one, or ``ray://host:10001``); without an address a local one starts.

Per-image seeds come from (run seed, image id) and every batch is padded to the same size, so
each executor writes the same bytes per id.
"""

from __future__ import annotations

import contextlib
import os

from .job import (
    GalleryJob,
    make_plan,
    prepare_store,
    run_record,
    run_shards,
    started_now,
    summary,
)
from .shard_store import GalleryStore
from .worker import ShardWorker


def in_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def run_local(job: GalleryJob) -> dict:
    started = started_now()
    store = GalleryStore(job.out)
    with store.lock():
        worker = ShardWorker(job.config, job.device, job.model_factory)
        plan = make_plan(job, worker)
        prep = prepare_store(store, plan, worker)
        stats = run_shards(worker, plan, store, list(range(len(plan.shards))), job)
        record = {**run_record(job, worker, plan, stats, executor="local", started=started), **prep}
        store.record_run(record)
    return summary(store, plan, [record])


def run_torchrun(job: GalleryJob) -> dict | None:
    """One rank of a torchrun job; rank 0 returns the summary, the others None."""
    import torch
    import torch.distributed as dist

    started = started_now()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available() and job.device in (None, "cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = job.device or "cpu"
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    hold = contextlib.ExitStack()
    try:
        store = GalleryStore(job.out)
        worker = ShardWorker(job.config, device, job.model_factory)
        plan = make_plan(job, worker)
        # Rank 0 prepares the store; a refusal (changed config) reaches every rank.
        error = [None]
        if rank == 0:
            try:
                hold.enter_context(store.lock())  # one job per store, held by rank 0 for the whole run
                prep = prepare_store(store, plan, worker)
            except Exception as err:  # noqa: BLE001 - re-raised on every rank below
                error = [f"{type(err).__name__}: {err}"]
                prep = {}
        dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise ValueError(error[0].split(": ", 1)[1])
        from .sharding import shards_of_rank

        mine = shards_of_rank(len(plan.shards), rank, world)
        stats = run_shards(worker, plan, store, mine, job, desc=f"gallery rank {rank}/{world}",
                           worker_name=f"rank {rank}/{world}")
        record = run_record(job, worker, plan, stats, executor="torchrun", started=started, rank=rank,
                            world_size=world)
        if rank == 0:
            record.update(prep)
        store.record_run(record)
        records = [None] * world
        dist.all_gather_object(records, record)
        dist.barrier()
        return summary(store, plan, records) if rank == 0 else None
    finally:
        hold.close()
        dist.destroy_process_group()


# -- Ray -------------------------------------------------------------------------------------------

_RAY_WORKERS: dict = {}


def _factory_key(factory) -> str | None:
    if factory is None:
        return None
    import hashlib

    from ray import cloudpickle

    return hashlib.sha256(cloudpickle.dumps(factory)).hexdigest()


def _ray_shard(job: GalleryJob, k: int, refs: list, config_sha: str, weights_sha256: str) -> tuple[int, bytes, dict]:
    """One Ray task: shard k's bytes. The worker (model, D) is built once per Ray worker process and
    kept while jobs with the same config, model factory and weights follow; a worker whose weights
    differ from the driver's is refused (never a silently mixed store)."""
    key = (repr(job.config), job.device, _factory_key(job.model_factory))
    worker = _RAY_WORKERS.get(key)
    if worker is None or worker.weights_sha256 != weights_sha256:
        _RAY_WORKERS.clear()
        worker = _RAY_WORKERS[key] = ShardWorker(job.config, job.device, job.model_factory)
    if worker.weights_sha256 != weights_sha256:
        raise ValueError(f"this Ray worker's model weights (sha256 {worker.weights_sha256[:12]}) differ from the "
                         f"driver's ({weights_sha256[:12]}): give every node the same model files")
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, job.decode_threads)) as pool:
        loaded = list(pool.map(worker.load, refs))
    data, stats = worker.compute(k, refs, loaded, config_sha)
    return k, data, stats


def run_ray(job: GalleryJob, address: str | None = None, max_retries: int = 3, num_cpus: float = 1) -> dict:
    """Run the job as Ray tasks, one per shard not done yet (see the module docstring)."""
    try:
        import ray
    except ImportError:
        raise ValueError("Ray is not installed: pip install 'advface-fast[ray]'") from None
    import time
    from dataclasses import replace

    started = started_now()
    store = GalleryStore(job.out)
    with store.lock():
        worker = ShardWorker(job.config, job.device, job.model_factory)  # the config's weights identity
        plan = make_plan(job, worker)
        prep = prepare_store(store, plan, worker)
        todo = [k for k in range(len(plan.shards)) if k not in store.done_shards()]
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        task = ray.remote(num_cpus=num_cpus, max_retries=max_retries)(_ray_shard)
        remote_job = replace(job, progress=False)
        pending = [task.remote(remote_job, k, plan.shard_refs(k), plan.config_sha, worker.weights_sha256)
                   for k in todo]
        stats = {"shards": 0, "images": 0, "ok": 0, "image_steps": 0, "useful_image_steps": 0,
                 "model_seconds": 0.0}
        t0 = time.perf_counter()
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(plan.shards[k]) for k in todo), desc="gallery (ray)", unit="img",
                   disable=not job.progress)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            k, data, s = ray.get(ready[0])
            store.commit_shard(k, data, plan.paths, {**s, "worker": "ray"})
            stats["shards"] += 1
            for key in ("images", "ok", "image_steps", "useful_image_steps"):
                stats[key] += s[key]
            stats["model_seconds"] += s["seconds"]
            bar.update(s["images"])
        bar.close()
        stats["seconds"] = time.perf_counter() - t0
        stats["model_busy_fraction"] = None  # per-task model time only (tasks decode then compute)
        record = {**run_record(job, worker, plan, stats, executor="ray", started=started), **prep}
        store.record_run(record)
    return summary(store, plan, [record])


def run(job: GalleryJob, executor: str = "local", ray_address: str | None = None) -> dict | None:
    """Run ``job`` with ``executor`` ("local" becomes torchrun under torchrun)."""
    if executor == "ray":
        return run_ray(job, ray_address)
    if executor != "local":
        raise ValueError(f"unknown executor {executor!r}; expected local or ray (torchrun is detected)")
    if in_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        return run_torchrun(job)
    return run_local(job)


__all__ = ["in_torchrun", "run", "run_local", "run_ray", "run_torchrun"]

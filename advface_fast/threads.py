"""How many CPU threads torch uses, chosen once per command and recorded with every result.

Compute kernels (convolutions, GEMMs) scale with threads on an idle machine, but a thread pool
larger than the cores left free by other processes is much slower than a small one: every
parallel region waits for its slowest thread, and a thread that lost its core stalls all of them
(an attack ran 6-15x slower with 2 threads than with 1 next to a neighbouring load on 2 cores).
So the default is the cores this process may use minus the ones other processes keep busy, at
least 1: all cores on an idle machine, fewer on a loaded one. "Busy" is read from the kernel's
count of runnable tasks now (``procs_running`` in /proc/stat, sampled a few times, this process
taken out), not from the 1-minute load average: that average lags by a minute, so a machine that
has just finished a job (or this user's previous command) still looks busy and got half its cores
(measured: load average 0.6-0.9 on an idle 2-core machine -> 1 thread, at 229-252 vs 439-471
image-steps/s with 2). Where /proc/stat is missing the load average is the fallback.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

_chosen: dict = {}


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def running_elsewhere(samples: int = 5, interval_s: float = 0.02) -> float | None:
    """Tasks other processes keep runnable now: the median of ``procs_running`` (/proc/stat) over a
    few samples, minus this process's own reading thread. None where /proc/stat is unavailable."""
    counts = []
    for k in range(samples):
        try:
            with open("/proc/stat") as f:
                line = next((ln for ln in f if ln.startswith("procs_running")), None)
        except OSError:
            return None
        if line is None:
            return None
        counts.append(int(line.split()[1]))
        if k + 1 < samples:
            time.sleep(interval_s)
    return max(0.0, statistics.median(counts) - 1)


def default_threads() -> tuple[int, str]:
    """(threads, why): usable cores minus the tasks other processes keep runnable now, >= 1
    (fallback: minus the rounded 1-minute load average).

    Call this before the compute starts (the CLI does): this process's own busy threads would count.
    """
    cores = usable_cores()
    busy = running_elsewhere()
    if busy is not None:
        threads = max(1, min(cores, cores - int(round(busy))))
        return threads, f"auto: {cores} usable cores, {busy:g} runnable tasks elsewhere -> {threads}"
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cores, f"auto: {cores} usable cores (load unknown)"
    threads = max(1, min(cores, cores - int(round(load))))
    return threads, f"auto: {cores} usable cores, load average {load:.1f} -> {threads}"


def set_threads(threads: int | None = None) -> dict:
    """Set torch's intra-op threads (and inter-op threads, where torch still allows it) and
    remember the choice for thread_info(). ``None`` picks default_threads()."""
    if threads is None:
        threads, why = default_threads()
    else:
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        threads, why = int(threads), "requested (--threads / threads=)"
    torch.set_num_threads(threads)
    try:  # only possible before the first inter-op parallel work of the process
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        pass
    _chosen.clear()
    _chosen.update(requested=threads, why=why)
    return thread_info()


def thread_info() -> dict:
    """What results files record: the threads torch uses now and how they were chosen."""
    return {"torch_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "threads_chosen": _chosen.get("why", "torch default (set_threads not called)"),
            "usable_cores": usable_cores(),
            "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS")}

"""Timing side by side, and the rows every comparison reports.

Every comparison runs ours and its baseline in ONE process on the same inputs, interleaved round
by round (the order rotates), after warm-up; the reported time is the median of the rounds.
"""

from __future__ import annotations

import dataclasses
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Timing:
    median_s: float  # median seconds per call over the rounds
    min_s: float
    samples: list  # seconds per call, one entry per round
    number: int  # calls per sample (more than 1 for sub-millisecond functions)


def time_side_by_side(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1,
                      min_sample_s: float = 0.0, sync: Callable[[], None] | None = None,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, Timing]:
    """Time every function in ``fns`` in the same rounds, interleaved, after ``warmup`` calls each.

    Round r runs the functions in an order rotated by r, so none is always first after the others.
    A function faster than ``min_sample_s`` is called several times per sample (as many calls as
    fit, counted once before timing). ``sync`` (e.g. torch.cuda.synchronize) runs before every
    clock read; ``clock`` is the time source (seconds).
    """
    sync = sync or (lambda: None)
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync()
    number = dict.fromkeys(names, 1)
    for name in names if min_sample_s > 0 else ():
        calls, t0 = 0, clock()
        while True:
            fns[name]()
            calls += 1
            sync()
            if clock() - t0 >= min_sample_s:
                break
        number[name] = calls
    samples: dict[str, list] = {name: [] for name in names}
    for r in range(max(rounds, 1)):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn, n = fns[name], number[name]
            sync()
            t0 = clock()
            for _ in range(n):
                fn()
            sync()
            samples[name].append((clock() - t0) / n)
    return {name: Timing(statistics.median(s), min(s), [round(v, 6) for v in s], number[name])
            for name, s in samples.items()}


@dataclass
class Variant:
    """One side of a comparison: a callable to time, or why it cannot run here."""

    label: str
    fn: Callable[[], Any] | None = None
    pending: str | None = None  # why it cannot run (an optional package is missing, ...)
    info: dict = field(default_factory=dict)


def time_variants(variants: dict[str, Variant], rounds: int, warmup: int, min_sample_s: float = 0.0,
                  sync=None, keep: dict | None = None) -> dict[str, Timing]:
    """``time_side_by_side`` over the runnable variants; with ``keep``, each one's last result lands there."""
    fns = {}
    for key, v in variants.items():
        if v.fn is None:
            continue
        if keep is None:
            fns[key] = v.fn
        else:
            fns[key] = (lambda key=key, fn=v.fn: keep.__setitem__(key, fn()))
    return time_side_by_side(fns, rounds, warmup, min_sample_s, sync)


def timing_dict(timings: dict[str, Timing], keys=None) -> dict:
    return {k: dataclasses.asdict(timings[k]) for k in (keys or timings) if k in timings}


@dataclass
class BenchRow:
    """One line of the benchmark table. ``ratio`` is the speed-up of ours over the baseline (or, for
    the FLOP and bandwidth rows, the fraction of the reference rate); ``target`` applies to it."""

    section: str
    name: str
    ours: float | None = None
    baseline: float | None = None
    unit: str = ""
    higher_is_better: bool = True
    target: float | None = None
    status: str = "ok"  # "ok", "pending: why", "pending (no GPU)", "error: what"
    note: str = ""
    details: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.baseline is None or self.ours <= 0 or self.baseline <= 0:
            return None
        return self.ours / self.baseline if self.higher_is_better else self.baseline / self.ours

    @property
    def met(self) -> bool | None:
        ratio = self.ratio
        return None if self.target is None or ratio is None else ratio >= self.target

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ratio": self.ratio, "met": self.met}


def pending(section: str, name: str, why: str, **kw) -> BenchRow:
    return BenchRow(section, name, status=why if why.startswith("pending") else f"pending: {why}", **kw)


def host_id() -> str:
    """platform.node() reduced to a safe file name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", platform.node()).strip("._-")
    return name or "unknown-host"


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"

"""Helpers shared by the benchmark scripts and the pytest-benchmark files in this folder.

The measurement code lives in the package (``advface_fast.bench``); this file only knows where
things are in a checkout: the LFW copy beside the repository and the results folder.

Environment for the pytest-benchmark files:
    ADVFACE_LFW              LFW folder (default: ../shared/data/lfw beside the repository, if present)
    ADVFACE_BENCH_THREADS    torch threads (default: all cores)
    ADVFACE_BENCH_QUICK=1    tiny sizes (a smoke run)
    ADVFACE_BENCH_SYNTHETIC=1  random on-grid pairs instead of LFW
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def default_lfw() -> str | None:
    """$ADVFACE_LFW, else the LFW copy beside the repository, else None (synthetic pairs)."""
    env = os.environ.get("ADVFACE_LFW")
    if env:
        return env
    beside = REPO_ROOT.parent / "shared" / "data" / "lfw"
    return str(beside) if (beside / "pairs.txt").exists() else None


def bench_threads() -> int:
    return int(os.environ.get("ADVFACE_BENCH_THREADS") or os.cpu_count() or 1)


def env_config(**overrides):
    """A BenchConfig from the environment variables above (used by the pytest-benchmark files)."""
    from advface_fast.bench import BenchConfig

    synthetic = os.environ.get("ADVFACE_BENCH_SYNTHETIC") == "1"
    return BenchConfig(lfw=None if synthetic else default_lfw(), synthetic=synthetic,
                       quick=os.environ.get("ADVFACE_BENCH_QUICK") == "1", threads=bench_threads(), **overrides)


def bench_context(**overrides):
    """A BenchContext (models and pairs, built lazily) for the pytest-benchmark files."""
    from advface_fast.bench import BenchContext

    return BenchContext(env_config(**overrides))


def module_context(**overrides):
    """Body of a module-scoped fixture: a BenchContext on its torch threads, data built before timing.

        @pytest.fixture(scope="module")
        def ctx():
            yield from module_context()
    """
    import torch

    context = bench_context(**overrides)
    previous = torch.get_num_threads()
    torch.set_num_threads(context.cfg.threads)
    context.data()  # build models and pairs before any timing
    yield context
    torch.set_num_threads(previous)


def run_variant(benchmark, variant, rounds: int, warmup: int = 1):
    """Time one Variant with pytest-benchmark (pedantic: a fixed number of rounds), or skip it."""
    import pytest

    if variant.fn is None:
        pytest.skip(variant.pending)
    return benchmark.pedantic(variant.fn, rounds=rounds, iterations=1, warmup_rounds=warmup)


def command_line(argv=None, lfw=None) -> str:
    """The command that made a result, shell-quoted so it can be pasted back; the LFW location (a
    path of this machine) written as <LFW>."""
    text = "python " + shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    return text if not lfw else text.replace(shlex.quote(str(lfw)), "<LFW>")


def run_record(argv=None, lfw=None) -> dict:
    """What a result file records first: the command that made it (:func:`command_line`) and when,
    in UTC to the second."""
    import datetime

    return {"command": command_line(argv, lfw),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def load_average() -> list[float] | None:
    """The 1/5/15-minute load average (recorded with a measurement: was the machine shared?)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def write_json(result: dict, out: Path | None) -> None:
    """Write a benchmark script's result (if ``out`` is given, atomically), creating the folder."""
    import json

    from advface_fast.fileio import write_text_atomic

    if out is not None:
        write_text_atomic(out, json.dumps(result, indent=2) + "\n")

"""Run the sections and report: one JSON-ready dict with the provenance of every number, and a table."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import platform
import time
from typing import Callable

import numpy as np
import torch

from .. import __version__
from ..allocator import allocator_info
from ..environment import command_line
from ..precision import cpu_features
from .context import SECTIONS, BenchConfig, BenchContext
from .embedding import section_embedding
from .flops import section_flops
from .gpu import section_gpu
from .harness import BenchRow, host_id
from .kernels import section_kernels
from .peer import torchattacks_version
from .pgd import section_pgd
from .table1 import section_table1

SECTION_FUNCS = {"kernels": section_kernels, "pgd": section_pgd, "embedding": section_embedding,
                 "flops": section_flops, "table1": section_table1, "gpu": section_gpu}


def versions() -> dict:
    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except Exception:
        ort = None
    return {"advface_fast": __version__, "torch": torch.__version__, "onnxruntime": ort,
            "torchattacks": torchattacks_version(), "numpy": np.__version__, "python": platform.python_version()}


def run_benchmarks(cfg: BenchConfig | None = None, *, command: str | None = None,
                   log: Callable[[str], None] | None = None) -> dict:
    """Run the configured sections side by side and return the report (see ``write_report``).

    A section that raises becomes an "error: ..." row; the others still run.
    """
    cfg = (cfg or BenchConfig()).resolved()
    sections = list(cfg.sections) + (["table1"] if cfg.table1 and "table1" not in cfg.sections else [])
    ctx = BenchContext(cfg, log)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    rows: list[BenchRow] = []
    try:
        for section in (s for s in SECTIONS if s in sections):
            ctx.log(f"[{section}]")
            t0 = time.perf_counter()
            try:
                new = SECTION_FUNCS[section](ctx)
            except Exception as err:
                new = [BenchRow(section, section, status=f"error: {type(err).__name__}: {err}")]
            for row in new:
                row.details.setdefault("section_seconds", round(time.perf_counter() - t0, 2))
            rows.extend(new)
        fast_precision = ctx._fast[1] if ctx._fast is not None else None
        data = ctx._data
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "host": host_id(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else command_line(),
        "cpu": cpu_features(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": versions(),
        "threads": cfg.threads,
        "allocator": allocator_info(),
        "precision": {"requested": cfg.precision, "fast_path": fast_precision},
        "data": None if data is None else {"source": data.source, "pairs": len(data.is_same),
                                           "threshold": data.threshold, "threshold_source": data.threshold_source},
        # The data is named by what it is (report["data"]), not by where it lives on this machine.
        "config": {**dataclasses.asdict(cfg), "lfw": None if cfg.lfw is None else "<LFW>"},
        "rows": [r.to_dict() for r in rows],
        "seconds": round(time.perf_counter() - t_start, 1),
    }


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def format_table(report: dict) -> str:
    """The rows as a readable table: name, ours, baseline, ratio, target, met?, note."""
    head = ("name", "ours", "baseline", "ratio", "target", "met?", "note")
    lines = []
    for r in report["rows"]:
        unit = f" {r['unit']}" if r["unit"] else ""
        fraction = "fraction" in r["name"]
        ours = _num(r["ours"]) + unit if r["ours"] is not None else "-"
        base = _num(r["baseline"]) + unit if r["baseline"] is not None else "-"
        ratio = "-" if r["ratio"] is None else (f"{r['ratio']:.0%}" if fraction else f"{r['ratio']:.2f}x")
        target = "-" if r["target"] is None else (f">={r['target']:.0%}" if fraction else f">={r['target']:g}x")
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        note = r["note"] if r["status"] == "ok" else r["status"] + (f"; {r['note']}" if r["note"] else "")
        lines.append((r["name"], ours, base, ratio, target, met, note))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" if i in (0, 6) else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [f"advface-fast benchmarks on {report['host']} ({report['threads']} threads, "
           f"fast path: {report['precision']['fast_path'] or 'not run'})"]
    if report.get("data"):
        d = report["data"]
        out.append(f"data: {d['source']}; cosine threshold {d['threshold']:.4f} ({d['threshold_source']})")
    out += [fmt.format(*head).rstrip(), "  ".join("-" * w for w in widths)]
    out += [fmt.format(*line).rstrip() for line in lines]
    out.append(f"({report['seconds']} s; ratio = speed-up of ours over the baseline, or the fraction of the "
               f"reference rate for 'fraction' rows)")
    return "\n".join(out)

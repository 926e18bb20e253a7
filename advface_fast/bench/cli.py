"""The command line shared by ``advface bench`` and ``benchmarks/run_all.py``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from ..allocator import keep_freed_memory
from ..fileio import write_text_atomic
from ..precision import PRECISIONS
from .context import DEFAULT_SECTIONS, SECTIONS, BenchConfig
from .harness import host_id
from .report import format_table, run_benchmarks

DESCRIPTION = ("Time the fused update kernels, PGD (ours fp32 / bf16 vs torchattacks on the same weights, "
               "objective, pairs and batch, with both success rates), embedding engines, and the "
               "forward+backward FLOP rate against the GEMM rates of this machine. Prints one table of "
               "ratios (medians after warm-up) and writes a JSON report.")
EPILOG = ("examples:\n"
          "  advface bench --quick --no-write                 a smoke run (seconds to minutes), nothing written\n"
          "  advface bench --lfw data/lfw --out runs/bench    writes runs/bench/bench_<host>.json\n"
          "  advface bench --only pgd,flops --out my.json     two sections, this exact file\n\n"
          "torchattacks (the PGD baseline) is optional: pip install --no-deps torchattacks==3.5.1")


def _section_list(text: str) -> tuple:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in SECTIONS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown sections {bad}; choose from {', '.join(SECTIONS)}")
    return parts


def add_arguments(parser: argparse.ArgumentParser, *, default_lfw: str | None = None,
                  default_out_dir: str | os.PathLike = "benchmarks/results") -> None:
    """The benchmark options (``advface bench`` and ``benchmarks/run_all.py``)."""
    parser.add_argument("--lfw", metavar="PATH", default=default_lfw,
                        help="LFW folder (fold 1 is used); without one, synthetic pairs (default: %(default)s)")
    parser.add_argument("--synthetic", action="store_true", help="random on-grid images instead of LFW")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds (a smoke run, not a measurement)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch / onnxruntime threads (default: all cores)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="precision of the fast path (default: %(default)s: bf16 where the CPU has it)")
    parser.add_argument("--only", type=_section_list, metavar="LIST", default=DEFAULT_SECTIONS,
                        help=f"sections to run, from {','.join(SECTIONS)} (default: {','.join(DEFAULT_SECTIONS)})")
    parser.add_argument("--table1", action="store_true",
                        help="also time Table 1 end to end on fold 1 (three variants; tens of minutes)")
    parser.add_argument("--batch-size", type=int, metavar="N",
                        help="pairs per attack batch (default 64, the attack commands' default; quick 4)")
    parser.add_argument("--steps", type=int, metavar="N",
                        help="steps of the full PGD rows and of the PGD run the FLOP row times (default 10, quick 2)")
    parser.add_argument("--rounds", type=int, metavar="N", help="timed rounds per comparison (default 5, quick 2)")
    parser.add_argument("--warmup", type=int, metavar="N", help="untimed calls before timing (default 1)")
    written = parser.add_mutually_exclusive_group()
    written.add_argument("--out", type=Path, metavar="FILE|DIR",
                         help="where the JSON report goes: a path ending in .json is the file; anything else is a "
                              "folder (created if needed) that gets bench_<host>.json. Checked before anything "
                              f"runs (default: {default_out_dir}/bench_<host>.json)")
    written.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    parser.add_argument("--json", action="store_true", help="also print the JSON report")
    parser.set_defaults(bench_default_out_dir=str(default_out_dir))


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` to the ``advface`` command."""
    p = subparsers.add_parser("bench", help="speed benchmarks: ours vs baselines, side by side in one process",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              description=DESCRIPTION, epilog=EPILOG)
    add_arguments(p)
    p.set_defaults(func=cmd_bench)
    return p


def report_path(out: str | os.PathLike | None, default_dir: str | os.PathLike) -> Path:
    """The report's file for ``--out`` (a .json file, or a folder that gets bench_<host>.json), made
    sure to be writable NOW, before any benchmark runs. ValueError in one line when it is not."""
    path = Path(out) if out is not None else Path(default_dir)
    if path.suffix.lower() != ".json" or path.is_dir():
        path = path / f"bench_{host_id()}.json"
    if path.is_dir():
        raise ValueError(f"--out: {path} is a folder; give a file ending in .json or another folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):  # can we create files there?
            pass
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is not writable")
    except OSError as err:
        raise ValueError(f"--out: cannot write the report to {path}: {err}") from None
    return path


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    lfw = args.lfw
    if lfw is None and not args.synthetic:
        from ..data import resolve_lfw_path

        try:  # $ADVFACE_LFW or the default download location; synthetic pairs without one
            lfw = resolve_lfw_path()
        except Exception:
            lfw = None
    return BenchConfig(lfw=lfw, synthetic=args.synthetic, quick=args.quick, threads=args.threads,
                       precision=args.precision, sections=tuple(args.only), table1=args.table1,
                       batch_size=args.batch_size, pgd_steps=args.steps, rounds=args.rounds, warmup=args.warmup)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run, print the table, write the JSON. Exit status 1 when a row errored (not for unmet targets)."""
    out = None if args.no_write else report_path(args.out, args.bench_default_out_dir)
    cfg = config_from_args(args).resolved()  # bad settings fail here, before the work too
    keep_freed_memory()  # as every compute command does (advface_fast.allocator); recorded in the report
    report = run_benchmarks(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_table(report))
    if out is not None:
        write_text_atomic(out, json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {out}")
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return 1 if any(r["status"].startswith("error") for r in report["rows"]) else 0


def main(argv=None, *, default_lfw: str | None = None, default_out_dir="benchmarks/results",
         prog: str = "advface bench") -> int:
    """Parse ``argv`` and run (``default_out_dir`` is relative to the working directory unless absolute)."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, default_lfw=default_lfw, default_out_dir=default_out_dir)
    args = parser.parse_args(argv)
    try:
        return cmd_bench(args)
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2

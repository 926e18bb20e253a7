"""The options every ``advface`` command shares, and the small steps every command runs with them
(--lfw resolution, input rules, threads, number lists). Every sub-CLI imports its options from here,
never from ``advface_fast.cli``; this module imports nothing of the commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG_PATHS = """\
paths:
  LFW is read from --lfw, else $ADVFACE_LFW, else $ADVFACE_HOME/lfw_home (default
  ~/.cache/advface-fast/lfw_home; fetch it with `advface download-lfw`). --lfw accepts the
  official layout (pairs.txt + lfw-deepfunneled/ or lfw/), scikit-learn's lfw_home, or an
  InsightFace .bin file. Caches (aligned chips, converted weights) live under $ADVFACE_HOME.
"""


def parse_folds(text: str | None):
    """'1,3,5-7' -> [1, 3, 5, 6, 7] (1-based LFW folds); None -> all folds."""
    if not text:
        return None
    folds = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            folds.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad fold list {text!r}; use e.g. 1,3,5-7") from None
    return folds


def lfw_path(args) -> Path:
    """--lfw, else $ADVFACE_LFW, else the default location — downloaded there (checksums verified)
    when nothing was given and nothing is there yet, unless --no-download."""
    import os

    from .data import LFWNotFoundError, default_data_dir, download_lfw, resolve_lfw_path

    try:
        return resolve_lfw_path(args.lfw)
    except LFWNotFoundError:
        if args.lfw or os.environ.get("ADVFACE_LFW") or args.no_download:
            raise
    dest = default_data_dir() / "lfw_home"
    print(f"LFW not found; downloading it to {dest} (checksums verified, resumable)", file=sys.stderr)
    return download_lfw(dest)


def add_common_options(p: argparse.ArgumentParser) -> None:
    from .models import list_models

    p.add_argument("--model", default="dlib-resnet", choices=list_models(), help="registry model (default: %(default)s)")
    p.add_argument("--lfw", metavar="PATH", help="LFW folder or .bin file (see 'paths' below)")
    p.add_argument("--folds", type=parse_folds, metavar="LIST", help="1-based folds to use, e.g. 1,3,5-7 (default: all)")
    p.add_argument("--out", metavar="DIR", type=Path, help="write results here")
    p.add_argument("--no-download", action="store_true",
                   help="fail instead of downloading LFW when no --lfw / $ADVFACE_LFW is given and none is cached")
    add_input_options(p)
    p.add_argument("--workers", type=int, metavar="N", help="alignment processes (default: all cores)")
    add_threads_option(p)
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per forward (and backward) pass (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_input_options(p: argparse.ArgumentParser, pairs_file: bool = True) -> None:
    """--on-bad, --no-face and (for commands that read pairs) --pairs-file: the input rules every
    command that reads images shares (advface_fast.data.policy)."""
    from .data.policy import NO_FACE_CHOICES, ON_BAD_CHOICES

    g = p.add_argument_group("bad input (the same rules in every command)")
    g.add_argument("--on-bad", choices=ON_BAD_CHOICES, default="error",
                   help="an image that cannot be used as it is (empty, truncated, not an image, not RGB): "
                        "stop with an error naming the file (error, the default); drop the pairs that use "
                        "it and list them (skip); or convert grayscale / palette / CMYK / alpha images to "
                        "RGB, alpha composited onto white, and list every conversion (convert)")
    g.add_argument("--no-face", choices=NO_FACE_CHOICES, default="center",
                   help="an image where no face detector finds a face: score it on a fixed centre box "
                        "(center, the default: the LFW protocol keeps every pair), drop its pairs (skip), "
                        "or stop (error). Every such image is counted and listed in the output and results")
    if not pairs_file:
        return
    g.add_argument("--pairs-file", type=Path, metavar="FILE",
                   help="your own pairs file (pairs.txt format) instead of the dataset's pairs.txt; checked "
                        "against a SHA256SUMS in the dataset folder or beside the file, or the published LFW "
                        "hashes, and used with a note when no checksum is known")


def input_policy(args):
    """The InputPolicy of parsed --on-bad / --no-face options."""
    from .data.policy import InputPolicy

    return InputPolicy(on_bad=args.on_bad, no_face=args.no_face)


def add_threads_option(p: argparse.ArgumentParser) -> None:
    """--threads: torch's CPU threads for this command (see advface_fast.threads)."""
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for the model (torch intra- and inter-op). Default: the usable cores "
                        "minus the ones other processes keep busy (tasks runnable now, from /proc/stat), at least 1 - a "
                        "thread pool larger than the free cores runs many times slower, not faster. "
                        "Recorded in every results file")


def apply_runtime(args) -> dict:
    """Once per compute command: torch's threads (--threads) and the allocator setting that keeps
    freed memory for reuse (advface_fast.allocator). Returns the thread choice."""
    from .allocator import keep_freed_memory
    from .threads import set_threads

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    keep_freed_memory()
    return set_threads(args.threads)


def check_pairs_file(args) -> None:
    if args.pairs_file is not None:
        if not args.pairs_file.is_file():
            raise FileNotFoundError(f"--pairs-file {args.pairs_file}: no such file")
        # Absolute, so that a bare name means the file here, not the dataset's file of that name.
        args.pairs_file = args.pairs_file.expanduser().resolve()


def float_list(text: str) -> tuple:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad number list {text!r}; use e.g. 2,4,8") from None


def int_list(text: str) -> tuple:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad integer list {text!r}; use e.g. 10,40") from None


def pair_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of pairs; for a pairs file use --pairs-file FILE") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"the number of pairs must be at least 1, got {n}")
    return n


def pair_count_or_all(text: str) -> int | None:
    """A number of pairs, or "all" (None)."""
    return None if text.strip().lower() == "all" else pair_count(text)


def print_input_and_outputs(report: dict, out, results_file: str, others: str) -> int:
    """What the input rules did (one summary) and which files were written; the command's exit status."""
    from .pair_chips import format_input_summary

    summary = format_input_summary(report.get("input", {}), results_file)
    if summary:
        print(summary)
    if out:
        print(f"wrote {results_file}, {others} to {out}")
    return 0

"""The ``advface`` command: argument parsing and printing only; the work lives in the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG_PATHS = """\
paths:
  LFW is read from --lfw, else $ADVFACE_LFW, else $ADVFACE_HOME/lfw_home (default
  ~/.cache/advface-fast/lfw_home; fetch it with `advface download-lfw`). --lfw accepts the
  official layout (pairs.txt + lfw-deepfunneled/ or lfw/), scikit-learn's lfw_home, or an
  InsightFace .bin file. Caches (aligned chips, converted weights) live under $ADVFACE_HOME.
"""


EPILOG_EXIT = """
exit status:
  0 done, 2 bad input or arguments (one line on stderr), 130 interrupted (Ctrl-C), 143 terminated
  (SIGTERM, handled like Ctrl-C). An interrupted run keeps every finished aligned chip and attack row
  in the caches; rerun the same command to resume.
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


def _common(p: argparse.ArgumentParser) -> None:
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


def _check_pairs_file(args) -> None:
    if args.pairs_file is not None:
        if not args.pairs_file.is_file():
            raise FileNotFoundError(f"--pairs-file {args.pairs_file}: no such file")
        # Absolute, so that a bare name means the file here, not the dataset's file of that name.
        args.pairs_file = args.pairs_file.expanduser().resolve()


def cmd_verify(args) -> int:
    from .verification import format_report, run_verify

    _check_pairs_file(args)
    apply_runtime(args)
    report = run_verify(lfw_path(args), args.model, folds=args.folds, out_dir=args.out,
                        batch_size=args.batch_size, policy=input_policy(args), pairs_file=args.pairs_file,
                        workers=args.workers, engine=args.engine, precision=args.precision,
                        compare_engines=args.compare_engines, progress=not args.quiet)
    print(format_report(report))
    if args.out:
        print(f"wrote {args.out / 'verify.json'} and {args.out / 'roc.png'}")
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    return 0


def _float_list(text: str) -> tuple:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad number list {text!r}; use e.g. 2,4,8") from None


def _int_list(text: str) -> tuple:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad integer list {text!r}; use e.g. 10,40") from None


def _pair_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of pairs; for a pairs file use --pairs-file FILE") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"the number of pairs must be at least 1, got {n}")
    return n


def _print_input_and_outputs(report: dict, out, results_file: str, others: str) -> int:
    """What the input rules did (one summary) and which files were written; the command's exit status."""
    from .pair_chips import format_input_summary

    summary = format_input_summary(report.get("input", {}), results_file)
    if summary:
        print(summary)
    if out:
        print(f"wrote {results_file}, {others} to {out}")
    return 0


def cmd_attack(args) -> int:
    from .attacks import list_attacks
    from .experiments.render import table1_markdown
    from .experiments.table1 import Table1Config, run_table1

    _check_pairs_file(args)
    apply_runtime(args)
    attacks = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
    unknown = [a for a in attacks if a not in list_attacks()]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; available: {', '.join(list_attacks())}")
    cfg = Table1Config(model=args.model, attacks=attacks, eps=args.eps, steps=args.steps,
                       folds=tuple(args.folds) if args.folds else (None if args.all_folds else (1,)),
                       max_pairs=args.pairs, metric=args.metric, batch_size=args.batch_size, seed=args.seed,
                       noise_baseline=not args.no_noise, precision=args.precision, fast_model=args.fast_model,
                       early_stop=args.early_stop, on_bad=args.on_bad, no_face=args.no_face,
                       pairs_file=None if args.pairs_file is None else str(args.pairs_file),
                       craft_model=args.craft_model)
    report = run_table1(lfw_path(args), cfg, out_dir=args.out, workers=args.workers,
                        progress=not args.quiet)
    print(table1_markdown(report))
    return _print_input_and_outputs(report, args.out, "table1.json", "table1.md, accuracy_vs_eps.png, examples.png")


def cmd_download(args) -> int:
    from .data import download_lfw

    path = download_lfw(args.dest)
    print(f"LFW is ready at {path}")
    return 0


def cmd_models(args) -> int:
    from .models import get_model_spec, list_models

    for name in list_models():
        spec = get_model_spec(name)
        print(f"{name:<16}{spec.embedding_dim}-d, {spec.input_size[0]}x{spec.input_size[1]} chips  {spec.description}")
    return 0


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def cmd_cache(args) -> int:
    from .cache import cache_info, cache_prune

    if args.action == "prune":
        result = cache_prune(args.root, dry_run=args.dry_run)
        if args.json:
            print(json.dumps(result, indent=2))
            return 0
        verb = "would remove" if result["dry_run"] else "removed"
        for r in result["removed"]:
            print(f"{verb}: {r['path']}  ({_bytes(r['bytes'])}; {r['why']})")
        print(f"{verb} {len(result['removed'])} item(s), {_bytes(result['bytes'])} under {result['root']}")
        return 0
    info = cache_info(args.root)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"cache root: {info['root']}")
    for name, c in info["caches"].items():
        stale = [e for e in c["entries"] if e["status"] not in ("ok", "partial (resumable)")]
        print(f"\n{name}: {len(c['entries'])} entries, {_bytes(c['bytes'])}"
              + (f"; {len(stale)} unusable (old key scheme / damaged)" if stale else "")
              + (f"; {len(c['leftovers'])} leftover temp/damaged files" if c["leftovers"] else ""))
        print(f"  key: {c['key_scheme']}")
        for e in c["entries"]:
            what = ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("path", "bytes", "status") and v is not None)
            print(f"  {Path(e['path']).name:<42} {_bytes(e['bytes']):>10}  {e['status']}" + (f"  ({what})" if what else ""))
    for u in info["unknown"]:
        print(f"\nunknown: {u['path']} ({_bytes(u['bytes'])})")
    print("\n`advface cache prune` removes the unusable entries and leftovers (add --dry-run to see them first).")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .attacks import DEFAULT_ATTACK_BATCH
    from .precision import PRECISIONS
    from .verify import METRICS

    parser = argparse.ArgumentParser(
        prog="advface",
        description="advface-fast: adversarial attacks and defenses on face verification, measured honestly.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  advface verify --lfw data/lfw --out runs/verify\n  advface attack --lfw data/lfw --folds 1 --out runs/table1\n  advface models\n\n" + EPILOG_PATHS + EPILOG_EXIT,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "verify", help="LFW 10-fold verification accuracy of a model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Align every pair image (cached), embed, and run the standard LFW protocol: for each "
                    "fold the threshold that maximises accuracy on the other folds. Reports cosine and L2, "
                    "without and with horizontal-flip averaging. The per-fold thresholds in verify.json are "
                    "the ones later used to judge attacks (never refit on attacked data).",
        epilog="example:\n  advface verify --model dlib-resnet --lfw data/lfw --out runs/verify\n\n" + EPILOG_PATHS)
    _common(p)
    p.add_argument("--engine", choices=("auto", "torch", "onnxruntime"), default="auto",
                   help="embedding engine; auto takes onnxruntime when installed and its embeddings match "
                        "torch within 1e-5, else torch (default: %(default)s)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="embedding precision; bf16 uses the fast model under autocast (auto: bf16 only where the "
                        "hardware has it natively) (default: %(default)s)")
    p.add_argument("--compare-engines", action="store_true",
                   help="also report accuracy, speed and deviation of every embedding path side by side")
    p.add_argument("--json", action="store_true", help="also print the report as JSON")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "attack", help="the paper's Table 1: accuracy after FGSM / PGD / C&W at several eps",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Attack the query of every selected pair (matched pairs: dodging; mismatched: "
                    "impersonation) and judge it with the clean per-fold thresholds (fitted on clean data, "
                    "other folds; never refit). eps is in 0-255 pixel levels, L-inf, and holds after the "
                    "attacked image is rounded to uint8. A uniform-noise row at each eps is the sanity "
                    "baseline. Rows are cached per pair: an interrupted run resumes.",
        epilog="examples:\n"
               "  advface attack --lfw data/lfw --attacks fgsm,pgd,cw --eps 2,4,8 --folds 1 --out runs/table1\n"
               "  advface attack --lfw data/lfw --attacks pgd --eps 1,2 --steps 3,10,40 --pairs 300 --out runs/pgd\n\n"
               + EPILOG_PATHS)
    _common(p)
    p.set_defaults(batch_size=DEFAULT_ATTACK_BATCH)
    p.add_argument("--attacks", default="fgsm,pgd,cw", metavar="LIST",
                   help="comma list of fgsm, pgd, cw, cw-l2, noise (default: %(default)s)")
    p.add_argument("--eps", type=_float_list, default=(2.0, 4.0, 8.0), metavar="LIST",
                   help="L-inf budgets in 0-255 levels (default: 2,4,8)")
    p.add_argument("--steps", type=_int_list, metavar="LIST", help="PGD / C&W step counts, e.g. 10,40 (default: 40)")
    p.add_argument("--pairs", type=_pair_count, metavar="N",
                   help="attack only the first N pairs of the folds, half matched (a pairs file of your own: "
                        "--pairs-file FILE)")
    p.add_argument("--all-folds", action="store_true", help="attack all folds (default without --folds: fold 1)")
    p.add_argument("--metric", choices=tuple(METRICS), default="cosine", help="similarity (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="run seed; per-pair seeds derive from it (default: 0)")
    p.add_argument("--no-noise", action="store_true", help="skip the uniform-noise baseline rows")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="precision of the attack gradients; auto = bf16 only where the hardware has it "
                        "natively (AMX / AVX512-BF16 CPUs, CUDA). Decisions are always fp32 (default: %(default)s)")
    p.add_argument("--craft-model", metavar="NAME",
                   help="transfer: craft the attacks on this registry model and judge them with --model and "
                        "its clean thresholds, on --model's chips (the crafting model sees them resized)")
    p.add_argument("--fast-model", action="store_true",
                   help="attack through the fast copy of the model (affine folded into convs, channels_last)")
    p.add_argument("--early-stop", action="store_true",
                   help="PGD: pairs already past the threshold by a margin leave the batch (saves image-steps; "
                        "the delivered attacks are weaker but still cross the threshold, so accuracy is never higher). Off by default")
    p.set_defaults(func=cmd_attack)

    from .train.cli import add_subparsers as add_train_parsers

    add_train_parsers(sub)

    from .experiments.cli import add_subparsers as add_experiment_parsers

    add_experiment_parsers(sub)

    p = sub.add_parser("download-lfw", help="download LFW and its pairs files (checksums verified, resumable)",
                       description="Download LFW (scikit-learn's public mirrors) with resume and checksum checks.")
    p.add_argument("--dest", metavar="DIR", help="target folder (default: $ADVFACE_HOME/lfw_home)")
    p.set_defaults(func=cmd_download)

    from .bench.cli import add_subparser as add_bench_parser

    add_bench_parser(sub)

    p = sub.add_parser(
        "cache", help="show what the caches hold, or prune entries no current code can use",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="info: every cache under $ADVFACE_HOME (chips, attacked queries, ONNX exports, converted "
                    "weights) with its entries, sizes and key scheme. prune: remove entries of old key schemes, "
                    "damaged entries, temporary files of killed runs and partial checkpoints beside a complete "
                    "entry. Resumable partial runs and downloaded data are kept.",
        epilog="examples:\n  advface cache info\n  advface cache prune --dry-run\n  advface cache prune")
    p.add_argument("action", choices=("info", "prune"), help="what to do")
    p.add_argument("--root", metavar="DIR", help="cache root (default: $ADVFACE_HOME or ~/.cache/advface-fast)")
    p.add_argument("--dry-run", action="store_true", help="prune: list what would be removed, remove nothing")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_cache)

    from .gallery import GALLERY_EPILOG, MATCH_EPILOG, add_gallery_arguments, add_match_arguments, cmd_gallery, cmd_match

    p = sub.add_parser(
        "gallery", help="defend every gallery image once (attack-as-defense): sharded, resumable, torchrun / ray",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Re-attack every gallery image with the defender's attack D and store the defended "
                    "embeddings: safetensors shards plus a SQLite manifest. Shards are the unit of work; "
                    "per-image seeds come from (seed, image id), so the store is the same whatever the "
                    "interruptions, the number of workers or the executor.",
        epilog=GALLERY_EPILOG)
    add_gallery_arguments(p)
    p.set_defaults(func=cmd_gallery)

    p = sub.add_parser(
        "match", help="defend query images and search them in a defended gallery (top-k, accept decision)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Defend each query with the gallery's D (same model, budget, steps and seed rule), then "
                    "find its top-k gallery images by cosine similarity (faiss when installed, else exact "
                    "torch search: the same results). With a calibrated threshold each match is accepted "
                    "or rejected; without one, scores only.",
        epilog=MATCH_EPILOG)
    add_match_arguments(p)
    p.set_defaults(func=cmd_match)

    p = sub.add_parser("models", help="list the registered models")
    p.set_defaults(func=cmd_models)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (a KeyboardInterrupt, so every cleanup path is the same)."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    """Exit codes: 0 done; 2 bad input or arguments (one line on stderr); 130 Ctrl-C; 143 SIGTERM
    (128 + the signal number, as shells report it). Interrupted runs keep every finished chip and
    attack row in the caches."""
    import signal
    import warnings

    from .data import DownloadError
    from .data.policy import DataWarning

    args = build_parser().parse_args(argv)
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signal handling to the caller
        pass
    try:
        with warnings.catch_warnings():
            # Skips and conversions are printed as one summary in command-line terms instead.
            warnings.simplefilter("ignore", DataWarning)
            return args.func(args)
    except (FileNotFoundError, ValueError, KeyError, DownloadError) as err:
        # Bad input is reported in one readable line; nothing is half-written.
        print(f"advface {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        how = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        print(f"{how}; caches keep what was finished, rerun to resume", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

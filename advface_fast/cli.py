"""The ``advface`` command: argument parsing and printing only; the work lives in the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_options import (EPILOG_PATHS, add_common_options, apply_runtime, check_pairs_file, float_list, input_policy,
                          int_list, lfw_path, pair_count, print_input_and_outputs)



EPILOG_EXIT = """
exit status:
  0 done, 2 bad input or arguments (one line on stderr), 130 interrupted (Ctrl-C), 143 terminated
  (SIGTERM, handled like Ctrl-C). An interrupted run keeps every finished aligned chip and attack row
  in the caches; rerun the same command to resume.
"""


def cmd_verify(args) -> int:
    from .experiments.verification import format_report, run_verify

    check_pairs_file(args)
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


def cmd_attack(args) -> int:
    from .attacks import list_attacks
    from .experiments.render import table1_markdown
    from .experiments.table1 import Table1Config, run_table1

    check_pairs_file(args)
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
    return print_input_and_outputs(report, args.out, "table1.json", "table1.md, accuracy_vs_eps.png, examples.png")


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
    from .cache_admin import cache_info, cache_prune

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
    from .metrics import METRICS

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
    add_common_options(p)
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
    add_common_options(p)
    p.set_defaults(batch_size=DEFAULT_ATTACK_BATCH)
    p.add_argument("--attacks", default="fgsm,pgd,cw", metavar="LIST",
                   help="comma list of fgsm, pgd, cw, cw-l2, noise (default: %(default)s)")
    p.add_argument("--eps", type=float_list, default=(2.0, 4.0, 8.0), metavar="LIST",
                   help="L-inf budgets in 0-255 levels (default: 2,4,8)")
    p.add_argument("--steps", type=int_list, metavar="LIST", help="PGD / C&W step counts, e.g. 10,40 (default: 40)")
    p.add_argument("--pairs", type=pair_count, metavar="N",
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

    from .jobs.cli import GALLERY_EPILOG, MATCH_EPILOG, add_gallery_arguments, add_match_arguments, cmd_gallery, cmd_match

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

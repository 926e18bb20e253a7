"""`advface advtrain`: parsing and printing only; the work lives in advface_fast.train."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli_options import (EPILOG_PATHS, check_pairs_file, float_list, int_list, pair_count, add_input_options,
                   add_threads_option, apply_runtime, input_policy, lfw_path, parse_folds)
from ..precision import PRECISIONS


def cmd_advtrain(args) -> int:
    import json

    from . import TrainConfig
    from .run import run_advtrain

    check_pairs_file(args)
    apply_runtime(args)
    policy = input_policy(args)
    eval_attacks = tuple(a for a in args.eval_attacks.split(",") if a)
    if args.eval_only:
        from .run import evaluate_run

        ev = evaluate_run(lfw_path(args), args.out, args.test_folds, model=args.model, eval_out=args.eval_out,
                          eval_attacks=eval_attacks, eval_eps=args.eval_eps, eval_steps=args.eval_steps,
                          eval_pairs=args.eval_pairs, eval_precision=args.precision, seed=args.seed,
                          policy=policy, pairs_file=args.pairs_file, workers=args.workers, progress=not args.quiet)
        _print_evaluation(ev, ev["file"])
        return 0
    cfg = TrainConfig(method=args.method, eps=args.eps, steps=1 if args.method == "fgsm-rs" else args.steps,
                      alpha=args.alpha, epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
                      lr=args.lr, weight_decay=args.weight_decay, scale=args.scale, margin=args.margin,
                      seed=args.seed, precision=args.precision)
    report = run_advtrain(lfw_path(args), cfg, args.out, model=args.model, test_folds=args.test_folds,
                          people_file=args.people_file, pairs_file=args.pairs_file, max_identities=args.max_identities,
                          max_images_per_identity=args.max_images_per_identity, policy=policy,
                          checkpoint_every=args.checkpoint_every, evaluate=not args.no_eval,
                          eval_attacks=eval_attacks, eval_eps=args.eval_eps,
                          eval_steps=args.eval_steps, eval_pairs=args.eval_pairs, eval_precision=args.precision,
                          workers=args.workers, progress=not args.quiet)
    done = report.get("already_finished", False)  # a rerun of a finished run: nothing was redone
    if done:
        print(f"nothing to do: {args.out} holds this run, finished (rerun it with other settings into a new --out, "
              "or judge it again with --eval-only)")
    split = report["split"]
    print(f"trained {args.model} ({args.method}) on {split['n_identities']} identities / {split['n_images']} images "
          f"outside folds {split['test_folds']}: {report['epochs_done']} epoch(s)")
    input_line = _training_input_summary(split["input"])
    if input_line:
        print(input_line)
    for r in report["history"]:
        rob = "—" if r["robust_accuracy"] is None else f"{100 * r['robust_accuracy']:.1f}%"
        print(f"  epoch {r['epoch']}: loss {r['loss']:.4f}, clean train acc {100 * r['clean_accuracy']:.1f}%, "
              f"robust train acc {rob}, {r['images_per_s']} img/s")
    ev = report.get("evaluation")
    if ev:
        _print_evaluation(ev)
    if args.json:
        print(json.dumps(report, indent=1))
    files = "weights.safetensors, checkpoint.safetensors, log.jsonl, train.json, run.json"
    print(f"results: {files} in {args.out}" if done else f"wrote {files} to {args.out}")
    return 0


def _print_evaluation(ev: dict, wrote: str | None = None) -> None:
    from ..pair_chips import format_input_summary

    rows = ", ".join(f"{k} {100 * v:.1f}%" for k, v in ev["rows"].items())
    print(f"held-out folds {ev['held_out_folds']} ({ev['n_pairs']} pairs): clean {100 * ev['clean_accuracy']:.1f}%"
          + (f", {rows}" if rows else "") + (f"; wrote {wrote}" if wrote else ""))
    summary = format_input_summary(ev["input"], ev["file"])
    if summary:
        print(summary)


def _training_input_summary(record: dict) -> str:
    """One line on what the input rules did to the training images (each one is listed in split.json)."""
    parts = []
    if record["skipped"]:
        parts.append(f"{len(record['skipped'])} image(s) dropped (--on-bad {record['on_bad']}, "
                     f"--no-face {record['no_face']})")
    if record["converted"]:
        parts.append(f"{len(record['converted'])} image(s) converted to RGB (--on-bad convert)")
    centre = [n for n in record["no_face_images"] if n["action"] != "dropped"]
    if centre:
        parts.append(f"{len(centre)} image(s) without a detected face, trained on the centre box (--no-face center)")
    return f"training input: {'; '.join(parts)} (all in split.json)" if parts else ""


def add_subparsers(sub) -> None:
    """The advtrain subcommand of `advface`."""
    p = sub.add_parser(
        "advtrain", help="adversarial training (PGD-AT, FGSM-RS, free AT, clean control) judged on held-out folds",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a face model with a CosFace identity loss on LFW people disjoint from every pair of "
                    "the held-out --test-folds (people.txt's folds match the pair folds; anyone a held-out pair names "
                    "is excluded too), with adversarial examples made in eval mode by the project's attacks "
                    "(bf16 gradients where native with --precision auto; fp32 weight updates). Then judge the "
                    "trained weights with the Table 1 code on the held-out folds only: thresholds cross-fitted "
                    "across the held-out folds on clean pairs (so at least two folds), attacks white-box against "
                    "the trained model. Rerunning the same command into the same --out resumes: an interrupted run "
                    "continues from its checkpoint exactly, a finished one is not redone, other settings are refused "
                    "naming what changed; the run is deterministic by --seed.",
        epilog="examples:\n"
               "  advface advtrain --lfw data/lfw --method pgd --eps 4 --steps 5 --test-folds 9,10 --epochs 1 "
               "--max-identities 40 --max-images-per-identity 8 --eval-pairs 200 --out runs/pgd\n"
               "  advface advtrain --lfw data/lfw --method clean --test-folds 9,10 --epochs 1 --out runs/clean\n"
               "  advface advtrain ... --out runs/pgd   (the same command again: continues an interrupted run)\n\n"
               + EPILOG_PATHS)
    p.add_argument("--model", default="dlib-resnet", choices=("dlib-resnet",), help="model to train (default: %(default)s)")
    p.add_argument("--lfw", metavar="PATH", help="LFW folder (official layout with people.txt)")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading LFW")
    p.add_argument("--out", metavar="DIR", type=Path, required=True, help="run folder (checkpoint, weights, logs)")
    p.add_argument("--method", choices=("clean", "pgd", "fgsm-rs", "free"), default="pgd",
                   help="pgd: Madry PGD-AT; fgsm-rs: FGSM with random start (Wong et al. 2020); free: free AT "
                        "(Shafahi et al. 2019, --steps replays per batch); clean: the control (default: %(default)s)")
    p.add_argument("--eps", type=float, default=4.0, help="L-inf budget in 0-255 levels (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="PGD steps K / free-AT replays (default: %(default)s)")
    p.add_argument("--alpha", type=float, help="attack step in 0-255 levels (default: 2.5 eps / K; fgsm-rs 1.25 eps)")
    p.add_argument("--test-folds", type=parse_folds, default=[9, 10], metavar="LIST",
                   help="held-out folds, at least two (default: 9,10)")
    p.add_argument("--people-file", metavar="FILE", help="people list (default: <lfw>/people.txt)")
    p.add_argument("--max-identities", type=int, metavar="N", help="train on the N identities with most images")
    p.add_argument("--max-images-per-identity", type=int, metavar="N", help="and at most N images of each")
    p.add_argument("--epochs", type=int, default=1, help="epochs; 0 evaluates the untrained model (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="images per update (default: %(default)s)")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-5, help="model learning rate; the head gets 10x (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="(default: %(default)s)")
    p.add_argument("--scale", type=float, default=30.0, help="CosFace scale s (default: %(default)s)")
    p.add_argument("--margin", type=float, default=0.35, help="CosFace margin m (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="run seed: image order and attack starts (default: 0)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="attack gradients (training and evaluation); the weight update is fp32 (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="no longer needed, accepted for old scripts: a rerun into the same --out always continues "
                        "the run there (same settings)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also checkpoint every N batches (default: end of each epoch)")
    p.add_argument("--no-eval", action="store_true", help="train only")
    p.add_argument("--eval-only", action="store_true",
                   help="judge the finished run in --out again with the --eval-* settings (no training)")
    p.add_argument("--eval-out", type=Path, metavar="DIR", help="with --eval-only: where the Table 1 files go "
                   "(default: <out>/eval)")
    p.add_argument("--eval-attacks", default="pgd", metavar="LIST", help="attacks for the held-out table, e.g. "
                   "fgsm,pgd,cw; empty for clean only (default: %(default)s)")
    p.add_argument("--eval-eps", type=float_list, default=(4.0,), metavar="LIST", help="(default: 4)")
    p.add_argument("--eval-steps", type=int_list, default=(10,), metavar="LIST", help="PGD / C&W steps (default: 10)")
    p.add_argument("--eval-pairs", type=pair_count, metavar="N", help="judge the first N held-out pairs (half matched)")
    p.add_argument("--workers", type=int, metavar="N", help="alignment processes (default: all cores)")
    add_input_options(p)
    add_threads_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="also print train.json")
    p.set_defaults(func=cmd_advtrain)

"""`advface defend`, `advface paper` and `advface cost`: parsing and printing only; the work lives in
advface_fast.experiments."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..attacks import DEFAULT_ATTACK_BATCH
from ..cli_options import (EPILOG_PATHS, add_input_options, add_threads_option, check_pairs_file, add_common_options,
                           float_list, int_list, parse_folds, pair_count, pair_count_or_all,
                           print_input_and_outputs, apply_runtime, lfw_path)


def _names(text: str, allowed, what: str) -> tuple:
    names = tuple(a.strip() for a in text.split(",") if a.strip())
    unknown = [a for a in names if a not in allowed]
    if unknown or not names:
        raise ValueError(f"unknown {what} {unknown or text!r}; available: {', '.join(allowed)}")
    return names


def _d_names(text: str) -> tuple:
    """--defense of defend / paper: attack-as-defense's attacks D. A registered defense of another family is
    pointed to the command that judges every family (one line, before any work)."""
    from ..defenses import DEFENSE_ATTACKS, check_defense

    names = tuple(a.strip() for a in text.split(",") if a.strip())
    for spec in (n for n in names if n not in DEFENSE_ATTACKS):
        try:
            check_defense(spec)
        except ValueError:
            continue  # not a defense at all: _names names the choices
        raise ValueError(f"--defense {spec}: this command runs the paper's Tables 2-4 for attack-as-defense's D "
                         f"({', '.join(DEFENSE_ATTACKS)}); judge {spec} with 'advface leaderboard --defense {spec}' "
                         "(clean calibration, transfer, BPDA + EOT, Square) or serve it with 'advface gallery "
                         f"--defense {spec}'")
    return _names(text, DEFENSE_ATTACKS, "defense")


def _adaptive_options(args) -> dict:
    opts = {field: getattr(args, option) for option, field in _ADAPTIVE_FIELDS.items()
            if getattr(args, option) is not None}
    if args.copy_steps is not None:  # 0 on the command line = the full D
        opts["copy_steps"] = tuple(None if k == 0 else k for k in args.copy_steps)
    return opts


# command-line option -> AdaptiveConfig field (given only when the option was)
_ADAPTIVE_FIELDS = {"eot": "eot", "adaptive_steps": "steps", "adaptive_eps": "eps", "kappa": "kappas",
                    "sweep_pairs": "sweep_pairs", "adaptive_defense_steps": "defense_steps",
                    "eot_redraw": "eot_redraw"}


def cmd_defend(args) -> int:
    from .defense_render import defend_markdown
    from .defense_tables import DefendConfig, run_defend

    check_pairs_file(args)
    apply_runtime(args)
    cfg = DefendConfig(model=args.model, defenses=_d_names(args.defense),
                       defense_eps=args.defense_eps, defense_steps=args.defense_steps,
                       attacks=_names(args.attacks, ("fgsm", "pgd", "cw"), "attack"), eps=args.eps,
                       attack_steps=args.attack_steps,
                       folds=tuple(args.folds) if args.folds else (None if args.all_folds else (1,)),
                       max_pairs=args.pairs, objective=args.objective, seed=args.seed, batch_size=args.batch_size,
                       defense_batch_size=args.defense_batch_size, precision=args.precision,
                       fast_model=args.fast_model, calibration_pairs=args.calibration_pairs,
                       adaptive=args.adaptive, adaptive_options=_adaptive_options(args), on_bad=args.on_bad,
                       no_face=args.no_face, pairs_file=None if args.pairs_file is None else str(args.pairs_file))
    report = run_defend(lfw_path(args), cfg, out_dir=args.out, workers=args.workers, progress=not args.quiet)
    print(defend_markdown(report))
    return print_input_and_outputs(report, args.out, "defend.json",
                                    "defend.md, accuracy_vs_defense_steps.png, price_vs_gain.png")


def cmd_paper(args) -> int:
    from .report import PaperConfig, run_paper
    from .transfer import resolve_transfer_models

    check_pairs_file(args)
    apply_runtime(args)
    cfg = PaperConfig(model=args.model, folds=tuple(args.folds) if args.folds else (None if args.all_folds else (1,)),
                      max_pairs=args.pairs, steps=args.steps, eps=args.eps, seed=args.seed,
                      batch_size=args.batch_size, precision=args.precision, calibration_pairs=args.calibration_pairs,
                      adaptive=not args.no_adaptive, adaptive_options=_adaptive_options(args), on_bad=args.on_bad,
                      no_face=args.no_face, pairs_file=None if args.pairs_file is None else str(args.pairs_file),
                      transfer_models=resolve_transfer_models(args.transfer_models, args.model),
                      train_runs=tuple(args.train_runs or ()))
    if args.out is None:
        raise ValueError("advface paper needs --out DIR (it writes REPORT.md and the tables there)")
    report = run_paper(lfw_path(args), cfg, out_dir=args.out, workers=args.workers, progress=not args.quiet)
    w = report["work"]
    print(f"wrote {args.out / 'REPORT.md'} ({report['times_s']['total']} s; this run: D on "
          f"{w['defense_images_computed']} images, {w['attacked_pairs']} pairs attacked)")
    return 0


def _defense_options(p, adaptive_flag: bool) -> None:
    """Options shared by defend and paper: D, calibration and the adaptive attacker."""
    from ..precision import PRECISIONS

    p.add_argument("--pairs", type=pair_count, metavar="N",
                   help="only the first N pairs of the folds, half matched (thresholds: see --calibration-pairs)")
    p.add_argument("--all-folds", action="store_true", help="all folds (default without --folds: fold 1)")
    p.add_argument("--seed", type=int, default=0, help="run seed; per-pair and per-image seeds derive from it (default: 0)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="gradients of the attacks and of D (auto: bf16 where native, D through the fast model); "
                        "embeddings and decisions are always fp32 (default: %(default)s)")
    p.add_argument("--calibration-pairs", type=pair_count, metavar="N",
                   help="fit the defended thresholds on a balanced subset of N pairs spread over every fold "
                        "(faster; recorded loudly in the report). Default: the full protocol, every pair of the "
                        "dataset (D on ~7,700 images, once, cached)")
    g = p.add_argument_group("adaptive attacker (BPDA + EOT, high confidence, worst case)")
    if adaptive_flag:
        g.add_argument("--adaptive", action="store_true",
                       help="also run the adaptive evaluation for D = pgd and cw (Tables 2-3)")
    g.add_argument("--eot", type=int_list, metavar="LIST", help="EOT samples S (default: 1,3; S > 1 on --sweep-pairs)")
    g.add_argument("--eot-redraw", choices=("per-step", "fixed"),
                   help="per-step: fresh draws of D's randomness at every attack step (default); fixed: the same "
                        "S draws throughout, a weaker attacker that overfits them (ablation)")
    g.add_argument("--copy-steps", type=int_list, metavar="LIST",
                   help="K of the attacker's copy of D; 0 = the full D (default: 5,0)")
    g.add_argument("--adaptive-steps", type=int_list, metavar="LIST", help="the adaptive PGD's steps (default: 20)")
    g.add_argument("--adaptive-eps", type=float_list, metavar="LIST", help="eps_a (default: eps_d)")
    g.add_argument("--kappa", type=float_list, metavar="LIST",
                   help="high-confidence margins past the undefended threshold (default: 0.1,0.3)")
    g.add_argument("--sweep-pairs", type=pair_count, metavar="N",
                   help="pairs for S > 1 and the eps_a / step sweeps (default: 200)")
    g.add_argument("--adaptive-defense-steps", type=int, metavar="K",
                   help="the D step count attacked and judged (default: D's smallest)")


def cmd_cost(args) -> int:
    from . import cost

    runs = cost.load_training_runs(args.train)
    reports = cost.load_defense_reports(args.defense_report or [])
    report = cost.cost_from(runs, reports, defense_steps=args.defense_steps, eps=args.eps,
                            full_images=args.full_images, full_epochs=args.epochs_full,
                            gallery_images=args.gallery_images)
    print(cost.write_cost(report, args.out, queries=args.queries) if args.out else cost.cost_markdown(report))
    if args.out:
        print(f"wrote cost.json, cost.md, accuracy_vs_compute.png to {args.out}")
    return 0


def cmd_leaderboard(args) -> int:
    from ..environment import command_line
    from ..models import list_models
    from .leaderboard import DEFAULT_DEFENSES, LeaderboardConfig, defense_families, parse_model, run_leaderboard
    from .leaderboard_render import leaderboard_markdown, load_entries, write_leaderboard

    if args.out is None:
        raise ValueError("advface leaderboard needs --out DIR (entries/, LEADERBOARD.md, leaderboard.json, the plot)")
    if args.merge:
        report = write_leaderboard(load_entries(args.merge), args.out)
        print(leaderboard_markdown(report["entries"]))
        print(f"merged {len(report['entries'])} entries; wrote LEADERBOARD.md, leaderboard.json, leaderboard.png to {args.out}")
        return 0
    check_pairs_file(args)
    apply_runtime(args)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    unknown = [m for m in models if parse_model(m)[0] not in list_models() and not m.startswith("onnx:")]
    if unknown or not models:
        raise ValueError(f"unknown model(s) {unknown or args.models!r}; available: {', '.join(list_models())}")
    defenses = (defense_families(args.defenses) if args.defenses else ()) + tuple(args.defense or ())
    defenses = tuple(dict.fromkeys(defenses)) or DEFAULT_DEFENSES  # each spec once, in the order given
    cfg = LeaderboardConfig(models=models, defenses=defenses, folds=tuple(args.folds) if args.folds else (1,),
                            max_pairs=args.pairs, eps=args.eps, adaptive_steps=args.adaptive_steps, eot=args.eot,
                            square_queries=args.square_queries, costly_square_queries=args.costly_square_queries,
                            square_pairs=args.square_pairs, costly_square_pairs=args.costly_square_pairs,
                            calibration_pairs=args.calibration_pairs, seed=args.seed,
                            warm_start=not args.no_warm_start, fast_model=args.fast_model,
                            square_fast_copy=not args.square_plain_model,
                            best_iterate=not args.no_best_iterate, copy_steps=args.copy_steps,
                            precision=args.precision, batch_size=args.batch_size, steps_cap=args.steps_cap,
                            on_bad=args.on_bad, no_face=args.no_face,
                            pairs_file=None if args.pairs_file is None else str(args.pairs_file),
                            command=command_line())
    report = run_leaderboard(lfw_path(args), cfg, args.out, workers=args.workers, progress=not args.quiet)
    print(leaderboard_markdown(report["entries"]))
    print(f"wrote entries/*.json, LEADERBOARD.md, leaderboard.json, leaderboard.png to {args.out}")
    return 0


def _add_leaderboard_parser(sub) -> None:
    from ..attacks import DEFAULT_ATTACK_BATCH
    from ..defenses import list_defenses
    from ..precision import PRECISIONS
    from .leaderboard import DEFAULT_DEFENSES

    p = sub.add_parser(
        "leaderboard", help="rank defenses under one adaptive protocol with a black-box check",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Every (model, defense) entry is attacked by transfer (Table 1's queries), high confidence, "
                    "BPDA + EOT through the defense and Square (score-based black box on the defended margin, the "
                    "defense's randomness redrawn per query), all at one L-inf eps on the uint8 grid, against the "
                    "defended pipeline's thresholds fitted on clean defended pairs. Robust accuracy is the per-pair "
                    "worst case; checks flag gradient masking (black box beats white box by > 0.2 points), more "
                    "steps or samples helping the defender, and an adaptive attack weaker than transfer. Entries "
                    "are written one JSON each as they finish (a rerun resumes); caches are shared with attack / "
                    "defend. Registered defenses: " + ", ".join(list_defenses()) + "; your own: "
                    "--defense package.module:factory[:name=value,...].",
        epilog="examples:\n"
               "  advface leaderboard --lfw data/lfw --models dlib-resnet,sface --defenses all --folds 1 --eps 4 "
               "--out runs/leaderboard\n"
               "  advface leaderboard --lfw data/lfw --defenses none,jpeg,median --pairs 100 --out runs/lb-transforms\n"
               "  advface leaderboard --lfw data/lfw --defense none --defense jpeg:quality=50 --pairs 100 --out runs/lb\n"
               "  advface leaderboard --lfw data/lfw --models dlib-resnet,dlib-resnet@runs/pgd/weights.safetensors \\\n"
               "      --defense none --folds 9 --out runs/lb-at   (an advtrain model on its held-out fold)\n"
               "  advface leaderboard --merge runs/lb-a runs/lb-b --out runs/lb   (entries of several machines)\n\n"
               "defaults: " + " ".join(DEFAULT_DEFENSES) + "\n\n" + EPILOG_PATHS)
    p.add_argument("--models", default="dlib-resnet", metavar="LIST",
                   help="comma list of models (default: %(default)s); NAME@WEIGHTS.safetensors is a model-stage entry "
                        "(e.g. an 'advface advtrain' run's weights: attacked on its held-out --folds, judged under the "
                        "same protocol; for it the white-box attack is the adaptive one)")
    p.add_argument("--defense", action="append", metavar="SPEC",
                   help="a defense NAME[:param=value,...] (repeat for several; default: every family, see below)")
    p.add_argument("--defenses", metavar="all|NAMES",
                   help="'all' (every family at the protocol's parameters, the default) or a comma list of family "
                        "names at those parameters, e.g. none,jpeg,median; with --defense: both")
    p.add_argument("--lfw", metavar="PATH", help="LFW folder or .bin file (see 'paths' below)")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading LFW")
    p.add_argument("--folds", type=parse_folds, metavar="LIST", help="folds to attack (default: 1)")
    p.add_argument("--pairs", type=pair_count, metavar="N", help="only the first N pairs of the folds, half matched")
    p.add_argument("--eps", type=float, default=4.0, help="the attacker's L-inf budget, 0-255 levels (default: %(default)s)")
    p.add_argument("--adaptive-steps", type=int, default=20, metavar="K", help="BPDA + EOT PGD steps (default: %(default)s)")
    p.add_argument("--eot", type=int, default=4, metavar="S", help="EOT draws for randomised defenses (default: %(default)s)")
    p.add_argument("--fast-model", action="store_true",
                   help="attack the undefended model (transfer queries, high confidence) and run Square's queries "
                        "through the model's fast copy (Table 1's queries are then those of 'advface attack "
                        "--fast-model'); default: the plain model")
    p.add_argument("--square-plain-model", action="store_true",
                   help="Square's queries read the plain model's scores instead of its fp32 fast copy's (protocol: "
                        "the fast copy, the same function up to summation order at 1.4x the query rate; the final "
                        "queries are judged by the plain model either way)")
    p.add_argument("--no-warm-start", action="store_true",
                   help="skip the BPDA + EOT row begun at the strongest transfer attack's queries (protocol: on)")
    p.add_argument("--copy-steps", type=int, metavar="K",
                   help="steps of an iterative defense's copy in the BPDA + EOT attacker (attack-as-defense's D; "
                        "default: the defense's own; a reduced copy was much weaker on sface)")
    p.add_argument("--no-best-iterate", action="store_true",
                   help="BPDA + EOT rows deliver their last iterate instead of each pair's highest-loss one "
                        "(protocol: best iterate)")
    p.add_argument("--square-queries", type=int, default=5000, metavar="N",
                   help="Square's budget for defenses costing about one forward pass (default: %(default)s)")
    p.add_argument("--costly-square-queries", type=int, default=1000, metavar="N",
                   help="Square's budget for defenses costing more than two passes per image (default: %(default)s)")
    p.add_argument("--square-pairs", type=pair_count, metavar="N", help="Square on the first N pairs only (default: all)")
    p.add_argument("--costly-square-pairs", type=pair_count_or_all, default=100, metavar="N",
                   help="Square on the first N pairs (half matched) for defenses costing more than two passes per "
                        "image; 'all' for every pair (default: %(default)s)")
    p.add_argument("--calibration-pairs", type=pair_count, metavar="N",
                   help="fit the defended thresholds on a balanced subset of N pairs over every fold (default: all)")
    p.add_argument("--steps-cap", type=int, metavar="K", help="cap every iteration count at K (quick runs, recorded)")
    p.add_argument("--seed", type=int, default=0, help="run seed (default: 0)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="attack gradients (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_ATTACK_BATCH, metavar="N", help="pairs per attack batch")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="merge the entries of these runs into --out (no attacks)")
    p.add_argument("--out", type=Path, metavar="DIR", help="write entries/, LEADERBOARD.md, leaderboard.json, .png")
    p.add_argument("--workers", type=int, metavar="N", help="alignment processes (default: all cores)")
    add_input_options(p)
    add_threads_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_leaderboard)


def add_subparsers(sub) -> None:
    """The defend, paper, cost and leaderboard subcommands of `advface`."""
    p = sub.add_parser(
        "defend", help="the paper's Tables 2-4: attack-as-defense (D re-attacks query and gallery)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The defender applies its own attack D (pgd: Table 2, cw: Table 3, fgsm: Table 4; "
                    "label-free objective) to the query and to the gallery image and compares the two. The "
                    "defended pipeline is calibrated like any verifier: D on both clean images of every pair, "
                    "k-fold thresholds on those CLEAN defended pairs, then fixed (never refit on attacked data). "
                    "Rows: the known attack (query attacked by D's own method), the unknown attacks and the "
                    "clean query (the price); columns D's steps (one run of the largest records all). Attacked "
                    "queries are Table 1's (shared cache); D's embeddings are cached per image. 50% is chance.",
        epilog="examples:\n"
               "  advface defend --lfw data/lfw --defense pgd,cw,fgsm --defense-eps 4 --defense-steps 10,20,40 "
               "--attacks fgsm,pgd,cw --eps 4 --folds 1 --out runs/defend\n"
               "  advface defend --lfw data/lfw --defense pgd --defense-eps 1,2,4,8 --pairs 200 "
               "--calibration-pairs 1000 --out runs/eps-sweep\n"
               "  advface defend --lfw data/lfw --defense pgd --adaptive --eot 1,3 --copy-steps 5,0 --out runs/adaptive\n\n"
               + EPILOG_PATHS)
    add_common_options(p)
    p.set_defaults(batch_size=DEFAULT_ATTACK_BATCH)
    p.add_argument("--defense", default="pgd", metavar="LIST", help="D's attack(s): pgd, cw, fgsm (default: %(default)s)")
    p.add_argument("--defense-eps", type=float_list, default=(4.0,), metavar="LIST", help="eps_d in 0-255 levels (default: 4)")
    p.add_argument("--defense-steps", type=int_list, default=(10, 20, 40), metavar="LIST",
                   help="D's step counts, the table's columns (default: 10,20,40)")
    p.add_argument("--defense-batch-size", type=int, default=32, metavar="N",
                   help="D's batch size (D's results depend on it; part of its cache key) (default: %(default)s)")
    p.add_argument("--objective", choices=("away-from-self", "random-direction"), default="away-from-self",
                   help="D's label-free objective (default: %(default)s)")
    p.add_argument("--attacks", default="fgsm,pgd,cw", metavar="LIST", help="attacked query conditions (default: %(default)s)")
    p.add_argument("--eps", type=float_list, default=(4.0,), metavar="LIST", help="the query attacks' eps (default: 4)")
    p.add_argument("--attack-steps", type=int, metavar="N", help="PGD / C&W steps of the query attacks (default: 40, as Table 1)")
    p.add_argument("--fast-model", action="store_true", help="query attacks through the fast model (as advface attack --fast-model)")
    _defense_options(p, adaptive_flag=True)
    p.set_defaults(func=cmd_defend)

    p = sub.add_parser(
        "paper", help="Table 1, Tables 2-4 and the adaptive evaluation in one resumable plan -> REPORT.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="One plan that reuses every shared artefact (chips, clean embeddings, Table 1's attacked "
                    "queries, D's embeddings per image) and writes REPORT.md with every table beside the "
                    "paper's numbers, plots, example grids, parameters, times and the image-steps spent vs a "
                    "naive run. Resumable: rerun the same command to continue; a fully cached rerun does no "
                    "attack work.",
        epilog="examples:\n  advface paper --lfw data/lfw --folds 1 --out runs/paper\n"
               "  advface paper --lfw data/lfw --pairs 40 --steps 5 --calibration-pairs 200 --transfer-models none "
               "--out runs/quick\n\n"
               + EPILOG_PATHS)
    add_common_options(p)
    p.set_defaults(batch_size=DEFAULT_ATTACK_BATCH)
    p.add_argument("--steps", type=int, metavar="K", help="cap every iteration count at K (quick runs)")
    p.add_argument("--eps", type=float_list, default=(2.0, 4.0, 8.0), metavar="LIST", help="Table 1's eps (default: 2,4,8)")
    p.add_argument("--no-adaptive", action="store_true", help="skip the adaptive evaluation")
    p.add_argument("--transfer-models", default="all", metavar="LIST|all|none",
                   help="the transfer matrix: Table 1's attacks at the queries' eps crafted on each of these models "
                        "and --model, judged by each (all: every registered model whose weights are on this "
                        "machine; the others are listed with the reason; none: skip) (default: %(default)s)")
    p.add_argument("--train-runs", nargs="+", metavar="DIR",
                   help="finished `advface advtrain` run folders: adds the section 'Adversarial training and cost' "
                        "(their training cost and accuracy against this run's defense: break-even queries, accuracy "
                        "bought, robust accuracy vs compute; as `advface cost`). Without it the section says not run")
    _defense_options(p, adaptive_flag=False)
    p.set_defaults(func=cmd_paper)

    p = sub.add_parser(
        "cost", help="compute of adversarial training vs attack-as-defense: break-even queries, accuracy bought",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Training: measured seconds and image-steps per training image per epoch from advtrain runs, "
                    "their totals and the extrapolation to CASIA-WebFace scale (--full-images x --epochs-full). "
                    "Defense: image-steps and seconds per query and per gallery image from --defense-report "
                    "(defend.json reports, merged per D setting), else estimated as D steps x the attack step time "
                    "measured in the training runs. Then the break-even number of queries, the accuracy each "
                    "approach buys at --eps (clean; static: the strongest attack measured; adaptive: the per-pair "
                    "worst case of the defense's adaptive evaluation, and for a trained model its white-box attack) "
                    "and a plot of worst-case robust accuracy vs compute, one curve per approach.",
        epilog="example:\n  advface cost --train runs/clean runs/pgd runs/fgsm --defense-report runs/pgd_adaptive/defend.json "
               "runs/cw_adaptive/defend.json --out runs/cost")
    p.add_argument("--train", nargs="+", required=True, metavar="DIR", help="advtrain run folders (or train.json files)")
    p.add_argument("--defense-report", nargs="+", metavar="FILE",
                   help="defend.json reports of the defense runs (e.g. D = PGD and D = C&W with --adaptive, and a "
                        "static D = FGSM run); reports on the same pairs merge per D setting")
    p.add_argument("--eps", type=float, default=4.0,
                   help="the attack budget (0-255 levels) at which every accuracy is compared (default: %(default)s)")
    p.add_argument("--defense-steps", type=int_list, default=(10, 40), metavar="LIST",
                   help="without a report: defense step counts D to estimate (default: 10,40)")
    p.add_argument("--full-images", type=int, default=494_414, help="training set size to extrapolate to "
                   "(default: CASIA-WebFace, %(default)s)")
    p.add_argument("--epochs-full", type=int, default=30, help="epochs assumed at full scale (default: %(default)s)")
    p.add_argument("--gallery-images", type=int, default=0, help="gallery images the defense re-attacks once (default: 0)")
    p.add_argument("--queries", type=int, default=10_000, help="queries served, for the plot (default: %(default)s)")
    p.add_argument("--out", metavar="DIR", type=Path, help="write cost.json, cost.md, accuracy_vs_compute.png")
    p.set_defaults(func=cmd_cost)

    _add_leaderboard_parser(sub)


__all__ = ["add_subparsers", "cmd_cost", "cmd_defend", "cmd_leaderboard", "cmd_paper"]

"""``advface gallery`` / ``advface match``: parsing and printing only; the work lives in
advface_fast.jobs. The module entry point for torchrun is ``python -m advface_fast.gallery``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GALLERY_EPILOG = """\
store (DIR):
  config.json          what every row depends on; a rerun with another config is refused
  manifest.sqlite      images(id, shard, row, status, error, path), shards(...), runs(...)
  shards/shard-NNNNNN.safetensors   "embeddings" float32 (n, D) [+ "chips" uint8 (n, H, W, 3)]
  Open them with sqlite3 and safetensors (see docs/gallery.md). A crash at any moment leaves complete
  shards and a consistent manifest: rerun the same command to resume; a finished shard is never
  recomputed. Bad input follows the input rules of every command: a bad file (empty, truncated,
  undecodable, unsupported, not RGB) stops the job with an error naming it, before any work where its
  header shows it (--on-bad error, the default), gets a "bad" row with the reason (skip), or is converted
  to RGB when it can be (convert); an image without a detected face is embedded on the centre box
  (--no-face center, the default), gets a "no_face" row (skip), or stops the job (error). Rows, the
  summary and config.json say what was done; a rerun with other rules is refused like any config change.

examples:
  advface gallery --model dlib-resnet --defense pgd --defense-eps 4 --defense-steps 40 \\
      --input photos/ --out gallery-store
  advface gallery --input chips.csv --aligned --out gallery-store --shard-size 512 --threads 4
  advface gallery --input photos/ --out gallery-store --on-bad skip --no-face skip   (record bad files, go on)
  torchrun --nproc_per_node 8 -m advface_fast.gallery --input photos/ --out gallery-store
  advface gallery --input photos/ --out gallery-store --executor ray --ray-address auto
"""

MATCH_EPILOG = """\
examples:
  advface match --gallery gallery-store --query probe.jpg --top-k 5
  advface match --gallery gallery-store --query probes/ --threshold-from defend.json --out matches.json

threshold: --threshold T, else --threshold-from FILE, else the one recorded in the store
(advface gallery --threshold-from FILE); without any, scores only (no accept / reject).
"""


def check_defense_spec(text: str) -> str:
    """--defense: an attack-as-defense attack name, or a spec naming a known defense (else ValueError)."""
    from ..defenses import DEFENSE_ATTACKS, check_defense

    if text in DEFENSE_ATTACKS:
        return text
    try:
        return check_defense(text)
    except ValueError as err:
        raise ValueError(f"--defense {text}: {err}") from None


def add_gallery_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli_options import add_input_options, add_threads_option
    from ..defenses.attack_as_defense import DEFENSE_ATTACKS
    from ..models import list_models
    from ..precision import PRECISIONS

    p.add_argument("--model", default="dlib-resnet", choices=list_models(), help="registry model (default: %(default)s)")
    p.add_argument("--defense", default="pgd", metavar="SPEC",
                   help=f"attack-as-defense's attack D ({', '.join(DEFENSE_ATTACKS)}; with --defense-eps / -steps / "
                        "-objective), or any registered defense by its spec, e.g. jpeg:quality=75, "
                        "gaussian-smoothing:sigma=8,samples=8, counter-attack:tau=0.02, or package.module:factory "
                        "(default: %(default)s)")
    p.add_argument("--defense-eps", type=float, default=4.0, metavar="EPS",
                   help="D's L-inf budget in 0-255 levels (default: %(default)s)")
    p.add_argument("--defense-steps", type=int, default=40, metavar="N", help="D's steps (default: %(default)s)")
    p.add_argument("--defense-objective", default="away-from-self", choices=("away-from-self", "random-direction"),
                   help="D's label-free objective (default: %(default)s)")
    p.add_argument("--input", required=True, metavar="SRC",
                   help="a folder of images (ids: paths relative to it), an LFW root, or a .csv (id,path) / "
                        ".jsonl manifest")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="the gallery store (created or resumed)")
    p.add_argument("--aligned", action="store_true",
                   help="the images are already aligned chips of the model's input size (no detection)")
    p.add_argument("--shard-size", type=int, default=256, metavar="N",
                   help="images per shard: the unit of work, commit and retry (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="D's run seed; per-image seeds derive from (seed, id) (default: 0)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="images per D batch (batches are padded to it; part of the config) (default: %(default)s)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="D's gradient precision, as `advface defend` (auto: bf16 through the model's fast copy where "
                        "the hardware has it, else fp32; the store records the resolved one) (default: %(default)s)")
    p.add_argument("--save-chips", action="store_true", help="also store the defended chips (uint8) in the shards")
    p.add_argument("--decode-threads", type=int, default=2, metavar="N",
                   help="background threads decoding / aligning the next shards (default: %(default)s)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local (torchrun ranks are detected from the environment) or ray (default: %(default)s)")
    p.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join (e.g. auto, ray://head:10001); "
                                                         "default: start a local one")
    p.add_argument("--device", help="torch device (default: cpu; under torchrun with CUDA: cuda:LOCAL_RANK)")
    p.add_argument("--threshold-from", type=Path, metavar="FILE",
                   help='record the defense\'s calibrated threshold (JSON with "threshold", or per-fold '
                        '"thresholds") in the store; `advface match` then decides with it')
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_input_options(p, pairs_file=False)
    add_threads_option(p)


def cmd_gallery(args) -> int:
    from ..cli_options import apply_runtime, input_policy
    from . import GalleryConfig, GalleryJob, run
    from .job import bad_rows, format_summary
    from .shard_store import GalleryStore
    from ..precision import resolve_precision

    apply_runtime(args)
    policy = input_policy(args)
    for name in ("shard_size", "batch_size", "defense_steps", "decode_threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    check_defense_spec(args.defense)
    config = GalleryConfig(model=args.model, defense=args.defense, eps=args.defense_eps, steps=args.defense_steps,
                           objective=args.defense_objective, seed=args.seed, aligned=args.aligned,
                           shard_size=args.shard_size, batch_size=args.batch_size,
                           precision=resolve_precision(args.precision, args.device), save_chips=args.save_chips,
                           on_bad=policy.on_bad, no_face=policy.no_face)
    calibration = None
    if args.threshold_from is not None:  # checked against this D before any work
        from ..fileio import sha256_file
        from .match import read_threshold

        calibration = (*read_threshold(args.threshold_from, config), sha256_file(args.threshold_from))
    job = GalleryJob(config=config, input=args.input, out=str(args.out), decode_threads=args.decode_threads,
                     progress=not args.quiet, device=args.device)
    result = run(job, executor=args.executor, ray_address=args.ray_address)
    if result is None:  # a torchrun rank other than 0
        return 0
    if calibration is not None:
        GalleryStore(args.out).record_calibration(*calibration)
        print(f"recorded the threshold {calibration[0]:.4f} from {calibration[1]} in the store")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_summary(result, bad_rows=bad_rows(GalleryStore(args.out))))
    return 0


def add_match_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli_options import add_threads_option

    p.add_argument("--gallery", required=True, type=Path, metavar="DIR", help="a store made by `advface gallery`")
    p.add_argument("--query", required=True, nargs="+", metavar="IMAGES",
                   help="query image files, folders or .csv / .jsonl manifests (aligned as the gallery was)")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="matches per query (default: %(default)s)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--threshold-from", type=Path, metavar="FILE",
                   help='the defense\'s calibration (JSON with "threshold", or per-fold "thresholds")')
    g.add_argument("--threshold", type=float, metavar="T", help="accept when cosine >= T")
    p.add_argument("--search", choices=("auto", "faiss", "torch"), default="auto",
                   help="faiss when installed, else exact chunked torch search (default: %(default)s)")
    p.add_argument("--out", type=Path, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--device", help="torch device (default: cpu)")
    add_threads_option(p)


def query_refs(items) -> list:
    from .sources import ImageRef, list_images

    refs = []
    for item in items:
        path = Path(item)
        if path.is_dir() or path.suffix.lower() in (".csv", ".jsonl"):
            refs += list_images(path)
        elif path.exists():
            refs.append(ImageRef(str(item), str(path)))
        else:
            raise FileNotFoundError(f"--query {item}: no such file or folder")
    return refs


def cmd_match(args) -> int:
    from ..cli_options import apply_runtime
    from ..fileio import write_json_atomic
    from .match import format_matches, match, read_threshold

    apply_runtime(args)
    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    threshold, source = args.threshold, ("--threshold" if args.threshold is not None else None)
    if args.threshold_from is not None:  # a defend.json is read for the gallery's own D
        from .shard_store import GalleryStore
        from .worker import GalleryConfig

        stored = GalleryStore(args.gallery).config()
        gcfg = None if stored is None else GalleryConfig(**stored["options"])
        threshold, source = read_threshold(args.threshold_from, gcfg)
    elif threshold is None:  # the one recorded with the gallery, if any
        from .shard_store import GalleryStore

        recorded = GalleryStore(args.gallery).calibration()
        if recorded is not None:
            threshold, source = recorded["threshold"], f"the store's calibration.json ({recorded['source']})"
    report = match(args.gallery, query_refs(args.query), top_k=args.top_k, threshold=threshold,
                   threshold_source=source, backend=args.search, device=args.device)
    print(format_matches(report))
    if args.out:
        write_json_atomic(args.out, report)
        print(f"wrote {args.out}")
    return 0

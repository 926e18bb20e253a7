"""From an LFW folder to verification numbers: pairs -> aligned chips -> embeddings -> report.

``prepare_pairs`` is shared by every experiment (verification now, attack tables next): it
loads the pairs, aligns every image once (chip cache) and indexes the chips by pair.
``run_verify`` is the Python API behind ``advface verify``.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .align import ALIGN_PATHS, AlignedChips, align_images, make_align_config
from .data import DataError, PairDataset, load_lfw
from .data.policy import InputPolicy
from .engine import make_engine
from .models import get_model_spec
from .threads import thread_info
from .verify import METRICS, VerificationResult, evaluate_embeddings, plot_roc

CHIP_CACHE_SCHEME = "content-sha256-v1"  # chip cache entries hold chips by image-content hash


@dataclass
class PairChips:
    """The pairs of a dataset with the aligned chip of each side."""

    dataset: PairDataset
    chips: AlignedChips
    a: np.ndarray  # row in chips.chips of each pair's first image
    b: np.ndarray  # ... and of its second image
    same: np.ndarray  # bool
    folds: np.ndarray  # int fold id (1-based, as in pairs.txt)
    image_rows: np.ndarray  # row in chips.chips of each of dataset.image_ids (equal files share a row)
    policy: InputPolicy = field(default_factory=InputPolicy)
    no_face: dict = field(default_factory=dict)  # image id -> what was done: no detector found a face

    def __len__(self) -> int:
        return len(self.same)

    def alignment_paths(self) -> dict[str, int]:
        """How many of the dataset's images took each alignment path (hog / cnn / mtcnn / center)."""
        counts = dict.fromkeys(ALIGN_PATHS, 0)
        for row in self.image_rows.tolist():
            counts[self.chips.paths[row]] += 1
        return counts

    def input_record(self) -> dict:
        """What the input rules did, for results files: policy, pairs file and how it was checked,
        every skipped pair, every conversion and every image without a detected face."""
        d = self.dataset
        return {**self.policy.to_dict(),
                "pairs_file": d.pairs_file, "pairs_sha256": d.pairs_sha256, "pairs_check": d.pairs_check,
                "n_pairs": len(self), "skipped": [vars(s) for s in d.skipped],
                "converted": [vars(c) for c in d.converted],
                "no_face_images": [{"image": i, "action": a} for i, a in self.no_face.items()]}


def prepare_pairs(lfw: str | Path | PairDataset, model: str = "dlib-resnet", *, folds=None,
                  policy: InputPolicy | None = None, on_bad: str | None = None, pairs_file=None,
                  cache_dir: str | Path | None = None, workers: int | None = None,
                  progress: bool = True) -> PairChips:
    """Load the pairs (all folds, or the 1-based ``folds``) and align their images for ``model``.

    policy: the input rules (data.policy.InputPolicy: on_bad, no_face); ``on_bad`` alone is a
    shortcut that overrides policy.on_bad. pairs_file: your own pairs file instead of the
    dataset's pairs.txt (see load_lfw's ``pairs``). Images where no detector finds a face are
    scored on the centre box, dropped with their pairs, or stop the run (policy.no_face); the
    choice and every such image are in ``input_record()``.
    """
    policy = policy or InputPolicy()
    if on_bad is not None:
        policy = replace(policy, on_bad=on_bad)
    if isinstance(lfw, PairDataset):
        if pairs_file is not None:
            raise ValueError("pairs_file applies when loading from a path; this dataset's pairs are already chosen")
        dataset = lfw
    else:
        extra = {} if pairs_file is None else {"pairs": str(pairs_file)}
        dataset = load_lfw(lfw, folds=folds, on_bad=policy.on_bad, **extra)
    spec = get_model_spec(model)
    config = make_align_config(spec.alignment)  # the model's aligner (dlib, mtcnn, ...) and chip geometry
    # Chips are cached by the SHA-256 of each image's bytes: any fold selection, subset or folder
    # layout of the same images reuses them, and a changed image can never hit a stale chip.
    digest = {image_id: dataset.image_digest(image_id) for image_id in dataset.image_ids}
    first_id = {}
    for image_id, d in digest.items():
        first_id.setdefault(d, image_id)
    chips = align_images(list(first_id), lambda d: dataset.load_image(first_id[d]), config, cache_dir=cache_dir,
                         dataset_fingerprint=CHIP_CACHE_SCHEME, progress=progress, workers=workers)
    # "center" is the path of an image where no detector found a face (the fixed box was used).
    faceless = [i for i in dataset.image_ids if chips.paths[chips.index(digest[i])] == "center"]
    no_face = {}
    if faceless and policy.no_face == "error":
        shown = ", ".join(faceless[:5]) + (f" and {len(faceless) - 5} more" if len(faceless) > 5 else "")
        raise DataError(f"no face detected in {len(faceless)} image(s): {shown}; use --no-face center "
                        "(no_face='center') to score them on the centre box, or --no-face skip to drop their pairs",
                        file=dataset.root)
    if faceless and policy.no_face == "skip":
        no_face = dict.fromkeys(faceless, "pairs skipped")
        dataset = dataset.without_images(dict.fromkeys(faceless, "no face detected"))
        if not dataset.pairs:
            raise DataError("no pairs left after skipping the images without a detected face", file=dataset.root)
    elif faceless:
        no_face = dict.fromkeys(faceless, "scored on the centre box")
    pairs = dataset.pairs
    return PairChips(
        dataset=dataset,
        chips=chips,
        a=np.array([chips.index(digest[p.a]) for p in pairs], dtype=np.int64),
        b=np.array([chips.index(digest[p.b]) for p in pairs], dtype=np.int64),
        same=np.array([p.same for p in pairs], dtype=bool),
        folds=np.array([p.fold for p in pairs], dtype=np.int64),
        image_rows=np.array([chips.index(digest[i]) for i in dataset.image_ids], dtype=np.int64),
        policy=policy,
        no_face=no_face,
    )


def format_input_summary(record: dict, results_file: str | None = None, limit: int = 8) -> str:
    """One readable block, in command-line terms, of what the input rules did (``input_record()``);
    empty when there is nothing to say."""
    skipped, converted = record.get("skipped", []), record.get("converted", [])
    no_face = record.get("no_face_images", [])
    check = record.get("pairs_check") or ""
    lines = []
    if record.get("pairs_file") and check.startswith("not verified"):
        lines.append(f"note: pairs file {record['pairs_file']} is {check}")
    if not (skipped or converted or no_face):
        return "\n".join(lines)
    parts = []
    if skipped:
        parts.append(f"{len(skipped)} pair(s) skipped (--on-bad {record['on_bad']}, --no-face {record['no_face']})")
    if converted:
        parts.append(f"{len(converted)} image(s) converted to RGB (--on-bad convert)")
    if no_face:
        action = "their pairs skipped" if record["no_face"] == "skip" else "scored on the centre box"
        parts.append(f"{len(no_face)} image(s) without a detected face, {action} (--no-face {record['no_face']})")
    lines.append(f"input: {record.get('n_pairs', '?')} pairs used; " + "; ".join(parts))

    def listing(title, items):
        for text in items[:limit]:
            lines.append(f"  {title:<10}{text}")
        if len(items) > limit:
            where = f" (all in {results_file})" if results_file else ""
            lines.append(f"  {'':<10}... and {len(items) - limit} more{where}")

    listing("skipped", [(f"{s['file']}:{s['line']}: " if s.get("line") else "") + s["reason"] for s in skipped])
    listing("converted", [f"{c['file']}: {c['reason'].removeprefix('converted ')}" for c in converted])
    listing("no face", [f"{n['image']}: {n['action']}" for n in no_face])
    return "\n".join(lines)


def environment() -> dict:
    """What produced a result: versions and the hardware it ran on."""
    return {
        "advface_fast": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        **thread_info(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def run_verify(lfw, model: str = "dlib-resnet", *, folds=None, out_dir: str | Path | None = None,
               batch_size: int = 64, policy: InputPolicy | None = None, on_bad: str | None = None,
               pairs_file=None, cache_dir=None, workers=None, engine: str = "auto", precision: str = "fp32",
               compare_engines: bool = False, progress: bool = True) -> dict:
    """The LFW verification protocol for ``model``: cosine and L2, without and with flip averaging.

    Returns the report dict (also written to ``out_dir/verify.json`` with ``out_dir/roc.png``).
    The headline numbers are cosine without flip; every variant is under ``results``.
    ``precision="bf16"`` embeds with the bf16 fast path; ``compare_engines`` adds the 10-fold
    accuracy, speed and deviation of every embedding path (torch fp32, onnxruntime, torch bf16).
    ``policy`` / ``on_bad`` / ``pairs_file``: the input rules, as for prepare_pairs; what they did
    is under ``input`` in the report.
    """
    t0 = time.perf_counter()
    pairs = prepare_pairs(lfw, model, folds=folds, policy=policy, on_bad=on_bad, pairs_file=pairs_file,
                          cache_dir=cache_dir, workers=workers, progress=progress)
    t_align = time.perf_counter() - t0
    eng = make_engine(model, kind=engine, precision=precision)
    chips = pairs.chips.chips
    emb = eng.embed(chips, batch_size=batch_size, progress=progress and "embedding")
    # Flip averaging: the mean of each chip's embedding and its mirror's (one extra pass, not two).
    mirrored = eng.embed(chips[:, :, ::-1], batch_size=batch_size, progress=progress and "embedding (mirrored)")
    emb_flip = (emb + mirrored) / 2
    t_embed = time.perf_counter() - t0 - t_align

    results: dict[str, VerificationResult] = {}
    for variant, e in (("", emb), ("+flip", emb_flip)):
        for metric in METRICS:
            results[metric + variant] = evaluate_embeddings(e[pairs.a], e[pairs.b], pairs.same,
                                                            pairs.folds, metric=metric)
    main = results["cosine"]
    report = {
        "model": model,
        "dataset": {"name": pairs.dataset.name, "layout": pairs.dataset.layout},
        "dataset_fingerprint": pairs.dataset.fingerprint,
        "n_pairs": len(pairs),
        "n_images": len(pairs.dataset.image_ids),
        "folds": sorted(int(f) for f in np.unique(pairs.folds)),
        "metric": main.metric,
        "accuracy_mean": main.accuracy_mean,
        "accuracy_std": main.accuracy_std,
        "matched_accuracy": main.matched_accuracy,
        "mismatched_accuracy": main.mismatched_accuracy,
        "auc": main.auc,
        "tar_at_far_1e-3": main.tar_at_far.get(1e-3),
        "tar_at_far_1e-2": main.tar_at_far.get(1e-2),
        "thresholds": main.thresholds,
        "alignment_paths": pairs.alignment_paths(),
        "skipped": [dict(s) if isinstance(s, dict) else vars(s) for s in pairs.dataset.skipped],
        "input": pairs.input_record(),
        "results": {name: r.to_dict() for name, r in results.items()},
        "timing_s": {"load_and_align": round(t_align, 2), "embed": round(t_embed, 2),
                     "total": round(time.perf_counter() - t0, 2)},
        "precision": getattr(eng, "precision", "fp32"),
        "engine": eng.describe(),
        "environment": environment(),
    }
    if compare_engines:
        report["embedding_paths"] = compare_embedding_paths(pairs, model, batch_size=batch_size, progress=progress)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "verify.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
        plot_roc({k: results[k] for k in ("cosine", "l2", "cosine+flip")}, out / "roc.png",
                 title=f"{model} on LFW ({len(pairs)} pairs)")
    return report


def compare_embedding_paths(pairs: PairChips, model: str, batch_size: int = 64, progress: bool = False) -> dict:
    """10-fold accuracy (cosine, L2), speed and max deviation from torch fp32 of every embedding path."""
    from .engine import import_onnxruntime

    paths = {"torch fp32": dict(kind="torch"), "torch bf16 (fast model)": dict(kind="torch", precision="bf16")}
    try:
        import_onnxruntime()
        paths["onnxruntime fp32"] = dict(kind="onnxruntime")
    except ImportError:
        pass
    chips, out, reference = pairs.chips.chips, {}, None
    for name, kwargs in paths.items():
        eng = make_engine(model, **kwargs)
        eng.embed(chips[:8], batch_size=8)  # warm-up outside the timing
        t0 = time.perf_counter()
        emb = eng.embed(chips, batch_size=batch_size, progress=progress and name)
        seconds = time.perf_counter() - t0
        reference = emb if reference is None else reference
        out[name] = {
            "cosine_accuracy_mean": evaluate_embeddings(emb[pairs.a], emb[pairs.b], pairs.same, pairs.folds).accuracy_mean,
            "l2_accuracy_mean": evaluate_embeddings(emb[pairs.a], emb[pairs.b], pairs.same, pairs.folds,
                                                    metric="l2").accuracy_mean,
            "max_abs_vs_torch_fp32": float(np.abs(emb - reference).max()),
            "images_per_s": round(len(chips) / seconds, 1),
            "engine": eng.describe(),
        }
    return out


def format_report(report: dict) -> str:
    """A readable table of every verification variant in ``report``."""
    rows = [f"{report['model']} on {report['n_pairs']} pairs, folds {report['folds']} "
            f"({report['n_images']} images; alignment {report['alignment_paths']})",
            f"{'variant':<13}{'accuracy':>18}{'matched':>10}{'mismatched':>12}{'AUC':>9}"
            f"{'TAR@1e-3':>10}{'TAR@1e-2':>10}"]
    for name, r in report["results"].items():
        acc = f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f}%"
        rows.append(f"{name:<13}{acc:>18}{100 * r['matched_accuracy']:>9.2f}%"
                    f"{100 * r['mismatched_accuracy']:>11.2f}%{r['auc']:>9.4f}"
                    f"{_pct(r.get('tar_at_far_1e-3')):>10}{_pct(r.get('tar_at_far_1e-2')):>10}")
    main = report["results"]["cosine"]
    rows.append("per-fold thresholds (cosine, fitted on the other folds): "
                + ", ".join(f"{t:.4f}" for t in main["thresholds"]))
    t = report["timing_s"]
    rows.append(f"embedding engine: {report['engine']['engine']} ({report['precision']})")
    for name, p in report.get("embedding_paths", {}).items():
        rows.append(f"  path {name:<24} cosine {100 * p['cosine_accuracy_mean']:.2f}%  L2 {100 * p['l2_accuracy_mean']:.2f}%  "
                    f"max |Δ| vs fp32 {p['max_abs_vs_torch_fp32']:.2g}  {p['images_per_s']:.0f} img/s")
    rows.append(f"time: {t['total']:.1f} s (load + align {t['load_and_align']:.1f} s, embed {t['embed']:.1f} s)")
    summary = format_input_summary(report.get("input", {}), "verify.json")
    return "\n".join(rows + ([summary] if summary else []))


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"

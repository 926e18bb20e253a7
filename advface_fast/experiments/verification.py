"""``advface verify``: LFW verification numbers of a model, every variant side by side.

pairs -> aligned chips (:mod:`advface_fast.pair_chips`) -> embeddings (:mod:`advface_fast.engine`) ->
the 10-fold protocol (:mod:`advface_fast.metrics`) -> report (JSON, ROC plot, a readable table).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..data.policy import InputPolicy
from ..engine import make_engine
from ..environment import environment
from ..fileio import write_json_atomic
from ..pair_chips import PairChips, format_input_summary, prepare_pairs
from ..metrics import METRICS, VerificationResult, evaluate_embeddings, plot_roc


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
            results[metric + variant] = evaluate_embeddings(e[pairs.query], e[pairs.gallery], pairs.same,
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
        write_json_atomic(out / "verify.json", report, indent=2)
        plot_roc({k: results[k] for k in ("cosine", "l2", "cosine+flip")}, out / "roc.png",
                 title=f"{model} on LFW ({len(pairs)} pairs)")
    return report


def compare_embedding_paths(pairs: PairChips, model: str, batch_size: int = 64, progress: bool = False) -> dict:
    """10-fold accuracy (cosine, L2), speed and max deviation from torch fp32 of every embedding path."""
    from ..engine import import_onnxruntime

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
            "cosine_accuracy_mean": evaluate_embeddings(emb[pairs.query], emb[pairs.gallery], pairs.same, pairs.folds).accuracy_mean,
            "l2_accuracy_mean": evaluate_embeddings(emb[pairs.query], emb[pairs.gallery], pairs.same, pairs.folds,
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

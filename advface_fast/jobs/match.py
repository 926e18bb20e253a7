"""The query side: defend each query the way the gallery was defended, then find its nearest
gallery images by cosine similarity.

Search: faiss (``IndexFlatIP`` on L2-normalised rows, exact) when it is installed, else a chunked
exact search in torch (``chunk`` gallery rows at a time, constant memory). Both are exact; they
can differ only in the last float bits of a score (BLAS summation order), so ties closer than
~1e-6 may come out in another order. Results: for each query its top-k (id, score) by decreasing
score (ties by gallery row), and the accept decision ``score >= threshold`` when a threshold is
known: given (``threshold=``), or read from a calibration file (``threshold_from=``): a JSON
object with ``"threshold"`` (or ``{"calibration": {"threshold": ...}}``, or per-fold
``"thresholds"``, whose mean is used and said so), or a ``defend.json`` whose calibration of the
gallery's own D is taken, checked against the gallery's config).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .shard_store import GalleryStore
from .sources import ImageRef
from .worker import GalleryConfig, ShardWorker


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def search(gallery: np.ndarray, queries: np.ndarray, top_k: int = 5, backend: str = "auto",
           chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k: (scores Q x k float32, rows Q x k int64), best first, ties by row."""
    g, q = _normalise(gallery), _normalise(queries)
    k = min(top_k, len(g))
    if backend == "auto":
        backend = "faiss" if faiss_available() else "torch"
    if k == 0:
        return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatIP(g.shape[1])
        index.add(g)
        scores, rows = index.search(q, k)
        return _tie_order(scores, rows.astype(np.int64))
    if backend != "torch":
        raise ValueError(f"unknown search backend {backend!r}; expected auto, faiss or torch")
    qt = torch.from_numpy(q)
    best_s = torch.full((len(q), 0), -np.inf)
    best_r = torch.zeros((len(q), 0), dtype=torch.int64)
    for start in range(0, len(g), chunk):
        s = qt @ torch.from_numpy(g[start : start + chunk]).T
        cs, cr = torch.topk(s, min(k, s.shape[1]), dim=1)
        best_s, order = torch.topk(torch.cat([best_s, cs], 1), min(k, best_s.shape[1] + cs.shape[1]), dim=1)
        best_r = torch.gather(torch.cat([best_r, cr + start], 1), 1, order)
    return _tie_order(best_s.numpy(), best_r.numpy())


def _tie_order(scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((rows, -scores), axis=1) if scores.size else np.zeros_like(rows)
    return np.take_along_axis(scores, order, 1).astype(np.float32), np.take_along_axis(rows, order, 1)


def read_threshold(path: str | Path, config: GalleryConfig | None = None) -> tuple[float, str]:
    """(threshold, where it came from) from a calibration JSON (see the module docstring).

    A ``defend.json`` (``advface defend``) holds one calibration per D: with the gallery's
    ``config`` the one of the same D (defense, eps, step count) is taken, after checking that the
    model, objective, seed and gradient precision are the gallery's too (a threshold fitted for
    another D would decide with the wrong scale); any difference is refused, naming it."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"--threshold-from {path}: cannot read it as JSON ({err})") from None
    if isinstance(obj, dict) and isinstance(obj.get("thresholds"), dict) and "defended" in obj["thresholds"]:
        return _defend_report_threshold(obj, path, config)
    for holder in (obj, obj.get("calibration") if isinstance(obj, dict) else None):
        if isinstance(holder, dict):
            if isinstance(holder.get("threshold"), (int, float)):
                return float(holder["threshold"]), f"{path} (threshold)"
            ts = holder.get("thresholds")
            if isinstance(ts, list) and ts and all(isinstance(t, (int, float)) for t in ts):
                return float(np.mean(ts)), f"{path} (mean of {len(ts)} per-fold thresholds)"
    raise ValueError(f'--threshold-from {path}: no "threshold" or "thresholds" found (expected e.g. '
                     '{"threshold": 0.42}, {"calibration": {"thresholds": [...]}} or a defend.json)')


def _defend_report_threshold(report: dict, path: Path, config: GalleryConfig | None) -> tuple[float, str]:
    entries = report["thresholds"]["defended"]
    have = ", ".join(f"{e['defense']} eps {e['defense_eps']:g} steps {'/'.join(e['per_step'])}" for e in entries)
    if config is None:
        raise ValueError(f"--threshold-from {path}: a defend.json holds one calibration per D ({have}); "
                         "it can only be read against a gallery's D")
    rc = report.get("config", {})
    gradients = report.get("precision", {}).get("gradients")
    differ = [f"{what}: calibrated {a!r}, gallery {b!r}" for what, a, b in (
        ("model", report.get("model"), config.model), ("objective", rc.get("objective"), config.objective),
        ("seed", rc.get("seed"), config.seed), ("precision", gradients, config.precision)) if a != b]
    if differ:
        raise ValueError(f"--threshold-from {path}: calibrated for another D than this gallery's ("
                         + "; ".join(differ) + ")")
    for e in entries:
        if e["defense"] == config.defense and float(e["defense_eps"]) == float(config.eps):
            step = e["per_step"].get(str(config.steps))
            if step is not None:
                ts = [float(t) for t in step["per_fold"].values()]
                return float(np.mean(ts)), (f"{path} (D = {config.defense} eps {config.eps:g}, {config.steps} steps: "
                                            f"mean of {len(ts)} per-fold thresholds, "
                                            f"{'full protocol' if e.get('full_protocol') else 'subset calibration'})")
    raise ValueError(f"--threshold-from {path}: no calibration of this gallery's D ({config.defense} eps "
                     f"{config.eps:g}, {config.steps} steps); it has: {have}")


def match(gallery_dir: str | Path, queries: list[ImageRef], top_k: int = 5, threshold: float | None = None,
          threshold_source: str | None = None, backend: str = "auto", device: str | None = None,
          model_factory: Callable | None = None) -> dict:
    """Defend each query with the gallery's D and search the defended gallery (see the module docstring)."""
    store = GalleryStore(gallery_dir)
    cfg = store.config()
    if cfg is None:
        raise FileNotFoundError(f"--gallery {gallery_dir}: not a gallery store (no config.json)")
    worker = ShardWorker(GalleryConfig(**cfg["options"]), device, model_factory)
    worker.bad_remedy = "remove it from --query (queries follow the input rules the gallery was built with)"
    worker.suggest_convert = False
    if worker.weights_sha256 != cfg["weights_sha256"]:
        raise ValueError(f"the model's weights (sha256 {worker.weights_sha256[:12]}) differ from the ones that made "
                         f"the gallery ({cfg['weights_sha256'][:12]})")
    ids, emb = store.embeddings()
    if not ids:
        raise ValueError(f"the gallery {gallery_dir} holds no embedded images yet")
    loaded = [worker.load(r) for r in queries]
    good = [i for i, (_, status, _) in enumerate(loaded) if status == "ok"]
    results = [{"query": r.id, "path": r.path, "status": status, "error": error, "matches": []}
               for r, (_, status, error) in zip(queries, loaded)]
    backend_used = backend if backend != "auto" else ("faiss" if faiss_available() else "torch")
    if good:
        x = torch.from_numpy(np.stack([loaded[i][0] for i in good])).permute(0, 3, 1, 2).float().div_(255.0)
        qids = [queries[i].id for i in good]
        q_emb = worker.defended(x.to(worker.device), qids)[0]
        scores, rows = search(emb, q_emb, top_k, backend_used)
        for j, i in enumerate(good):
            results[i]["matches"] = [
                {"id": ids[r], "score": float(s), **({"accept": bool(s >= threshold)} if threshold is not None else {})}
                for s, r in zip(scores[j], rows[j])]
    return {"gallery": str(gallery_dir), "gallery_images": len(ids), "top_k": top_k, "search": backend_used,
            "threshold": threshold, "threshold_source": threshold_source if threshold is not None else None,
            "defense": cfg["defense"], "results": results}


def format_matches(report: dict) -> str:
    lines = [f"{len(report['results'])} queries against {report['gallery_images']} defended gallery images "
             f"(search: {report['search']})"]
    if report["threshold"] is None:
        lines.append("no calibrated threshold is known: scores only (give --threshold-from FILE or --threshold X "
                     "for accept / reject decisions)")
    else:
        lines.append(f"accept when cosine >= {report['threshold']:.4f} (from {report['threshold_source']})")
    for r in report["results"]:
        if r["status"] != "ok":
            lines.append(f"{r['query']}: not matched ({r['status']}: {r['error']})")
            continue
        lines.append(f"{r['query']}:")
        for n, m in enumerate(r["matches"], 1):
            decision = "" if "accept" not in m else ("  accept" if m["accept"] else "  reject")
            lines.append(f"  {n:>2}. {m['score']:+.4f}  {m['id']}{decision}")
    return "\n".join(lines)


__all__ = ["faiss_available", "format_matches", "match", "read_threshold", "search"]

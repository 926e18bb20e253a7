"""`advface cache info|prune`: what each cache under the cache root holds, and removing what no
current code can use. It imports the stores it inspects (their key schemes and layouts); nothing
below imports it."""

from __future__ import annotations

import json
from pathlib import Path

from .cache import default_cache_root
from .experiments.defended import DEFENDED_SCHEME
from .experiments.runner import EMBEDDINGS_SCHEME, ROWS_SCHEME
from .fileio import is_temp_name
from .pair_chips import CHIP_CACHE_SCHEME
from .store import FORMAT, META, entry_dirs, leftovers, remove

# What the caches hold, and removing what no current code can use (`advface cache info|prune`)

CACHES = {
    "chips": "aligned face chips: <key>/chips.npy + index.json (+ partial/ of an unfinished run); "
             "key = config_key(kind, dataset scheme, aligner settings, aligner/library version, model files)",
    "attacks": "attacked queries per pair id (experiments runner): <key>/meta.json + chunk-*.npz; "
               "key = config_key(scheme, model, weights, data, alignment, metric, seed, thresholds, attack)",
    "embeddings": "the plain model's clean embeddings per chip id (experiments runner): <key>/meta.json + "
                  "chunk-*.npz; key = config_key(scheme, model, weights, alignment, batch size)",
    "defended": "attack-as-defense embeddings per image id (experiments.defended): <key>/meta.json + "
                "chunk-*.npz; key = config_key(scheme, alignment, weights, D's step config)",
    "onnx": "ONNX exports: <model>-<key>.onnx; key = config_key(model, weights, opset, torch, exporter)",
    "models": "converted weights: <model>-<sha256 of the source file>.safetensors",
}
_DATA = ("lfw_home",)  # data, not cache: listed, never pruned


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _chip_entries(folder: Path, current_scheme: str):
    """(entry path, status, details) for every chip cache entry."""
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        details, status = {}, "ok"
        try:
            index = json.loads((d / "index.json").read_text())
            meta = index["meta"]
            details = {"chips": len(index["ids"]), "scheme": meta.get("dataset"), "align": meta.get("align"),
                       "aligner": meta.get("aligner", "dlib"), "dlib": meta.get("dlib"), "created": index.get("created")}
            if meta.get("dataset") != current_scheme:
                status = "old key scheme"
        except FileNotFoundError:
            status = "partial (resumable)" if (d / "partial").is_dir() else "empty"
        except (OSError, ValueError, KeyError, TypeError):
            status = "damaged index"
        if (d / "partial").is_dir() and status == "ok":
            details["leftover_partial"] = True
        yield d, status, details


def cache_info(root: str | Path | None = None) -> dict:
    """Every cache under ``root`` (default: :func:`default_cache_root`): its entries, sizes, key
    scheme and whether the current code can still use each entry."""
    root = Path(root) if root is not None else default_cache_root()
    out = {"root": str(root), "caches": {}}
    for name, scheme in CACHES.items():
        folder = root / name
        entries = []
        if folder.is_dir():
            if name == "chips":
                for d, status, details in _chip_entries(folder, CHIP_CACHE_SCHEME):
                    entries.append({"path": str(d), "bytes": _size(d), "status": status, **details})
            elif name in ("attacks", "defended", "embeddings"):
                for d in entry_dirs(folder):
                    try:
                        meta = json.loads((d / META).read_text())
                        cfg = meta["config"]
                        scheme = {"attacks": ROWS_SCHEME, "defended": DEFENDED_SCHEME}.get(name, EMBEDDINGS_SCHEME)
                        ok = meta.get("format") == FORMAT and cfg.get("scheme") == scheme
                        details = {"scheme": cfg.get("scheme"), "model": cfg.get("model"),
                                   "attack": (cfg.get("attack") or {}).get("name"),
                                   "eps": (cfg.get("attack") or {}).get("eps"),
                                   "chunks": len(list(d.glob("chunk-*.npz")))}
                        status = "ok" if ok else "old key scheme"
                    except (OSError, ValueError, KeyError, TypeError, AttributeError):
                        details, status = {}, "damaged meta"
                    entries.append({"path": str(d), "bytes": _size(d), "status": status, **details})
                for f in sorted(folder.glob("*.npz")):  # v1: one whole-row file keyed by position
                    entries.append({"path": str(f), "bytes": _size(f), "status": "old key scheme",
                                    "scheme": "attack-rows-v1 (pair position)"})
            else:
                for f in sorted(p for p in folder.iterdir() if p.is_file() and not is_temp_name(p.name)):
                    entries.append({"path": str(f), "bytes": _size(f), "status": "ok"})
        left = leftovers(folder)
        out["caches"][name] = {"path": str(folder), "key_scheme": scheme, "entries": entries,
                               "bytes": _size(folder), "leftovers": [str(p) for p in left]}
    for name in _DATA:
        if (root / name).exists():
            out["caches"][name] = {"path": str(root / name), "key_scheme": "data (never pruned)", "entries": [],
                                   "bytes": _size(root / name), "leftovers": []}
    known = set(CACHES) | set(_DATA)
    out["unknown"] = [{"path": str(p), "bytes": _size(p)} for p in sorted(root.iterdir()) if p.name not in known] \
        if root.is_dir() else []
    return out


def cache_prune(root: str | Path | None = None, dry_run: bool = False) -> dict:
    """Remove what no current code can use: entries of old key schemes, damaged entries,
    temporary files of killed writers, partial checkpoints left beside a complete entry, and
    folders of removed features (e.g. ``tuning/``). Resumable partial runs and data are kept.
    Returns ``{"removed": [{path, bytes, why}], "bytes": total, "dry_run": ...}``."""
    root = Path(root) if root is not None else default_cache_root()
    info = cache_info(root)
    doomed = []
    for name, cache in info["caches"].items():
        if name in _DATA:
            continue
        for e in cache["entries"]:
            if e["status"] in ("old key scheme", "damaged index", "damaged meta", "empty"):
                doomed.append((Path(e["path"]), e["bytes"], e["status"]))
            elif e.get("leftover_partial"):
                p = Path(e["path"]) / "partial"
                doomed.append((p, _size(p), "partial checkpoints of a complete entry"))
        doomed += [(Path(p), _size(Path(p)), "temporary or damaged file") for p in cache["leftovers"]]
    doomed += [(Path(u["path"]), u["bytes"], "not a cache of this version") for u in info["unknown"]
               if Path(u["path"]).name == "tuning"]
    removed = []
    for path, size, why in doomed:
        if not dry_run:
            remove(path)
        removed.append({"path": str(path), "bytes": size, "why": why})
    return {"root": str(root), "removed": removed, "bytes": sum(r["bytes"] for r in removed), "dry_run": dry_run}

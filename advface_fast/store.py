"""The one on-disk store: entries keyed by a config dict, items keyed by id, appended in chunks.

Layout of a store rooted at ``root`` (every file is plain JSON or NumPy ``.npz``)::

    root/<key>/meta.json                       {"format", "key", "kind", "config", "created"}
    root/<key>/chunk-<time_ns>-<rand>.npz      one appended batch: "ids" (str) + one array per
                                               field (first axis = item) + "stats" (JSON text)

``key = config_key(**config)``: the config names everything the items depend on (model weights
identity, data, alignment, attack config, seed, ...), so a change of any of them is a new entry
and an equal config finds the old one. Items are keyed by id (a pair id, an image id), never by
position, so two runs over overlapping selections share what they have in common.

Writing is append-only: each batch becomes one new chunk file (unique temporary name, fsync,
``os.replace``), so an interrupted run keeps every finished batch and nothing is ever rewritten.
Reading merges the chunks. ``.npz`` members carry CRC-32 checksums, so a damaged chunk (truncated,
flipped bytes, wrong fields) is detected when it is read; it is then reported with a
``RuntimeWarning``, renamed to ``*.damaged`` (kept for inspection, removed by ``advface cache
prune``) and its items are computed again by the caller — never trusted, never silently replaced.
``compact()`` merges the chunks of an entry into one.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
import warnings
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from .cache import config_key
from .fileio import atomic_write, is_temp_name, write_json_atomic

FORMAT = 1
META = "meta.json"
CHUNK_GLOB = "chunk-*.npz"
DAMAGED_SUFFIX = ".damaged"


def _compressed(path: Path) -> bool:
    """Whether every member of an .npz chunk is deflated (np.savez_compressed)."""
    try:
        with zipfile.ZipFile(path) as z:
            return all(info.compress_type != zipfile.ZIP_STORED for info in z.infolist())
    except (OSError, zipfile.BadZipFile):
        return True  # unreadable: read() reports it; nothing to rewrite here


def normalise_config(config: Mapping) -> dict:
    """The config as it reads back from JSON (tuples become lists, paths strings, ...)."""
    return json.loads(json.dumps(dict(config), sort_keys=True, default=str))


@dataclass
class Items:
    """What an entry holds: ``ids`` in chunk order, one array per field (row i = ``ids[i]``) and
    the summed numeric ``stats`` of the chunks read."""

    ids: list[str] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def row(self) -> dict[str, int]:
        return {item_id: i for i, item_id in enumerate(self.ids)}

    def take(self, ids: Iterable[str], name: str) -> np.ndarray:
        """``arrays[name]`` for ``ids``, in that order (KeyError names the first missing id)."""
        row = self.row()
        ids = list(ids)
        missing = [i for i in ids if i not in row]
        if missing:
            raise KeyError(f"{len(missing)} ids not in the entry, e.g. {missing[0]!r}")
        return self.arrays[name][np.array([row[i] for i in ids], dtype=np.int64)]


class Entry:
    """One entry of a :class:`Store`: ``<root>/<config_key(**config)>/``."""

    def __init__(self, root: str | Path, config: Mapping, kind: str = "items"):
        self.config = normalise_config(config)
        self.kind = kind
        self.key = config_key(**self.config)
        self.dir = Path(root) / self.key
        self._meta_checked = False

    # -- writing ----------------------------------------------------------------------------------

    def _ensure_meta(self) -> None:
        if self._meta_checked:
            return
        path = self.dir / META
        if path.exists():
            self._check_meta()
        else:
            write_json_atomic(path, {"format": FORMAT, "key": self.key, "kind": self.kind, "config": self.config,
                                     "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        self._meta_checked = True

    def append(self, ids: Iterable[str], arrays: Mapping[str, np.ndarray], stats: Mapping | None = None, *,
               compress: bool = False) -> Path:
        """Store one batch of items as a new chunk; returns its path."""
        ids = [str(i) for i in ids]
        if len(set(ids)) != len(ids):
            raise ValueError("ids must be unique within a chunk")
        arrays = {name: np.asarray(a) for name, a in arrays.items()}
        for name, a in arrays.items():
            if name in ("ids", "stats"):
                raise ValueError(f"field name {name!r} is reserved")
            if a.dtype == object or len(a) != len(ids):
                raise ValueError(f"field {name!r}: expected {len(ids)} rows of a plain dtype, got {a.dtype} {a.shape}")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._ensure_meta()
        target = self.dir / f"chunk-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.npz"
        save = np.savez_compressed if compress else np.savez
        with atomic_write(target) as tmp, open(tmp, "wb") as f:
            save(f, ids=np.array(ids, dtype=str), stats=np.array(json.dumps(dict(stats or {}))), **arrays)
        return target

    # -- reading ----------------------------------------------------------------------------------

    def _check_meta(self) -> bool:
        path = self.dir / META
        try:
            meta = json.loads(path.read_text())
            if meta.get("format") != FORMAT or meta.get("key") != self.key or meta.get("config") != self.config:
                raise ValueError("format, key or config differ from the expected ones")
            return True
        except (OSError, ValueError) as err:
            # Without trustworthy metadata no chunk of the entry can be trusted: set it all aside.
            self._quarantine(self.dir, f"{META}: {err}")
            self._meta_checked = False
            return False

    def _quarantine(self, path: Path, err) -> None:
        dest = path.with_name(path.name + DAMAGED_SUFFIX)
        if path.is_dir() and dest.exists():
            dest = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}{DAMAGED_SUFFIX}")
        warnings.warn(f"damaged store file {path} ({err}); not trusted: its items will be computed again "
                      f"(kept as {dest.name} for inspection; `advface cache prune` removes it)",
                      RuntimeWarning, stacklevel=4)
        try:
            path.replace(dest)
        except OSError:
            pass

    def chunks(self) -> list[Path]:
        return sorted(self.dir.glob(CHUNK_GLOB)) if self.dir.is_dir() else []

    def _read_chunk(self, path: Path) -> tuple[list[str], dict[str, np.ndarray], dict]:
        with np.load(path, allow_pickle=False) as z:
            data = {name: z[name] for name in z.files}  # reads every member: CRC-checked
        ids = [str(i) for i in data.pop("ids")]
        stats = json.loads(str(data.pop("stats")))
        if not isinstance(stats, dict) or any(len(a) != len(ids) for a in data.values()):
            raise ValueError("fields do not match the ids")
        return ids, data, stats

    def read(self) -> Items:
        """Every trusted item of the entry (damaged chunks are reported and left out)."""
        chunks = self.chunks()
        if not chunks or ((self.dir / META).exists() and not self._check_meta()):
            return Items()
        if not (self.dir / META).exists():
            self._quarantine(self.dir, f"chunks without {META}")
            return Items()
        ids: list[str] = []
        parts: dict[str, list[np.ndarray]] = {}
        stats: dict[str, float] = {}
        seen: set[str] = set()
        for path in chunks:
            try:
                c_ids, c_arrays, c_stats = self._read_chunk(path)
                if parts and set(c_arrays) != set(parts):
                    raise ValueError(f"fields {sorted(c_arrays)} differ from {sorted(parts)}")
            except Exception as err:  # a damaged zip can raise almost anything; never trust it
                self._quarantine(path, err)
                continue
            keep = np.array([i not in seen for i in c_ids], dtype=bool)  # a concurrent writer's duplicate
            seen.update(c_ids)
            ids += [i for i, k in zip(c_ids, keep) if k]
            for name, a in c_arrays.items():
                parts.setdefault(name, []).append(a[keep])
            for name, v in c_stats.items():
                if isinstance(v, (int, float)):
                    stats[name] = stats.get(name, 0) + v
        return Items(ids, {name: np.concatenate(a) for name, a in parts.items()}, stats)

    def compact(self) -> None:
        """Merge every chunk into one, compressed (readers never see a state where items are missing).
        Appending uncompressed and compacting once compresses every item once."""
        chunks = self.chunks()
        if not chunks or len(chunks) == 1 and _compressed(chunks[0]):
            return
        items = self.read()
        chunks = [c for c in chunks if c.exists()]  # damaged ones were renamed
        if not items.ids:
            return
        self.append(items.ids, items.arrays, items.stats, compress=True)
        for c in chunks:
            c.unlink(missing_ok=True)

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.rglob("*") if p.is_file()) if self.dir.is_dir() else 0


class Store:
    """A folder of entries; ``store.entry(config)`` opens (or will create) one."""

    def __init__(self, root: str | Path, kind: str = "items"):
        self.root = Path(root)
        self.kind = kind

    def entry(self, config: Mapping) -> Entry:
        return Entry(self.root, config, kind=self.kind)


def entry_dirs(root: str | Path) -> list[Path]:
    """Every entry folder under ``root`` (those holding a meta.json or chunks)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.endswith(DAMAGED_SUFFIX)
                  and ((d / META).exists() or any(d.glob(CHUNK_GLOB))))


def leftovers(root: str | Path) -> list[Path]:
    """Temporary files of killed writers and quarantined damaged files under ``root``."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.rglob("*") if (p.is_file() and is_temp_name(p.name)) or p.name.endswith(DAMAGED_SUFFIX)]
    return sorted(p for p in found if not any(q in p.parents for q in found))  # a damaged folder covers its files


def remove(path: Path) -> int:
    """Delete a file or folder; returns the bytes freed."""
    if path.is_dir():
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        shutil.rmtree(path, ignore_errors=True)
        return size
    size = path.stat().st_size if path.exists() else 0
    path.unlink(missing_ok=True)
    return size


__all__ = ["Entry", "Items", "Store", "entry_dirs", "leftovers", "normalise_config", "remove"]

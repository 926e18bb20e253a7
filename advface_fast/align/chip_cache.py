"""On-disk cache of aligned face chips.

An entry is a folder `<cache_dir>/<key>/` holding

- `chips.npy`: every chip as one uint8 array N x S x S x 3 (loaded memory-mapped, read-only);
- `index.json`: ids and detector paths (row order of `chips.npy`), the metadata the key was made
  from, and the byte size and sha256 of `chips.npy`;
- `partial/`: checkpoints of an alignment run that has not finished yet (one `.npz` per chunk).

`key` is `config_key(**meta)`, where `meta` names everything the chips depend on (dataset
fingerprint, alignment settings, dlib version, model files). Every file is written to a temporary
name and moved into place with `os.replace`, and an entry is only trusted when its index parses,
its metadata matches and `chips.npy` has the recorded size and sha256; anything else is ignored
(with a warning) and rebuilt by the caller.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from advface_fast.cache import config_key
from advface_fast.fileio import atomic_write, sha256_file, write_json_atomic

# How an image got its face box: dlib's HOG detector, dlib's CNN (MMOD) detector, MTCNN, or the
# fixed centre box (no detector found a face).
ALIGN_PATHS = ("hog", "cnn", "mtcnn", "center")

INDEX_FORMAT = 1


@dataclass(frozen=True)
class AlignedChips:
    """Aligned chips (uint8 N x S x S x 3 RGB) with their image ids and the detector path each took."""

    chips: np.ndarray
    ids: list[str]
    paths: list[str]
    _row: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.chips.dtype != np.uint8 or self.chips.ndim != 4 or self.chips.shape[3] != 3:
            raise ValueError(f"chips must be uint8 N x S x S x 3, got {self.chips.dtype} {self.chips.shape}")
        if not (len(self.chips) == len(self.ids) == len(self.paths)):
            raise ValueError(f"{len(self.chips)} chips, {len(self.ids)} ids, {len(self.paths)} paths")
        row = {image_id: i for i, image_id in enumerate(self.ids)}
        if len(row) != len(self.ids):
            raise ValueError("ids must be unique")
        object.__setattr__(self, "_row", row)

    def __len__(self) -> int:
        return len(self.ids)

    def index(self, image_id: str) -> int:
        """Row of `image_id` in `chips` (KeyError if absent)."""
        return self._row[image_id]

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._row

    def path_counts(self) -> dict[str, int]:
        """Number of images per detector path, e.g. {'hog': 7690, 'cnn': 9, 'center': 2}."""
        counts = {path: 0 for path in ALIGN_PATHS}
        counts.update(Counter(self.paths))
        return counts

    def subset(self, ids: Sequence[str]) -> "AlignedChips":
        """The chips of `ids`, in that order (no copy when it is already this order)."""
        ids = list(ids)
        if ids == self.ids:
            return self
        rows = np.array([self._row[i] for i in ids], dtype=np.int64)
        return AlignedChips(np.asarray(self.chips[rows]), ids, [self.paths[r] for r in rows])


def concat_chips(parts: Sequence[AlignedChips]) -> AlignedChips:
    """All parts, in order, in one in-memory AlignedChips."""
    if not parts:
        raise ValueError("nothing to concatenate")
    return AlignedChips(
        np.concatenate([np.asarray(p.chips) for p in parts]),
        [i for p in parts for i in p.ids],
        [s for p in parts for s in p.paths],
    )


def _normalised(meta: dict) -> dict:
    # What the metadata looks like after a JSON round trip (tuples become lists, ...).
    return json.loads(json.dumps(meta, sort_keys=True, default=str))


class ChipCache:
    """One cache entry, `<cache_dir>/<config_key(**meta)>/`."""

    def __init__(self, cache_dir: str | Path, meta: dict):
        self.meta = _normalised(meta)
        self.key = config_key(**self.meta)
        self.dir = Path(cache_dir) / self.key
        self.chips_path = self.dir / "chips.npy"
        self.index_path = self.dir / "index.json"
        self.partial_dir = self.dir / "partial"

    # -- complete entry ---------------------------------------------------------------------------

    def load(self, verify: bool = True) -> AlignedChips | None:
        """The cached chips (memory-mapped, read-only), or None when absent or not trustworthy.

        `verify` also checks the sha256 of `chips.npy` (reads the whole file once, ~0.5 s per GB).
        """
        if not self.index_path.exists():
            return None
        try:
            index = json.loads(self.index_path.read_text())
            if index.get("format") != INDEX_FORMAT or index.get("key") != self.key:
                raise ValueError("index format or key mismatch")
            if index.get("meta") != self.meta:
                raise ValueError("metadata mismatch")
            ids, paths = list(index["ids"]), list(index["paths"])
            if self.chips_path.stat().st_size != index["npy_bytes"]:
                raise ValueError("chips.npy has the wrong size (partial write?)")
            if verify and sha256_file(self.chips_path) != index["npy_sha256"]:
                raise ValueError("chips.npy sha256 mismatch")
            chips = np.load(self.chips_path, mmap_mode="r", allow_pickle=False)
            if list(chips.shape) != [len(ids)] + list(index["chip_shape"]):
                raise ValueError(f"chips.npy shape {chips.shape} does not match the index")
            if any(p not in ALIGN_PATHS for p in paths):
                raise ValueError("unknown detector path in index")
            return AlignedChips(chips, ids, paths)
        except (OSError, ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
            warnings.warn(f"ignoring unusable chip cache {self.dir}: {err}", RuntimeWarning, stacklevel=2)
            return None

    def save(self, parts: Sequence[AlignedChips]) -> None:
        """Write the concatenation of `parts` as this entry, replacing any previous one atomically."""
        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError("nothing to save")
        ids = [i for p in parts for i in p.ids]
        if len(set(ids)) != len(ids):
            raise ValueError("ids must be unique across parts")
        chip_shape = parts[0].chips.shape[1:]
        if any(p.chips.shape[1:] != chip_shape for p in parts):
            raise ValueError("parts have different chip shapes")
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.chips_path) as tmp:
            # Fill the file row block by row block: the full set never has to sit in memory twice.
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(ids),) + chip_shape)
            row = 0
            for p in parts:
                out[row : row + len(p)] = p.chips
                row += len(p)
            out.flush()
            del out
            index = {
                "format": INDEX_FORMAT,
                "key": self.key,
                "meta": self.meta,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "chip_shape": list(chip_shape),
                "npy_bytes": tmp.stat().st_size,
                "npy_sha256": sha256_file(tmp),
                "path_counts": dict(Counter(s for p in parts for s in p.paths)),
                "ids": ids,
                "paths": [s for p in parts for s in p.paths],
            }
        write_json_atomic(self.index_path, index)

    # -- checkpoints of an unfinished run ---------------------------------------------------------

    def save_checkpoint(self, part: AlignedChips) -> None:
        """Store one chunk of a running alignment so an interrupted run can resume from it."""
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        # Time-ordered names, so resumed chunks are merged in the order they were aligned.
        target = self.partial_dir / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:6]}.npz"
        with atomic_write(target) as tmp, open(tmp, "wb") as f:
            np.savez(f, key=np.array(self.key), chips=np.asarray(part.chips),
                     ids=np.array(part.ids, dtype=str), paths=np.array(part.paths, dtype=str))

    def load_checkpoints(self) -> list[AlignedChips]:
        """Valid checkpoints left by unfinished runs (unreadable ones are skipped with a warning)."""
        parts = []
        for path in sorted(self.partial_dir.glob("part-*.npz")):
            try:
                with np.load(path, allow_pickle=False) as z:
                    if str(z["key"]) != self.key:
                        raise ValueError("key mismatch")
                    paths = [str(s) for s in z["paths"]]
                    if any(p not in ALIGN_PATHS for p in paths):
                        raise ValueError("unknown detector path")
                    parts.append(AlignedChips(z["chips"], [str(i) for i in z["ids"]], paths))
            except Exception as err:  # a damaged zip can raise almost anything; never trust it
                warnings.warn(f"ignoring unusable chip checkpoint {path}: {err}", RuntimeWarning, stacklevel=2)
        return parts

    def clear_checkpoints(self) -> None:
        shutil.rmtree(self.partial_dir, ignore_errors=True)


def unique_in_order(ids: Iterable[str]) -> list[str]:
    """`ids` without repeats, first occurrences kept in order."""
    return list(dict.fromkeys(ids))

"""The gallery store on disk: safetensors shards, a SQLite manifest, a JSON config.

Layout of ``DIR``::

    DIR/config.json                   what every row depends on (model weights, D, seed, alignment,
                                      shard size, the input rules, the id set); written once, checked
                                      on every rerun
    DIR/shards/shard-000042.safetensors
        tensors   "embeddings"  float32 (n_ok, D): defended embeddings, one row per embedded image
                  "chips"       uint8 (n_ok, H, W, 3): the defended chips (only with --save-chips)
        metadata  "format", "shard", "config_sha256",
                  "ids"   JSON list: the id of each row of "embeddings"
                  "rows"  JSON list of [id, row or null, status, error] for EVERY id of the shard,
                          so the manifest can always be rebuilt from the shards alone
    DIR/calibration.json              the defense's calibrated threshold, when one was given
                                      (``advface gallery --threshold-from FILE``); match decides with it
    DIR/manifest.sqlite
        images(id PRIMARY KEY, shard, row, status, error, path)   status: ok | bad | no_face
        shards(shard PRIMARY KEY, file, sha256, n_images, n_ok, image_steps, seconds, worker, finished)
        runs(run PRIMARY KEY, started, finished, executor, rank, world_size, shards, images,
             image_steps, seconds, model_seconds, record)           record: JSON (config, versions, ...)

Commit protocol. A shard is written under a temporary name, fsync'ed and renamed into place
(:func:`advface_fast.fileio.atomic_write`); only then does one SQLite transaction insert its image
rows and its ``shards`` row. A crash before the rename leaves a temporary file (removed on the next
start); a crash between the rename and the commit leaves a complete shard the manifest does not
list yet: the next start verifies it and commits its rows (:meth:`GalleryStore.adopt`), so it is
not computed again. A shard listed in ``shards`` is done and is never redone.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import sqlite3
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..fileio import atomic_write, is_temp_name, sha256_file, write_json_atomic
from .sharding import shard_name

SHARD_FORMAT = "advface-gallery-shard-v1"
CONFIG = "config.json"
CALIBRATION = "calibration.json"
MANIFEST = "manifest.sqlite"
SHARDS = "shards"
LOCK = ".lock"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (id TEXT PRIMARY KEY, shard INTEGER NOT NULL, row INTEGER,
    status TEXT NOT NULL, error TEXT, path TEXT);
CREATE TABLE IF NOT EXISTS shards (shard INTEGER PRIMARY KEY, file TEXT NOT NULL, sha256 TEXT NOT NULL,
    n_images INTEGER NOT NULL, n_ok INTEGER NOT NULL, image_steps INTEGER, seconds REAL, worker TEXT,
    finished TEXT);
CREATE TABLE IF NOT EXISTS runs (run INTEGER PRIMARY KEY AUTOINCREMENT, started TEXT, finished TEXT,
    executor TEXT, rank INTEGER, world_size INTEGER, shards INTEGER, images INTEGER, image_steps INTEGER,
    seconds REAL, model_seconds REAL, record TEXT);
"""


class StoreBusy(ValueError):
    """Another process holds the store's lock."""


class ConfigChanged(ValueError):
    """The store was made with another config; never mix two configs in one store."""


def config_sha256(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


# What a user changes to change a config key (for the refusal message).
_OPTION = {"model": "--model", "weights_sha256": "the model weights", "defense": "the defense D (--defense*)",
           "seed": "--seed", "alignment": "the alignment (--aligned / the model's aligner)",
           "shard_size": "--shard-size", "ids_sha256": "the set of input images (--input)",
           "n_images": "the set of input images (--input)", "save_chips": "--save-chips",
           "input": "the input rules (--on-bad / --no-face)", "format": "the store format"}


# The command-line option of each recorded job option.
_FLAG = {"model": "--model", "defense": "--defense", "eps": "--defense-eps", "steps": "--defense-steps",
         "objective": "--defense-objective", "seed": "--seed", "aligned": "--aligned", "shard_size": "--shard-size",
         "batch_size": "--batch-size", "precision": "--precision", "save_chips": "--save-chips",
         "on_bad": "--on-bad", "no_face": "--no-face"}
# Keys that follow from the options: named only when no option explains the change.
_DERIVED = ("model", "defense", "seed", "alignment.aligned", "shard_size", "save_chips", "input")


def describe_changes(old: dict, new: dict) -> str:
    """The differences of two store configs, in command-line terms where possible."""
    a, b = _flat(old), _flat(new)
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]
    shown = [k for k in changed if k.startswith("options.") or not k.startswith(_DERIVED)] or changed
    lines = []
    for key in shown:
        top = key.split(".")[0]
        what = _FLAG.get(key.split(".", 1)[1], key) if top == "options" else _OPTION.get(top, top)
        lines.append(f"{what}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}"
                     + ("" if what == key else f" ({key})"))
    return "; ".join(lines)


def encode_shard(k: int, config_sha: str, rows: list, embeddings: np.ndarray, chips: np.ndarray | None) -> bytes:
    """The bytes of one shard file (safetensors). ``rows``: [id, row or None, status, error] per id."""
    from safetensors.numpy import save

    ids = [r[0] for r in rows if r[2] == "ok"]
    if len(ids) != len(embeddings):
        raise ValueError(f"{len(ids)} ok rows but {len(embeddings)} embeddings")
    tensors = {"embeddings": np.ascontiguousarray(embeddings, dtype=np.float32)}
    if chips is not None:
        tensors["chips"] = np.ascontiguousarray(chips, dtype=np.uint8)
    meta = {"format": SHARD_FORMAT, "shard": str(k), "config_sha256": config_sha,
            "ids": json.dumps(ids), "rows": json.dumps(rows)}
    return save(tensors, metadata=meta)


def read_shard(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata with "ids" and "rows" parsed, tensors) of a shard file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata() or {})
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    meta["ids"], meta["rows"] = json.loads(meta["ids"]), json.loads(meta["rows"])
    return meta, tensors


class GalleryStore:
    """One gallery store folder (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.shard_dir = self.root / SHARDS

    # -- opening ---------------------------------------------------------------------------------

    def connect(self) -> sqlite3.Connection:
        self.root.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.root / MANIFEST, timeout=600, isolation_level=None)
        con.execute("PRAGMA synchronous=FULL")
        con.executescript(_SCHEMA)
        return con

    @contextmanager
    def lock(self):
        """An exclusive lock on the store for the process that plans and commits (one job at a time)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK, "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise StoreBusy(f"another job is writing to {self.root}; wait for it or use another --out") from None
            yield

    def config(self) -> dict | None:
        path = self.root / CONFIG
        return json.loads(path.read_text()) if path.exists() else None

    def ensure_config(self, config: dict) -> None:
        """Write ``config`` on first use; afterwards refuse any other config, naming what changed."""
        config = json.loads(json.dumps(config, sort_keys=True))
        old = self.config()
        if old is None:
            write_json_atomic(self.root / CONFIG, config)
        elif old != config:
            raise ConfigChanged(f"the store {self.root} was made with another config: {describe_changes(old, config)}."
                                " Rerun with the original options to resume, or write to a new --out")

    def calibration(self) -> dict | None:
        """The defense's calibrated threshold recorded with the store ({"threshold", "source", ...}), if any."""
        path = self.root / CALIBRATION
        return json.loads(path.read_text()) if path.exists() else None

    def record_calibration(self, threshold: float, source: str, file_sha256: str | None = None) -> None:
        """Record the threshold ``advface match`` decides with (not part of the config: it never
        changes a row)."""
        write_json_atomic(self.root / CALIBRATION, {"threshold": float(threshold), "source": source,
                                                    "file_sha256": file_sha256, "recorded": _now()})

    def remove_temp_files(self) -> list[Path]:
        """Temporary files of killed writers (never a complete shard)."""
        found = [p for d in (self.root, self.shard_dir) if d.is_dir() for p in d.iterdir() if is_temp_name(p.name)]
        for p in found:
            p.unlink(missing_ok=True)
        return found

    # -- committing ------------------------------------------------------------------------------

    def done_shards(self, con: sqlite3.Connection | None = None) -> set[int]:
        own = con is None
        con = con or self.connect()
        try:
            return {k for (k,) in con.execute("SELECT shard FROM shards")}
        finally:
            if own:
                con.close()

    def commit_shard(self, k: int, data: bytes, paths: dict[str, str], stats: dict,
                     con: sqlite3.Connection | None = None) -> bool:
        """Write shard ``k`` atomically, then commit its rows. False if it was already done."""
        own = con is None
        con = con or self.connect()
        try:
            if k in self.done_shards(con):
                return False
            target = self.shard_dir / shard_name(k)
            with atomic_write(target) as tmp:
                tmp.write_bytes(data)
            meta, _ = read_shard(target)
            self._commit_rows(con, k, meta["rows"], paths, hashlib.sha256(data).hexdigest(), stats)
            return True
        finally:
            if own:
                con.close()

    def _commit_rows(self, con, k, rows, paths, sha, stats) -> None:
        con.execute("BEGIN IMMEDIATE")
        try:
            if con.execute("SELECT 1 FROM shards WHERE shard=?", (k,)).fetchone():
                con.execute("ROLLBACK")
                return
            con.executemany("INSERT INTO images (id, shard, row, status, error, path) VALUES (?, ?, ?, ?, ?, ?)",
                            [(i, k, row, status, error, paths.get(i)) for i, row, status, error in rows])
            n_ok = sum(1 for r in rows if r[2] == "ok")
            con.execute("INSERT INTO shards VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (k, f"{SHARDS}/{shard_name(k)}", sha, len(rows), n_ok, stats.get("image_steps"),
                         stats.get("seconds"), stats.get("worker"), _now()))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def adopt(self, config_sha: str, shards: list[list[str]], paths: dict[str, str]) -> list[int]:
        """Commit the rows of complete shard files the manifest does not list (a crash came between
        the rename and the commit). A file that does not check out is set aside and redone."""
        if not self.shard_dir.is_dir():
            return []
        adopted = []
        con = self.connect()
        try:
            done = self.done_shards(con)
            for k, ids in enumerate(shards):
                path = self.shard_dir / shard_name(k)
                if k in done or not path.exists():
                    continue
                try:
                    meta, tensors = read_shard(path)
                    ok = (meta.get("format") == SHARD_FORMAT and meta.get("config_sha256") == config_sha
                          and [r[0] for r in meta["rows"]] == ids
                          and len(meta["ids"]) == len(tensors["embeddings"]))
                except Exception as err:  # a damaged file can raise anything: never trust it
                    ok, meta = False, {"error": str(err)}
                if not ok:
                    path.replace(path.with_name(path.name + ".damaged"))
                    continue
                self._commit_rows(con, k, meta["rows"], paths, sha256_file(path), {"worker": "adopted"})
                adopted.append(k)
        finally:
            con.close()
        return adopted

    def record_run(self, record: dict) -> None:
        con = self.connect()
        try:
            con.execute("INSERT INTO runs (started, finished, executor, rank, world_size, shards, images, image_steps,"
                        " seconds, model_seconds, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (record.get("started"), _now(), record.get("executor"), record.get("rank", 0),
                         record.get("world_size", 1), record.get("shards", 0), record.get("images", 0),
                         record.get("image_steps", 0), record.get("seconds"), record.get("model_seconds"),
                         json.dumps(record, default=str)))
        finally:
            con.close()

    # -- reading ---------------------------------------------------------------------------------

    def rows(self) -> list[tuple]:
        """Every manifest row (id, shard, row, status, error, path), by id."""
        con = self.connect()
        try:
            return con.execute("SELECT id, shard, row, status, error, path FROM images ORDER BY id").fetchall()
        finally:
            con.close()

    def counts(self) -> dict[str, int]:
        con = self.connect()
        try:
            return dict(con.execute("SELECT status, COUNT(*) FROM images GROUP BY status").fetchall())
        finally:
            con.close()

    def embeddings(self) -> tuple[list[str], np.ndarray]:
        """(ids, float32 N x D) of every embedded image, in shard then row order."""
        ids, parts = [], []
        con = self.connect()
        try:
            files = con.execute("SELECT file FROM shards ORDER BY shard").fetchall()
        finally:
            con.close()
        for (name,) in files:
            meta, tensors = read_shard(self.root / name)
            if meta["ids"]:
                ids += meta["ids"]
                parts.append(tensors["embeddings"])
        dim = parts[0].shape[1] if parts else 0
        return ids, (np.concatenate(parts) if parts else np.zeros((0, dim), np.float32))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def utc_now() -> str:
    return _now()


__all__ = ["ConfigChanged", "GalleryStore", "config_sha256", "describe_changes", "encode_shard", "read_shard"]

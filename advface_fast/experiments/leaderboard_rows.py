"""The leaderboard's row ledger: what each finished row of an entry decided, pair by pair.

An entry of the full protocol takes hours (Square alone: 5,000 queries on 600 pairs). The runner's
store caches the attacked images (megabytes per row, kept in the cache, not meant to travel);
the ledger keeps only each row's per-pair outcome — similarity under the defended verifier,
right or wrong under its fixed thresholds, the attack's seconds and image-steps per pair, and
per-image diagnostics where the defense gives them —, a few kilobytes per row. It lives beside
the entries (``<out>/rows``, one :class:`~advface_fast.store.Entry` per row, keyed by everything
the row depends on), so an entry can be computed in pieces, on several machines or after the
image cache is gone: copy the ledger, rerun the command, and only the pair batches it lacks are
computed (every row is recorded one attack batch of pairs at a time). A row is read back only
under the very config that made it: model weights, defense config, the run's protocol, the data,
the defended thresholds (rounded to 1e-6, so the last bit of an fp32 sum on another CPU does not
invalidate a row) and the row's attack (its config, with the precision it resolved to: a bf16 row made on one machine
is not read back by an fp32 run). The decisions are taken again from the stored similarities
under the reading run's thresholds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from ..store import Entry, Items
from .runner import Selection

SCHEME = "leaderboard-rows-v1"
DIAG = "diag:"  # prefix of per-image diagnostic fields


class MemoryEntry:
    """An :class:`~advface_fast.store.Entry` that keeps its items in memory (a run without a ledger)."""

    def __init__(self):
        self.parts: list[tuple[list[str], dict]] = []

    def append(self, ids, arrays, stats=None) -> None:
        self.parts.append((list(ids), dict(arrays)))

    def read(self) -> Items:
        if not self.parts:
            return Items()
        ids = [i for part, _ in self.parts for i in part]
        return Items(ids, {k: np.concatenate([a[k] for _, a in self.parts]) for k in self.parts[0][1]})

    def compact(self) -> None:
        pass


class RowLedger:
    """Per-pair outcomes of an entry's rows; ``root=None``: in memory only (nothing survives the run)."""

    def __init__(self, root: str | Path | None, identity: dict, progress: bool = False):
        self.root, self.identity, self.progress = (Path(root) if root is not None else None), identity, progress
        self.read_back: list[str] = []  # rows (or parts of rows) found in the ledger

    def entry(self, row: str, key: dict | None = None):
        if self.root is None:
            return MemoryEntry()
        return Entry(self.root, {"scheme": SCHEME, **self.identity, "row": row, **(key or {})}, kind=SCHEME)

    def outcome(self, row: str, sel: Selection, compute: Callable[[Selection], dict], chunk: int | None = None,
                key: dict | None = None) -> dict:
        """The row's per-pair arrays over ``sel`` (what ``compute`` returns), in ``sel``'s order: read from
        the ledger where present; the missing pairs computed by ``compute(sub_selection)`` (one call, or
        one per ``chunk`` of missing pairs, each appended as soon as it is done) -> {field: array}.
        ``key``: what else the row depends on (its attack's config: resolved precision, steps, start, ...)."""
        entry = self.entry(row, key)
        done = set(entry.read().ids)
        todo = [i for i, pid in enumerate(sel.pair_ids) if pid not in done]
        if len(todo) < len(sel):
            self.read_back.append(row if not todo else f"{row} ({len(sel) - len(todo)} of {len(sel)} pairs)")
        step = chunk or len(todo) or 1
        with tqdm(total=len(todo), desc=f"{row}: pairs", unit="pair",
                  disable=not self.progress or len(todo) <= step) as bar:
            for at in range(0, len(todo), step):
                piece = sel.take(todo[at: at + step])
                found = compute(piece)
                entry.append(piece.pair_ids, {k: np.asarray(v) for k, v in found.items()})
                bar.update(len(piece))
        if todo:
            entry.compact()  # one compressed file per finished row
        items = entry.read()
        return {name: items.take(sel.pair_ids, name) for name in items.arrays}


def diagnostic_fields(values: dict | None) -> dict:
    """A defense's per-image diagnostics as ledger fields."""
    return {f"{DIAG}{k}": np.asarray(v) for k, v in (values or {}).items()}


def diagnostics_in(arrays: dict) -> dict | None:
    """The per-image diagnostics among a row's fields (None: none)."""
    found = {k[len(DIAG):]: v for k, v in arrays.items() if k.startswith(DIAG)}
    return found or None


__all__ = ["MemoryEntry", "RowLedger", "diagnostic_fields", "diagnostics_in"]

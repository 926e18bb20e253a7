"""Defended embeddings on disk: D's embedding of an image, computed once per image and D config.

Attack-as-defense re-attacks every image it is given (query and gallery) with its own attack D
and embeds the result. Whatever table asks for ``f(D(image))`` — the calibration on every clean
pair image of the dataset, the gallery side of every defended row, the attacked queries of every
row — goes through :class:`DefendedStore`, which keeps the embeddings in the one on-disk store
(:mod:`advface_fast.store`) with one entry per D step count:

* entry config: ``D.step_config(k)`` (D's attack config at k steps, objective, seed, batch size)
  + the weights identity of the embedding model and of the model D attacks through + the chip
  alignment; so any change of any of them is a new entry;
* item id: the image's id. Clean chips are keyed by their content id (the chips' ids are
  SHA-256 digests of the image bytes), attacked queries by ``<pair id>@<attacked-queries key>``;
  so an image used by many pairs, folds, tables or runs is computed once.

D's result for an image does not depend on which batch it comes in (per-image seeds from
``derive_seed(D seed, image id)``, batches padded to D's batch size; see
:class:`advface_fast.defenses.AttackAsDefense`), so computing only the missing ids gives the
same embeddings as computing everything at once. ONE D run of ``max(steps)`` steps fills the
entries of every step count. Missing images are computed in chunks, each appended as soon as it
is done: an interrupted run keeps every finished chunk and resumes.

Each item also records the share of its chunk's cost (``cost_seconds``, ``cost_image_steps``, the
padding included), so a table can say what its defended images cost.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..cache import default_cache_root
from ..models.identity import weights_id
from ..store import Store

DEFENDED_SCHEME = "defended-embeddings-v1"


class DefendedStore:
    """``f(D(image))`` for images given by id, from the on-disk store or computed (missing ids only).

    Arguments:
        defense (AttackAsDefense): D (its model f embeds, its attack model is attacked).
        root (path | None): the store's folder (default: ``$ADVFACE_HOME/defended``).
        align (str): the alignment key of the chips (part of every entry's config).
        chunk (int): images per appended chunk (a multiple of D's batch size is best). (Default: 64)
        progress (bool | str): a progress bar over D's images (images/s, image-steps/s, ETA).

    ``calls`` counts D runs and ``computed`` the images D was run on (tests count them).
    """

    def __init__(self, defense, root: str | Path | None = None, align: str = "", chunk: int = 64,
                 progress: bool | str = False):
        self.defense = defense
        self.store = Store(Path(root) if root else default_cache_root() / "defended", kind=DEFENDED_SCHEME)
        self.align = align
        self.chunk = max(int(chunk), 1)
        self.progress = progress
        self.calls = 0
        self.computed = 0
        self.image_steps = 0
        self.seconds = 0.0
        self._weights = (weights_id(defense.model), weights_id(defense.attack_model))
        self._items: dict[int, object] = {}  # step count -> Items read (refreshed after writes)

    def entry_config(self, variant) -> dict:
        return {"scheme": DEFENDED_SCHEME, "align": self.align, "weights": self._weights[0],
                "attack_weights": self._weights[1], **self.defense.variant_config(variant)}

    def entry(self, variant):
        return self.store.entry(self.entry_config(variant))

    def _read(self, variant, refresh: bool = False):
        if refresh or variant not in self._items:
            self._items[variant] = self.entry(variant).read()
        return self._items[variant]

    def missing(self, ids) -> list[str]:
        """The ids (unique, in order) missing from the entry of any variant."""
        have = [set(self._read(k).ids) for k in self.defense.variants]
        out, seen = [], set()
        for i in map(str, ids):
            if i not in seen and not all(i in h for h in have):
                seen.add(i)
                out.append(i)
        return out

    def embed(self, images, ids) -> dict:
        """{variant (attack-as-defense: step count): float32 N x D}: D's embeddings of ``images`` (uint8 N x H x W x 3 or a
        float batch), one row per id; only ids not yet stored are computed."""
        ids = [str(i) for i in ids]
        if len(ids) != len(images):
            raise ValueError(f"got {len(images)} images but {len(ids)} ids")
        todo = self.missing(ids)
        if todo:
            self._compute(images, ids, todo)
        return {k: self._read(k).take(ids, "embedding") for k in self.defense.variants}

    def cost(self, ids, variant) -> dict:
        """What D spent on these ids (each chunk's cost shared by its images)."""
        items = self._read(variant)
        ids = list(dict.fromkeys(map(str, ids)))
        return {"seconds": float(items.take(ids, "cost_seconds").sum()),
                "image_steps": float(items.take(ids, "cost_image_steps").sum())}

    def _compute(self, images, ids: list[str], todo: list[str]) -> None:
        first = {}
        for pos, i in enumerate(ids):
            first.setdefault(i, pos)
        have = {k: set(self._read(k).ids) for k in self.defense.variants}
        d = self.defense
        per_image = d.cost_per_image()
        desc = self.progress if isinstance(self.progress, str) else f"defense {d.name}"
        bar = tqdm(total=len(todo), desc=desc, unit="img", leave=False, disable=not self.progress)
        for start in range(0, len(todo), self.chunk):
            chunk_ids = todo[start : start + self.chunk]
            rows = np.array([first[i] for i in chunk_ids])
            t0 = time.perf_counter()
            emb = d.embed(images[rows], chunk_ids)
            seconds = time.perf_counter() - t0
            steps = int(d.last_stats["image_steps"])
            self.calls += 1
            self.computed += len(chunk_ids)
            self.image_steps += steps
            self.seconds += seconds
            n = len(chunk_ids)
            cost = {"cost_seconds": np.full(n, seconds / n), "cost_image_steps": np.full(n, steps / n)}
            for k in d.variants:
                keep = np.array([i not in have[k] for i in chunk_ids])
                if keep.any():
                    self.entry(k).append([i for i, kp in zip(chunk_ids, keep) if kp],
                                         {"embedding": emb[k].numpy().astype(np.float32)[keep],
                                          **{name: a[keep] for name, a in cost.items()}},
                                         stats={"seconds": seconds * keep.mean(), "image_steps": steps * keep.mean()})
            bar.update(n)
            rate = self.image_steps / max(self.seconds, 1e-9)
            bar.set_postfix_str(f"{rate:.0f} image-steps/s ({per_image:g} per image)", refresh=False)
        bar.close()
        for k in d.variants:
            self.entry(k).compact()
            self._read(k, refresh=True)


class StoredDefenseVerifier:
    """A defense at one variant (attack-as-defense: a step count), read through a
    :class:`DefendedStore`: the experiment runner's verifier shape (``embed(chips, ids) -> float32
    N x D``, ``config()``)."""

    def __init__(self, store: DefendedStore, variant):
        store.defense.variant_config(variant)  # checks the variant
        self.store, self.variant = store, variant
        self.steps = variant  # attack-as-defense's name for it

    def embed(self, chips, ids) -> np.ndarray:
        return self.store.embed(chips, ids)[self.variant]

    def config(self) -> dict:
        return {"kind": self.store.defense.name, **self.store.defense.variant_config(self.variant)}


__all__ = ["DEFENDED_SCHEME", "DefendedStore", "StoredDefenseVerifier"]

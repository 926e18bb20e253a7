"""Pairs -> aligned chips: the input of every experiment.

``prepare_pairs`` loads the pairs (with the input rules of :mod:`advface_fast.data.policy`), aligns
every image once (chip cache, keyed by image content) and indexes the chips by pair: ``PairChips``
holds, for each pair, the chip row of its query (first image) and of its gallery image (second).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .align import ALIGN_PATHS, AlignedChips, align_images, make_align_config
from .data import DataError, PairDataset, load_lfw
from .data.policy import InputPolicy
from .models import get_model_spec

CHIP_CACHE_SCHEME = "content-sha256-v1"  # chip cache entries hold chips by image-content hash


@dataclass
class PairChips:
    """The pairs of a dataset with the aligned chip of each side."""

    dataset: PairDataset
    chips: AlignedChips
    query: np.ndarray  # row in chips.chips of each pair's query (its first image in pairs.txt)
    gallery: np.ndarray  # ... and of its gallery image (the second)
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
        from .data.paths import shown_path

        d = self.dataset
        root = str(d.root).rstrip("/") + "/"
        return {**self.policy.to_dict(),
                "pairs_file": None if d.pairs_file is None else shown_path(d.pairs_file, d.root),
                "pairs_sha256": d.pairs_sha256,
                "pairs_check": None if d.pairs_check is None else str(d.pairs_check).replace(root, ""),
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
        query=np.array([chips.index(digest[p.a]) for p in pairs], dtype=np.int64),
        gallery=np.array([chips.index(digest[p.b]) for p in pairs], dtype=np.int64),
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

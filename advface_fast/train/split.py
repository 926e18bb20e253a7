"""Training identities for adversarial training: LFW people disjoint from every test pair's people.

LFW View 2 comes with ``people.txt``: ten people folds that match the ten pair folds of
``pairs.txt`` (every person of a fold-k pair is listed in people fold k and in no other fold;
checked on the official files). Training on the people of the folds that are NOT held out and
testing on the pairs of the held-out folds therefore never shows the model a test person.

The split is made twice over, on purpose: people of the held-out people folds are excluded, and
so is ANY person named by a held-out pair (even if a nonstandard people file listed them
elsewhere). Training keeps identities with at least ``min_images`` images (a classification head
needs at least two images of a class to generalise within it).

Examples (official LFW, identities with >= 2 images): held out fold 10 -> 1,499 identities,
7,809 images; held out folds 9-10 -> 1,324 identities, 7,007 images.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..data import DataError, image_id, parse_pairs, parse_people
from ..data.errors import bad_input_error
from ..data.images import conversion_of, probe_image, read_bytes, read_image
from ..data.paths import resolve_lfw_path, shown_path
from ..data.policy import InputPolicy

IMAGE_DIR_NAMES = ("lfw-deepfunneled", "lfw_funneled", "lfw")


@dataclass(frozen=True)
class TrainSplit:
    """The training images: ``image_ids[i]`` has class ``labels[i]`` = index into ``identities``."""

    test_folds: tuple[int, ...]
    identities: tuple[str, ...]
    image_ids: tuple[str, ...]
    labels: tuple[int, ...]
    test_people: frozenset = field(repr=False)  # everyone the held-out pairs/folds name
    stats: dict = field(default_factory=dict)

    @property
    def n_identities(self) -> int:
        return len(self.identities)

    def summary(self) -> dict:
        return {"test_folds": list(self.test_folds), "n_identities": self.n_identities,
                "n_images": len(self.image_ids), **self.stats}

    def without(self, images) -> "TrainSplit":
        """The split without ``images`` (ids, e.g. bad input); an identity left with fewer than
        ``min_images`` images goes too (listed in stats["identities_dropped"]), and labels are renumbered."""
        images = set(images)
        kept = [(i, label) for i, label in zip(self.image_ids, self.labels) if i not in images]
        counts = Counter(label for _, label in kept)
        keep = [k for k in range(self.n_identities) if counts[k] >= self.stats.get("min_images", 2)]
        if not keep:
            raise DataError("no training identities left after dropping the unusable images")
        new_label = {k: n for n, k in enumerate(keep)}
        kept = [(i, new_label[label]) for i, label in kept if label in new_label]
        dropped = [name for k, name in enumerate(self.identities) if k not in new_label]
        return replace(self, identities=tuple(self.identities[k] for k in keep), image_ids=tuple(i for i, _ in kept),
                       labels=tuple(label for _, label in kept),
                       stats={**self.stats, "identities_dropped": self.stats.get("identities_dropped", []) + dropped})


def _check_folds(test_folds, n_folds: int) -> tuple[int, ...]:
    folds = tuple(sorted({int(f) for f in test_folds}))
    if not folds:
        raise ValueError("give at least one held-out test fold")
    bad = [f for f in folds if not 1 <= f <= n_folds]
    if bad:
        raise ValueError(f"test folds must be in 1..{n_folds}, got {bad}")
    if len(folds) == n_folds:
        raise ValueError("every fold is held out: nothing is left to train on")
    return folds


def make_split(lfw, test_folds, *, people_file=None, pairs_file: str = "pairs.txt", min_images: int = 2,
               max_identities: int | None = None, max_images_per_identity: int | None = None) -> TrainSplit:
    """Training identities and images from the LFW folder ``lfw`` with ``test_folds`` held out.

    people_file: the people list (default ``<lfw>/people.txt``). max_identities keeps the
    identities with the most images (ties by name); max_images_per_identity keeps each one's
    first images. Deterministic: the same arguments give the same split.
    """
    root = resolve_lfw_path(lfw)
    people_path = Path(people_file) if people_file is not None else root / "people.txt"
    if not people_path.is_file():
        raise DataError("people.txt is missing: the training identities are taken from its people folds "
                        "(give another file with people_file= / --people-file)", file=people_path)
    people_folds = parse_people(people_path)
    pairs_path = Path(pairs_file) if Path(pairs_file).is_absolute() else root / pairs_file
    pairs = parse_pairs(pairs_path)
    if pairs.n_folds != len(people_folds):
        raise DataError(f"{pairs.n_folds} pair folds but {len(people_folds)} people folds: "
                        "the people file does not match the pairs file", file=people_path)
    folds = _check_folds(test_folds, pairs.n_folds)
    held = set(folds)
    test_people = {i.split("/")[0] for p in pairs.pairs if p.fold in held for i in (p.a, p.b)}
    test_people |= {name for k, fold in enumerate(people_folds, 1) if k in held for name, _ in fold}
    candidates, single, named = {}, 0, 0
    for k, fold in enumerate(people_folds, 1):
        if k in held:
            continue
        for name, count in fold:
            if name in test_people:
                named += 1
            elif count < min_images:
                single += 1
            else:
                candidates[name] = max(count, candidates.get(name, 0))
    eligible_ids, eligible_images = len(candidates), sum(candidates.values())
    chosen = sorted(candidates.items(), key=lambda nc: (-nc[1], nc[0]))
    if max_identities is not None:
        chosen = chosen[:max_identities]
    chosen.sort()
    if not chosen:
        raise DataError("no training identities left (need people outside the held-out folds with "
                        f">= {min_images} images)", file=people_path)
    identities, ids, labels = [], [], []
    for label, (name, count) in enumerate(chosen):
        identities.append(name)
        n = count if max_images_per_identity is None else min(count, max_images_per_identity)
        ids += [image_id(name, i) for i in range(1, n + 1)]
        labels += [label] * n
    stats = {"eligible_identities": eligible_ids, "eligible_images": eligible_images,
             "excluded_single_image_people": single, "excluded_named_by_test_pairs": named,
             "test_people": len(test_people), "min_images": min_images,
             "max_identities": max_identities, "max_images_per_identity": max_images_per_identity,
             "people_file": shown_path(people_path, root), "pairs_file": shown_path(pairs_path, root)}
    return TrainSplit(folds, tuple(identities), tuple(ids), tuple(labels), frozenset(test_people), stats)


def image_folder(lfw) -> Path:
    """The image folder of an official-layout LFW folder (lfw-deepfunneled/, lfw_funneled/ or lfw/)."""
    root = resolve_lfw_path(lfw)
    found = [root / n for n in IMAGE_DIR_NAMES if (root / n).is_dir()]
    if len(found) != 1:
        raise DataError(f"expected exactly one image folder of {IMAGE_DIR_NAMES}, found {len(found)}", file=root)
    return found[0]


def load_train_chips(lfw, split: TrainSplit, model: str = "dlib-resnet", *, policy: InputPolicy | None = None,
                     cache_dir=None, workers=None, progress: bool = True) -> tuple[np.ndarray, dict, TrainSplit]:
    """Aligned chips for ``model``'s alignment, through the chip cache (keyed by each image's content
    hash, as the verification pipeline): (uint8 N x S x S x 3 chips, info, the split they are of).

    The input rules (``policy``, as every command: data.policy.InputPolicy) decide what happens to a
    training image that cannot be used as it is (checked by name, header and tail before aligning:
    stop with an error naming it, drop it, or convert it to RGB) and to one where no detector finds a
    face (train on the centre box, drop it, or stop). The split returned is ``split`` without the
    dropped images (see TrainSplit.without); ``info["input"]`` says what was done to which image.
    """
    from ..align import AlignConfig, align_images
    from ..data.checksums import sha256_bytes
    from ..models import get_model_spec
    from ..pair_chips import CHIP_CACHE_SCHEME

    policy = policy or InputPolicy()
    convert = policy.on_bad == "convert"
    folder = image_folder(lfw)
    data, problems, converted = {}, {}, {}
    for i in split.image_ids:
        path = folder / f"{i}.jpg"
        try:
            data[i], _ = read_bytes(path)
            mode = probe_image(data[i], name=str(path), convert=convert)
        except DataError as err:
            problems[i] = err
            continue
        if mode != "RGB":
            converted[i] = f"converted {conversion_of(data[i])}"
    if problems and policy.on_bad != "skip":
        raise bad_input_error(problems.values(), "use --on-bad skip (on_bad='skip') to train without it")
    usable = [i for i in split.image_ids if i not in problems]
    digest = {i: sha256_bytes(data[i]) for i in usable}
    first_id = {}
    for i, d in digest.items():
        first_id.setdefault(d, i)
    config = AlignConfig(**get_model_spec(model).alignment)
    chips = align_images(list(first_id),
                         lambda d: read_image(data[first_id[d]], name=str(folder / f"{first_id[d]}.jpg"),
                                              convert=convert)[0],
                         config, cache_dir=cache_dir, dataset_fingerprint=CHIP_CACHE_SCHEME, progress=progress,
                         workers=workers)
    # "center" is the path of an image where no detector found a face (the fixed box was used).
    faceless = [i for i in usable if chips.paths[chips.index(digest[i])] == "center"]
    if faceless and policy.no_face == "error":
        shown = ", ".join(faceless[:5]) + (f" and {len(faceless) - 5} more" if len(faceless) > 5 else "")
        raise DataError(f"no face detected in {len(faceless)} training image(s): {shown}; use --no-face center "
                        "(no_face='center') to train on the centre box, or --no-face skip to train without them",
                        file=folder)
    dropped = {i: err.reason for i, err in problems.items()}
    if policy.no_face == "skip":
        dropped.update(dict.fromkeys(faceless, "no face detected"))
    used = split.without(dropped) if dropped else split
    rows = np.array([chips.index(digest[i]) for i in used.image_ids], dtype=np.int64)
    paths = {}
    for r in rows.tolist():
        paths[chips.paths[r]] = paths.get(chips.paths[r], 0) + 1
    action = "dropped" if policy.no_face == "skip" else "trained on the centre box"
    record = {**policy.to_dict(), "skipped": [{"image": i, "reason": r} for i, r in dropped.items()],
              "converted": [{"image": i, "reason": c} for i, c in converted.items()],
              "no_face_images": [{"image": i, "action": action} for i in faceless]}
    return chips.chips[rows], {"alignment_paths": paths, "input": record}, used


__all__ = ["TrainSplit", "image_folder", "load_train_chips", "make_split"]

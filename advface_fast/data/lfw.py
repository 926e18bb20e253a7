"""One dataset object for the three LFW layouts: the official folder, scikit-learn's lfw_home, and
InsightFace .bin files.

Verification levels (load_lfw's verify argument), with measured costs for the full LFW View 2
(6,000 pairs using 7,701 of the 13,233 images, 68 MB; 2-core machine, warm disk cache):

* "none": parse the pairs file and stat every pair image (missing or empty files are caught).
  ~0.2 s. The fingerprint is then computed on first use (hashes the pair images, ~0.8 s).
* "auto" (default): also check the metadata files against SHA256SUMS when present, else a
  pairs file named like a published one against scikit-learn's published SHA-256; hash every
  pair image (against SHA256SUMS when present); and read each image's header and tail
  (not an image, truncated JPEG/PNG, non-RGB mode). ~0.9 s.
* "full": also decode every pair image completely and check every file SHA256SUMS lists,
  including images no pair uses. ~5 s.

Images found bad while loading raise a DataError (on_bad="error"), or with on_bad="skip" every
pair that uses them is dropped and recorded in .skipped (a warning says how many). A bad image met
later by load_image always raises: a pair cannot be dropped halfway through a run without skewing
the numbers, so use verify="full" to find such images up front.
"""

from __future__ import annotations

import copy
import hashlib
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .checksums import PUBLISHED_SHA256, SUMS_NAME, read_sha256sums, sha256_bytes, sha256_file, verify_file
from .errors import DataError, DataIssue, bad_input_error, check_on_bad
from .images import conversion_of, probe_image, read_bytes, read_image
from .policy import DataWarning
from .insightface_bin import BIN_FOLDS, bin_pairs, load_bin
from .pairs import Pair, parse_pairs
from .paths import resolve_lfw_path

IMAGE_DIR_NAMES = ("lfw-deepfunneled", "lfw_funneled", "lfw")
VERIFY_CHOICES = ("auto", "full", "none")
FINGERPRINT_VERSION = "advface-pairs-v1"


class _DirImages:
    """Images stored as <image_dir>/<id>.jpg."""

    def __init__(self, root: Path, image_dir: Path):
        self.root, self.image_dir = root, image_dir

    def path(self, image_id: str) -> Path:
        return self.image_dir / f"{image_id}.jpg"

    def label(self, image_id: str) -> str:
        return str(self.path(image_id))

    def relpath(self, image_id: str) -> str:
        return self.path(image_id).relative_to(self.root).as_posix()

    def read(self, image_id: str) -> bytes:
        return read_bytes(self.path(image_id), name=self.label(image_id))[0]


class _BinImages:
    """Images held in memory, as read from a .bin file; id "bin/000123" is images[123]."""

    def __init__(self, path: Path, images: list[bytes]):
        self.file, self.images = path, images

    def label(self, image_id: str) -> str:
        return f"{self.file}[{image_id}]"

    def read(self, image_id: str) -> bytes:
        return read_bytes(self.images[int(image_id.split("/")[1])], name=self.label(image_id))[0]


class PairDataset:
    """Verification pairs plus access to their images.

    Attributes: name, root (folder or .bin file), layout ("official", "lfw_home" or
    "insightface_bin"), pairs (list[Pair]), n_folds (folds in the protocol file), folds (the
    1-based fold numbers selected), image_ids (unique ids used by pairs, in first-use order),
    pairs_file, pairs_sha256, published_pairs (the pairs file is byte-identical to a published LFW
    pairs file), pairs_check (how the pairs file was checked, in words), skipped and converted
    (lists of DataIssue), verify (the level used).
    """

    def __init__(self, *, name: str, root: Path, layout: str, pairs: list[Pair], n_folds: int,
                 folds: tuple[int, ...], images, on_bad: str, verify: str, skipped: list[DataIssue],
                 converted: dict[str, DataIssue], digests: dict[str, str], pairs_file: str | None = None,
                 pairs_sha256: str | None = None, published_pairs: bool = False, pairs_check: str | None = None):
        self.name, self.root, self.layout = name, root, layout
        self.pairs, self.n_folds, self.folds = pairs, n_folds, folds
        self.pairs_file, self.pairs_sha256, self.published_pairs = pairs_file, pairs_sha256, published_pairs
        self.pairs_check = pairs_check
        self.on_bad, self.verify, self.skipped = on_bad, verify, skipped
        self.image_ids = list(dict.fromkeys(image for pair in pairs for image in (pair.a, pair.b)))
        self._known = set(self.image_ids)
        self._images = images
        self._converted = converted
        self._digests = {key: value for key, value in digests.items() if key in self._known}
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def __repr__(self) -> str:
        return (f"PairDataset(name={self.name!r}, layout={self.layout!r}, pairs={len(self.pairs)}, "
                f"folds={self.folds}, images={len(self.image_ids)}, skipped={len(self.skipped)})")

    @property
    def converted(self) -> list[DataIssue]:
        """Images converted to RGB (on_bad="convert"), found while loading or by load_image."""
        return list(self._converted.values())

    def without_images(self, reasons: dict[str, str]) -> "PairDataset":
        """A copy without the pairs that use any image in ``reasons`` ({image id: why}), each dropped
        pair recorded in .skipped (e.g. images without a detectable face, no_face="skip")."""
        bad = {i: r for i, r in reasons.items() if i in self._known}
        if not bad:
            return self
        kept, dropped = [], []
        for pair in self.pairs:
            why = [f"image {i}: {bad[i]}" for i in (pair.a, pair.b) if i in bad]
            if why:
                dropped.append(DataIssue(self.pairs_file or str(self.root), None,
                                         f"pair {pair.a} | {pair.b} (fold {pair.fold}) dropped, " + "; ".join(why)))
            else:
                kept.append(pair)
        out = copy.copy(self)
        out.pairs, out.skipped = kept, self.skipped + dropped
        out.image_ids = list(dict.fromkeys(i for pair in kept for i in (pair.a, pair.b)))
        out._known = set(out.image_ids)
        out._digests = {k: v for k, v in self._digests.items() if k in out._known}
        out._converted = {k: v for k, v in self._converted.items() if k in out._known}
        out._fingerprint = None
        return out

    def image_path(self, image_id: str) -> Path:
        """File of an image (folder layouts only)."""
        if not isinstance(self._images, _DirImages):
            raise TypeError(f"{self.layout} datasets keep their images inside one file")
        self._check_known(image_id)
        return self._images.path(image_id)

    def _check_known(self, image_id: str) -> None:
        if image_id not in self._known:
            raise KeyError(f"{image_id!r} is not used by any pair of {self.name}")

    def _read_checked(self, image_id: str) -> bytes:
        data = self._images.read(image_id)
        expected = self._digests.get(image_id)
        # Cheap (tens of microseconds) and guarantees the fingerprint describes the pixels used.
        if expected is not None and sha256_bytes(data) != expected:
            raise DataError("image changed since the dataset was loaded", file=self._images.label(image_id))
        return data

    def load_image(self, image_id: str) -> np.ndarray:
        """Decode one image to uint8 HxWx3 RGB. A bad image raises DataError (see module doc)."""
        self._check_known(image_id)
        label = self._images.label(image_id)
        try:
            data = self._read_checked(image_id)
            array, mode = read_image(data, name=label, convert=self.on_bad == "convert")
        except DataError as exc:
            raise DataError(
                f"{exc.reason} (found during the run; load with verify='full' to find bad images before it)",
                file=label,
            ) from None
        if mode != "RGB" and image_id not in self._converted:
            self._converted[image_id] = _converted_issue(label, data)
        return array

    def image_digest(self, image_id: str) -> str:
        """SHA-256 of the image file's bytes (from loading, or computed now)."""
        self._check_known(image_id)
        if image_id not in self._digests:
            self._digests[image_id] = sha256_bytes(self._images.read(image_id))
        return self._digests[image_id]

    @property
    def fingerprint(self) -> str:
        """SHA-256 over the pairs (fold, ids, label, in order) and the SHA-256 of every image they use.

        Identifies the data, not where it lives: the same pairs and image bytes give the same value
        in any folder layout; any change to a pair, the fold selection, a skipped pair or one
        image byte changes it. Image hashes come from loading (verify "auto"/"full") or are
        computed here on first use (verify "none").
        """
        if self._fingerprint is None:
            for image_id in self.image_ids:
                if image_id not in self._digests:
                    self._digests[image_id] = sha256_bytes(self._images.read(image_id))
            self._fingerprint = _fingerprint(self.pairs, self._digests)
        return self._fingerprint


def _fingerprint(pairs: list[Pair], digests: dict[str, str]) -> str:
    digest = hashlib.sha256(f"{FINGERPRINT_VERSION}\n".encode())
    for pair in pairs:
        digest.update(f"pair {pair.fold} {pair.a} {pair.b} {int(pair.same)}\n".encode())
    for image_id in sorted(digests):
        digest.update(f"image {image_id} {digests[image_id]}\n".encode())
    return digest.hexdigest()


def _converted_issue(label: str, data: bytes) -> DataIssue:
    return DataIssue(label, None, f"converted {conversion_of(data)}", action="converted")


def _select_folds(folds: Iterable[int] | int | None, n_folds: int) -> tuple[int, ...]:
    if folds is None:
        return tuple(range(1, n_folds + 1))
    chosen = (folds,) if isinstance(folds, int) else tuple(folds)
    bad = [f for f in chosen if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or not 1 <= f <= n_folds]
    if bad or not chosen:
        raise ValueError(f"folds are numbered 1..{n_folds}; got {list(chosen)}")
    return tuple(sorted(set(int(f) for f in chosen)))


def _check_images(image_ids: list[str], images, *, verify: str, convert: bool, sums: dict[str, str] | None):
    """Check each image; return (problems {id: DataError}, digests {id: sha256}, converted {id: issue})."""
    problems: dict[str, DataError] = {}
    digests: dict[str, str] = {}
    converted: dict[str, DataIssue] = {}
    for image_id in image_ids:
        label = images.label(image_id)
        try:
            if verify == "none":
                if isinstance(images, _DirImages):
                    _stat_image(images.path(image_id), label)
                else:
                    images.read(image_id)  # in memory already: only catches empty entries
                continue
            data = images.read(image_id)
            digests[image_id] = sha256_bytes(data)
            if sums is not None:
                expected = sums.get(images.relpath(image_id))
                if expected is None:
                    raise DataError(f"image is not listed in {SUMS_NAME}", file=label)
                if expected != digests[image_id]:
                    raise DataError(f"SHA-256 mismatch: {SUMS_NAME} says {expected}, file has {digests[image_id]}",
                                    file=label)
            if verify == "full":
                mode = read_image(data, name=label, convert=convert)[1]
            else:
                mode = probe_image(data, name=label, convert=convert)
            if mode != "RGB":
                converted[image_id] = _converted_issue(label, data)
        except DataError as exc:
            problems[image_id] = exc
    return problems, digests, converted


def _stat_image(path: Path, label: str) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError("image file is missing", file=label) from None
    if not path.is_file():
        raise DataError("image path is not a file", file=label)
    if size == 0:
        raise DataError("image file is empty (0 bytes)", file=label)


def _drop_bad_pairs(pairs, lines, problems, *, on_bad: str, pairs_label: str):
    """Raise for the first bad image, or (on_bad="skip") drop pairs using bad images and record them."""
    if not problems:
        return pairs, []
    if on_bad != "skip":
        raise bad_input_error(problems.values(), "use --on-bad skip (on_bad='skip') to drop the pairs that use it")
    kept, skipped = [], []
    for pair, line in zip(pairs, lines):
        bad = [image for image in (pair.a, pair.b) if image in problems]
        if not bad:
            kept.append(pair)
            continue
        reason = "; ".join(f"image {image}: {problems[image].reason}" for image in bad)
        skipped.append(DataIssue(pairs_label, line, f"pair dropped, {reason}"))
    return kept, skipped


def _warn_skipped(name: str, skipped: list[DataIssue]) -> None:
    if skipped:
        warnings.warn(f"{name}: {len(skipped)} pair(s) skipped because of bad input; see dataset.skipped",
                      DataWarning, stacklevel=4)  # point at the caller of load_lfw


def _find_root(path: Path, pairs: str) -> Path:
    # Accept scikit-learn's data_home (which holds lfw_home/) as well as lfw_home itself.
    if not (path / pairs).exists() and (path / "lfw_home").is_dir():
        return path / "lfw_home"
    return path


def _find_image_dir(root: Path, images: str | None) -> Path:
    if images is not None:
        image_dir = root / images
        if not image_dir.is_dir():
            raise DataError(f"image folder {images!r} not found", file=root)
        return image_dir
    found = [root / name for name in IMAGE_DIR_NAMES if (root / name).is_dir()]
    if not found:
        raise DataError(f"no image folder found; expected one of {', '.join(IMAGE_DIR_NAMES)}", file=root)
    if len(found) > 1:
        # Different alignments give different numbers, so never pick one silently.
        names = ", ".join(p.name for p in found)
        raise DataError(f"several image folders ({names}); choose one with images=...", file=root)
    return found[0]


def _verify_metadata(root: Path, pairs_path: Path, sums: dict[str, str] | None, pairs_sha256: str,
                     users_file: bool) -> str:
    """Check the metadata (non-image) files against SHA256SUMS and the pairs file against what is
    known of it; return how the pairs file was checked (PairDataset.pairs_check).

    A pairs file is checked by the SHA256SUMS of the dataset folder or one beside it, else by the
    published LFW hash when it is named like a published file. A file inside the dataset named like
    a published one that differs is refused (a changed protocol file); the user's own file given by
    path (``users_file``) is used with a note instead.
    """
    covered = None
    if sums is not None:
        for rel, expected in sums.items():
            if rel.split("/", 1)[0] not in IMAGE_DIR_NAMES:
                verify_file(root / rel, expected, label=root / rel)
        try:
            if pairs_path.resolve().relative_to(root.resolve()).as_posix() in sums:
                covered = root / SUMS_NAME
        except ValueError:
            pass
    beside = pairs_path.parent / SUMS_NAME
    if covered is None and beside.is_file() and pairs_path.parent.resolve() != root.resolve():
        listed = read_sha256sums(beside).get(pairs_path.name)
        if listed is not None:
            verify_file(pairs_path, listed, label=pairs_path)
            covered = beside
    if covered is not None:
        return f"verified by {covered}"
    if pairs_sha256 in PUBLISHED_SHA256.values():
        name = next(n for n, h in PUBLISHED_SHA256.items() if h == pairs_sha256)
        return f"identical to the published LFW {name}"
    published = PUBLISHED_SHA256.get(pairs_path.name)
    if published is not None and not users_file:
        raise DataError(
            f"does not match the published LFW {pairs_path.name} (SHA-256 {pairs_sha256}, published {published}); "
            "results on a changed protocol file are not comparable. To use your own pairs anyway, give the "
            "file by path (--pairs-file FILE, or pairs=<path> in Python), or give it another name",
            file=pairs_path,
        )
    return (f"not verified: no {SUMS_NAME} lists it and it is not a published LFW pairs file "
            f"(SHA-256 {pairs_sha256}); results are not comparable with published LFW numbers")


def _verify_all_listed(root: Path, sums: dict[str, str], already: set[str]) -> None:
    for rel, expected in sums.items():
        if rel not in already:
            verify_file(root / rel, expected, label=root / rel)


def _load_folder(root: Path, *, pairs: str, folds, verify: str, on_bad: str, images: str | None,
                 name: str | None) -> PairDataset:
    root = _find_root(root, pairs)
    image_dir = _find_image_dir(root, images)
    users_file = Path(pairs).name != str(pairs)  # given by path, not a file name inside the dataset
    pairs_path = Path(pairs).expanduser() if Path(pairs).expanduser().is_absolute() else (
        Path(pairs) if users_file else root / pairs)
    if not pairs_path.is_file():
        available = sorted(p.name for p in root.glob("pairs*.txt"))
        raise DataError(f"pairs file not found (available: {', '.join(available) or 'none'})", file=pairs_path)
    pairs_sha256 = sha256_file(pairs_path)
    sums_path = root / SUMS_NAME
    sums = read_sha256sums(sums_path) if verify != "none" and sums_path.is_file() else None
    pairs_check = "not checked (verify='none')"
    if verify != "none":
        pairs_check = _verify_metadata(root, pairs_path, sums, pairs_sha256, users_file)

    parsed = parse_pairs(pairs_path, on_bad=on_bad)
    selected = _select_folds(folds, parsed.n_folds)
    block = 2 * parsed.pairs_per_half
    chosen = [(p, line) for p, line in zip(parsed.pairs, parsed.lines) if p.fold in selected]
    skipped = [s for s in parsed.skipped if (s.line - 2) // block + 1 in selected]
    kept_pairs, kept_lines = [p for p, _ in chosen], [line for _, line in chosen]

    source = _DirImages(root, image_dir)
    image_ids = list(dict.fromkeys(i for p in kept_pairs for i in (p.a, p.b)))
    problems, digests, converted = _check_images(
        image_ids, source, verify=verify, convert=on_bad == "convert", sums=sums
    )
    kept_pairs, dropped = _drop_bad_pairs(kept_pairs, kept_lines, problems, on_bad=on_bad, pairs_label=str(pairs_path))
    skipped += dropped
    if verify == "full" and sums is not None:
        _verify_all_listed(root, sums, {source.relpath(i) for i in image_ids})
    layout = "lfw_home" if root.name == "lfw_home" else "official"
    dataset = PairDataset(
        name=name or root.name, root=root, layout=layout, pairs=kept_pairs, n_folds=parsed.n_folds,
        folds=selected, images=source, on_bad=on_bad, verify=verify, skipped=skipped,
        converted={k: v for k, v in converted.items() if k not in problems}, digests=digests,
        pairs_file=str(pairs_path), pairs_sha256=pairs_sha256,
        published_pairs=pairs_sha256 in PUBLISHED_SHA256.values(), pairs_check=pairs_check,
    )
    _warn_skipped(dataset.name, skipped)
    return dataset


def _load_insightface_bin(path: Path, *, folds, verify: str, on_bad: str, name: str | None,
                          bin_folds: int) -> PairDataset:
    if verify != "none":
        sums_path = path.parent / SUMS_NAME
        sums = read_sha256sums(sums_path) if sums_path.is_file() else {}
        if path.name in sums:
            verify_file(path, sums[path.name])
    images, issame = load_bin(path)
    all_pairs = bin_pairs(issame, bin_folds)
    selected = _select_folds(folds, bin_folds)
    indexed = [(k, p) for k, p in enumerate(all_pairs) if p.fold in selected]
    source = _BinImages(path, images)
    image_ids = list(dict.fromkeys(i for _, p in indexed for i in (p.a, p.b)))
    problems, digests, converted = _check_images(
        image_ids, source, verify=verify, convert=on_bad == "convert", sums=None
    )
    # A .bin has no lines; the pair index (from 0, as InsightFace counts) stands in for one.
    kept, skipped = _drop_bad_pairs([p for _, p in indexed], [k for k, _ in indexed], problems,
                                    on_bad=on_bad, pairs_label=str(path))
    skipped = [DataIssue(s.file, None, f"pair {s.line}: {s.reason}") for s in skipped]
    dataset = PairDataset(
        name=name or path.stem, root=path, layout="insightface_bin", pairs=kept, n_folds=bin_folds,
        folds=selected, images=source, on_bad=on_bad, verify=verify, skipped=skipped,
        converted={k: v for k, v in converted.items() if k not in problems}, digests=digests,
    )
    _warn_skipped(dataset.name, skipped)
    return dataset


def load_lfw(path: str | os.PathLike | None = None, pairs: str = "pairs.txt", folds: Iterable[int] | int | None = None,
             verify: str = "auto", on_bad: str = "error", *, images: str | None = None, name: str | None = None,
             bin_folds: int = BIN_FOLDS) -> PairDataset:
    """Load LFW verification pairs from a folder or an InsightFace .bin file.

    path: a folder with a pairs file and one image folder (lfw-deepfunneled/, lfw_funneled/ or
      lfw/), scikit-learn's lfw_home (or the data_home above it), or a .bin file; None means
      resolve_lfw_path() ($ADVFACE_LFW, then the default data directory).
    pairs: pairs file name inside the folder (pairs.txt, pairsDevTrain.txt, pairsDevTest.txt), or
      the path of your own pairs file (anything with a folder part: relative to the current
      directory unless absolute). View 1 files are one fold. Ignored for .bin files. How the file
      was checked is in .pairs_check: a SHA256SUMS in the dataset folder or beside the file, else
      the published LFW hashes; your own file that no checksum covers is used with a note.
    folds: 1-based fold numbers to keep (as in the LFW documentation), e.g. [1] or range(1, 6);
      None keeps all.
    verify: "none", "auto" or "full" (see the module docstring for what each checks and costs).
    on_bad: "error" raises DataError; "skip" drops the affected pairs and records them in
      .skipped; "convert" converts grayscale/CMYK/alpha images to RGB (recorded in .converted)
      and otherwise behaves like "error". Checksum mismatches of metadata files, bad headers and
      a line count that disagrees with the header always raise.
    images: image folder name, required when several exist.
    bin_folds: folds for .bin files (consecutive, as InsightFace splits them).
    """
    check_on_bad(on_bad)
    if verify not in VERIFY_CHOICES:
        raise ValueError(f"verify must be one of {VERIFY_CHOICES}, got {verify!r}")
    root = resolve_lfw_path(path)
    if root.is_file():
        return _load_insightface_bin(root, folds=folds, verify=verify, on_bad=on_bad, name=name, bin_folds=bin_folds)
    return _load_folder(root, pairs=pairs, folds=folds, verify=verify, on_bad=on_bad, images=images, name=name)

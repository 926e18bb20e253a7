"""Where a gallery's images come from: a directory tree, a CSV / JSONL manifest of (id, path), or an
LFW root. Every source becomes one list of ``ImageRef(id, path)`` sorted by id.

- Directory: every file under it (hidden files and folders excepted); the id is the path relative to
  the directory, with ``/`` separators (``Aaron_Eckhart/Aaron_Eckhart_0001.jpg``). Files that are not
  images stay in the list: the job records them as "unsupported format" instead of hiding them.
- Manifest ``*.csv`` (header ``id,path``) or ``*.jsonl`` (one ``{"id": ..., "path": ...}`` per line):
  relative paths are relative to the manifest's folder. A malformed line or a repeated id is an
  error naming the line (the job cannot guess what was meant).
- LFW root (a folder holding ``pairs.txt`` and ``lfw-deepfunneled/`` or ``lfw/``, or scikit-learn's
  ``lfw_home``): the image folder, as a directory tree.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..data.errors import DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
LFW_IMAGE_DIRS = ("lfw-deepfunneled", "lfw", "lfw_funneled")


@dataclass(frozen=True)
class ImageRef:
    """One gallery image: its id (unique, the key of every row) and where its bytes are."""

    id: str
    path: str


def _walk(root: Path) -> list[ImageRef]:
    refs = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        refs.append(ImageRef(rel.as_posix(), str(path)))
    return refs


def _lfw_image_dir(root: Path) -> Path | None:
    if not (root / "pairs.txt").exists() and (root / "lfw_home").is_dir():
        root = root / "lfw_home"
    if not (root / "pairs.txt").exists():
        return None
    found = [root / n for n in LFW_IMAGE_DIRS if (root / n).is_dir()]
    if len(found) > 1:
        raise DataError(f"several LFW image folders ({', '.join(p.name for p in found)}); "
                        "give the one you want as --input", file=root)
    return found[0] if found else None


def _manifest(path: Path) -> list[ImageRef]:
    base = path.parent
    rows: list[tuple[int, str, str]] = []
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                rows.append((n, str(obj["id"]), str(obj["path"])))
            except (ValueError, KeyError, TypeError):
                raise DataError('expected a JSON object with "id" and "path"', file=path, line=n) from None
    else:
        reader = csv.reader(text.splitlines())
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:2]] != ["id", "path"]:
            raise DataError("a CSV manifest starts with the header 'id,path'", file=path, line=1)
        for n, fields in enumerate(reader, 2):
            if not fields or not "".join(fields).strip():
                continue
            if len(fields) < 2 or not fields[0].strip():
                raise DataError("expected 'id,path'", file=path, line=n)
            rows.append((n, fields[0].strip(), fields[1].strip()))
    refs, seen = [], {}
    for n, image_id, p in rows:
        if image_id in seen:
            raise DataError(f"id {image_id!r} repeats line {seen[image_id]}", file=path, line=n)
        seen[image_id] = n
        full = Path(p) if Path(p).is_absolute() else base / p
        refs.append(ImageRef(image_id, str(full)))
    return refs


def list_images(source: str | Path) -> list[ImageRef]:
    """Every image reference of ``source`` (a folder, an LFW root or a .csv / .jsonl manifest), by id."""
    source = Path(source).expanduser().absolute()  # paths in the manifest must not depend on the cwd
    if source.is_file():
        if source.suffix.lower() not in (".csv", ".jsonl"):
            raise DataError("a manifest must be a .csv (id,path) or .jsonl file", file=source)
        refs = _manifest(source)
    elif source.is_dir():
        refs = _walk(_lfw_image_dir(source) or source)
    else:
        raise FileNotFoundError(f"--input {source}: no such file or folder")
    refs.sort(key=lambda r: r.id)
    if not refs:
        raise DataError("no files found", file=source)
    return refs


def is_image_name(path: str) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def fingerprint(refs: list[ImageRef]) -> str:
    """sha256 of the sorted id list: a store holds exactly one set of ids (the shard assignment
    depends on it). Paths are not part of it, so a moved gallery resumes."""
    h = hashlib.sha256()
    for r in refs:
        h.update(r.id.encode("utf-8") + b"\0")
    return h.hexdigest()


__all__ = ["IMAGE_SUFFIXES", "ImageRef", "fingerprint", "is_image_name", "list_images"]

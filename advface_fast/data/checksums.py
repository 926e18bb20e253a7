"""SHA-256 helpers: hashing files, reading and writing SHA256SUMS, the published LFW pairs hashes."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from ..fileio import sha256_file, write_text_atomic
from .errors import DataError

# SHA-256 of the LFW protocol files as published in scikit-learn's LFW fetcher (the same bytes as
# the official LFW site). A pairs file that matches one of these is the standard protocol.
PUBLISHED_SHA256 = {
    "pairs.txt": "ea42330c62c92989f9d7c03237ed5d591365e89b3e649747777b70e692dc1592",
    "pairsDevTrain.txt": "1d454dada7dfeca0e7eab6f65dc4e97a6312d44cf142207be28d688be92aabfa",
    "pairsDevTest.txt": "7cb06600ea8b2814ac26e946201cdb304296262aad67d046a16a7ec85d0ff87c",
}

SUMS_NAME = "SHA256SUMS"
_SUMS_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def normalize_relpath(text: str) -> str:
    """'./a/b.jpg' -> 'a/b.jpg'; refuses absolute paths and '..' so entries stay inside the root."""
    path = PurePosixPath(text.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts or re.match(r"^[A-Za-z]:", text):
        raise ValueError(f"path {text!r} is not a relative path inside the data folder")
    return path.as_posix()  # PurePosixPath already drops "./" parts


def parse_sha256sums(text: str, *, file: str = SUMS_NAME) -> dict[str, str]:
    """Parse '<sha256>  ./rel/path' lines (sha256sum format) into {rel/path: lowercase hex}."""
    sums: dict[str, str] = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = _SUMS_LINE.match(line.rstrip("\r"))
        try:
            if not match:
                raise ValueError("expected '<64 hex digits>  <path>'")
            rel = normalize_relpath(match.group(2))
        except ValueError as exc:
            raise DataError(f"malformed checksum line: {exc}", file=file, line=line_no) from None
        digest = match.group(1).lower()
        if sums.get(rel, digest) != digest:
            raise DataError(f"{rel} is listed twice with different checksums", file=file, line=line_no)
        sums[rel] = digest
    return sums


def read_sha256sums(path: str | os.PathLike) -> dict[str, str]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError("not UTF-8 text", file=path) from None
    return parse_sha256sums(text, file=str(path))


def write_sha256sums(root: str | os.PathLike, rel_paths: Iterable[str], out: str | os.PathLike | None = None) -> Path:
    """Hash root/rel for each rel path and write a sorted SHA256SUMS (default root/SHA256SUMS)."""
    root = Path(root)
    out = Path(out) if out is not None else root / SUMS_NAME
    lines = [f"{sha256_file(root / rel)}  ./{normalize_relpath(rel)}\n" for rel in sorted(set(rel_paths))]
    write_text_atomic(out, "".join(lines))  # never leave a half-written checksum file behind
    return out


def verify_file(path: str | os.PathLike, expected: str, *, label: str | None = None) -> str:
    """Raise DataError unless the file exists and its SHA-256 equals expected; return the digest."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file listed in the checksums is missing", file=label or path)
    actual = sha256_file(path)
    if actual != expected.lower():
        raise DataError(f"SHA-256 mismatch: expected {expected.lower()}, got {actual}", file=label or path)
    return actual

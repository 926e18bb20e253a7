"""The two file primitives every cache and output uses: hash a file, write a file atomically.

``atomic_write(path)`` yields a temporary path in the same folder (unique per process and call,
so concurrent writers never share one); when the block ends without an exception the file is
fsync'ed and moved into place with ``os.replace``, so a reader sees the old file or the new one,
never a half-written one. On an exception the temporary file is removed.

Temporary names look like ``.<name>.<pid>.<8 hex>.tmp``; ``is_temp_name`` recognises them, so
``advface cache prune`` can remove the ones a killed process left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Iterator

_TMP_RE = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def temp_path(target: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``target`` (same folder, hence same file system)."""
    target = Path(target)
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def is_temp_name(name: str) -> bool:
    """True for names made by :func:`temp_path`."""
    return bool(_TMP_RE.match(name))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success fsync it and ``os.replace`` it onto ``path``.

    Example (numpy appends ".npz" to a file NAME that lacks it, so write through a handle)::

        with atomic_write("out/result.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, x=x)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return write_bytes_atomic(path, text.encode(encoding))


def write_json_atomic(path: str | os.PathLike, obj, indent: int | None = 1) -> Path:
    """``obj`` as JSON (NaN/inf refused), written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


__all__ = ["atomic_write", "is_temp_name", "sha256_file", "temp_path", "write_bytes_atomic",
           "write_json_atomic", "write_text_atomic"]

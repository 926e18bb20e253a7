"""InsightFace verification .bin files (lfw.bin, cfp_fp.bin, ...), read without trusting pickle.

A .bin file is a pickle of (images, issame): images is a list of encoded images (JPEG/PNG bytes),
issame[k] tells whether images 2k and 2k+1 show the same person.
"""

from __future__ import annotations

import codecs
import importlib
import io
import os
import pickle
from pathlib import Path

import numpy as np

from .errors import DataError
from .pairs import Pair

BIN_FOLDS = 10  # InsightFace evaluates its .bin sets with 10 consecutive, unshuffled folds


def bin_image_id(index: int) -> str:
    return f"bin/{index:06d}"


def _latin1_encode(text, encoding="latin1", errors="strict"):
    # Python 3 pickles bytes under protocols 0-2 as _codecs.encode(text, "latin1"); nothing else is needed.
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise _Refused(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1", errors)


def _numpy_attr(module_names: tuple[str, ...], attr: str):
    for module_name in module_names:
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            continue
    return None


def _allowed_globals() -> dict[tuple[str, str], object]:
    # Some .bin writers store numpy arrays (uint8 image buffers, a bool issame array) or numpy bool
    # scalars. These callables only build arrays, dtypes and scalars from plain data: none of them
    # imports, calls or evaluates anything named by the file.
    allowed: dict[tuple[str, str], object] = {
        ("_codecs", "encode"): _latin1_encode,
        ("builtins", "bytes"): bytes,  # protocols 0-2 write b"" as bytes()
        ("__builtin__", "bytes"): bytes,
    }
    for module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "ndarray")] = np.ndarray
        allowed[(module, "dtype")] = np.dtype
    for attr, submodule in (("_reconstruct", "multiarray"), ("scalar", "multiarray"), ("_frombuffer", "numeric")):
        modules = (f"numpy._core.{submodule}", f"numpy.core.{submodule}")  # numpy 2 names first
        found = _numpy_attr(modules, attr)
        if found is not None:
            for module in modules:
                allowed[(module, attr)] = found
    return allowed


class _Refused(pickle.UnpicklingError):
    pass


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves no global except a fixed allowlist (see _allowed_globals).

    Lists, tuples, bytes, str, ints and bools need no globals at all, so a legitimate .bin file
    never reaches find_class for them; anything such as os.system or builtins.eval is refused.
    """

    _allowed = None

    def find_class(self, module: str, name: str):
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _allowed_globals()
        found = RestrictedUnpickler._allowed.get((module, name))
        if found is None:
            raise _Refused(f"refused to load global '{module}.{name}'")
        return found

    def persistent_load(self, pid):
        raise _Refused("refused a persistent id")


def _unpickle(data: bytes, label: str):
    # Files written by Python 2 hold images as str; decoding them as text fails, so retry the way
    # InsightFace does (encoding="bytes"), then latin1 (what numpy recommends for Python 2 arrays).
    last_error: Exception | None = None
    for encoding in ("ASCII", "bytes", "latin1"):
        try:
            return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
        except UnicodeDecodeError as exc:
            last_error = exc
            continue
        except _Refused as exc:
            raise DataError(
                f"{exc}: an InsightFace .bin holds only image bytes and booleans, so this file is not one "
                "and may be malicious; it was not loaded",
                file=label,
            ) from None
        except Exception as exc:  # any other failure of untrusted data is just "unreadable"
            last_error = exc
            break
    raise DataError(f"not a readable InsightFace .bin pickle ({last_error})", file=label)


def _as_image_bytes(item, index: int, label: str) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, str):  # latin1 fallback for Python 2 files
        return item.encode("latin1")
    if isinstance(item, np.ndarray) and item.dtype in (np.uint8, np.int8) and item.ndim == 1:
        return item.tobytes()
    raise DataError(f"image {index} is a {type(item).__name__}, expected encoded image bytes", file=label)


def _as_bool(item, index: int, label: str) -> bool:
    if isinstance(item, (bool, np.bool_)):
        return bool(item)
    if isinstance(item, (int, np.integer)) and int(item) in (0, 1):
        return bool(item)
    raise DataError(f"issame[{index}] is {item!r}, expected a boolean", file=label)


def load_bin(path: str | os.PathLike) -> tuple[list[bytes], list[bool]]:
    """Read an InsightFace .bin file; return (encoded images, issame). Raises DataError on anything odd."""
    path = Path(path)
    label = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError("file is missing", file=label) from None
    obj = _unpickle(data, label)
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise DataError("expected a pickled pair (images, issame)", file=label)
    images, issame = obj
    sequence_types = (list, tuple, np.ndarray)
    if not isinstance(images, sequence_types) or not isinstance(issame, sequence_types):
        raise DataError("images and issame must be sequences", file=label)
    if len(issame) == 0:
        raise DataError("the file holds no pairs", file=label)
    if len(images) != 2 * len(issame):
        raise DataError(
            f"{len(images)} images for {len(issame)} pairs; expected exactly 2 images per pair", file=label
        )
    return (
        [_as_image_bytes(item, k, label) for k, item in enumerate(images)],
        [_as_bool(item, k, label) for k, item in enumerate(issame)],
    )


def fold_sizes(n_pairs: int, n_folds: int = BIN_FOLDS) -> list[int]:
    """Consecutive fold sizes; the first n_pairs % n_folds folds get one extra pair (as KFold does)."""
    if n_folds < 1 or n_pairs < n_folds:
        raise ValueError(f"cannot split {n_pairs} pairs into {n_folds} folds")
    base, extra = divmod(n_pairs, n_folds)
    return [base + (1 if fold < extra else 0) for fold in range(n_folds)]


def bin_pairs(issame: list[bool], n_folds: int = BIN_FOLDS) -> list[Pair]:
    """Pairs (bin/2k, bin/2k+1) in file order, split into n_folds consecutive folds numbered from 1."""
    pairs, start = [], 0
    for fold, size in enumerate(fold_sizes(len(issame), n_folds), start=1):
        for k in range(start, start + size):
            pairs.append(Pair(fold=fold, a=bin_image_id(2 * k), b=bin_image_id(2 * k + 1), same=issame[k]))
        start += size
    return pairs

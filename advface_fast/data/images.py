"""Strict image decoding: uint8 HxWx3 RGB or a clear DataError, never a silently damaged image."""

from __future__ import annotations

import io
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from .errors import DataError
from .policy import ALPHA_BACKGROUND

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview]

# Modes that convert to RGB without guessing much. Alpha is composited onto ALPHA_BACKGROUND (the
# colour a transparent pixel is shown on), never dropped; CMYK uses PIL's plain (profile-free) formula. Modes such as I;16 or F are refused even with convert=True:
# squeezing them into uint8 would need a scaling choice we should not make silently.
CONVERTIBLE_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})

_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})

_MODE_WORDS = {"1": "black-and-white", "L": "grayscale", "LA": "grayscale with alpha", "P": "palette",
               "RGBA": "RGB with alpha", "CMYK": "CMYK"}

# A JPEG's entropy-coded data can never contain FF D9, so the end-of-image marker must sit near the
# end of an intact file; 1 KiB leaves room for the trailing padding some writers add.
_JPEG_TAIL = 1024
_truncation_lock = threading.Lock()


@contextmanager
def _refuse_truncated():
    """Make PIL raise on truncated files even if someone set ImageFile.LOAD_TRUNCATED_IMAGES.

    PIL only offers the module-wide flag; it is touched (under a lock, and restored) only in the
    rare case it was switched on, so the usual path changes no global state.
    """
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        yield
        return
    with _truncation_lock:
        saved, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


def read_bytes(source: ImageSource, *, name: str | None = None) -> tuple[bytes, str]:
    """Return (bytes, label for messages); a missing, unreadable or empty file is a DataError."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, label = bytes(source), name or "<bytes>"
    else:
        path = Path(source)
        label = name or str(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise DataError("image file is missing", file=label) from None
        except OSError as exc:
            raise DataError(f"cannot read image file ({exc.strerror or exc})", file=label) from None
    if not data:
        raise DataError("image file is empty (0 bytes)", file=label)
    return data, label


def _check_mode(mode: str, label: str, convert: bool) -> None:
    if mode == "RGB":
        return
    word = _MODE_WORDS.get(mode, "not RGB")
    if not convert:
        raise DataError(f"image has mode {mode!r} ({word}), expected RGB", file=label)
    if mode not in CONVERTIBLE_MODES:
        raise DataError(f"image has mode {mode!r}, which is not converted to RGB automatically", file=label)


def _check_tail(data: bytes, fmt: str | None, label: str) -> None:
    if fmt == "JPEG" and b"\xff\xd9" not in data[-_JPEG_TAIL:]:
        raise DataError("JPEG has no end-of-image marker (truncated file?)", file=label)
    if fmt == "PNG" and b"IEND" not in data[-64:]:
        raise DataError("PNG has no IEND chunk (truncated file?)", file=label)


def has_alpha(image: Image.Image) -> bool:
    """Whether the image carries transparency (an alpha band, or a palette/gray transparency key)."""
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of a PIL image; transparency is composited onto ALPHA_BACKGROUND, not dropped."""
    if not has_alpha(image):
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def conversion_note(mode: str, alpha: bool) -> str:
    """How an image of `mode` was converted, for the records: "CMYK -> RGB", "RGBA -> RGB, alpha
    composited onto (255, 255, 255)"."""
    note = f"{mode} ({_MODE_WORDS.get(mode, 'not RGB')}) -> RGB"
    return note + (f", alpha composited onto {ALPHA_BACKGROUND}" if alpha else "")


def conversion_of(data: bytes) -> str:
    """conversion_note for encoded image bytes (reads the header only)."""
    with Image.open(io.BytesIO(data)) as image:
        return conversion_note(image.mode, has_alpha(image))


def probe_image(source: ImageSource, *, name: str | None = None, convert: bool = False) -> str:
    """Cheap check without decoding pixels: readable, non-empty, an image, not cut short, RGB.

    Returns the image mode. Truncation is caught from the file tail for JPEG and PNG; a full
    decode (read_image) catches it for every format. Damage inside the compressed data that keeps
    the length is only caught by checksums.
    """
    data, label = read_bytes(source, name=name)
    try:
        with Image.open(io.BytesIO(data)) as image:
            mode, fmt = image.mode, image.format
    except UnidentifiedImageError:
        raise DataError("not a recognised image file", file=label) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"corrupt image header ({exc})", file=label) from None
    _check_tail(data, fmt, label)
    _check_mode(mode, label, convert)
    return mode


def read_image(source: ImageSource, *, name: str | None = None, convert: bool = False) -> tuple[np.ndarray, str]:
    """Decode fully; return (uint8 HxWx3 RGB array, the file's original mode).

    Non-RGB images raise a DataError naming the mode, unless convert=True and the mode is in
    CONVERTIBLE_MODES. EXIF orientation is ignored: pixels are returned as stored.
    """
    data, label = read_bytes(source, name=name)
    try:
        with _refuse_truncated(), Image.open(io.BytesIO(data)) as image:
            image.load()
            mode, fmt = image.mode, image.format
            _check_mode(mode, label, convert)
            rgb = image if mode == "RGB" else to_rgb(image)
            array = np.array(rgb, dtype=np.uint8)
    except UnidentifiedImageError:
        raise DataError("not a recognised image file", file=label) from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"image is implausibly large ({exc})", file=label) from None
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"corrupt or truncated image ({exc})", file=label) from None
    _check_tail(data, fmt, label)
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(f"decoded to shape {array.shape}, expected HxWx3", file=label)
    return array, mode


def read_rgb(source: ImageSource, *, name: str | None = None, convert: bool = False) -> np.ndarray:
    """Decode an image file or encoded bytes to a uint8 HxWx3 RGB array (see read_image)."""
    return read_image(source, name=name, convert=convert)[0]

"""Strict image decoding: uint8 HxWx3 RGB or a clear DataError, never a silently damaged image."""

from __future__ import annotations

import io
import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
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
_open_lock = threading.Lock()  # see _open


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
    if mode not in CONVERTIBLE_MODES:  # e.g. 16-bit or float: refused whatever on_bad says
        raise DataError(f"image has mode {mode!r} ({word}), which is not converted to RGB automatically", file=label)
    if not convert:
        raise DataError(f"image has mode {mode!r} ({word}), expected RGB", file=label)


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
    """conversion_note for encoded image bytes (reads the header only, through decode_image)."""
    decoded = decode_image(data, convert=True, pixels=False)
    return conversion_note(decoded.mode, decoded.alpha)


@dataclass(frozen=True)
class DecodedImage:
    """What decode_image found: ``array`` (uint8 HxWx3 RGB, None when only the header was read),
    the file's original ``mode`` and ``format``, its ``size`` (width, height) and whether it has
    transparency (``alpha``)."""

    array: np.ndarray | None
    mode: str
    format: str | None
    size: tuple[int, int]
    alpha: bool


def _open(data: bytes) -> Image.Image:
    """Image.open on bytes with PIL's decompression-bomb warning raised as an error, not printed.

    PIL warns (DecompressionBombWarning) above MAX_IMAGE_PIXELS and raises above twice that, both
    from inside Image.open. Python's warning filters are process-wide, so the filter is set only
    around this header parse (microseconds) and under a lock; decoding the pixels runs outside it.
    PIL's own "cannot identify" hints (UserWarnings from PIL.Image) are dropped here too: the
    DataError says the file is not a recognised image.
    """
    with _open_lock, warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"PIL\.Image$")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def _check_pixels(size: tuple[int, int], label: str) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        raise DataError(f"image is implausibly large ({size[0]}x{size[1]} pixels, more than PIL's limit of "
                        f"{limit}; a decompression bomb?)", file=label)


def _check_size(size: tuple[int, int], expected: tuple[int, int] | None, label: str) -> None:
    """``size`` is PIL's (width, height); ``expected`` is (height, width), as a model's input_size."""
    if expected is not None and (size[1], size[0]) != tuple(expected):
        raise DataError(f"chip is {size[1]}x{size[0]}, expected {expected[0]}x{expected[1]} (--aligned)", file=label)


def decode_image(source: ImageSource, *, name: str | None = None, convert: bool = False, pixels: bool = True,
                 size: tuple[int, int] | None = None) -> DecodedImage:
    """THE image decoder of the package: every file or encoded image any command reads goes through
    here, and every way it can fail ends as a DataError naming the file.

    Reads the bytes (missing, unreadable, empty), opens the header (not an image, corrupt header,
    decompression bomb: more than PIL.Image.MAX_IMAGE_PIXELS pixels, whether PIL would warn or
    raise), checks the size against ``size`` ((height, width) of the fixed-size chips a caller
    expects, e.g. ``--aligned``), the tail of JPEG / PNG files (truncation) and the mode (RGB, or one
    of CONVERTIBLE_MODES with convert=True); with ``pixels`` it then decodes fully (any decoder
    failure: truncated or damaged data, out of memory) to uint8 HxWx3 RGB. EXIF orientation is
    ignored: pixels are returned as stored.
    """
    data, label = read_bytes(source, name=name)
    try:
        with _refuse_truncated():
            image = _open(data)
            with image:
                mode, fmt, dims, alpha = image.mode, image.format, tuple(image.size), has_alpha(image)
                _check_pixels(dims, label)
                _check_size(dims, size, label)
                _check_tail(data, fmt, label)
                _check_mode(mode, label, convert)
                array = None
                if pixels:
                    image.load()
                    array = np.array(image if mode == "RGB" else to_rgb(image), dtype=np.uint8)
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError("not a recognised image file", file=label) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"image is implausibly large ({exc})", file=label) from None
    except MemoryError:
        raise DataError("image is too large to decode (out of memory)", file=label) from None
    except Exception as exc:  # noqa: BLE001 - a damaged file can make a decoder raise anything
        what = "corrupt or truncated image" if pixels else "corrupt image header"
        raise DataError(f"{what} ({type(exc).__name__}: {exc})", file=label) from None
    if array is not None and (array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape[:2]):
        raise DataError(f"decoded to shape {array.shape}, expected HxWx3", file=label)
    return DecodedImage(array, mode, fmt, dims, alpha)


def probe_image(source: ImageSource, *, name: str | None = None, convert: bool = False,
                size: tuple[int, int] | None = None) -> str:
    """Cheap check without decoding pixels: readable, non-empty, an image, not implausibly large,
    of the ``size`` asked for, not cut short, RGB (see decode_image).

    Returns the image mode. Truncation is caught from the file tail for JPEG and PNG; a full
    decode (read_image) catches it for every format. Damage inside the compressed data that keeps
    the length is only caught by checksums.
    """
    return decode_image(source, name=name, convert=convert, pixels=False, size=size).mode


def read_image(source: ImageSource, *, name: str | None = None, convert: bool = False,
               size: tuple[int, int] | None = None) -> tuple[np.ndarray, str]:
    """Decode fully; return (uint8 HxWx3 RGB array, the file's original mode) (see decode_image).

    Non-RGB images raise a DataError naming the mode, unless convert=True and the mode is in
    CONVERTIBLE_MODES. EXIF orientation is ignored: pixels are returned as stored.
    """
    decoded = decode_image(source, name=name, convert=convert, size=size)
    return decoded.array, decoded.mode


def read_rgb(source: ImageSource, *, name: str | None = None, convert: bool = False) -> np.ndarray:
    """Decode an image file or encoded bytes to a uint8 HxWx3 RGB array (see read_image)."""
    return read_image(source, name=name, convert=convert)[0]

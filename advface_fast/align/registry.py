"""Aligner registry: a model's ``alignment`` dict -> the config object that makes its chips.

Each model in the model registry names the chip it expects (``ModelSpec.alignment``); the
``"aligner"`` key picks the aligner (``"dlib"`` when absent) and the other keys are that
aligner's settings::

    make_align_config({"size": 150, "padding": 0.25})                            # dlib (AlignConfig)
    make_align_config({"aligner": "mtcnn", "size": 112, "template": "arcface"})  # MTCNN

Every config object has the same small interface, which ``align_images``, the chip cache and the
experiment runner use without knowing the aligner:

- ``name``: the aligner's registry name;
- ``size``: chips are ``size x size x 3`` uint8 RGB;
- ``key()``: a readable string of every setting (part of the chip-cache key and of attack-store keys);
- ``make_aligner()``: a fresh aligner with ``align(image) -> (chip, path)``, built once per worker
  process (aligners hold models and are not picklable; the config is);
- ``meta()``: everything else the chips depend on (aligner version, library version, sha256 of
  every model file), merged into the chip-cache metadata. dlib's dict is unchanged from before
  the registry, so existing dlib chip caches stay valid.

The chip cache key hashes ``meta()`` (with the dataset fingerprint), so chips of one image made
by two aligners - or one aligner with two settings - are two different entries.

No face: dlib walks its detector chain down to the fixed centre box ("center"). MTCNN has one
detector, so ``MtcnnAlignConfig`` adds the same last resort: when MTCNN finds no face the chip is
the LFW centre box (``LFW_CENTER_BOX``, fractions of the image) cropped and resized to
``size x size`` (not landmark-aligned), and its path is ``"center"``. The input policy
(``--no-face error|skip|center``, applied in ``prepare_pairs``) then treats it exactly as a dlib
"center" image. ``center_fallback=False`` makes a faceless image raise ``NoFaceError`` instead.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields

import numpy as np

from advface_fast.align.dlib_align import LFW_CENTER_BOX, AlignConfig, NoFaceError

DEFAULT_ALIGNER = "dlib"


@dataclass(frozen=True)
class MtcnnAlignConfig:
    """MTCNN chips (see ``advface_fast.align.mtcnn``) plus the centre-box fallback for faceless images."""

    size: int = 112
    template: str = "arcface"
    margin: float = 0.0
    min_face: int = 20
    thresholds: tuple = (0.6, 0.7, 0.7)
    factor: float = 0.709
    center_fallback: bool = True
    center_box: tuple = LFW_CENTER_BOX
    name: str = field(default="mtcnn", init=False)

    def __post_init__(self):
        object.__setattr__(self, "center_box", tuple(float(v) for v in self.center_box))
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        self.mtcnn_config()  # validates the MTCNN settings
        left, top, right, bottom = self.center_box
        if not (0 <= left < right <= 1 and 0 <= top < bottom <= 1):
            raise ValueError(f"center_box must be fractions left < right, top < bottom, got {self.center_box}")

    def mtcnn_config(self):
        from advface_fast.align.mtcnn import MtcnnConfig

        return MtcnnConfig(size=self.size, template=self.template, margin=self.margin, min_face=self.min_face,
                           thresholds=self.thresholds, factor=self.factor)

    def key(self) -> str:
        key = self.mtcnn_config().key()
        if self.center_fallback:
            key += "-center" + ",".join(f"{v:g}" for v in self.center_box)
        return key

    def make_aligner(self) -> "MtcnnCenterAligner":
        return MtcnnCenterAligner(self)

    def meta(self) -> dict:
        import torch

        from advface_fast.align.mtcnn import weights_dir

        return {"align": self.key(), "aligner": "mtcnn", "torch": torch.__version__.split("+")[0],
                "models": _weights_identity(str(weights_dir()))}


def _file_stamp(folder: str) -> tuple:
    import os

    return tuple((n, os.stat(os.path.join(folder, f"{n}.pt")).st_mtime_ns) for n in ("pnet", "rnet", "onet"))


def _weights_identity(folder: str) -> dict[str, str]:
    return _weights_identity_memo(folder, _file_stamp(folder))


@functools.lru_cache(maxsize=8)
def _weights_identity_memo(folder: str, stamp: tuple) -> dict[str, str]:
    from advface_fast.align.mtcnn import weights_identity

    return weights_identity(folder)  # stamp only keys the memo


def center_chip(image: np.ndarray, size: int, box=LFW_CENTER_BOX) -> np.ndarray:
    """The fixed centre box (fractions left, top, right, bottom of the image) cropped and resized to size x size."""
    from advface_fast.align.mtcnn import crop_box

    height, width = image.shape[:2]
    left, top, right, bottom = box
    pixels = (round(left * width), round(top * height), round(right * width) - 1, round(bottom * height) - 1)
    return crop_box(image, pixels, size, 0.0)


class MtcnnCenterAligner:
    """``MtcnnAligner`` whose faceless images fall back to the centre box (path "center")."""

    def __init__(self, config: MtcnnAlignConfig):
        from advface_fast.align.mtcnn import MtcnnAligner

        self.config = config
        self.mtcnn = MtcnnAligner(config.mtcnn_config())

    def align(self, image: np.ndarray) -> tuple[np.ndarray, str]:
        from advface_fast.align.mtcnn import as_rgb

        image = as_rgb(image)
        try:
            return self.mtcnn.align(image)
        except NoFaceError:
            if not self.config.center_fallback:
                raise
            return center_chip(image, self.config.size, self.config.center_box), "center"


def _dlib(settings: dict) -> AlignConfig:
    return AlignConfig(**settings)


def _mtcnn(settings: dict) -> MtcnnAlignConfig:
    return MtcnnAlignConfig(**settings)


ALIGNERS = {"dlib": _dlib, "mtcnn": _mtcnn}


def list_aligners() -> list[str]:
    return sorted(ALIGNERS)


def make_align_config(alignment: dict | None = None):
    """The config object for a model's ``alignment`` dict (``"aligner"`` picks it; default dlib)."""
    settings = dict(alignment or {})
    name = settings.pop("aligner", DEFAULT_ALIGNER)
    if name not in ALIGNERS:
        raise ValueError(f"unknown aligner {name!r}; available: {', '.join(list_aligners())}")
    try:
        return ALIGNERS[name](settings)
    except TypeError as err:  # an unknown setting
        raise ValueError(f"bad settings for aligner {name!r}: {err}") from None


def align_settings(config) -> dict:
    """The alignment dict that ``make_align_config`` turns back into ``config``."""
    out = {f.name: getattr(config, f.name) for f in fields(config) if f.init}
    return {"aligner": config.name, **out}


__all__ = ["ALIGNERS", "DEFAULT_ALIGNER", "MtcnnAlignConfig", "MtcnnCenterAligner", "align_settings",
           "center_chip", "list_aligners", "make_align_config"]

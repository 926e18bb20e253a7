"""Face alignment: an aligner registry (dlib: detection + 5 landmarks -> 150x150 chips; MTCNN ->
ArcFace 112x112 / FaceNet 160x160 chips), with an on-disk chip cache keyed by aligner and settings."""

from advface_fast.align.chip_cache import ALIGN_PATHS, AlignedChips, ChipCache
from advface_fast.align.dlib_align import (
    LFW_CENTER_BOX,
    AlignConfig,
    DlibAligner,
    NoFaceError,
    align_images,
    cache_meta,
)
from advface_fast.align.registry import MtcnnAlignConfig, list_aligners, make_align_config

__all__ = [
    "ALIGN_PATHS",
    "LFW_CENTER_BOX",
    "AlignConfig",
    "AlignedChips",
    "ChipCache",
    "DlibAligner",
    "NoFaceError",
    "align_images",
    "cache_meta",
    "list_aligners",
    "make_align_config",
    "MtcnnAlignConfig",
]

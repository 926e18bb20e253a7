"""Face alignment: dlib detection + 5 landmarks -> 150x150 chips, with an on-disk chip cache."""

from advface_fast.align.chip_cache import ALIGN_PATHS, AlignedChips, ChipCache
from advface_fast.align.dlib_align import (
    LFW_CENTER_BOX,
    AlignConfig,
    DlibAligner,
    NoFaceError,
    align_images,
    cache_meta,
)

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
]

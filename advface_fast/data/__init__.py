"""LFW data layer: pairs files, strict image decoding, checksums, download, InsightFace .bin files."""

from .checksums import PUBLISHED_SHA256, read_sha256sums, sha256_file, write_sha256sums
from .download import (
    ChecksumError,
    DownloadError,
    RemoteFile,
    UnsafeArchiveError,
    download_lfw,
    fetch,
    safe_extract_tar,
)
from .errors import DataError, DataIssue
from .images import DecodedImage, decode_image, probe_image, read_image, read_rgb
from .insightface_bin import load_bin
from .lfw import PairDataset, load_lfw
from .policy import NO_FACE_CHOICES, ON_BAD_CHOICES, DataWarning, InputPolicy
from .pairs import Pair, PairsFile, image_id, parse_pairs, parse_pairs_text, parse_people
from .paths import LFWNotFoundError, default_data_dir, resolve_lfw_path

__all__ = [
    "ChecksumError",
    "DataError",
    "DataIssue",
    "DataWarning",
    "DecodedImage",
    "InputPolicy",
    "NO_FACE_CHOICES",
    "ON_BAD_CHOICES",
    "DownloadError",
    "LFWNotFoundError",
    "PUBLISHED_SHA256",
    "Pair",
    "PairDataset",
    "PairsFile",
    "RemoteFile",
    "UnsafeArchiveError",
    "decode_image",
    "default_data_dir",
    "download_lfw",
    "fetch",
    "image_id",
    "load_bin",
    "load_lfw",
    "parse_pairs",
    "parse_pairs_text",
    "parse_people",
    "probe_image",
    "read_image",
    "read_rgb",
    "read_sha256sums",
    "resolve_lfw_path",
    "safe_extract_tar",
    "sha256_file",
    "write_sha256sums",
]

"""Where advface-fast keeps derived artefacts, and how cache entries are keyed."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def default_cache_root() -> Path:
    """`$ADVFACE_HOME` if it is set and non-empty, else `~/.cache/advface-fast`."""
    env = os.environ.get("ADVFACE_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "advface-fast"


def config_key(**parts) -> str:
    """Short sha256 hex of `parts` as sorted JSON: equal parts give equal keys, any change a new key.

    Values that JSON cannot encode (paths, ...) are encoded with `str`.
    """
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]

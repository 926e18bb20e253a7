"""Where LFW lives: an explicit path, $ADVFACE_LFW, or the default data directory."""

from __future__ import annotations

import os
from pathlib import Path

ENV_LFW = "ADVFACE_LFW"
ENV_HOME = "ADVFACE_HOME"


class LFWNotFoundError(FileNotFoundError):
    """No LFW data at the given, configured or default location."""


def default_data_dir() -> Path:
    """$ADVFACE_HOME, else ~/.cache/advface-fast."""
    home = os.environ.get(ENV_HOME)
    return Path(home).expanduser() if home else Path("~/.cache/advface-fast").expanduser()


def default_lfw_path() -> Path:
    return default_data_dir() / "lfw_home"


def _how_to_get_lfw() -> str:
    return (
        "Pass the path explicitly (a folder with pairs.txt and lfw-deepfunneled/, lfw_funneled/ or lfw/; "
        "scikit-learn's lfw_home folder, e.g. ~/scikit_learn_data/lfw_home; or an InsightFace lfw.bin), "
        f"set {ENV_LFW}, or download it into {default_lfw_path()} with `advface download-lfw` "
        "(advface_fast.data.download_lfw)."
    )


def resolve_lfw_path(path: str | os.PathLike | None = None) -> Path:
    """Pick the LFW location: path if given, else $ADVFACE_LFW, else default_lfw_path().

    Only checks that the location exists; load_lfw checks what is inside.
    """
    if path is not None and str(path) != "":
        candidate, origin = Path(path).expanduser(), "the given path"
    elif os.environ.get(ENV_LFW):
        candidate, origin = Path(os.environ[ENV_LFW]).expanduser(), f"${ENV_LFW}"
    else:
        candidate, origin = default_lfw_path(), "the default location"
    if not candidate.exists():
        unfinished = candidate.with_name(candidate.name + ".download")
        note = (f" An unfinished download is in {unfinished}; `advface download-lfw` resumes it."
                if origin == "the default location" and unfinished.is_dir() else "")
        raise LFWNotFoundError(f"no LFW data at {candidate} ({origin}).{note} {_how_to_get_lfw()}")
    if origin == "the default location" and candidate.is_dir() and not any(candidate.glob("pairs*.txt")):
        # An empty or half-filled folder left by an older failed download is not LFW.
        raise LFWNotFoundError(f"{candidate} ({origin}) holds no pairs file (an unfinished download?); "
                               f"`advface download-lfw` completes it. {_how_to_get_lfw()}")
    return candidate


def shown_path(path, root) -> str:
    """How a results file names ``path``: relative to the dataset ``root`` when it lies inside it (so
    committed results never carry the paths of the machine that made them), else as given."""
    from pathlib import Path

    path, root = Path(path), Path(root)
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)

"""Locate model files shipped by the `face_recognition_models` pip package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

MODELS_PACKAGE = "face_recognition_models"


def models_dir() -> Path:
    """Folder holding the package's `.dat` files.

    The package is found without importing it: its `__init__` needs `pkg_resources`,
    which recent setuptools no longer ships.
    """
    spec = importlib.util.find_spec(MODELS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the '{MODELS_PACKAGE}' package is not installed; "
            f"install it with: pip install {MODELS_PACKAGE}==0.3.0"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def model_file(name: str) -> Path:
    """Path of model file `name` (e.g. 'shape_predictor_5_face_landmarks.dat'); raises if it is missing."""
    path = models_dir() / name
    if not path.is_file():
        available = sorted(p.name for p in path.parent.glob("*.dat"))
        raise FileNotFoundError(f"model file {name!r} not found in {path.parent}; available: {available}")
    return path

"""Shared fixtures: where the test data lives, and a private cache root per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Tests read LFW from the data folder beside the repository unless ADVFACE_TEST_DATA says otherwise.
DATA_ROOT = Path(os.environ.get("ADVFACE_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))
LFW_CI = DATA_ROOT / "lfw_ci"
LFW_FULL = DATA_ROOT / "lfw"
# In CI (CI=true) a missing data folder or peer library is a failure, never a silent skip.
CI_MODE = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(what: str) -> None:
    """Skip the test because `what` is missing; in CI mode fail it instead."""
    if CI_MODE:
        pytest.fail(f"{what} (CI=true: missing test inputs are an error, not a skip)", pytrace=False)
    pytest.skip(what, allow_module_level=True)


def need_module(name: str, hint: str = ""):
    """`pytest.importorskip`, except that in CI mode a missing module fails the test."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as err:
        missing(f"could not import {name!r}: {err}" + (f" ({hint})" if hint else ""))


def need_data(path: Path) -> Path:
    """`path` (a dataset folder with pairs.txt); skipped when absent, failed in CI mode."""
    if not (path / "pairs.txt").exists():
        missing(f"test data not found at {path} (set ADVFACE_TEST_DATA to the folder holding lfw_ci/ and lfw/)")
    return path


@pytest.fixture(scope="session")
def lfw_ci() -> Path:
    return need_data(LFW_CI)


@pytest.fixture(scope="session")
def lfw_full() -> Path:
    return need_data(LFW_FULL)


def _dlib_chipper():
    """A function image -> dlib's own aligned chip (HOG + 5 landmarks + get_face_chip), or None."""
    dlib = need_module("dlib")
    from advface_fast.models.assets import model_file

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(model_file("shape_predictor_5_face_landmarks.dat")))

    def chip(img):
        dets = detector(img, 1)
        return dlib.get_face_chip(img, predictor(img, dets[0]), size=150, padding=0.25) if len(dets) else None

    return chip


def _read_rgb(path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="session")
def ci_chips(lfw_ci):
    """Real aligned LFW chips made by dlib itself, independent of our alignment code: uint8 N x 150 x 150 x 3."""
    import numpy as np

    chip = _dlib_chipper()
    chips = [c for c in (chip(_read_rgb(p)) for p in sorted((lfw_ci / "lfw-deepfunneled").glob("*/*.jpg"))[:12])
             if c is not None]
    assert len(chips) >= 10
    return np.stack(chips)


@pytest.fixture(scope="session")
def ci_pair_chips(lfw_ci):
    """The first 8 matched and 8 mismatched lfw_ci pairs as dlib chips: (queries, galleries), uint8,
    matched first."""
    import numpy as np

    chip = _dlib_chipper()

    def load(name, number):
        return chip(_read_rgb(lfw_ci / "lfw-deepfunneled" / name / f"{name}_{number:04d}.jpg"))

    matched, mismatched = [], []
    for line in (lfw_ci / "pairs.txt").read_text().splitlines()[1:]:
        f = line.split("\t")
        pair = (f[0], int(f[1]), f[0], int(f[2])) if len(f) == 3 else (f[0], int(f[1]), f[2], int(f[3]))
        bucket = matched if len(f) == 3 else mismatched
        if len(bucket) < 8:
            a, b = load(*pair[:2]), load(*pair[2:])
            if a is not None and b is not None:
                bucket.append((a, b))
    assert len(matched) == len(mismatched) == 8
    pairs = matched + mismatched
    return np.stack([a for a, _ in pairs]), np.stack([b for _, b in pairs])


@pytest.fixture(scope="module")
def tiny():
    """A small random conv net with smooth activations, frozen: N x 3 x H x W -> N x 8.
    Fast stand-in for a face model where a test checks attack mechanics, not face verification."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Tanh(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Tanh(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 8),
    )

    class TinyEmbedder(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x - 0.5)

    return TinyEmbedder().eval().requires_grad_(False)

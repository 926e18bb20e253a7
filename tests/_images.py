"""Test images shared by the attack tests."""

from __future__ import annotations

import numpy as np
import torch


def uint8_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Random images on the uint8 grid, with saturated pixels to exercise the [0, 1] box."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(n, 3, size, size))
    img[rng.random(img.shape) < 0.1] = 0
    img[rng.random(img.shape) < 0.1] = 255
    return torch.from_numpy(img).float() / 255.0

"""Float tolerances that hold on any CPU.

oneDNN and onnxruntime choose their kernels by CPU (AVX2, AVX512, AVX512-BF16, AMX), memory layout
and batch size. So two float32 computations of the same function (two runtimes, a fast copy,
another layout, another batch size) agree only up to rounding, and that rounding changes from one
CPU to another. A rounding error is relative: a few ulps of the values involved. So the tolerance
of such a comparison is a fraction of the reference's scale (its largest magnitude), not a fixed
absolute number. An absolute 1e-5 is about 170 ulps at 0.5 but a third of one ulp at 381: the
onnx-prefix test failed it on an Intel AMX Xeon with a relative error of 8e-8.

Bitwise checks stay bitwise where the arithmetic is the same by construction: integers,
uint8-grid images, a pure copy, or the same computation run twice on the same batch. Attack
results compared across batch compositions are equal but for rare flipped pixels (see
``FLIP_FRACTION``).

Example::

    assert_close_to_scale(fast(x), model(x), rel=FP32_DEEP)
"""

from __future__ import annotations

import numpy as np

# Fractions of the reference's scale (max |reference|), each well above the rounding measured on an
# AMD EPYC (AVX512-BF16) and well below any real error (a wrong mean or std, a dropped layer or a
# wrong sign moves outputs by 1e-3 of their scale or more).
FP32_OPS = 1e-6  # a few float32 operations or one short reduction (measured <= 1.2e-7)
FP32_NET = 1e-5  # a small network computed two ways (measured <= 2e-7; 8e-8 on the Intel AMX Xeon)
FP32_DEEP = 3e-5  # a 20-60 layer network, two runtimes or kernel paths (measured <= 2.5e-6)


def _array(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def scale_of(reference) -> float:
    """The largest magnitude in ``reference`` (its finite values)."""
    ref = _array(reference)
    finite = ref[np.isfinite(ref)]
    return float(np.abs(finite).max()) if finite.size else 0.0


def scaled_error(actual, reference) -> float:
    """max |actual - reference| divided by max |reference| (0 when both are all zero)."""
    a, r = _array(actual), _array(reference)
    if a.shape != r.shape:
        raise AssertionError(f"shapes differ: {a.shape} vs {r.shape}")
    err = float(np.abs(a - r).max()) if a.size else 0.0
    scale = scale_of(r)
    return err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))


def close_to_scale(actual, reference, rel: float = FP32_NET) -> bool:
    """True when every |actual - reference| <= rel * max |reference|."""
    return scaled_error(actual, reference) <= rel


def assert_close_to_scale(actual, reference, rel: float = FP32_NET, what: str = "") -> None:
    """Assert that every |actual - reference| <= rel * max |reference| (numpy arrays or torch tensors)."""
    err = scaled_error(actual, reference)
    assert err <= rel, (f"{what + ': ' if what else ''}max |actual - reference| is {err:.3g} of the reference's "
                        f"scale {scale_of(reference):.4g}, more than the {rel:g} allowed")


# Attack results compared across batch compositions (a batch split in parts, rows compacted away):
# oneDNN may compute another batch size with other kernels, and the rounding that changes (~1e-7 of
# a gradient's scale) moves an attack's result only where it flips the sign of a near-zero gradient
# entry (PGD's sign step) or an iterate's rounding to the uint8 grid (C&W): a few isolated pixels.
# Simulated with a one-ulp, batch-size-dependent change of every convolution and linear output: at
# most 5 of 768 values of one image, 1 or 2 grid levels each. A seeding, batching or compaction bug
# changes whole images instead (another random start moves ~8/9 of an image's pixels).
FLIP_FRACTION = 0.02  # of each image's values


def flipped_fraction(actual, expected) -> np.ndarray:
    """Per image (leading dimension): the fraction of its values that differ at all."""
    a, e = _array(actual), _array(expected)
    if a.shape != e.shape:
        raise AssertionError(f"shapes differ: {a.shape} vs {e.shape}")
    return (a != e).reshape(len(a), -1).mean(axis=1) if a.size else np.zeros(len(a))


def same_but_for_rare_flips(actual, expected, max_fraction: float = FLIP_FRACTION) -> bool:
    """True when no image has more than ``max_fraction`` of its values changed."""
    return bool((flipped_fraction(actual, expected) <= max_fraction).all())


def assert_same_but_for_rare_flips(actual, expected, max_fraction: float = FLIP_FRACTION, what: str = "") -> None:
    """Assert that every image equals its counterpart but for at most ``max_fraction`` of its values."""
    frac = flipped_fraction(actual, expected)
    bad = np.flatnonzero(frac > max_fraction)
    assert not bad.size, (f"{what + ': ' if what else ''}images {bad.tolist()[:8]} differ in up to "
                          f"{frac.max():.1%} of their values, more than the {max_fraction:.0%} "
                          "that rounding flips explain")

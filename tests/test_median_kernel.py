"""The 3 x 3 median filter: every path vs the unfold + median reference, bitwise (fp32 and bf16, ties of
uint8-grid images, the smallest planes reflect padding allows, non-contiguous input), the median
defense's forward through it, and the Triton kernel under TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch

from advface_fast.defenses.median import MedianFilter, median_filter
from advface_fast.kernels.median3x3 import median3x3, median3x3_fused, median3x3_reference, resolve_impl

from _interpreter import run_interpreted

SHAPES = [(2, 3, 5, 7), (1, 1, 2, 2), (3, 2, 2, 9), (2, 3, 17, 13), (4, 3, 150, 150)]


def _grid(shape, levels=256, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, levels, shape, generator=g).float() / (levels - 1)).to(dtype)


def test_reference_on_a_hand_computed_plane():
    x = torch.tensor([[1.0, 9.0, 2.0], [8.0, 3.0, 7.0], [4.0, 6.0, 5.0]]).view(1, 1, 3, 3)
    # centre: median of 1..9 = 5; corner (0, 0), reflect padding: window rows (3,8,3),(9,1,9),(3,8,3) -> 3
    got = median3x3_reference(x)
    assert got[0, 0, 1, 1] == 5.0 and got[0, 0, 0, 0] == 3.0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("levels", [3, 256])  # 3 levels: windows full of ties
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_the_reference_bitwise(shape, levels, dtype):
    x = _grid(shape, levels, dtype=dtype)
    ref, got = median3x3_reference(x), median3x3_fused(x)
    assert got.dtype == ref.dtype and got.shape == ref.shape and torch.equal(got, ref)


def test_non_contiguous_input_and_the_defense_forward():
    x = _grid((2, 3, 20, 16)).contiguous(memory_format=torch.channels_last)
    assert torch.equal(median3x3(x), median3x3_reference(x))
    d = MedianFilter(torch.nn.Identity(), size=3)
    assert torch.equal(d.transform(x), median_filter(x, 3))  # the kernel in the forward
    assert d.surrogate(x.requires_grad_(True)).grad_fn is not None  # the reference (differentiable) for BPDA


def test_impl_choice_and_errors():
    assert resolve_impl("cpu") == "fused"
    with pytest.raises(ValueError, match="impl must be one of"):
        median3x3(_grid((1, 1, 3, 3)), "fast")
    with pytest.raises(ValueError, match="H, W >= 2"):
        median3x3(_grid((1, 1, 1, 5)))
    with pytest.raises(ValueError, match="N x C x H x W"):
        median3x3(_grid((3, 4, 4)))


def test_triton_kernel_in_the_interpreter():
    """The Triton kernel, run by Triton's CPU interpreter in a fresh process (TRITON_INTERPRET=1
    must be set before triton is imported)."""
    code = (
        "from advface_fast.kernels.median3x3 import median3x3_triton, median3x3_reference\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for shape in ((2, 3, 5, 7), (1, 1, 2, 2), (3, 2, 2, 9), (2, 3, 17, 13)):\n"
        "    for levels in (3, 256):\n"
        "        x = torch.randint(0, levels, shape, generator=g).float() / (levels - 1)\n"
        "        assert torch.equal(median3x3_triton(x), median3x3_reference(x)), (shape, levels)\n"
        "print('ok')\n")
    run_interpreted(code, "median3x3.py")

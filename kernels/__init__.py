"""Fused attack-update kernels (Triton on CUDA, fused ATen on CPU) with their plain-torch references,
PReLU with a fused input-gradient backward, and the 3 x 3 median filter of the median defense."""

from .cw_step import cw_step, cw_step_fused, cw_step_reference, cw_step_triton
from .median3x3 import median3x3, median3x3_fused, median3x3_reference, median3x3_triton
from .prelu import prelu, prelu_backward, prelu_backward_fused, prelu_backward_reference, prelu_backward_triton
from .pgd_step import (
    IMPLS,
    linf_bounds,
    pgd_step,
    pgd_step_fused,
    pgd_step_reference,
    pgd_step_torchattacks,
    pgd_step_triton,
    resolve_impl,
    triton_usable,
)

__all__ = [
    "IMPLS",
    "cw_step",
    "cw_step_fused",
    "cw_step_reference",
    "cw_step_triton",
    "linf_bounds",
    "median3x3",
    "median3x3_fused",
    "median3x3_reference",
    "median3x3_triton",
    "pgd_step",
    "pgd_step_fused",
    "pgd_step_reference",
    "pgd_step_torchattacks",
    "pgd_step_triton",
    "prelu",
    "prelu_backward",
    "prelu_backward_fused",
    "prelu_backward_reference",
    "prelu_backward_triton",
    "resolve_impl",
    "triton_usable",
]

"""The 3 x 3 median filter (reflect padding), per channel: the forward pass of the median defense.

The reference (``F.unfold`` to 9 x H*W windows, then ``median`` over the strided window axis) moves
every pixel nine times through memory and sorts each window; on a 2-core EPYC, batch 64 of 150 x 150
chips, it took 2.7x dlib-resnet's fp32 forward pass, so a Square query through the median defense
cost 3.7 forward passes instead of 1. The median of 9 needs no sort: with each window's three
columns sorted (lo <= mid <= hi),

    median = med3(max(lo_0, lo_1, lo_2), med3(mid_0, mid_1, mid_2), min(hi_0, hi_1, hi_2))

and the column sorts are shared by the three windows that overlap horizontally: one sort of every
vertical triple of the padded image, then min / max over three horizontal shifts.

  "triton"    one 1-D Triton kernel over the output (each element loads its 9 neighbours with
              reflected indices and runs the network above): CUDA tensors, or CPU tensors under
              TRITON_INTERPRET=1.
  "fused"     the same network as whole-tensor ``minimum`` / ``maximum`` ops on the padded image
              (about 20 passes over memory, no window tensor).
  "reference" ``F.unfold`` + ``median`` (what ``defenses/median.py`` computes for any odd size).
  "auto"      triton for CUDA tensors when Triton is importable, else fused.

Every path returns the reference's values bit for bit (a median of 9 is one of the 9 inputs;
min / max pick, never round), NaN-free input assumed (images in [0, 1]). The forward only: the
median defense's BPDA surrogate keeps the reference, whose gradient reaches the pixel each
median selects.

Example::

    y = median3x3(x)    # x: N x C x H x W float, H, W >= 2; y: same shape
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .pgd_step import BLOCK_SIZE, IMPLS, tl, triton
from .pgd_step import resolve_impl as _resolve_impl


if triton is not None:

    @triton.jit
    def _tl_sort2(a, b):
        return tl.minimum(a, b), tl.maximum(a, b)

    @triton.jit
    def _tl_med3(a, b, c):
        return tl.maximum(tl.minimum(a, b), tl.minimum(tl.maximum(a, b), c))

    @triton.jit
    def _column(x_ptr, plane, up, row, down, c, width, mask):
        """The vertical triple at column c, sorted: (lo, mid, hi)."""
        a = tl.load(x_ptr + plane + up * width + c, mask=mask, other=0.0)
        b = tl.load(x_ptr + plane + row * width + c, mask=mask, other=0.0)
        d = tl.load(x_ptr + plane + down * width + c, mask=mask, other=0.0)
        a, b = _tl_sort2(a, b)
        b, d = _tl_sort2(b, d)
        a, b = _tl_sort2(a, b)
        return a, b, d

    @triton.jit
    def _median3x3_kernel(x_ptr, out_ptr, n_elements, height, width, BLOCK_SIZE: tl.constexpr):
        pid = tl.program_id(0)
        offsets = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_elements
        col = offsets % width
        row = (offsets // width) % height
        plane = offsets - row * width - col  # start of this image-channel plane
        up = tl.where(row == 0, 1, row - 1)  # reflect: -1 -> 1, H -> H - 2
        down = tl.where(row == height - 1, height - 2, row + 1)
        left = tl.where(col == 0, 1, col - 1)
        right = tl.where(col == width - 1, width - 2, col + 1)
        l0, m0, h0 = _column(x_ptr, plane, up, row, down, left, width, mask)
        l1, m1, h1 = _column(x_ptr, plane, up, row, down, col, width, mask)
        l2, m2, h2 = _column(x_ptr, plane, up, row, down, right, width, mask)
        lo_max = tl.maximum(tl.maximum(l0, l1), l2)
        hi_min = tl.minimum(tl.minimum(h0, h1), h2)
        mids = _tl_med3(m0, m1, m2)
        out = _tl_med3(lo_max, mids, hi_min)
        tl.store(out_ptr + offsets, out, mask=mask)

    _INTERPRETED = type(_median3x3_kernel).__name__ == "InterpretedFunction"
else:
    _INTERPRETED = False


def resolve_impl(device, impl: str = "auto") -> str:
    """The implementation that runs on `device` (the update kernels' rule, for this kernel's build)."""
    return _resolve_impl(device, impl, _INTERPRETED)


def _check(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"median3x3: x must be a float N x C x H x W tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"median3x3: reflect padding needs H, W >= 2, got {tuple(x.shape[2:])}")


def median_filter_reference(x: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Per-channel ``size x size`` median, reflect padding: ``F.unfold`` windows and ``median`` (any
    odd size; differentiable: the gradient reaches the pixel each median selects)."""
    pad = size // 2
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, size - 1 - pad, pad, size - 1 - pad), mode="reflect")
    windows = F.unfold(padded.reshape(n * c, 1, *padded.shape[2:]), size)  # (N*C, size*size, H*W)
    return windows.median(dim=1).values.reshape(n, c, h, w)


def median3x3_reference(x: torch.Tensor) -> torch.Tensor:
    _check(x)
    return median_filter_reference(x, 3)


def _med3(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))


def median3x3_fused(x: torch.Tensor) -> torch.Tensor:
    """The column-sort network as whole-tensor min / max ops (module docstring)."""
    _check(x)
    h, w = x.shape[2:]
    p = F.pad(x, (1, 1, 1, 1), mode="reflect")
    a, b, c = p[:, :, 0:h], p[:, :, 1:h + 1], p[:, :, 2:h + 2]  # the vertical triple of every padded column
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    mid = torch.minimum(hi, c)
    hi = torch.maximum(hi, c)
    mid = torch.maximum(lo, mid)
    lo = torch.minimum(lo, c)  # lo <= mid <= hi per column (N x C x H x W+2)

    def cols(t):
        return t[..., 0:w], t[..., 1:w + 1], t[..., 2:w + 2]

    l0, l1, l2 = cols(lo)
    h0, h1, h2 = cols(hi)
    return _med3(torch.maximum(torch.maximum(l0, l1), l2), _med3(*cols(mid)), torch.minimum(torch.minimum(h0, h1), h2))


def median3x3_triton(x: torch.Tensor) -> torch.Tensor:
    """The same filter from one Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1)."""
    _check(x)
    resolve_impl(x.device, "triton")
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        _median3x3_kernel[(triton.cdiv(n, BLOCK_SIZE),)](x, out, n, x.shape[2], x.shape[3], BLOCK_SIZE=BLOCK_SIZE)
    return out


def median3x3(x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """The 3 x 3 median of every channel of ``x`` (reflect padding), by ``impl`` (see IMPLS)."""
    impl = resolve_impl(x.device, impl)
    return {"triton": median3x3_triton, "fused": median3x3_fused, "reference": median3x3_reference}[impl](x)


__all__ = ["IMPLS", "median3x3", "median3x3_fused", "median3x3_reference", "median3x3_triton",
           "median_filter_reference"]

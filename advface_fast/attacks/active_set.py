"""Active-set compaction: pairs that are finished leave the batch, so later steps compute less.

An attack keeps the per-pair tensors of the pairs it still works on (iterate, box, gallery
embedding, ...) as a compact batch, and ``rows``, their positions in the caller's full batch.
When some pairs finish, their results are written back into the full-size output at those
positions and every per-pair tensor is shrunk with ``index_select``. Learning which rows are
finished needs one host sync, so attacks do it every few steps rather than after every kernel.
"""

from __future__ import annotations

import torch


def split_finished(finished: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the unfinished rows and of the finished rows, each in ascending order.

    One host sync (the number of unfinished rows decides the split).
    """
    # A stable sort keeps both groups in batch order, so the compact batch keeps the pairs' order.
    order = torch.argsort(finished.to(torch.uint8), stable=True)
    n_keep = finished.numel() - int(finished.sum())
    return order[:n_keep], order[n_keep:]


def select_rows(rows: torch.Tensor, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Each tensor's rows at ``rows`` (contiguous copies, as the in-place update kernels need);
    None (an optional input such as labels or thresholds) stays None."""
    return tuple(None if t is None else t.index_select(0, rows) for t in tensors)

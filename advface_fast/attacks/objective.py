"""What the attacks optimise: the verification objective, kept in one swappable object.

A verification pair is (query, gallery). The attacker perturbs the query only; the gallery's
clean embedding is fixed. Every score is a SIMILARITY ``s`` where higher means "same person":

* ``metric="cosine"`` (default): cosine of the L2-normalised embeddings;
* ``metric="l2"``: ``s = -||e_q - e_g||_2`` on the raw embeddings (a negated distance).

Thresholds ``tau`` are given in that same convention (for L2: negated distances) and the
decision is "predicted same iff s > tau", exactly the rule of :mod:`advface_fast.verify`.
Thresholds come from fitting on clean data and are never refitted on attacked data.

Matched pairs are attacked by *dodging* (push ``s`` down to ``s <= tau``), mismatched pairs by
*impersonation* (push ``s`` up to ``s > tau``). Attacks only call the methods below and pass
``is_same`` / ``thresholds`` through unopened, so another objective with the same methods (for
instance a label-free one that a defense induces) can be dropped in without touching them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..verify import METRICS  # the one list of metric names


@dataclass(frozen=True)
class VerificationObjective:
    """Similarity, losses and success test of a verification pair; all per pair (shape N).

    Args:
        metric: "cosine" (cosine of L2-normalised embeddings) or "l2" (negated Euclidean
            distance of raw embeddings).
    """

    metric: str = "cosine"

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric '{self.metric}'; expected one of {tuple(METRICS)}")

    def similarity(self, query_emb: torch.Tensor, gallery_emb: torch.Tensor) -> torch.Tensor:
        """N x D, N x D -> N similarities (higher = same)."""
        if self.metric == "cosine":
            return (F.normalize(query_emb, dim=1) * F.normalize(gallery_emb, dim=1)).sum(dim=1)
        return -torch.linalg.vector_norm(query_emb - gallery_emb, dim=1)

    def ascent_loss(self, sim: torch.Tensor, is_same: torch.Tensor) -> torch.Tensor:
        """The loss FGSM/PGD MAXIMISE: ``-s`` for matched pairs (dodging), ``+s`` for mismatched
        pairs (impersonation). Higher = more adversarial."""
        return torch.where(is_same, -sim, sim)

    def margin_loss(self, sim: torch.Tensor, is_same: torch.Tensor, thresholds: torch.Tensor,
                    kappa: float = 0.0) -> torch.Tensor:
        """The loss C&W MINIMISES: ``max(s - tau + kappa, 0)`` for matched pairs,
        ``max(tau - s + kappa, 0)`` for mismatched pairs. Zero once the decision is flipped
        with a safety margin ``kappa`` (in similarity units). With ``kappa > 0`` a zero loss
        implies :meth:`success`; with ``kappa = 0`` a mismatched pair at exactly ``s == tau`` has
        zero loss but is not a success (the decision rule is strict)."""
        gap = torch.where(is_same, sim - thresholds, thresholds - sim)
        return torch.clamp(gap + kappa, min=0.0)

    def success(self, sim: torch.Tensor, is_same: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        """True where the verification decision (same iff ``s > tau``) is wrong for the pair:
        matched pairs with ``s <= tau``, mismatched pairs with ``s > tau``."""
        return (sim > thresholds) != is_same

    def config(self) -> dict:
        return {"metric": self.metric}

"""The identity loss: a CosFace-style normalised classification head over the training identities.

CosFace (Wang et al., CVPR 2018, "CosFace: Large Margin Cosine Loss for Deep Face Recognition"):
logits ``s * (cos(theta_j) - m * [j == y])`` where ``cos(theta_j)`` is the cosine between the
L2-normalised embedding and the L2-normalised class weight ``W_j``; the loss is the cross
entropy of those logits. The margin m pushes each embedding's cosine to its own class at least
m above any other class's, which is what verification by cosine similarity needs.

For fine-tuning a pretrained embedding model the class weights start at the normalised mean
embedding of each class (:meth:`CosFaceHead.init_from_embeddings`), so the first steps do not
spend the model's features on fitting a random head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CosFaceHead(nn.Module):
    """Normalised linear head with an additive cosine margin.

    Arguments:
        embedding_dim (int): D of the model's embeddings.
        n_classes (int): number of training identities.
        scale (float): s, the logit scale. (Default: 30)
        margin (float): m, the cosine margin subtracted from the true class. (Default: 0.35)

    Shape:
        - embeddings: (N, D) float; labels: (N,) int64 in [0, n_classes).
        - loss(..., reduction="none"): (N,).
    """

    def __init__(self, embedding_dim: int, n_classes: int, scale: float = 30.0, margin: float = 0.35):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"a classification head needs at least 2 identities, got {n_classes}")
        self.scale, self.margin = float(scale), float(margin)
        self.weight = nn.Parameter(torch.randn(n_classes, embedding_dim) / embedding_dim ** 0.5)

    def cosines(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, C) cosines between each embedding and each class weight (in fp32)."""
        return F.normalize(embeddings.float(), dim=1) @ F.normalize(self.weight.float(), dim=1).t()

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled cosines; with labels, the true class's cosine is lowered by the margin first."""
        cos = self.cosines(embeddings)
        if labels is not None:
            cos = cos - self.margin * F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        return self.scale * cos

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """CosFace loss: cross entropy of the margin logits."""
        return F.cross_entropy(self.logits(embeddings, labels), labels, reduction=reduction)

    def predict(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N,) the class with the highest cosine."""
        return self.cosines(embeddings).argmax(dim=1)

    @torch.no_grad()
    def init_from_embeddings(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Set each class weight to the normalised mean of its (normalised) embeddings."""
        e = F.normalize(embeddings.float(), dim=1)
        sums = torch.zeros_like(self.weight).index_add_(0, labels, e)
        missing = torch.bincount(labels, minlength=self.weight.shape[0]) == 0
        if missing.any():
            raise ValueError(f"{int(missing.sum())} classes have no embedding to start from")
        self.weight.copy_(F.normalize(sums, dim=1))

    def extra_repr(self) -> str:
        return f"classes={self.weight.shape[0]}, dim={self.weight.shape[1]}, scale={self.scale}, margin={self.margin}"


__all__ = ["CosFaceHead"]

"""The undefended model as a defense entry: the transform is the identity, so its rows are Table 1's."""

from __future__ import annotations

from advface_fast.defenses.base import Defense
from advface_fast.defenses.registry import register_defense


class NoDefense(Defense):
    r"""
    No defense: ``embed`` is the plain model's fp32 embedding.

    The leaderboard's reference entry: its clean accuracy and its rows under every attack must equal
    Table 1's (same thresholds, same attacked queries).

    Arguments:
        model (nn.Module): the embedding model f.
        seed, batch_size: as :class:`~advface_fast.defenses.base.Defense` (nothing is random).

    Shape:
        - images: (N, 3, H, W) float in [0, 1] (or uint8 N x H x W x 3), ids: N strings.
        - embed: {"default": (N, D) float32, CPU}.

    Examples::
        >>> d = NoDefense(model)
        >>> emb = d.embed(images, ids)["default"]
    """

    name = "none"
    paper = "-"


register_defense("none", NoDefense)

__all__ = ["NoDefense"]

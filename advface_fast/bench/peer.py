"""torchattacks, the peer library, bent to face verification: the baseline of the PGD rows.

torchattacks attacks classifiers. ``TwoLogitVerifier`` makes one pair look like a 2-class
classifier whose cross-entropy ascent moves the query exactly as our verification objective
does, so ``torchattacks.PGD`` runs on the same weights, objective, pairs and batch as ours.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attacks import round_to_uint8_grid
from .context import BenchContext, cosine
from .harness import Variant


class TwoLogitVerifier(nn.Module):
    """A face-embedding model as a 2-class "classifier" of one pair, for classification attacks.

    forward(x) = [m, -m] with m = s(x) - threshold, s the cosine similarity of x's embedding to the
    pair's gallery embedding. CE([m, -m], y) = softplus(-2m) for y = 0 and softplus(2m) for y = 1,
    so an untargeted attack that MAXIMISES CE lowers s for label 0 (matched pairs: dodging) and
    raises s for label 1 (mismatched pairs: impersonation), the same directions as our objective.
    Set the pairs of each batch with ``set_pairs`` before calling the attack.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.gallery = None
        self.thresholds = None

    def set_pairs(self, gallery: torch.Tensor, thresholds: torch.Tensor | float) -> None:
        self.gallery = gallery
        self.thresholds = torch.as_tensor(thresholds, dtype=torch.float32, device=gallery.device)

    @staticmethod
    def labels(is_same: torch.Tensor) -> torch.Tensor:
        return (~is_same.bool()).long()  # matched -> 0, mismatched -> 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        margin = cosine(self.model(x), self.gallery) - self.thresholds
        return torch.stack([margin, -margin], dim=1)


def torchattacks_version() -> str | None:
    try:
        import torchattacks
    except Exception:
        return None
    return getattr(torchattacks, "__version__", "unknown")


def torchattacks_pgd(ctx: BenchContext, steps: int) -> Variant:
    """torchattacks.PGD fp32 on the plain model and the context's pairs (its float output: round it
    with ``deliver_torchattacks`` before judging), or a pending Variant without torchattacks."""
    try:
        import torchattacks
    except Exception as err:
        return Variant("torchattacks fp32", pending=f"torchattacks not importable ({err}); "
                                                    f"pip install --no-deps torchattacks==3.5.1")
    data, cfg = ctx.data(), ctx.cfg
    wrapper = TwoLogitVerifier(ctx.model)
    attack = torchattacks.PGD(wrapper, eps=cfg.eps / 255, alpha=cfg.eps / 4 / 255, steps=steps, random_start=True)
    labels = TwoLogitVerifier.labels(data.is_same)

    def run():
        torch.manual_seed(cfg.seed)  # torchattacks draws its random start from the global generator
        wrapper.set_pairs(data.gallery, data.threshold)
        return attack(data.queries, labels)

    return Variant("torchattacks fp32", run)


def deliver_torchattacks(x_adv: torch.Tensor, x0: torch.Tensor, eps: float) -> torch.Tensor:
    """Round torchattacks' float output to the uint8 grid inside the eps-box, as ours delivers."""
    return round_to_uint8_grid(x_adv.detach().float(), x0, eps)

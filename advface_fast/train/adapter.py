"""The one place training touches the attack classes: an objective that makes them attack the
identity head instead of a verification pair.

The attack classes (:mod:`advface_fast.attacks`) compute ``objective.similarity(model(x),
gallery)`` and ascend ``objective.ascent_loss(similarity, is_same)``, with the random start,
projection, fused update kernel, per-image seeds and bf16 gradient policy all in the attack.
For training the "gallery" slot carries each image's class label (an N x 1 float tensor, exact
for any label < 2**24) and the per-image "similarity" is the head's CosFace loss, so PGD / FGSM
maximise the training loss within the eps-box — Madry et al.'s inner maximisation. Everything
that depends on the attack objective contract lives in this file, so a change there is a change
here only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..attacks import PGD
from .head import CosFaceHead

try:  # the objective contract with a base class (prepare_target, needs_labels, ...)
    from ..attacks.objective import Objective as _ObjectiveBase
except ImportError:  # the earlier duck-typed contract
    _ObjectiveBase = object


class HeadObjective(_ObjectiveBase):
    """Attack objective for training: the per-image CosFace loss of the head (higher = more adversarial).

    The attack's target / gallery slot carries the labels (N x 1 float); no verification labels
    (``is_same``) or thresholds are used."""

    name = "cosface-head"
    metric = "cosine"
    needs_labels = False
    margin_needs_thresholds = False

    def __init__(self, head: CosFaceHead):
        self.head = head

    def prepare_target(self, target, clean_embed, noise):
        if target is None:
            raise ValueError("the training objective needs the labels (N x 1) as the target")
        return target

    def similarity(self, query_emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head.loss(query_emb, labels[:, 0].long(), reduction="none")

    def ascent_loss(self, sim: torch.Tensor, is_same: torch.Tensor | None = None) -> torch.Tensor:
        return sim

    def margin_loss(self, sim, is_same, thresholds, kappa: float = 0.0):
        raise NotImplementedError("the training objective has no verification threshold (no early stop)")

    def success(self, sim, is_same, thresholds):
        raise NotImplementedError("the training objective has no verification threshold")

    def config(self) -> dict:
        return {"name": self.name, "metric": self.metric, "scale": self.head.scale, "margin": self.head.margin}


def training_attack(model, head: CosFaceHead, *, eps: float, steps: int, alpha: float, random_start: bool = True,
                    precision: str = "auto") -> PGD:
    """A PGD on the head's loss: float iterate (no uint8 rounding; training images need not be
    deliverable files), ``steps`` steps of ``alpha`` (0-255 units) in the eps-box.
    FGSM-RS (Wong et al. 2020) is ``steps=1, alpha=1.25 * eps, random_start=True``."""
    return PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start, objective=HeadObjective(head),
               seed=0, round_output=False, precision=precision)


def attack_images(attack: PGD, images: torch.Tensor, labels: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """Adversarial versions of ``images`` (N x 3 x H x W in [0, 1]) against their ``labels``;
    image i's random start comes from ``seeds[i]``."""
    n = images.shape[0]
    carrier = labels.to(torch.float32).view(n, 1)
    return attack(images, carrier, torch.zeros(n, dtype=torch.bool), None, sample_seeds=list(seeds))


__all__ = ["HeadObjective", "attack_images", "training_attack"]

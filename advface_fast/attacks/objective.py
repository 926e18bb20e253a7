"""What an attack pushes: the objective, one swappable object per kind of goal.

The contract. An objective receives EMBEDDINGS (N x D, from the model the attack runs) and an
optional TARGET (N x D), and turns them into one score per image, a similarity ``s`` where
higher means "closer to the target". Attacks only call the methods of :class:`Objective`:

* ``prepare_target(target, clean_embed, noise)``: the N x D target the attack compares
  against, from what the caller gave (``target``), the embeddings of the clean images
  (``clean_embed()``, computed only if asked) and the attack's seeded randomness (``noise``);
* ``similarity(emb, target)``: N scores;
* ``ascent_loss(sim, is_same)``: what FGSM / PGD MAXIMISE (higher = more adversarial);
* ``margin_loss(sim, is_same, thresholds, kappa)``: what C&W MINIMISES, >= 0, zero once the goal
  is met with margin ``kappa``;
* ``success(sim, is_same, thresholds)``: whether the goal is met;
* ``config()``: ``{"name": ..., "metric": ...}``, nested under ``"objective"`` in every attack's
  config, so cache keys say which objective ran. ``make_objective(config)`` rebuilds it.

``is_same`` (per pair labels) and ``thresholds`` are optional in the attack call; an objective
that needs them says so (``needs_labels``, ``margin_needs_thresholds``) and the attack raises a
one-line error when they are missing.

Objectives:

* ``"verification"`` (:class:`VerificationObjective`, the attacks' default): a (query, gallery)
  pair; the target is the gallery's fixed embedding. Matched pairs are attacked by *dodging*
  (push ``s`` down to ``s <= tau``), mismatched pairs by *impersonation* (push ``s`` up to
  ``s > tau``). Needs ``is_same``; C&W needs each pair's threshold. ``metric="cosine"`` (cosine
  of L2-normalised embeddings) or ``"l2"`` (``s = -||e_q - e_g||``, a negated distance).
  Thresholds are in that convention and the decision is "same iff s > tau", as in
  :mod:`advface_fast.metrics`. Thresholds come from clean data and are never refitted on attacks.
* ``"away-from-self"`` (:class:`AwayFromSelf`, label-free; the defense's default): minimise the
  cosine similarity to the image's OWN clean embedding. The target is the clean embedding of
  the image given (computed by the attack's model unless the caller passes it). An
  untargeted feature-space attack: it needs no label and no gallery.
* ``"random-direction"`` (:class:`RandomDirection`, label-free): maximise the cosine similarity
  to a fixed random unit direction per image, drawn (standard normal, normalised) from the
  image's own seed (the attack's per-sample seed), in a stream separate from the random start.

Label-free objectives have no threshold of their own: without ``thresholds`` their margin loss
is the distance still to go to the unreachable extreme (``1 + s`` away, ``1 - s`` towards), so
C&W becomes plain Adam minimisation within the budget; with ``thresholds`` it is the C&W margin
against them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..metrics import METRICS  # the one list of metric names


def _cosine(emb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (F.normalize(emb, dim=1) * F.normalize(target, dim=1)).sum(dim=1)


class Objective:
    """Base class of the objectives (see the module docstring for the contract)."""

    name = "objective"
    metric = "cosine"
    needs_labels = False  # is_same required
    margin_needs_thresholds = False  # margin_loss / success need thresholds

    def prepare_target(self, target: torch.Tensor | None, clean_embed: Callable[[], torch.Tensor],
                       noise) -> torch.Tensor:
        raise NotImplementedError

    def similarity(self, emb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """N x D, N x D -> N similarities (higher = closer to the target)."""
        return _cosine(emb, target)

    def ascent_loss(self, sim: torch.Tensor, is_same: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def margin_loss(self, sim, is_same, thresholds, kappa: float = 0.0) -> torch.Tensor:
        raise NotImplementedError

    def success(self, sim, is_same, thresholds) -> torch.Tensor:
        raise NotImplementedError

    def config(self) -> dict:
        return {"name": self.name, "metric": self.metric}


@dataclass(frozen=True)
class VerificationObjective(Objective):
    """Similarity, losses and success test of a verification pair; all per pair (shape N).

    Args:
        metric: "cosine" (cosine of L2-normalised embeddings) or "l2" (negated Euclidean
            distance of raw embeddings).
    """

    metric: str = "cosine"
    name = "verification"
    needs_labels = True
    margin_needs_thresholds = True

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric '{self.metric}'; expected one of {tuple(METRICS)}")

    def prepare_target(self, target, clean_embed, noise):
        if target is None:
            raise ValueError("the verification objective needs the gallery embeddings (N x D) as the target")
        return target

    def similarity(self, query_emb: torch.Tensor, gallery_emb: torch.Tensor) -> torch.Tensor:
        """N x D, N x D -> N similarities (higher = same)."""
        if self.metric == "cosine":
            return _cosine(query_emb, gallery_emb)
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


class _LabelFree(Objective):
    """Cosine objectives that ignore ``is_same``; ``sign`` = +1 pushes s up, -1 pushes it down."""

    sign = -1.0

    def __init__(self, metric: str = "cosine"):
        if metric != "cosine":
            raise ValueError(f"the {self.name} objective is defined for metric 'cosine' only, got {metric!r}")

    def ascent_loss(self, sim, is_same=None):
        return self.sign * sim

    def margin_loss(self, sim, is_same=None, thresholds=None, kappa: float = 0.0):
        if thresholds is None:  # no threshold: the distance to the extreme s = -sign (never reached)
            return 1.0 - self.sign * sim
        return torch.clamp(self.sign * (thresholds - sim) + kappa, min=0.0)

    def success(self, sim, is_same=None, thresholds=None):
        if thresholds is None:
            raise ValueError(f"the {self.name} objective has no success test without thresholds")
        return sim <= thresholds if self.sign < 0 else sim > thresholds

    def __eq__(self, other):
        return type(other) is type(self)

    def __hash__(self):
        return hash(self.name)

    def __repr__(self):
        return f"{type(self).__name__}()"


class AwayFromSelf(_LabelFree):
    """Label-free: minimise the cosine similarity to the image's own clean embedding.

    The target is the clean embedding of the image given: the caller's ``target`` if passed
    (e.g. computed once by the plain fp32 model), else the attack model's embedding of the clean
    image (in the attack's precision, no gradient). Success with thresholds: ``s <= tau``.
    """

    name = "away-from-self"
    sign = -1.0

    def prepare_target(self, target, clean_embed, noise):
        return clean_embed() if target is None else target


class RandomDirection(_LabelFree):
    """Label-free: maximise the cosine similarity to a fixed random unit direction per image.

    The direction is drawn from the image's own seed (``noise.fork("objective")``: the
    per-sample seeds when given, so it does not depend on the batch), in a generator separate
    from the random start. A given ``target`` is used as the directions instead. Success with
    thresholds: ``s > tau``.
    """

    name = "random-direction"
    sign = 1.0

    def prepare_target(self, target, clean_embed, noise):
        if target is not None:
            return target
        dim = clean_embed().shape[1]
        return F.normalize(noise.fork("objective").normal((dim,)), dim=1)


OBJECTIVES: dict[str, type[Objective]] = {
    "verification": VerificationObjective,
    "away-from-self": AwayFromSelf,
    "random-direction": RandomDirection,
}


def make_objective(spec=None) -> Objective:
    """An objective from a spec: None (verification, cosine), a name, a config dict
    (``{"name": "verification", "metric": "l2"}``) or an :class:`Objective` (returned as is)."""
    if spec is None:
        return VerificationObjective()
    if isinstance(spec, Objective):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        raise TypeError(f"an objective is a name, a config dict or an Objective, got {type(spec).__name__}")
    spec = dict(spec)
    name = spec.pop("name", "verification")
    try:
        cls = OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective '{name}'; available: {', '.join(sorted(OBJECTIVES))}") from None
    return cls(**spec)

"""The attacker who knows the defense: BPDA + EOT through any defense, and transfer.

Written once against the Defense protocol (:mod:`advface_fast.defenses.base`): the forward pass
runs one draw of the defense (``defense.eot_copy``), the backward pass is BPDA through the
defense's ``surrogate`` (the identity unless the defense has a differentiable approximation:
then the gradient taken at the defended image is pulled back through the surrogate at x), and
EOT averages over fresh draws. The rest of this docstring is the attack-as-defense case it was
first built for.

A test-time defense counts only by its accuracy under an attacker who knows it. For the
attack-as-defense D the defended score of a pair is ``s = cos(f(D(q)), f(D(g)))``; the attacker
perturbs only the query (its own budget eps_a) so that ``s`` crosses the defended pipeline's
FIXED threshold (fitted on clean defended pairs by the runner): dodging for matched pairs,
impersonation for mismatched. The defended gallery embedding ``f(D(g))`` is given and fixed.

:class:`DefendedModel` is the model such an attacker attacks, usable by every attack class
(FGSM, PGD, C&W, C&W-L2) through their one gradient hook
(:meth:`advface_fast.attacks.base.Attack.loss_and_grad`):

* forward: ``f(D(x))``, with D run without gradient on ``x`` rounded to the uint8 grid (the
  image the defender would receive);
* backward: BPDA with the identity, i.e. the gradient of the score taken at D(x) is applied to
  x. D is itself sign-gradient (PGD / FGSM) or clipped (all: projection), so unrolling D would
  give a zero or near-zero gradient through its steps; the identity is the standard choice
  (Athalye et al., 2018);
* EOT over ``samples`` draws of D's random start (every D starts at a seeded random point by
  default; with ``random_start=False`` C&W and FGSM are deterministic and the samples coincide),
  drawn afresh at every evaluation (``redraw="per-step"``, the default): sample s of image i at
  the attack's t-th gradient or score evaluation uses the seed ``derive_seed(attacker_seed_i,
  "eot/t/s")``, where ``attacker_seed_i`` is the attack's per-sample seed (or one derived from its
  seed and the row), so a result depends on neither batching nor sharding. With
  ``redraw="fixed"`` (the seed ``"eot/s"`` at every step) the attacker optimises against the same
  S draws of D throughout and overfits them: on LFW more steps then HELPED the defender (an
  ablation, kept to show it). The attacker's seeds never equal the defender's
  (``derive_seed(defense_seed, image_id)``): evaluate the attacked queries against the full D
  with its own seed;
* ``steps``: a reduced-K copy of D (e.g. K = 5 for a 20-step D, as Croce et al. 2022 did); None
  = D's largest step count. The gradient is averaged over the samples; so is the similarity
  the attack scores itself with (C&W's done test, PGD's restarts).

D is very random and far from the identity, so EOT and the copy's K matter. A first look on
16 lfw_ci pairs (dlib-resnet, D = PGD eps 4, 10 steps, away-from-self; defended threshold fitted
on those pairs' clean defended scores; attacker PGD eps 4, 10 steps): two defender seeds give
defended embeddings of cosine 0.84 on average; the transfer attack (PGD-10 on the plain model)
broke 8/16 defended decisions; BPDA with a K=3 copy broke 3/16 (S=1) and 4/16 (S=3), with the
full K=10 copy 6/16 (S=1) and 10/16 (S=3). An adaptive attack weaker than transfer is a weak
configuration, not evidence of robustness: report the per-pair worst case over all attacks.

Cost: every attack step costs ``samples * (K + 1)`` image passes per image (``step_cost``); the
attack's ``last_stats`` counts them.

Transfer and high confidence need no wrapper: a PGD on the undefended model (Table 1's
queries) fed to D is the transfer attack; ``PGD(model, eps=eps_a, kappa=k)`` is the
high-confidence one (pushes each pair until it is ``k`` past its undefended threshold; ``kappa
=None`` pushes as far as the budget allows), see :class:`advface_fast.attacks.PGD`.

Example::

    >>> d = AttackAsDefense(model, "pgd", eps=4, steps=(20,), seed=0)
    >>> attack = adaptive_attack("pgd", d, eps=4, steps=40, samples=3, copy_steps=5, seed=1)
    >>> x_adv = attack(queries, defended_gallery_emb, is_same, defended_thresholds, sample_seeds=seeds)
    >>> s = cos(d.embed(x_adv, query_ids)[20], defended_gallery_emb)     # judged by the full D
"""

from __future__ import annotations

import torch
from torch import nn

from advface_fast.attacks import Attack, make_attack, round_to_uint8_grid
from advface_fast.defenses.base import Defense
from advface_fast.models import arithmetic_key
from advface_fast.seeds import derive_seed


class DefendedModel(nn.Module):
    """``f(D(x))`` for an attacker: BPDA backward (identity, or the defense's surrogate), EOT over
    the defense's randomness.

    Arguments:
        defense (Defense): the defense D (its model f is the embedder).
        samples (int): EOT samples S of D's randomness per gradient. (Default: 1)
        steps (int | None): K of the attacker's copy of D, for a defense with an iteration count
            (attack-as-defense; None = D's largest); other defenses take None. (Default: None)
        embedder (nn.Module | None): the model the attacker differentiates at D(x) (e.g. a fast
            copy of f); None = D's model f. (Default: None)
        redraw (str): "per-step": fresh draws of D at every evaluation of the attack; "fixed":
            the same S draws at every step (the weaker attacker, an ablation). (Default: "per-step")
    """

    REDRAW = ("per-step", "fixed")

    def __init__(self, defense: Defense, samples: int = 1, steps: int | None = None,
                 embedder: nn.Module | None = None, redraw: str = "per-step"):
        super().__init__()
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        if redraw not in self.REDRAW:
            raise ValueError(f"redraw must be one of {', '.join(self.REDRAW)}, got {redraw!r}")
        self.redraw = redraw
        self.embedder = defense.model if embedder is None else embedder
        self.defense = defense
        self.samples = int(samples)
        iterative = defense.iterative  # a defense with an iteration count (attack-as-defense)
        if steps is not None and not iterative:
            raise ValueError(f"{defense.name} has no iteration count: copy steps must be None, got {steps}")
        self.steps = max(defense.steps) if iterative and steps is None else steps
        if self.steps is not None:
            self.steps = int(self.steps)
            if self.steps < 1:
                raise ValueError(f"the copy of D needs steps >= 1, got {self.steps}")
        self.copy = defense.eot_copy(self.steps)
        self.step_cost = self.samples * (defense.eot_copy_cost(self.steps) + 1)
        if type(defense).surrogate is not Defense.surrogate:  # a defense with its own surrogate: BPDA through it
            if defense.surrogate_name == "identity":
                raise ValueError(f"{defense.name} overrides surrogate(): give it a surrogate_name (recorded as 'bpda')")
            self.pullback = self._pullback

    @property
    def randomized(self) -> bool:
        """Whether two evaluations of the same image can differ: a randomised D redrawn per evaluation."""
        return bool(self.defense.randomized) and self.redraw == "per-step"

    def views(self, x: torch.Tensor, seeds: list[int], draw: int = 0) -> list[torch.Tensor]:
        """D_s(round(x)) for s = 0..S-1, detached: where the gradient is taken (BPDA). ``draw``:
        the attack's evaluation count t (fresh draws per t with ``redraw="per-step"``)."""
        if len(seeds) != x.shape[0]:
            raise ValueError(f"views: {len(seeds)} seeds for {x.shape[0]} images")
        q = round_to_uint8_grid(x.detach(), x, None)
        tag = f"eot/{int(draw)}/" if self.redraw == "per-step" else "eot/"
        with torch.no_grad():
            return [self.copy(q, sample_seeds=[derive_seed(seed, f"{tag}{s}") for seed in seeds]).detach()
                    for s in range(self.samples)]

    def _pullback(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """BPDA through the surrogate g: the gradient taken at D(x), pulled back through g at x
        (``J_g(x)^T grad``). Set as ``pullback`` only for a defense with a surrogate."""
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.defense.surrogate(xr), xr, grad)
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """f(D(x)) with one draw of D (seeds from the row positions); the gradient through the
        surrogate (the identity by default)."""
        d = self.views(x, [derive_seed(0, f"row/{i}") for i in range(x.shape[0])])[0]
        g = self.defense.surrogate(x)
        return self.embedder(g + (d - g).detach())

    def config(self) -> dict:
        defense = self.defense
        return {"bpda": defense.surrogate_name, "eot_samples": self.samples,
                **({"copy_steps": self.steps} if self.steps is not None else {}),
                # Only when per-step, so the fixed-draw attacker's earlier cache keys still hold.
                **({"eot_redraw": self.redraw} if self.redraw != "fixed" else {}),
                # another embedder by its type, and a fast copy's arithmetic (switches and version), so a
                # changed copy never meets old entries
                **({} if self.embedder is defense.model else {
                    "embedder": type(self.embedder).__name__,
                    **({"embedder_arithmetic": arithmetic} if (arithmetic := arithmetic_key(self.embedder)) else {})}),
                "defense": defense.variant_config(defense.variants[-1]) | {"copy": self.copy.config()}}


def adaptive_attack(attack: str, defense: Defense, eps: float = 4, samples: int = 1,
                    copy_steps: int | None = None, seed: int = 0, precision: str = "fp32",
                    embedder: nn.Module | None = None, redraw: str = "per-step", **options) -> Attack:
    """An attack ("fgsm", "pgd", "cw", "cw-l2") on :class:`DefendedModel` (BPDA + EOT), verification
    objective: call it with the defended gallery embeddings and the defended thresholds.
    ``config()`` records the wrapper under ``"defended_model"``."""
    model = DefendedModel(defense, samples=samples, steps=copy_steps, embedder=embedder, redraw=redraw)
    return make_attack(attack, model, eps=eps, seed=seed, precision=precision, **options)

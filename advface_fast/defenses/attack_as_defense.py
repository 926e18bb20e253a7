"""Attack-as-defense: the defender re-attacks the query and the gallery image with its own attack D.

The paper's defense (Tables 2-4): the defender knows no labels. It applies its own attack D
(PGD, C&W or FGSM, with its own budget ``eps``, step count and seed) to the query it receives
and to the gallery image, and compares the two re-attacked images:
``s = cos(f(D(query)), f(D(gallery)))``. D's objective is label-free: by default
"away-from-self" (minimise the cosine similarity to the image's own clean embedding); also
"random-direction" (towards a fixed random unit direction per image); see
:mod:`advface_fast.attacks.objective`. Every config records which objective ran.

Per-image randomness. D's random start (and a random-direction target) for an image comes from
``derive_seed(seed, image_id)``, so D(image) is the same in any batch, pair, fold or shard.

Random start. The away-from-self similarity is maximal at the clean image, so its gradient
there is float noise (dlib-resnet, lfw_ci chips: L1 norm ~1e-6 per image at x0 vs ~1 at a
uniform start within eps 4). D therefore starts at a seeded uniform point of its eps-box
whatever its attack: PGD's own default, and ``random_start=True`` for C&W and FGSM (FGSM with
random init, Wong et al. 2020), so a started-at-x0 D does not follow rounding errors. Pass
``random_start=False`` for the literal start at the clean image; the config records it.

Step counts. ONE run of ``max(steps)`` steps delivers the image at every requested step count
(the attack's ``record_steps``); the image at k is exactly what a separate k-step run of D with
the same seed delivers (D's step size does not depend on its step count), so
:meth:`AttackAsDefense.step_config` is a valid cache key for it. FGSM is one step whatever the
step count: every requested count gets that same one-step image.

Example::

    >>> d = AttackAsDefense(model, attack="pgd", eps=4, steps=(10, 20, 40), seed=0)
    >>> emb = d.embed(images, ids)           # {10: N x D, 20: N x D, 40: N x D}, fp32
    >>> s = (F.normalize(emb[40][q]) * F.normalize(emb[40][g])).sum(1)   # defended scores
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from advface_fast.attacks import FGSM, Attack, make_attack, make_objective
from advface_fast.defenses.base import Defense, DefendedVerifier, as_image_batch, pad_batch
from advface_fast.defenses.registry import register_defense
from advface_fast.precision import model_device, resolve_precision

DEFENSE_ATTACKS = ("pgd", "cw", "fgsm")


class AttackAsDefense(Defense):
    r"""
    The defender's re-attack D (Tables 2-4 of the paper), applied per image without labels.

    Arguments:
        model (nn.Module): the verifier's embedding model f (embeddings are computed with it in
            plain fp32, autocast disabled).
        attack (str): D's attack, one of "pgd", "cw", "fgsm". (Default: "pgd")
        eps (float): D's L-inf budget, 0-255 units. (Default: 4)
        steps (int | Sequence[int]): D's step counts; one run of the largest records all. (Default: (10, 20, 40))
        objective (str | dict | Objective): D's label-free objective. (Default: "away-from-self")
        seed (int): D's run seed; image i uses ``derive_seed(seed, id_i)``. (Default: 0)
        precision (str): D's gradient precision, "fp32", "bf16" or "auto". (Default: "fp32")
        batch_size (int): images per D batch (every batch padded to it, see below). (Default: 32)
        attack_model (nn.Module | None): the model D attacks through (e.g. a fast copy of
            ``model``); None = ``model``. (Default: None)
        progress (bool | str): a progress bar (images/s, ETA) over D's batches; a string names it. (Default: False)
        **attack_options: further options of D's attack (e.g. ``alpha``, ``lr``, ``kappa``;
            ``random_start`` defaults to True, see above).

    Batches. D's result for an image must not depend on which other images share its batch.
    Each image has its own seed, and every batch is padded to exactly ``batch_size`` images (the
    last one repeated, its results dropped), because a model's float results can depend on the
    batch SIZE (oneDNN picks other kernels; on the tiny test net batch 1 vs 6 changes gradients
    by ~2e-8), and D turns such differences into different pixels: on dlib-resnet with lfw_ci
    chips, D = PGD or C&W at eps 4, 2 steps, batch size 1 vs 4 changed pixels by up to 4 and 2
    levels, while the same batch size with other batch mates and another order gave identical
    images. So D(image) is identical in any batch, order or shard for a given ``batch_size``,
    which the config records. The padding is counted in ``last_stats["image_steps"]`` (computed, not useful).

    Shape:
        - images: (N, 3, H, W) float on the uint8 grid (or uint8 N x H x W x 3), ids: N strings.
        - defend: {k: (N, 3, H, W) float32 on the uint8 grid}; embed: {k: (N, D) float32, CPU}.
    """

    name = "attack-as-defense"
    paper = "the attack-as-defense paper this project reproduces (Tables 2-4; see the seed text)"
    randomized = True  # D starts at a seeded random point (see "Random start")
    iterative = True

    def __init__(self, model: nn.Module, attack: str = "pgd", eps: float = 4, steps: int | Sequence[int] = (10, 20, 40),
                 objective="away-from-self", seed: int = 0, precision: str = "fp32", batch_size: int = 32,
                 attack_model: nn.Module | None = None, progress: bool | str = False, **attack_options):
        if attack not in DEFENSE_ATTACKS:
            raise ValueError(f"unknown defense attack '{attack}'; expected one of {', '.join(DEFENSE_ATTACKS)}")
        steps = (steps,) if isinstance(steps, int) else tuple(steps)
        if not steps or min(int(k) for k in steps) < 1:
            raise ValueError(f"defense steps must be positive integers, got {list(steps)}")
        super().__init__(model, seed=seed, batch_size=batch_size)
        self.attack_model = model if attack_model is None else attack_model
        self.attack_name = attack
        self.eps = eps
        self.steps = tuple(sorted({int(k) for k in steps}))
        self.objective = make_objective(objective)
        if self.objective.needs_labels:
            raise ValueError(f"the defense knows no labels: its objective must be label-free, not '{self.objective.name}'")
        self.progress = progress
        self.attack_options = {"random_start": True, **attack_options}  # see "Random start" above
        self._precision_requested = precision
        self.attack = self.attack_at(max(self.steps), record_steps=self.steps)
        self.precision = self.attack.precision

    def attack_at(self, steps: int, record_steps: Sequence[int] = ()) -> Attack:
        """D's attack with ``steps`` steps (a fresh object; FGSM: one step whatever ``steps``)."""
        common = dict(eps=self.eps, objective=self.objective, seed=self.seed, precision=self._precision_requested,
                      **self.attack_options)
        if self.attack_name == "fgsm":
            return FGSM(self.attack_model, **common)
        return make_attack(self.attack_name, self.attack_model, steps=int(steps), record_steps=tuple(record_steps),
                           **common)

    def image_steps_per_image(self, steps: int) -> int:
        """Forward + backward passes D spends on one image for ``steps`` steps."""
        return 1 if self.attack_name == "fgsm" else int(steps)

    # ------------------------------------------------------------------ the contract

    def defend(self, images, ids: Sequence[str]) -> dict[int, torch.Tensor]:
        """D applied to every image: {step count: N x 3 x H x W float32 on the uint8 grid}."""
        out: dict[int, list[torch.Tensor]] = {k: [] for k in self.steps}
        for chunk in self._batches(images, ids):
            for k, x in chunk.items():
                out[k].append(x)
        return {k: torch.cat(v) for k, v in out.items()}

    def embed(self, images, ids: Sequence[str]) -> dict[int, torch.Tensor]:
        """Embeddings of the defended images by the plain fp32 model: {step count: N x D float32, CPU}."""
        out: dict[int, list[torch.Tensor]] = {k: [] for k in self.steps}
        for chunk in self._batches(images, ids):
            for k, x in chunk.items():
                out[k].append(self.embed_images(x))
        return {k: torch.cat(v) for k, v in out.items()}

    def config(self) -> dict:
        """Everything D's results depend on except the model weights (JSON-able)."""
        return {"defense": "attack-as-defense", "steps": list(self.steps), "attack": self.attack.config(),
                "batch_size": self.batch_size, **self._model_note()}

    def step_config(self, steps: int) -> dict:
        """The config of D at one step count: identical to a separate run with that many steps,
        so it keys D's result at that count whichever run computed it."""
        if steps not in self.steps:
            raise ValueError(f"step count {steps} is not one of this defense's {list(self.steps)}")
        return {"defense": "attack-as-defense", "steps": int(steps), "attack": self.attack_at(steps).config(),
                "batch_size": self.batch_size, **self._model_note()}

    def __repr__(self) -> str:
        return (f"AttackAsDefense(attack={self.attack_name!r}, eps={self.eps}, steps={list(self.steps)}, "
                f"objective={self.objective.name!r}, seed={self.seed}, precision={self.precision!r})")

    def verifier(self, steps: int) -> DefendedVerifier:
        """D at one step count as a verifier for the experiment runner: ``embed(chips, ids) -> N x D``."""
        self.step_config(steps)  # checks steps
        return DefendedVerifier(self, int(steps))

    # ------------------------------------------------------------------ the Defense protocol

    @property
    def variants(self) -> tuple:
        return self.steps

    def variant_config(self, variant) -> dict:
        return self.step_config(variant)

    def settings(self) -> dict:
        return {"attack": self.attack_name, "eps": self.eps, "steps": list(self.steps), "objective": self.objective.name}

    def cost_per_image(self, variant=None) -> float:
        return float(self.image_steps_per_image(max(self.steps) if variant is None else variant))

    def transform(self, x: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """D at its largest step count with the given per-image seeds (no padding: for the attacker)."""
        return self.attack(x, sample_seeds=list(seeds))

    def eot_copy(self, steps: int | None = None) -> Attack:
        """The attacker's copy of D: D's attack at ``steps`` (None: the largest) steps."""
        return self.attack_at(max(self.steps) if steps is None else int(steps))

    def eot_copy_cost(self, steps: int | None = None) -> float:
        return float(self.image_steps_per_image(max(self.steps) if steps is None else int(steps)))

    # ------------------------------------------------------------------ helpers

    def _model_note(self) -> dict:
        if self.attack_model is self.model:
            return {}
        from ..models import arithmetic_key

        arithmetic = arithmetic_key(self.attack_model)
        # the class name alone, as before, for a copy without an arithmetic record (its keys stay valid)
        return {"attack_model": type(self.attack_model).__name__,
                **({"attack_model_arithmetic": arithmetic} if arithmetic is not None else {})}

    def _batches(self, images, ids):
        """Yield {step count: defended batch}, batch by batch; sets ``last_stats``."""
        x = as_image_batch(images)
        ids = [str(i) for i in ids]
        if len(ids) != x.shape[0]:
            raise ValueError(f"got {x.shape[0]} images but {len(ids)} ids")
        image_steps = 0
        desc = self.progress if isinstance(self.progress, str) else f"defense {self.attack_name} eps={self.eps:g}"
        bar = tqdm(total=x.shape[0], desc=desc, unit="img", leave=False, disable=not self.progress)
        for start in range(0, x.shape[0], self.batch_size):
            chunk, chunk_ids = x[start : start + self.batch_size], ids[start : start + self.batch_size]
            n = chunk.shape[0]
            if n < self.batch_size:  # pad: every batch has the same size (see the class docstring)
                chunk = pad_batch(chunk, self.batch_size)
                chunk_ids = chunk_ids + chunk_ids[-1:] * (self.batch_size - n)
            final = self.attack(chunk, sample_seeds=self.seeds(chunk_ids))
            image_steps += self.attack.last_stats["image_steps"]
            bar.update(n)
            bar.set_postfix_str(f"{image_steps / max(bar.format_dict['elapsed'], 1e-9):.1f} image-steps/s", refresh=False)
            if self.attack_name == "fgsm":
                yield {k: final[:n] for k in self.steps}
            else:
                yield {k: self.attack.last_iterates[k][:n] for k in self.steps}
        bar.close()
        self.last_stats = {"image_steps": image_steps, "images": x.shape[0]}  # image_steps includes padding


def make_defense(net: nn.Module, attack: str, eps: float, steps, *, spec=None, objective: str = "away-from-self",
                 seed: int = 0, precision: str = "auto", batch_size: int = 32, progress=False) -> AttackAsDefense:
    """D as every table and gallery job builds it: gradients in ``precision`` (auto: bf16 where the
    hardware has it), through the model's fast copy (``spec.make_fast``) when bf16; embeddings
    and decisions by the plain fp32 ``net``. One place, so a gallery's D is the calibrated D."""
    resolved = resolve_precision(precision, model_device(net))
    make_fast = getattr(spec, "make_fast", None)
    attack_model = make_fast(net) if resolved == "bf16" and make_fast is not None else net
    return AttackAsDefense(net, attack, eps=eps, steps=steps, objective=objective, seed=seed, precision=precision,
                           batch_size=batch_size, attack_model=attack_model, progress=progress)


def _create(model: nn.Module, attack: str = "pgd", eps: float = 4, steps=(10, 20, 40), **options) -> AttackAsDefense:
    """The registry's attack-as-defense: :func:`make_defense` with the model's own spec (its fast copy)."""
    return make_defense(model, attack, eps, steps, spec=getattr(model, "spec", None), **options)


register_defense("attack-as-defense", _create)


__all__ = ["DEFENSE_ATTACKS", "AttackAsDefense", "DefendedVerifier", "as_image_batch", "make_defense"]

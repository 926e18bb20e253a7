"""The Defense protocol: what every test-time defense gives the benchmark, and what an adaptive
attacker needs from it.

A defense maps a batch of images (float32 N x 3 x H x W RGB in [0, 1], on the uint8 grid) with
their ids to what the verifier compares: embeddings, ``embed(images, ids) -> {variant: N x D}``.
Most defenses transform the image and embed the result with the plain model f; they implement
:meth:`Defense.transform` and inherit :meth:`Defense.embed`. A defense that changes the model
instead (adversarial training: a checkpoint) is an entry of the same shape whose transform is the
identity.

What a defense declares:

* ``name`` (its registry name), ``paper`` (where it comes from), ``config()`` (everything its
  results depend on except the model weights: the cache key of its embeddings);
* ``variants``: the settings one run delivers (attack-as-defense: its step counts, all from one
  run of the largest; every other defense: ``("default",)``), each with ``variant_config(v)``;
* ``randomized``: whether ``transform`` draws randomness. Draws come from per-image seeds
  ``derive_seed(seed, image id)``, so an image's result never depends on its batch or shard;
* ``needs_fit()`` / ``fit(images, ids)``: a parameter fitted on CLEAN images before use (the
  counter-attack's gate threshold; never refit on attacked data), recorded in ``config()``;
* ``adaptive_models(samples, embedder)``: the defense-specific adaptive attacks, {row name: a
  model the attack classes attack} (e.g. the counter-attack's gate-aware attacker; default none);
* ``cost_per_image(v)``: model passes (forward-pass equivalents; a forward + backward step counts
  as one image-step like an attack step) the defense spends on one image;
* for the adaptive attacker (:mod:`advface_fast.defenses.adaptive`): ``transform(x, seeds)`` is
  one draw of the defense at given seeds (fresh seeds = a fresh EOT draw), and
  ``surrogate(x)`` a differentiable approximation for BPDA — the identity unless the defense
  has a better one (``surrogate_name`` says which).

Every defense runs its model in eval mode and restores the mode afterwards; the defended
embeddings are plain fp32.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from advface_fast.attacks.base import eval_mode
from advface_fast.precision import autocast, model_device
from advface_fast.seeds import derive_seed


def as_image_batch(images, device=None) -> torch.Tensor:
    """N x 3 x H x W float32 in [0, 1] from a float tensor of that shape, or from uint8 images
    (a tensor or array, N x H x W x 3 or N x 3 x H x W)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.array(images, copy=True))
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError("images must be a 4-d tensor or array (N x 3 x H x W float, or uint8 N x H x W x 3)")
    if images.dtype == torch.uint8:
        if images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)
        images = images.float().div_(255.0)
    elif not images.is_floating_point():
        raise ValueError(f"images must be float in [0, 1] or uint8, got {images.dtype}")
    return images.to(device=device, dtype=torch.float32)


def pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` padded to ``size`` rows by repeating its last row (a model's floats can depend on the batch
    size; padding every pass to one size makes an image's result independent of its batch). The
    padding carries no gradient."""
    n = x.shape[0]
    return x if n >= size else torch.cat([x, x[-1:].detach().expand(size - n, *x.shape[1:])])


class Defense:
    """Base class of the test-time defenses (see the module docstring for the contract).

    Arguments:
        model (nn.Module): the verifier's embedding model f (plain fp32 embeddings).
        seed (int): the defense's run seed; image i draws with ``derive_seed(seed, id_i)``. (Default: 0)
        batch_size (int): images per model pass; every batch is padded to it, so an image's
            floats never depend on its batch mates or the batch size. (Default: 32)
    """

    name = ""
    paper = ""
    randomized = False
    iterative = False  # has an iteration count (``steps``) that an attacker's copy may reduce
    surrogate_name = "identity"
    variants: tuple = ("default",)

    def __init__(self, model: nn.Module, seed: int = 0, batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.attack_model = model
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.last_stats: dict | None = None
        self._memo = None  # (key, embeddings) of the last embed_memo call

    # ------------------------------------------------------------------ what a defense implements

    def transform(self, x: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """One draw of the defense's input transformation: N x 3 x H x W -> N x 3 x H x W in [0, 1]
        (``seeds``: one int per image; a deterministic defense ignores them). Default: identity."""
        return x

    def surrogate(self, x: torch.Tensor) -> torch.Tensor:
        """A differentiable approximation of :meth:`transform` for BPDA (default: the identity)."""
        return x

    def settings(self) -> dict:
        """The defense's own parameters (part of :meth:`config`)."""
        return {}

    def needs_fit(self) -> bool:
        """Whether :meth:`fit` must run on clean images before the defense is used (default: no)."""
        return False

    def fit(self, images, ids: Sequence[str]):
        """Fit the defense's own parameters on CLEAN images (default: nothing to fit)."""
        return None

    def diagnostic_values(self, images, ids: Sequence[str]) -> dict | None:
        """What the defense did to each of these images, for the record: {name: one value per image}
        (e.g. the counter-attack's drift tau); None: nothing to report (the default)."""
        return None

    def summarise_diagnostics(self, values: dict) -> dict:
        """The record of :meth:`diagnostic_values` over a set of images (default: each one's mean)."""
        return {k: float(np.mean(v)) for k, v in values.items()}

    def diagnostics(self, images, ids: Sequence[str]) -> dict | None:
        """:meth:`summarise_diagnostics` of these images' :meth:`diagnostic_values` (None: nothing to report)."""
        values = self.diagnostic_values(images, ids)
        return None if values is None else self.summarise_diagnostics(values)

    def adaptive_models(self, samples: int = 1, embedder: nn.Module | None = None) -> dict:
        """The defense-specific adaptive attacks beyond BPDA + EOT: {row name: model} (default: none)."""
        return {}

    # ------------------------------------------------------------------ derived, rarely overridden

    def config(self) -> dict:
        """Everything the defense's results depend on except the model weights (JSON-able)."""
        return {"defense": self.name, **self.settings(), "seed": self.seed, "batch_size": self.batch_size}

    def variant_config(self, variant) -> dict:
        self._check_variant(variant)
        return self.config()

    def cost_per_image(self, variant=None) -> float:
        """Model passes per image: one forward pass of f (transforms are free next to it)."""
        return 1.0

    def seeds(self, ids: Sequence[str]) -> list[int]:
        """The per-image seeds of the defense's randomness."""
        return [derive_seed(self.seed, str(i)) for i in ids]

    def embed(self, images, ids: Sequence[str]) -> dict:
        """{variant: N x D float32 CPU}: f(transform(x)) with each image's own seed."""
        x, ids = self._inputs(images, ids)
        out = []
        with torch.no_grad():
            for start in range(0, x.shape[0], self.batch_size):
                chunk = x[start : start + self.batch_size]
                out.append(self.embed_images(self.transform(chunk, self.seeds(ids[start : start + self.batch_size]))))
        self.last_stats = {"images": x.shape[0], "image_steps": self.cost_per_image() * x.shape[0]}
        emb = torch.cat(out) if out else torch.zeros(0, 0)
        return {v: emb for v in self.variants}

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        """Plain fp32 embeddings (autocast disabled, no gradient, eval mode) of images, on the CPU;
        batches padded to ``batch_size`` (so an image's embedding does not depend on its batch)."""
        device = model_device(self.model, x.device)
        embs = []
        with torch.no_grad(), eval_mode(self.model):
            for start in range(0, x.shape[0], self.batch_size):
                batch = x[start : start + self.batch_size].to(device)
                with autocast("fp32", device):
                    embs.append(self.model(pad_batch(batch, self.batch_size))[: batch.shape[0]].float().cpu())
        return torch.cat(embs) if embs else torch.zeros(0, 0)

    def embed_memo(self, images, ids: Sequence[str]) -> dict:
        """:meth:`embed`, remembering the last call (same ids and image bytes): the verifiers of the
        other variants then reuse the same single run, in memory only."""
        x = as_image_batch(images)
        key = (tuple(str(i) for i in ids), hashlib.blake2b(x.cpu().numpy().tobytes(), digest_size=16).hexdigest())
        if self._memo is None or self._memo[0] != key:
            self._memo = (key, self.embed(x, ids))
        return self._memo[1]

    def eot_copy(self, steps: int | None = None):
        """What the adaptive attacker runs for one EOT draw: a callable ``copy(x, sample_seeds=seeds)
        -> images`` with ``config()``. Default: :meth:`transform` itself (``steps`` is for defenses
        with an iteration count, e.g. a reduced-K copy of attack-as-defense)."""
        return _TransformDraw(self)

    def eot_copy_cost(self, steps: int | None = None) -> float:
        """Model passes per image of one :meth:`eot_copy` draw (0 for a pure input transformation)."""
        return 0.0

    def verifier(self, variant=None):
        """The defense at one variant as a verifier for the experiment runner."""
        return DefendedVerifier(self, self.variants[0] if variant is None else variant)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args}{', ' if args else ''}seed={self.seed})"

    def _check_variant(self, variant) -> None:
        if variant not in self.variants:
            raise ValueError(f"{self.name}: variant {variant!r} is not one of {list(self.variants)}")

    @staticmethod
    def _inputs(images, ids) -> tuple[torch.Tensor, list[str]]:
        x = as_image_batch(images)
        ids = [str(i) for i in ids]
        if len(ids) != x.shape[0]:
            raise ValueError(f"got {x.shape[0]} images but {len(ids)} ids")
        return x, ids


class DefendedVerifier:
    """A defense at one variant, in the experiment runner's verifier shape:
    ``embed(chips uint8 N x H x W x 3, ids) -> float32 N x D`` (numpy) and ``config()``.
    Verifiers of one defense share its runs: asking two variants for the same images runs the
    defense once (:meth:`Defense.embed_memo`)."""

    def __init__(self, defense: Defense, variant):
        defense.variant_config(variant)  # checks the variant
        self.defense, self.variant = defense, variant
        self.steps = variant  # attack-as-defense's variants are its step counts (older callers read .steps)

    def embed(self, chips, ids) -> np.ndarray:
        return self.defense.embed_memo(chips, ids)[self.variant].numpy().astype(np.float32)

    def config(self) -> dict:
        return {"kind": self.defense.name, **self.defense.variant_config(self.variant)}


class _TransformDraw:
    """One draw of a defense's transform, in the shape the adaptive attacker calls."""

    def __init__(self, defense: Defense):
        self.defense = defense

    def __call__(self, x: torch.Tensor, sample_seeds: Sequence[int]) -> torch.Tensor:
        return self.defense.transform(x, list(sample_seeds))

    def config(self) -> dict:
        return self.defense.config()


__all__ = ["Defense", "DefendedVerifier", "as_image_batch", "pad_batch"]

"""What every attack shares: input checks, the L-inf budget, seeded noise, uint8 rounding.

Budget. ``eps`` is given in 0-255 pixel units (the paper uses 2, 4, 8) and used internally as
``eps / 255``. During optimisation the iterate stays in the box ``[lo, hi]`` with
``lo = max(x0 - eps/255, 0)``, ``hi = min(x0 + eps/255, 1)``.

Rounding. A real attacker delivers an image file, so by default the output is rounded to the
uint8 grid and the integer image is clamped into
``[ceil(255*x0 - eps), floor(255*x0 + eps)]  ∩  [0, 255]``, so that ``||delta||_inf <= eps``
holds exactly AFTER rounding. Clean images must then lie on the uint8 grid (checked, tolerance
1e-6 in [0, 1] units); on that grid the bound is ``x0_int ± floor(eps)``, computed in integers
(so ``eps=2.5`` allows 2 levels). ``round_output=False`` returns the float iterate instead
(then off-grid clean images are accepted).

Precision. ``precision="bf16"`` runs the model under bf16 autocast when computing gradients
(``"auto"``: bf16 only where the hardware does it natively, see :mod:`advface_fast.precision`).
The iterate, the update and the projection stay fp32. The similarities an attack computes for
itself (C&W's "done" test and best-so-far choice, PGD's best restart) are then bf16-computed
too; the caller judges the delivered images with its own fp32 model, so a bf16 attack can be
weaker but never reports a wrong result.

Randomness. Each call draws from a fresh ``torch.Generator`` seeded with ``seed``, so the same
seed gives identical results for the same inputs. ``sample_seeds`` (one int per query) gives
every query its own generator instead, so a query's random draws do not depend on which batch
or shard it is in; derive them from (run seed, image id) upstream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from advface_fast.attacks.objective import VerificationObjective
from advface_fast.kernels import linf_bounds
from advface_fast.precision import autocast, resolve_precision

GRID_TOLERANCE = 1e-6  # how far (in [0, 1] units) a clean pixel may sit from k/255


class SeededNoise:
    """Uniform draws in [0, 1) from one generator, or from one generator per sample."""

    def __init__(self, n: int, device: torch.device, seed: int | None,
                 sample_seeds: Sequence[int] | None = None):
        self.n, self.device = n, device
        if sample_seeds is not None:
            seeds = [int(s) for s in sample_seeds]
            if len(seeds) != n:
                raise ValueError(f"sample_seeds has {len(seeds)} entries for {n} queries")
            self.per_sample = [torch.Generator(device=device).manual_seed(s) for s in seeds]
            self.shared = None
        else:
            self.per_sample = None
            if seed is None:  # nondeterministic on request: take a seed from torch's global RNG
                seed = int(torch.randint(0, 2**63 - 1, (1,)).item())
            self.shared = torch.Generator(device=device).manual_seed(int(seed))

    def rand(self, sample_shape: Sequence[int]) -> torch.Tensor:
        """An N x sample_shape tensor of U[0, 1) draws (float32, on the device)."""
        if self.per_sample is None:
            return torch.rand((self.n, *sample_shape), generator=self.shared, device=self.device)
        return torch.stack([torch.rand(tuple(sample_shape), generator=g, device=self.device)
                            for g in self.per_sample])


def model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else fallback


def check_on_uint8_grid(images: torch.Tensor) -> None:
    """Raise ValueError unless every pixel is (within 1e-6) some k/255, k in 0..255."""
    off = (images.double() - torch.round(images.double() * 255.0) / 255.0).abs().max()
    if off > GRID_TOLERANCE:
        raise ValueError(
            f"clean queries must lie on the uint8 grid (k/255) for the rounded output to keep "
            f"||delta||_inf <= eps; a pixel is {float(off):.3g} away from it. Pass images made "
            f"from uint8 data, or use round_output=False.")


def round_to_uint8_grid(x_adv: torch.Tensor, x0: torch.Tensor, eps: float | None) -> torch.Tensor:
    """Round ``x_adv`` to k/255 and clamp the integers so that |k_adv - k_0| <= eps exactly.

    ``x0`` must be on the grid; ``eps`` in 0-255 units, or None for no L-inf bound (only [0, 255]).
    """
    adv_int = torch.round(x_adv * 255.0)
    if eps is None:
        return adv_int.clamp_(0.0, 255.0).div_(255.0)
    x0_int = torch.round(x0 * 255.0)
    # For an integer x0_int, ceil(x0_int - eps) = x0_int - floor(eps): exact, no float slack.
    budget = float(math.floor(eps))
    lo = (x0_int - budget).clamp_(min=0.0)
    hi = (x0_int + budget).clamp_(max=255.0)
    return torch.minimum(torch.maximum(adv_int, lo), hi).div_(255.0)


class Attack:
    """Base class. Subclasses set ``name`` and implement :meth:`perturb`.

    Call: ``x_adv = attack(queries, gallery_embeddings, is_same, thresholds, sample_seeds=None)``

    Shape:
        - queries: (N, 3, H, W) float in [0, 1]; on the uint8 grid when rounding.
        - gallery_embeddings: (N, D) clean gallery embeddings (fixed; no gradient flows there).
        - is_same: (N,) bool, True for matched pairs (dodging), False for mismatched
          (impersonation). Only the objective reads it.
        - thresholds: (N,) float, each pair's clean (per-fold) threshold in the objective's
          similarity convention; required by attacks with ``needs_thresholds``.
        - output: (N, 3, H, W) float32 on the model's device, on the uint8 grid when rounding.
    """

    name = "attack"
    needs_thresholds = False
    last_stats: dict | None = None  # set by every call: {"image_steps", "image_steps_full"}

    def __init__(self, model: nn.Module, eps: float | None, objective: VerificationObjective | None = None,
                 seed: int | None = 0, round_output: bool = True, precision: str = "fp32"):
        if eps is not None and not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0 (0-255 units), got {eps}")
        self.model = model
        self.eps = eps
        self.objective = objective if objective is not None else VerificationObjective()
        self.seed = seed
        self.round_output = round_output
        # "auto" is resolved here, once, so config() records what actually ran.
        self.precision = resolve_precision(precision, model_device(model, torch.device("cpu")))

    # ---------------------------------------------------------------- public

    def __call__(self, queries: torch.Tensor, gallery_embeddings: torch.Tensor, is_same: torch.Tensor,
                 thresholds: torch.Tensor | None = None, sample_seeds: Sequence[int] | None = None) -> torch.Tensor:
        x0, gallery, is_same, thresholds = self._check_inputs(queries, gallery_embeddings, is_same, thresholds)
        noise = SeededNoise(x0.shape[0], x0.device, self.seed, sample_seeds)
        # Attacks need input gradients even when the caller runs under torch.no_grad().
        with torch.enable_grad():
            x_adv = self.perturb(x0, gallery, is_same, thresholds, noise).detach()
        if self.round_output:
            return round_to_uint8_grid(x_adv, x0, self.eps)
        return x_adv

    def config(self) -> dict:
        """Key parameters; sizes in 0-255 units. ``make_attack(model=m, **a.config())`` rebuilds it."""
        return {"name": self.name, "eps": self.eps, **self._config(), **getattr(self.objective, "config", dict)(),
                "seed": self.seed, "round_output": self.round_output,
                # Only when not fp32, so fp32 configs (and the cache keys built from them) are unchanged.
                **({"precision": self.precision} if self.precision != "fp32" else {})}

    def perturb(self, x0, gallery, is_same, thresholds, noise: SeededNoise) -> torch.Tensor:
        """Return float adversarial queries (in the image box; in the eps-box if eps-bounded)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"

    # ---------------------------------------------------------------- helpers for subclasses

    def _config(self) -> dict:
        return {}

    def _check_inputs(self, queries, gallery_embeddings, is_same, thresholds):
        if not isinstance(queries, torch.Tensor) or queries.ndim != 4 or not queries.is_floating_point():
            raise ValueError("queries must be a float tensor of shape N x C x H x W")
        n = queries.shape[0]
        device = model_device(self.model, queries.device)
        # Contiguous once here: the fused update kernels work on flat storage, in place.
        x0 = queries.detach().to(device=device, dtype=torch.float32).contiguous()
        if not torch.isfinite(x0).all() or x0.min() < 0 or x0.max() > 1:
            raise ValueError("queries must be finite and in [0, 1]")
        if self.round_output:
            check_on_uint8_grid(x0)
        gallery = torch.as_tensor(gallery_embeddings).detach().to(device=device, dtype=torch.float32)
        if gallery.ndim != 2 or gallery.shape[0] != n:
            raise ValueError(f"gallery_embeddings must be N x D with N={n}, got {tuple(gallery.shape)}")
        is_same = torch.as_tensor(is_same, device=device)
        if is_same.shape != (n,):
            raise ValueError(f"is_same must have shape ({n},), got {tuple(is_same.shape)}")
        is_same = is_same.bool()
        if thresholds is not None:
            thresholds = torch.as_tensor(thresholds, device=device, dtype=torch.float32)
            if thresholds.ndim == 0:
                thresholds = thresholds.expand(n)
            if thresholds.shape != (n,):
                raise ValueError(f"thresholds must have shape ({n},), got {tuple(thresholds.shape)}")
        elif self.needs_thresholds:
            raise ValueError(f"{self.name} needs each pair's clean threshold (thresholds=...)")
        return x0, gallery, is_same, thresholds

    def _eps_box(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """lo = max(x0 - eps, 0), hi = min(x0 + eps, 1), in [0, 1] units."""
        return linf_bounds(x0, self.eps / 255.0)

    def _similarity(self, x: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        """Similarities of the model's embeddings of ``x`` to the gallery.

        Only the model runs in ``self.precision`` (bf16: under autocast); the embeddings are
        cast to fp32 before the similarity, and the gradient reaching ``x`` is fp32.
        """
        with autocast(self.precision, x.device):
            emb = self.model(x)
        return self.objective.similarity(emb.float(), gallery)

    def _ascent_gradient(self, x: torch.Tensor, gallery, is_same) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient of the summed ascent loss w.r.t. the queries (NaN -> 0), and the similarities.

        Summing is fine: in eval mode each pair's loss depends on its own query only, so the
        gradient of the sum is every pair's own gradient. A NaN gradient (e.g. from a
        degenerate embedding) is replaced by 0, i.e. those pixels do not move this step,
        instead of poisoning the iterate.
        """
        x = x.detach().requires_grad_(True)
        sim = self._similarity(x, gallery)
        loss = self.objective.ascent_loss(sim, is_same).sum()
        (grad,) = torch.autograd.grad(loss, x)
        return torch.nan_to_num(grad, nan=0.0).contiguous(), sim.detach()

"""What every attack shares: input checks, the L-inf budget, seeded noise, uint8 rounding, the
one gradient hook, eval mode, and iterates recorded at several step counts.

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
(``"auto"``: bf16 only where the hardware does it natively, see :mod:`advface_fast.precision`);
``precision="fp32"`` runs it with autocast explicitly DISABLED, so an fp32 attack nested in a
bf16 region (a defense inside a bf16 attacker) stays fp32.
The iterate, the update and the projection stay fp32. The similarities an attack computes for
itself (C&W's "done" test and best-so-far choice, PGD's best restart) are then bf16-computed
too; the caller judges the delivered images with its own fp32 model, so a bf16 attack can be
weaker but never reports a wrong result.

Randomness. Each call draws from a fresh ``torch.Generator`` seeded with ``seed``, so the same
seed gives identical results for the same inputs. ``sample_seeds`` (one int per query) gives
every query its own generator instead, so a query's random draws do not depend on which batch
or shard it is in; derive them from (run seed, image id) upstream.

The gradient hook. Every gradient an attack takes goes through :meth:`Attack.loss_and_grad`
(and every forward-only score through :meth:`Attack.score`), for FGSM, PGD, C&W and C&W-L2
alike. By default that is autograd through the model. A model may substitute it by defining
``views(x, seeds) -> list[Tensor]`` (the points at which to evaluate it, one per sample) and
``embedder`` (the module evaluated there): the hook then averages the gradient of the loss over
the views and applies it to ``x``. That is BPDA (the gradient taken at D(x), applied to x) and
EOT (the average over samples of a randomized D); see :mod:`advface_fast.defenses.adaptive`. A
model that also defines ``pullback(x, grad)`` maps that averaged gradient back to ``x`` (BPDA
through a differentiable surrogate of the defense instead of the identity).
A model may instead define ``terms(x, seeds, draw) -> (embedding, penalty)``: the hook then takes
the gradient of ``sum(loss_fn(similarity(embedding)) + penalty)`` by autograd through ``terms`` at
``x`` (``penalty``: N per-image ascent terms, e.g. a defense's gate that the attacker must also
fool; ``seeds`` and ``draw`` as for ``views``), and scores with the embedding alone.
A model that also defines ``step_cost`` (image passes per attack step and image) scales the
``last_stats`` counters. Subclasses can override the two methods instead.

Mode. ``Attack.__call__`` puts the model in eval mode for the attack and restores every
module's previous mode afterwards.

Iterates at several step counts. Attacks with ``record_steps`` (PGD, C&W) keep, from ONE run of
``steps`` steps, the iterate each requested step count would have delivered on its own; after a
call ``last_iterates`` maps every recorded step count (and ``steps``) to that image, rounded
like the output. Attacks without it set ``last_iterates = {steps: output}`` (FGSM: ``{1: ...}``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from advface_fast.attacks.objective import Objective, make_objective
from advface_fast.seeds import derive_seed
from advface_fast.kernels import linf_bounds
from advface_fast.precision import autocast, model_device, resolve_precision

GRID_TOLERANCE = 1e-6  # how far (in [0, 1] units) a clean pixel may sit from k/255
# Images per attack batch in the experiment commands and the benchmark. Results do not depend on which
# images share a batch (per-image seeds); float rounding may still move with the batch SIZE on some
# kernels (see AttackAsDefense; the bf16 fast path gave bitwise-equal gradients at 4, 32 and 64 images
# on the development machine). Speed depends on it: dlib-resnet PGD-10 on a
# 2-core AVX512-BF16 EPYC, bf16, ran at 0.66-0.67 of the bf16 GEMM rate with 32 images and 0.71-0.72 with
# 64 (benchmarks/results/bench_2core_avx512bf16_stem*.json, two runs each).
DEFAULT_ATTACK_BATCH = 64


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
            self.seed, self.sample_seeds = None, seeds
        else:
            self.per_sample = None
            if seed is None:  # nondeterministic on request: take a seed from torch's global RNG
                seed = int(torch.randint(0, 2**63 - 1, (1,)).item())
            self.shared = torch.Generator(device=device).manual_seed(int(seed))
            self.seed, self.sample_seeds = int(seed), None

    def row_seeds(self) -> list[int]:
        """One seed per row: the per-sample seeds, else ones derived from (seed, row position)."""
        if self.sample_seeds is not None:
            return list(self.sample_seeds)
        return [derive_seed(self.seed, f"row/{i}") for i in range(self.n)]

    def fork(self, tag: str) -> SeededNoise:
        """Another stream for another purpose (``tag``), seeded from this one's seed(s): drawing
        from it leaves this stream untouched."""
        if self.sample_seeds is not None:
            return SeededNoise(self.n, self.device, None, [derive_seed(s, tag) for s in self.sample_seeds])
        return SeededNoise(self.n, self.device, derive_seed(self.seed, tag))

    def normal(self, sample_shape: Sequence[int]) -> torch.Tensor:
        """An N x sample_shape tensor of standard normal draws (float32, on the device)."""
        if self.per_sample is None:
            return torch.randn((self.n, *sample_shape), generator=self.shared, device=self.device)
        return torch.stack([torch.randn(tuple(sample_shape), generator=g, device=self.device)
                            for g in self.per_sample])

    def rand(self, sample_shape: Sequence[int]) -> torch.Tensor:
        """An N x sample_shape tensor of U[0, 1) draws (float32, on the device)."""
        if self.per_sample is None:
            return torch.rand((self.n, *sample_shape), generator=self.shared, device=self.device)
        return torch.stack([torch.rand(tuple(sample_shape), generator=g, device=self.device)
                            for g in self.per_sample])


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


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run the block with ``model`` in eval mode; afterwards every module gets its own previous
    mode back (a model with some submodules in train mode stays exactly so)."""
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
    if isinstance(model, nn.Module):
        model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def check_record_steps(record_steps, steps: int) -> tuple[int, ...]:
    """The sorted distinct step counts to record, each in [0, steps]."""
    if record_steps is None:
        return ()
    if isinstance(record_steps, int):
        record_steps = (record_steps,)
    out = tuple(sorted({int(k) for k in record_steps}))
    if out and (out[0] < 0 or out[-1] > steps):
        raise ValueError(f"record_steps must lie in [0, steps={steps}], got {list(record_steps)}")
    return out


def _zero_nans(g: torch.Tensor) -> torch.Tensor:
    """NaN -> 0; in place where ``g`` is dense (autograd's fresh gradient: no new tensor to allocate and fill)."""
    return g.nan_to_num_(nan=0.0) if g.is_contiguous() or g.is_contiguous(memory_format=torch.channels_last) \
        else torch.nan_to_num(g, nan=0.0)


class Attack:
    """Base class. Subclasses set ``name`` and implement :meth:`perturb`.

    Call: ``x_adv = attack(queries, target=None, is_same=None, thresholds=None, sample_seeds=None, start=None)``

    ``start``: the first iterate, e.g. another attack's queries (a warm start: an adaptive attack begun
    where a transfer attack ended). Projected onto the eps-box of ``queries``; used by the first
    restart only (later restarts draw their random starts as usual). Attacks whose search does not
    begin at an iterate (Square) refuse it.

    Shape:
        - queries: (N, 3, H, W) float in [0, 1]; on the uint8 grid when rounding.
        - target: (N, D) the objective's target, fixed (no gradient flows there): the clean
          gallery embeddings for the verification objective; optional for label-free objectives
          (away-from-self: the images' own clean embeddings, computed if not given).
        - is_same: (N,) bool, True for matched pairs (dodging), False for mismatched
          (impersonation). Required by objectives with ``needs_labels`` (verification).
        - thresholds: (N,) float (or a scalar), each pair's clean (per-fold) threshold in the
          objective's similarity convention; required by attacks that use the margin (C&W,
          PGD with early stop or kappa) when the objective's margin needs them.
        - output: (N, 3, H, W) float32 on the model's device, on the uint8 grid when rounding.
    """

    name = "attack"
    needs_thresholds = False  # the attack (as configured) uses the objective's margin / success test
    last_stats: dict | None = None  # set by every call: {"image_steps", "image_steps_full"}
    last_iterates: dict[int, torch.Tensor] | None = None  # set by every call: step count -> image
    accepts_start = True  # the first iterate can be given (``start=``, see :meth:`_start`)
    _given_start: torch.Tensor | None = None

    def __init__(self, model: nn.Module, eps: float | None, objective: Objective | str | dict | None = None,
                 seed: int | None = 0, round_output: bool = True, precision: str = "fp32"):
        if eps is not None and not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0 (0-255 units), got {eps}")
        self.model = model
        self.eps = eps
        self.objective = make_objective(objective)
        self.seed = seed
        self.round_output = round_output
        # "auto" is resolved here, once, so config() records what actually ran.
        self.precision = resolve_precision(precision, model_device(model, torch.device("cpu")))
        self._row_seeds: list[int] | None = None
        self._draw = 0  # evaluations of a model with views in this call: EOT draws per evaluation
        self._recorded: dict[int, torch.Tensor] = {}

    # ---------------------------------------------------------------- public

    def __call__(self, queries: torch.Tensor, target: torch.Tensor | None = None, is_same: torch.Tensor | None = None,
                 thresholds: torch.Tensor | None = None, sample_seeds: Sequence[int] | None = None,
                 start: torch.Tensor | None = None) -> torch.Tensor:
        x0, is_same, thresholds = self._check_inputs(queries, is_same, thresholds)
        self._given_start = self._check_start(start, x0)
        noise = SeededNoise(x0.shape[0], x0.device, self.seed, sample_seeds)
        self._row_seeds = noise.row_seeds() if self._seeded_model() else None
        self._draw = 0
        self._recorded = {}
        with eval_mode(self.model):
            target = self._prepare_target(target, x0, noise)
            # Attacks need input gradients even when the caller runs under torch.no_grad().
            with torch.enable_grad():
                result = self.perturb(x0, target, is_same, thresholds, noise)
        self._row_seeds = self._given_start = None
        iterates = {**self._recorded, self._final_steps(): result}
        self._recorded = {}
        iterates = {k: self._deliver(v.detach(), x0) for k, v in sorted(iterates.items())}
        self.last_iterates = iterates
        scale = getattr(self.model, "step_cost", 1)
        if scale != 1 and self.last_stats is not None:
            self.last_stats = {k: v * scale for k, v in self.last_stats.items()}
        return iterates[max(iterates)]

    def config(self) -> dict:
        """Key parameters; sizes in 0-255 units. ``make_attack(model=m, **a.config())`` rebuilds it.
        The objective's config nests under ``"objective"``."""
        return {"name": self.name, "eps": self.eps, **self._config(), "objective": self.objective.config(),
                "seed": self.seed, "round_output": self.round_output,
                # Only when not fp32, so fp32 configs (and the cache keys built from them) stay short.
                **({"precision": self.precision} if self.precision != "fp32" else {}),
                # An attack through a defended model (BPDA / EOT) says so.
                **({"defended_model": self.model.config()} if self._seeded_model() else {})}

    def perturb(self, x0, target, is_same, thresholds, noise: SeededNoise) -> torch.Tensor:
        """Return float adversarial queries (in the image box; in the eps-box if eps-bounded).
        Attacks that record iterates at other step counts put them in ``self._recorded``
        ({step count: float queries}); ``__call__`` rounds them into ``last_iterates``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"

    # ---------------------------------------------------------------- the gradient hook

    def loss_and_grad(self, x: torch.Tensor, target: torch.Tensor,
                      loss_fn: Callable[[torch.Tensor], torch.Tensor],
                      rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """THE gradient of every attack: d/dx of ``sum_i loss_fn(sim)_i`` and the similarities.

        ``loss_fn`` maps the N similarities to N per-image losses. Summing is fine: in eval mode
        each image's loss depends on its own input only, so the gradient of the sum is every
        image's own gradient. NaN gradient entries (e.g. from a degenerate embedding) become 0:
        those pixels do not move this step. The gradient is a fresh tensor the caller owns (PGD and
        FGSM write its sign over it: ``pgd_step(overwrite_grad=True)``); an override must keep that.
        ``rows`` are the positions of ``x``'s rows in the
        call's batch (attacks that drop finished rows pass them; None = all rows), used to give
        a substituted gradient (views) each row's own seed.

        With a model that has ``views`` (BPDA / EOT): the gradient is taken at every view and
        averaged, and the similarity is the mean over the views. Returns fp32, contiguous.
        """
        if hasattr(self.model, "terms"):  # an objective with its own penalty (e.g. a defense's gate)
            xr = x.detach().requires_grad_(True)
            with autocast(self.precision, x.device):
                emb, penalty = self.model.terms(xr, *self._seeds_and_draw(rows))
            s = self.objective.similarity(emb.float(), target)
            (g,) = torch.autograd.grad(loss_fn(s).sum() + penalty.float().sum(), xr)
            return _zero_nans(g).contiguous(), s.detach()
        grad = sim = None
        views = self._views(x, rows)
        for view in views:
            v = view.detach().requires_grad_(True)
            s = self._similarity(v, target)
            (g,) = torch.autograd.grad(loss_fn(s).sum(), v)
            g = _zero_nans(g)
            grad, sim = (g, s.detach()) if grad is None else (grad.add_(g), sim.add_(s.detach()))
        if len(views) > 1:
            grad.div_(len(views))
            sim.div_(len(views))
        pullback = getattr(self.model, "pullback", None)
        if pullback is not None:  # BPDA through a differentiable surrogate of the defense
            grad = pullback(x, grad)
        return grad.contiguous(), sim

    def score(self, x: torch.Tensor, target: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Forward-only similarities of ``x`` (mean over the views of a model that has them)."""
        with torch.no_grad():
            if hasattr(self.model, "terms"):
                with autocast(self.precision, x.device):
                    emb = self.model.terms(x, *self._seeds_and_draw(rows))[0]
                return self.objective.similarity(emb.float(), target)
            views = self._views(x, rows)
            sim = self._similarity(views[0], target)
            for view in views[1:]:
                sim = sim + self._similarity(view, target)
            return sim / len(views) if len(views) > 1 else sim

    def _seeded_model(self) -> bool:
        """A model whose evaluations draw randomness per row (``views`` or ``terms``)."""
        return hasattr(self.model, "views") or hasattr(self.model, "terms")

    def _seeds_and_draw(self, rows: torch.Tensor | None) -> tuple[list[int], int]:
        seeds = self._row_seeds if rows is None else [self._row_seeds[r] for r in rows.tolist()]
        # The t-th evaluation of the call: every row still attacked sees the same t whatever the
        # batch (attacks evaluate all their active rows at every step), so draws never depend on batching.
        self._draw += 1
        return seeds, self._draw - 1

    def _views(self, x: torch.Tensor, rows: torch.Tensor | None) -> list[torch.Tensor]:
        views = getattr(self.model, "views", None)
        if views is None:
            return [x]
        return views(x, *self._seeds_and_draw(rows))

    def _embedder(self) -> nn.Module:
        return getattr(self.model, "embedder", self.model)

    def _similarity(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Similarities of the embedder's embeddings of ``x`` to the target.

        Only the model runs in ``self.precision`` (bf16: under autocast; fp32: autocast off);
        the embeddings are cast to fp32 before the similarity, and the gradient reaching ``x``
        is fp32.
        """
        with autocast(self.precision, x.device):
            emb = self._embedder()(x)
        return self.objective.similarity(emb.float(), target)

    # ---------------------------------------------------------------- helpers for subclasses

    def _config(self) -> dict:
        return {}

    def _threshold_user(self) -> str:
        """How the error for missing thresholds names what needs them."""
        return self.name

    def _final_steps(self) -> int:
        return int(getattr(self, "steps", 1))

    def _deliver(self, x_adv: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return round_to_uint8_grid(x_adv, x0, self.eps) if self.round_output else x_adv

    def _prepare_target(self, target, x0: torch.Tensor, noise: SeededNoise) -> torch.Tensor:
        n = x0.shape[0]

        def clean_embed():
            with torch.no_grad(), autocast(self.precision, x0.device):
                return self._embedder()(x0).float()

        if target is not None:
            target = torch.as_tensor(target).detach().to(device=x0.device, dtype=torch.float32)
            if target.ndim != 2 or target.shape[0] != n:
                raise ValueError(f"the target (gallery embeddings) must be N x D with N={n}, got {tuple(target.shape)}")
        return self.objective.prepare_target(target, clean_embed, noise).detach().to(torch.float32)

    def _check_inputs(self, queries, is_same, thresholds):
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
        if is_same is not None:
            is_same = torch.as_tensor(is_same, device=device)
            if is_same.shape != (n,):
                raise ValueError(f"is_same must have shape ({n},), got {tuple(is_same.shape)}")
            is_same = is_same.bool()
        elif self.objective.needs_labels:
            raise ValueError(f"the {self.objective.name} objective needs is_same (N bools: True for matched pairs)")
        if thresholds is not None:
            thresholds = torch.as_tensor(thresholds, device=device, dtype=torch.float32)
            if thresholds.ndim == 0:
                thresholds = thresholds.expand(n)
            if thresholds.shape != (n,):
                raise ValueError(f"thresholds must have shape ({n},), got {tuple(thresholds.shape)}")
        elif self.needs_thresholds and self.objective.margin_needs_thresholds:
            raise ValueError(f"{self._threshold_user()} needs each pair's clean threshold (thresholds=...) "
                             f"with the {self.objective.name} objective")
        return x0, is_same, thresholds

    def _check_start(self, start, x0: torch.Tensor) -> torch.Tensor | None:
        if start is None:
            return None
        if not self.accepts_start:
            raise ValueError(f"{self.name} does not take a start (start=): its search does not begin at an iterate")
        if not isinstance(start, torch.Tensor) or tuple(start.shape) != tuple(x0.shape):
            raise ValueError(f"start must be a tensor shaped like the queries {tuple(x0.shape)}, "
                             f"got {tuple(getattr(start, 'shape', ()))}")
        start = start.detach().to(device=x0.device, dtype=torch.float32)
        if not torch.isfinite(start).all() or start.min() < 0 or start.max() > 1:
            raise ValueError("start must be finite and in [0, 1]")
        return start

    def _start(self, x0, lo, hi, noise):
        """The first iterate: the given ``start`` (first restart only) projected onto the eps-box;
        else x0, or with ``self.random_start`` a uniform draw in the eps-box (clamped to the image
        box), from the attack's seeded noise."""
        given, self._given_start = self._given_start, None
        if given is not None:
            return torch.minimum(torch.maximum(given, lo), hi).contiguous()
        if not getattr(self, "random_start", False):
            return x0.clone()
        uniform = noise.rand(x0.shape[1:]).mul_(2.0).sub_(1.0)  # U[-1, 1)
        return torch.minimum(torch.maximum(x0 + uniform * (self.eps / 255.0), lo), hi)

    def _eps_box(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """lo = max(x0 - eps, 0), hi = min(x0 + eps, 1), in [0, 1] units."""
        return linf_bounds(x0, self.eps / 255.0)

    def _ascent_gradient(self, x: torch.Tensor, target, is_same, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient of the objective's ascent loss (through the hook), and the similarities."""
        return self.loss_and_grad(x, target, lambda sim: self.objective.ascent_loss(sim, is_same), rows)

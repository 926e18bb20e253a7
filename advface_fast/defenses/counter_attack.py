"""A tau-gated counter-attack after TTC (Xing, Zhao, Sebe: "CLIP is Strong Enough to Fight Back:
Test-time Counterattacks towards Zero-shot Adversarial Robustness of CLIP", CVPR 2025), for
face embeddings.

The premise (TTC's "falsely stable" images): an adversarial image sits where the embedding
barely moves under small random noise. The defense measures that drift,
``tau(x) = ||f(x + n) - f(x)|| / ||f(x)||`` with ``n`` uniform in the ``eps`` box, and

* ``tau >= tau_threshold``: the image is treated as clean, the verifier sees ``x + n``;
* ``tau < tau_threshold``: the image is counter-attacked: ``steps`` sign-gradient steps of size
  ``alpha`` from ``n`` that MAXIMISE ``||f(x + delta) - f(x)||^2`` within the ``eps`` box, and the
  verifier sees ``x + sum_k w_k delta_k`` over the iterates ``delta_0 = n, ..., delta_K`` with
  weights ``w_k`` proportional to ``exp(beta * k)`` (later steps weigh more), as in the paper.

Gate calibration (the stated rule). With ``tau=None`` the threshold is fitted by :meth:`fit`
on CLEAN images only: the ``gate_quantile`` quantile of their tau (each image with its own
noise draw), so that fraction of clean images is counter-attacked. It is never refit on
attacked data; the fitted value and the rule enter :meth:`config` (the cache key).

The attacker who knows it (:class:`GateAwareModel`): the gate is part of the defense, so a
gate-blind attack is not an adaptive one. Besides BPDA + EOT through the whole defense (the
generic adaptive attacker), the defense names a gate-aware attack: PGD on the verification
margin of ``f(x + n)`` (the branch the gate lets through) plus a hinge that pushes the image's
own drift ``tau(x)`` past ``margin * tau_threshold`` (fresh ``n`` per step, EOT over draws), so
the delivered image both crosses the verification threshold and looks clean to the gate. The
leaderboard runs it with the high-confidence margin ``kappa``: once a pair is ``kappa`` past its
threshold the verification term stops pulling and the sign step follows the gate term (on 8
matched lfw_ci pairs, gate at the 0.8 quantile of clean tau, eps 4, 4 draws: without kappa the
sign step follows the larger term and 0-2 of 8 images got past the gate; with kappa 0.05-0.1,
4-5 of 8, as many as clean images, every decision flipped).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from advface_fast.attacks.base import SeededNoise, eval_mode
from advface_fast.defenses.base import Defense, pad_batch
from advface_fast.defenses.registry import register_defense
from advface_fast.precision import autocast, model_device
from advface_fast.seeds import derive_seed


def drift(emb_noisy: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """TTC's tau: ``||f(x + n) - f(x)|| / ||f(x)||`` per row."""
    return (emb_noisy - emb).norm(dim=1) / emb.norm(dim=1).clamp_min(1e-12)


class CounterAttack(Defense):
    r"""
    TTC's tau-gated counter-attack (see the module docstring).

    Arguments:
        model (nn.Module): the embedding model f.
        eps (float): the counter-attack's L-inf box and the gate's noise box, 0-255 levels. (Default: 4)
        steps (int): counter-attack steps K. (Default: 2)
        alpha (float): step size, 0-255 levels. (Default: 1)
        beta (float): step weights ``exp(beta * k)``. (Default: 2)
        tau (float | None): the gate threshold; None: fitted on clean images by :meth:`fit`. (Default: None)
        gate_quantile (float): the fit's rule: this quantile of clean tau. (Default: 0.2)
        seed, batch_size: as :class:`~advface_fast.defenses.base.Defense` (noise from per-image seeds;
            every model pass padded to ``batch_size``).

    Cost: K + 2 model passes per image (f(x), K forward + backward steps, the final embedding).

    Batches: every model pass is padded to ``batch_size``, yet the sign step can still flip a pixel
    whose gradient is ~0 when other batch mates move the float rounding (lfw_ci: 2 of 67,500 values
    of one image, embedding change 2e-5 of its scale), as for the attacks; the defended stores keep
    each image's first result, so a cached run never mixes two.

    Shape:
        - images: (N, 3, H, W) float in [0, 1], ids: N strings.
        - transform (one draw): (N, 3, H, W) float32; embed: {"default": (N, D) float32}.

    Examples::
        >>> d = CounterAttack(model, eps=4, steps=2, seed=0)
        >>> d.fit(clean_images, clean_ids)             # tau threshold: the 0.2 quantile of clean tau
        >>> emb = d.embed(images, ids)["default"]
        >>> d.last_stats["counterattacked"]            # fraction of images the gate sent to the counter-attack
    """

    name = "counter-attack"
    paper = "Xing, Zhao, Sebe, CVPR 2025 (TTC: tau-gated test-time counterattacks)"
    randomized = True

    def __init__(self, model, eps: float = 4.0, steps: int = 2, alpha: float = 1.0, beta: float = 2.0,
                 tau: float | None = None, gate_quantile: float = 0.2, seed: int = 0, batch_size: int = 32):
        super().__init__(model, seed=seed, batch_size=batch_size)
        if float(eps) <= 0 or float(alpha) <= 0:
            raise ValueError(f"eps and alpha must be positive (0-255 levels), got eps={eps}, alpha={alpha}")
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not 0.0 < float(gate_quantile) < 1.0:
            raise ValueError(f"gate_quantile must be in (0, 1), got {gate_quantile}")
        if tau is not None and float(tau) < 0:
            raise ValueError(f"tau must be >= 0, got {tau}")
        self.eps, self.steps, self.alpha, self.beta = float(eps), int(steps), float(alpha), float(beta)
        self.gate_quantile = float(gate_quantile)
        self.tau = None if tau is None else float(tau)
        self.fit_record: dict | None = None

    # ------------------------------------------------------------------ the protocol

    def settings(self) -> dict:
        gate = ({"tau": self.tau} if self.fit_record is None else
                {"tau": self.tau, "gate_rule": f"quantile {self.gate_quantile:g} of clean tau",
                 "gate_fit": {k: self.fit_record[k] for k in ("images", "ids_sha256")}})
        return {"eps": self.eps, "steps": self.steps, "alpha": self.alpha, "beta": self.beta, **gate}

    def needs_fit(self) -> bool:
        return self.tau is None

    def cost_per_image(self, variant=None) -> float:
        return float(self.steps + 2)

    def eot_copy_cost(self, steps: int | None = None) -> float:
        return float(self.steps + 1)

    def transform(self, x: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        return self._run(x, list(seeds))[0]

    def embed(self, images, ids: Sequence[str]) -> dict:
        x, ids = self._inputs(images, ids)
        out, gated = [], []
        for start in range(0, x.shape[0], self.batch_size):
            chunk = x[start: start + self.batch_size]
            y, _, closed = self._run(chunk, self.seeds(ids[start: start + self.batch_size]))
            out.append(self.embed_images(y))
            gated.append(closed)
        self.last_stats = {"images": x.shape[0], "image_steps": self.cost_per_image() * x.shape[0],
                           "counterattacked": float(torch.cat(gated).float().mean()) if gated else None}
        emb = torch.cat(out) if out else torch.zeros(0, 0)
        return {v: emb for v in self.variants}

    # ------------------------------------------------------------------ the gate

    def fit(self, images, ids: Sequence[str]) -> float:
        """Set ``tau`` to the ``gate_quantile`` quantile of clean images' tau (their own noise draws).
        Returns the threshold; :attr:`fit_record` keeps what it was fitted on."""
        x, ids = self._inputs(images, ids)
        if x.shape[0] < 10:
            raise ValueError(f"{self.name}: fitting the gate needs at least 10 clean images, got {x.shape[0]}")
        taus = self._taus(x, ids)
        self.tau = float(np.quantile(taus, self.gate_quantile))
        self.fit_record = {"images": int(x.shape[0]),
                           "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16],
                           "clean_tau": {"quantiles": {str(q): float(np.quantile(taus, q))
                                                       for q in (0.05, 0.1, 0.2, 0.5, 0.8, 0.95)}}}
        return self.tau

    def diagnostic_values(self, images, ids: Sequence[str]) -> dict:
        """The gate on these images: each one's tau (its own draw)."""
        return {"tau": self._taus(*self._inputs(images, ids))}

    def summarise_diagnostics(self, values: dict) -> dict:
        """The fraction below the threshold (counter-attacked) and tau's quartiles."""
        taus = np.asarray(values["tau"])
        return {"counterattacked": float((taus < self.tau).mean()),
                "tau_quartiles": [float(q) for q in np.quantile(taus, (0.25, 0.5, 0.75))]}

    def drifts(self, x: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """tau of each image with the defense's own noise draw (CPU float32)."""
        n = self._noise(x, seeds)
        with torch.no_grad(), eval_mode(self.model):
            return drift(self._f(x + n), self._f(x)).cpu()

    def _taus(self, x: torch.Tensor, ids: list[str]) -> np.ndarray:
        """:meth:`drifts` of every image, in ``batch_size`` chunks with the images' own seeds."""
        return torch.cat([self.drifts(x[s: s + self.batch_size], self.seeds(ids[s: s + self.batch_size]))
                          for s in range(0, x.shape[0], self.batch_size)]).numpy()

    # ------------------------------------------------------------------ internals

    def _noise(self, x: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """The gate's uniform draw in the eps box, kept inside [0, 1]."""
        u = SeededNoise(x.shape[0], torch.device("cpu"), None,  # CPU draws: the same on every device
                        [derive_seed(s, "ttc/noise") for s in seeds]).rand(x.shape[1:]).to(x.device)
        n = u.mul_(2.0).sub_(1.0).mul_(self.eps / 255.0)
        return torch.minimum(torch.maximum(n, -x), 1.0 - x)

    def _f(self, x: torch.Tensor) -> torch.Tensor:
        """f(x) in fp32, every pass padded to ``batch_size`` (gradients flow when enabled)."""
        device = model_device(self.model, x.device)
        with autocast("fp32", device):
            return self.model(pad_batch(x.to(device), self.batch_size))[: x.shape[0]].float()

    def _run(self, x: torch.Tensor, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(defended images, tau, counter-attacked mask), on ``x``'s device, in ``batch_size`` chunks."""
        if self.tau is None:
            raise RuntimeError(f"{self.name}: the gate threshold is not set: pass tau=... or call fit() on clean images")
        x = x.detach().float()
        out, taus, closed = [], [], []
        with eval_mode(self.model):
            for s in range(0, x.shape[0], self.batch_size):
                y, t, c = self._run_batch(x[s: s + self.batch_size], seeds[s: s + self.batch_size])
                out.append(y), taus.append(t), closed.append(c)
        return torch.cat(out), torch.cat(taus), torch.cat(closed)

    def _run_batch(self, x, seeds):
        eps, alpha = self.eps / 255.0, self.alpha / 255.0
        lo, hi = -x, 1.0 - x  # delta keeps x + delta in [0, 1]
        delta = self._noise(x, seeds)
        with torch.no_grad():
            clean = self._f(x)
        iterates = [delta]
        tau = None
        for _ in range(self.steps):
            d = delta.detach().requires_grad_(True)
            with torch.enable_grad():
                emb = self._f(x + d)
                if tau is None:
                    tau = drift(emb.detach(), clean)
                (g,) = torch.autograd.grad((emb - clean).pow(2).sum(), d)
            g = torch.nan_to_num(g, nan=0.0)
            delta = torch.minimum(torch.maximum((delta + alpha * g.sign()).clamp(-eps, eps), lo), hi)
            iterates.append(delta)
        closed = tau < self.tau  # "falsely stable": counter-attack
        w = torch.exp(self.beta * torch.arange(self.steps + 1, dtype=torch.float32, device=x.device))
        w = w / w.sum()
        weighted = sum(wk * dk for wk, dk in zip(w, iterates))
        final = torch.where(closed.view(-1, 1, 1, 1).to(x.device), weighted, iterates[0])
        return (x + final).clamp_(0.0, 1.0), tau, closed

    def adaptive_models(self, samples: int = 1, embedder: nn.Module | None = None) -> dict:
        """The defense-specific adaptive attacks (row name -> model for the attack classes)."""
        return {"gate-aware": GateAwareModel(self, samples=samples, embedder=embedder)}


class GateAwareModel(nn.Module):
    """The gate-aware attacker's model: ``terms(x, seeds, draw) -> (embedding, penalty)`` for the
    attacks' gradient hook (:meth:`advface_fast.attacks.base.Attack.loss_and_grad`).

    The embedding is ``f(x + n)`` averaged over ``samples`` fresh gate draws (the branch the gate
    lets through); the penalty (an ascent term per image) is
    ``-weight * relu(margin * tau_threshold - tau(x))`` averaged over the same draws, with tau
    computed through f at ``x`` and ``x + n``: the attack is pushed to make the image look clean
    to the gate while it crosses the verification threshold.

    Arguments:
        defense (CounterAttack): the defense (its gate threshold must be set).
        samples (int): gate draws per evaluation (EOT). (Default: 1)
        embedder (nn.Module | None): the model differentiated (e.g. a fast copy of f). (Default: f)
        margin (float): the drift aimed at, as a multiple of the threshold. (Default: 1.1)
        weight (float): the hinge's weight against the verification margin (cosine units). (Default: 1;
            on 16 lfw_ci pairs, dlib-resnet, a gate at the 0.8 quantile of clean tau, PGD-10 at eps 4 with 2
            draws: weight 0 left 2/16 images past the gate, weight 1 7/16 with every decision still
            flipped, weight 3 7/16 with 4/16 decisions kept: the sign step follows the larger term)
    """

    def __init__(self, defense: CounterAttack, samples: int = 1, embedder: nn.Module | None = None,
                 margin: float = 1.1, weight: float = 1.0):
        super().__init__()
        if defense.tau is None:
            raise ValueError("the gate-aware attack needs the defense's gate threshold (fit the defense first)")
        self.defense, self.samples = defense, int(samples)
        self.embedder = defense.model if embedder is None else embedder
        self.margin, self.weight = float(margin), float(weight)
        self.step_cost = float(self.samples + 1)

    def terms(self, x: torch.Tensor, seeds: Sequence[int], draw: int) -> tuple[torch.Tensor, torch.Tensor]:
        own = self.embedder(x)
        emb = pen = None
        for s in range(self.samples):
            n = self.defense._noise(x.detach(), [derive_seed(seed, f"gate/{int(draw)}/{s}") for seed in seeds])
            noisy = self.embedder(x + n)
            tau = drift(noisy.float(), own.float())
            p = -self.weight * torch.relu(self.margin * self.defense.tau - tau)
            emb, pen = (noisy, p) if emb is None else (emb + noisy, pen + p)
        return emb / self.samples, pen / self.samples

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """f(x + n) with one gate draw (row-position seeds)."""
        return self.terms(x, [derive_seed(0, f"row/{i}") for i in range(x.shape[0])], 0)[0]

    def config(self) -> dict:
        return {"attacker": "gate-aware", "gate_samples": self.samples, "margin": self.margin, "weight": self.weight,
                **({} if self.embedder is self.defense.model else {"embedder": type(self.embedder).__name__}),
                "defense": self.defense.config()}


register_defense("counter-attack", CounterAttack)

__all__ = ["CounterAttack", "GateAwareModel", "drift"]

"""Training methods, one step each: the clean control, PGD-AT, FGSM-RS and free AT.

Every method sees a batch (images N x 3 x H x W in [0, 1], labels, per-image attack seeds) and
makes ONE optimiser update per replay, in fp32 (the model's fp32 weights are the master
weights; only attack gradients may run in bf16, see :mod:`advface_fast.precision`).

* ``clean`` — the control: the update on the clean images, everything else identical.
* ``pgd`` — Madry et al. 2018 (https://arxiv.org/abs/1706.06083): K steps of PGD on the head's
  loss from a uniform random start in the eps-box (step alpha, default 2.5 * eps / K as in
  Madry et al.), then the update on the adversarial images.
* ``fgsm-rs`` — Wong, Rice & Kolter 2020, "Fast is better than free"
  (https://arxiv.org/abs/2001.03994): uniform random start, one signed step of 1.25 * eps,
  projection, then the update.
* ``free`` — Shafahi et al. 2019, "Adversarial Training for Free!"
  (https://arxiv.org/abs/1904.12843): each batch is replayed K times; every replay's backward
  gives both the weight update and the perturbation's step (eps * sign), and the perturbation
  carries over to the next batch. K replays cost K update passes, so divide the epochs by K to
  match a clean run's cost (Shafahi et al. do).

Attacks (pgd, fgsm-rs) are generated with the model in EVAL mode and the model is put back in
train mode for the update, so models with BatchNorm neither use batch statistics of adversarial
images while attacking nor update running statistics with them. (Free AT has no separate attack
pass: its perturbation step comes from the training pass itself.) dlib-resnet has no BatchNorm.

Accuracies reported per batch: ``robust`` = the head's accuracy on the images the update used
(the adversarial ones; pre-update), ``clean`` = its accuracy on the clean images (for the
adversarial methods an extra no-grad eval-mode forward, timed apart and left out of the cost).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from .adapter import attack_images, training_attack
from .head import CosFaceHead

METHODS = ("clean", "pgd", "fgsm-rs", "free")


@dataclass
class StepResult:
    loss: float  # mean training loss of the batch (mean over replays for free AT)
    n: int
    clean_correct: int
    robust_correct: int | None  # None for the clean control (no adversarial images made)
    attack_image_steps: int  # forward + input-gradient passes of the attack
    update_passes: int  # forward + full backward passes that update the weights
    attack_seconds: float
    update_seconds: float
    monitor_seconds: float  # the clean-accuracy forward of adversarial methods (not part of the cost)


class Method:
    name = "method"

    def __init__(self, model: nn.Module, head: CosFaceHead, eps: float, steps: int, alpha: float | None,
                 precision: str):
        self.model, self.head = model, head
        self.eps, self.steps, self.precision = float(eps), int(steps), precision
        self.alpha = alpha

    def step(self, x, labels, seeds, optimizer) -> StepResult:
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint must hold to resume this method exactly (free AT's perturbation)."""
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def _update(self, images, labels, optimizer):
        """One fp32 update on ``images``; returns (loss, correct before the update)."""
        self.model.train()
        optimizer.zero_grad(set_to_none=True)
        emb = self.model(images)
        loss = self.head.loss(emb, labels)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            correct = int((self.head.predict(emb.detach()) == labels).sum())
        return float(loss.detach()), correct

    @torch.no_grad()
    def _clean_correct(self, x, labels) -> int:
        self.model.eval()
        return int((self.head.predict(self.model(x)) == labels).sum())


class Clean(Method):
    name = "clean"

    def step(self, x, labels, seeds, optimizer) -> StepResult:
        t0 = time.perf_counter()
        loss, correct = self._update(x, labels, optimizer)
        return StepResult(loss, len(labels), correct, None, 0, len(labels), 0.0, time.perf_counter() - t0, 0.0)


class PGDAT(Method):
    """PGD-AT (and FGSM-RS, which is its one-step special case)."""

    name = "pgd"

    def _attack(self):
        alpha = self.alpha if self.alpha is not None else 2.5 * self.eps / max(self.steps, 1)
        return training_attack(self.model, self.head, eps=self.eps, steps=self.steps, alpha=alpha,
                               precision=self.precision)

    def step(self, x, labels, seeds, optimizer) -> StepResult:
        t0 = time.perf_counter()
        clean_correct = self._clean_correct(x, labels)
        t1 = time.perf_counter()
        self.model.eval()  # attacks see inference-mode layers (BatchNorm: running statistics)
        try:
            attack = self._attack()
            x_adv = attack_images(attack, x, labels, seeds)
        finally:
            self.model.train()
        t2 = time.perf_counter()
        loss, robust = self._update(x_adv, labels, optimizer)
        t3 = time.perf_counter()
        return StepResult(loss, len(labels), clean_correct, robust, attack.last_stats["image_steps"], len(labels),
                          t2 - t1, t3 - t2, t1 - t0)


class FGSMRS(PGDAT):
    name = "fgsm-rs"

    def _attack(self):
        alpha = self.alpha if self.alpha is not None else 1.25 * self.eps
        return training_attack(self.model, self.head, eps=self.eps, steps=1, alpha=alpha, precision=self.precision)


class FreeAT(Method):
    """Free AT: K replays per batch, the perturbation reused across replays and batches."""

    name = "free"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.delta: torch.Tensor | None = None

    def state(self):
        return {} if self.delta is None else {"delta": self.delta}

    def load_state(self, state):
        self.delta = state.get("delta")

    def step(self, x, labels, seeds, optimizer) -> StepResult:
        t0 = time.perf_counter()
        clean_correct = self._clean_correct(x, labels)
        t1 = time.perf_counter()
        n, eps = x.shape[0], self.eps / 255.0
        if self.delta is None or self.delta.shape[1:] != x.shape[1:] or self.delta.shape[0] < n:
            self.delta = torch.zeros_like(x)
        losses, robust = [], 0
        self.model.train()
        for _ in range(max(self.steps, 1)):
            delta = self.delta[:n]
            x_adv = (x + delta).clamp_(0.0, 1.0).requires_grad_(True)
            optimizer.zero_grad(set_to_none=True)
            emb = self.model(x_adv)
            loss = self.head.loss(emb, labels)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                robust = int((self.head.predict(emb.detach()) == labels).sum())
                grad = torch.nan_to_num(x_adv.grad, nan=0.0)
                self.delta[:n] = (delta + eps * grad.sign()).clamp_(-eps, eps)
            losses.append(float(loss.detach()))
        t2 = time.perf_counter()
        replays = max(self.steps, 1)
        return StepResult(sum(losses) / len(losses), n, clean_correct, robust, 0, n * replays, 0.0, t2 - t1, t1 - t0)


def make_method(name: str, model, head, *, eps: float, steps: int, alpha: float | None = None,
                precision: str = "auto") -> Method:
    classes = {"clean": Clean, "pgd": PGDAT, "fgsm-rs": FGSMRS, "free": FreeAT}
    if name not in classes:
        raise ValueError(f"unknown training method {name!r}; use one of {', '.join(METHODS)}")
    if name != "clean" and not eps > 0:
        raise ValueError(f"{name} needs eps > 0 (0-255 units), got {eps}")
    if name in ("pgd", "free") and steps < 1:
        raise ValueError(f"{name} needs steps >= 1, got {steps}")
    return classes[name](model, head, eps, steps, alpha, precision)


__all__ = ["METHODS", "Method", "StepResult", "make_method"]

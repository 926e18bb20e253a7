"""What every comparison works on: the configuration, the models and the pairs.

The pairs are LFW fold 1 (the first ``batch_size`` pairs, half matched) or synthetic on-grid
images; one fixed cosine threshold judges every attack's success. ``pgd_one_step`` is the
attack step the FLOP-rate and CUDA-graph rows time: the PGD class itself, one step (or K steps
of one PGD-K run, whose per-attack setup the K steps share).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..attacks import DEFAULT_ATTACK_BATCH, PGD, VerificationObjective
from ..attacks.base import SeededNoise
from ..engine import chips_to_tensor, embed_chips
from ..precision import PRECISIONS, resolve_precision

MODEL_NAME = "dlib-resnet"
SECTIONS = ("kernels", "pgd", "embedding", "flops", "table1", "gpu")
DEFAULT_SECTIONS = ("kernels", "pgd", "embedding", "flops", "gpu")  # table1 is opt-in: it takes long


@dataclass
class BenchConfig:
    """What to run and at which sizes; None sizes take the full or the quick default."""

    lfw: str | os.PathLike | None = None  # LFW location; None (or unreadable) -> synthetic pairs
    synthetic: bool = False  # random on-grid images instead of LFW
    quick: bool = False  # tiny sizes and few rounds (smoke test)
    threads: int | None = None  # torch (and onnxruntime) threads; None: all cores
    precision: str = "auto"  # precision of the fast path: auto, fp32 or bf16
    sections: tuple = DEFAULT_SECTIONS
    table1: bool = False  # add the (long) end-to-end Table 1 section
    batch_size: int | None = None  # pairs per attack batch (DEFAULT_ATTACK_BATCH = 64; quick 4)
    pgd_steps: int | None = None  # steps of the full PGD row (10; quick 2)
    eps: float = 4.0  # L-inf budget in 0-255 levels (alpha = eps / 4)
    rounds: int | None = None  # timed rounds per comparison (5; quick 2)
    warmup: int | None = None  # untimed calls first (1)
    kernel_batch: int | None = None  # images in the kernel rows (32; quick 4)
    embed_images: int | None = None  # images embedded per timed call (128; quick 8)
    embed_batch: int | None = None  # engine batch size (64; quick 4)
    gemm_size: int | None = None  # square GEMM side (2048; quick 256)
    table1_pairs: int | None = None  # None: the whole fold (600 pairs); quick 4
    table1_steps: int | None = None  # PGD / C&W steps in Table 1 (40; quick 2)
    seed: int = 0

    def resolved(self) -> "BenchConfig":
        q = self.quick
        defaults = dict(batch_size=4 if q else DEFAULT_ATTACK_BATCH, pgd_steps=2 if q else 10, rounds=2 if q else 5, warmup=1,
                        kernel_batch=4 if q else 32, embed_images=8 if q else 128, embed_batch=4 if q else 64,
                        gemm_size=256 if q else 2048, table1_pairs=4 if q else None,
                        table1_steps=2 if q else 40)
        out = dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})
        if out.threads is None:
            out.threads = os.cpu_count() or 1
        if out.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {out.precision!r}")
        unknown = [s for s in out.sections if s not in SECTIONS]
        if unknown:
            raise ValueError(f"unknown sections {unknown}; choose from {SECTIONS}")
        return out


@dataclass
class PairBatch:
    """The pairs every attack row works on."""

    queries: torch.Tensor  # N x 3 x H x W float32, on the uint8 grid
    gallery: torch.Tensor  # N x D clean fp32 embeddings of the gallery images
    is_same: torch.Tensor  # N bool: matched pairs are dodged, mismatched impersonated
    threshold: float  # one fixed cosine threshold: "same" iff s > threshold
    chips: np.ndarray  # uint8 N x H x W x 3 chips for the embedding rows
    source: str
    threshold_source: str


class BenchContext:
    """Models, data and the fast path shared by all sections (each built on first use)."""

    def __init__(self, cfg: BenchConfig, log: Callable[[str], None] | None = None):
        self.cfg = cfg.resolved()
        self.log = log or (lambda msg: None)
        self.device = torch.device("cpu")
        self._model = None
        self._fast = None
        self._data = None

    @property
    def model(self) -> nn.Module:
        """The plain fp32 eager model (the reference for every parity and success check)."""
        if self._model is None:
            from ..models import create_model

            self._model = create_model(MODEL_NAME, device=self.device)
        return self._model

    def fast(self) -> tuple[nn.Module, str]:
        """(the fast model copy, the resolved precision of the fast path)."""
        if self._fast is None:
            from ..models import create_model

            self._fast = (create_model(MODEL_NAME, device=self.device, fast=True),
                          resolve_precision(self.cfg.precision, self.device))
        return self._fast

    def data(self) -> PairBatch:
        if self._data is None:
            self._data = load_pair_batch(self)
        return self._data


def pgd_one_step(model: nn.Module, precision: str, queries: torch.Tensor, gallery: torch.Tensor,
                 is_same: torch.Tensor, eps: float, steps: int = 1) -> Callable[[], torch.Tensor]:
    """A callable doing one PGD step (forward, input gradient of the objective, fused update) with
    the PGD class, from the clean queries (no random start, no rounding); with ``steps`` = K, one
    PGD-K run (K such steps after the attack's setup: the eps box, the start, the result copy).

    It calls ``PGD.perturb`` rather than the attack itself: ``__call__``'s input checks read
    values back to the host, which a CUDA graph cannot capture and which the FLOP rate should not
    include. ``queries`` must already be float32, contiguous and on the model's device.
    """
    attack = PGD(model, eps=eps, steps=steps, random_start=False, round_output=False, precision=precision)
    noise = SeededNoise(queries.shape[0], queries.device, 0)  # unused without a random start

    def step():
        with torch.enable_grad():
            return attack.perturb(queries, gallery, is_same, None, noise)

    return step


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return VerificationObjective("cosine").similarity(a, b)


@torch.no_grad()
def _embed(model: nn.Module, chips: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(embed_chips(model, np.asarray(chips), batch_size=64))


def _fit_threshold(sim: torch.Tensor, same: np.ndarray) -> float:
    from ..metrics import fit_threshold

    return fit_threshold(sim.double().numpy(), same, metric="cosine")[0]


def _fold_pairs(pairs, n: int) -> np.ndarray:
    """The first n//2 matched and n - n//2 mismatched pairs (LFW folds list matched pairs first)."""
    same = np.flatnonzero(pairs.same)[: n // 2]
    diff = np.flatnonzero(~pairs.same)[: n - n // 2]
    return np.sort(np.concatenate([same, diff]))


def load_pair_batch(ctx: BenchContext) -> PairBatch:
    """LFW fold 1 (the first batch_size pairs, half matched), or synthetic pairs."""
    cfg = ctx.cfg
    n, n_embed = cfg.batch_size, max(cfg.embed_images, 1)
    why_synthetic = "requested" if cfg.synthetic else None
    if not cfg.synthetic:
        if cfg.lfw is None:
            why_synthetic = "no LFW path given"
        else:
            try:
                from ..pair_chips import prepare_pairs

                ctx.log(f"loading LFW fold 1 from {cfg.lfw} (aligns on a cold chip cache)")
                pairs = prepare_pairs(cfg.lfw, MODEL_NAME, folds=[1], progress=False)
            except Exception as err:
                why_synthetic = f"LFW unavailable: {type(err).__name__}: {err}"
    if why_synthetic is not None:
        ctx.log(f"synthetic pairs ({why_synthetic})")
        return synthetic_pair_batch(ctx.model, n, n_embed, cfg.seed, why_synthetic)
    chips = pairs.chips.chips
    sel = _fold_pairs(pairs, n)
    gallery = _embed(ctx.model, chips[pairs.gallery[sel]])
    same = pairs.same[sel]
    if cfg.quick:
        sim = cosine(_embed(ctx.model, chips[pairs.query[sel]]), gallery)
        thr, thr_src = _fit_threshold(sim, same), f"fitted on the {len(sel)} clean benchmark pairs"
    else:  # a threshold from the whole fold is a fairer judge than one from 32 pairs
        emb = _embed(ctx.model, chips)
        thr = _fit_threshold(cosine(emb[pairs.query], emb[pairs.gallery]), pairs.same)
        thr_src = f"fitted on all {len(pairs)} clean fold-1 pairs"
    return PairBatch(chips_to_tensor(np.asarray(chips[pairs.query[sel]])).contiguous(), gallery,
                     torch.from_numpy(same), thr, np.asarray(chips[:n_embed]),
                     f"LFW fold 1, {int(same.sum())} matched + {int((~same).sum())} mismatched pairs", thr_src)


def synthetic_chips(n: int, seed: int, size: int = 150) -> np.ndarray:
    """Smooth random RGB uint8 chips (upsampled coarse noise plus fine noise), N x H x W x 3."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 10, 10, generator=gen)
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    x = (x + 0.1 * torch.rand(n, 3, size, size, generator=gen)).clamp_(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def synthetic_pair_batch(model: nn.Module, n: int, n_embed: int, seed: int, why: str) -> PairBatch:
    """Random on-grid queries; a matched pair's gallery is a lightly noised copy of its query."""
    queries_u8 = synthetic_chips(n, seed)
    others = synthetic_chips(n, seed + 1)
    noise = np.random.default_rng(seed).integers(-6, 7, queries_u8.shape)
    same = np.arange(n) % 2 == 0
    gallery_u8 = np.where(same[:, None, None, None], np.clip(queries_u8 + noise, 0, 255), others).astype(np.uint8)
    gallery = _embed(model, gallery_u8)
    thr = _fit_threshold(cosine(_embed(model, queries_u8), gallery), same)
    return PairBatch(chips_to_tensor(queries_u8).contiguous(), gallery, torch.from_numpy(same), thr,
                     synthetic_chips(n_embed, seed + 2), f"synthetic ({why})", f"fitted on the {n} clean synthetic pairs")

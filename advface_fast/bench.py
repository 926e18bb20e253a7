"""Side-by-side speed benchmarks: the logic behind ``advface bench`` and ``benchmarks/run_all.py``.

Every comparison runs ours and its baseline in ONE process on the same inputs, interleaved round by
round (the order rotates), after warm-up; the reported time is the median of the rounds. Sections:

  kernels    fused attack-update kernels vs the eager chains they replace
  pgd        one PGD step and PGD-k on real LFW pairs (or synthetic ones): ours fp32, ours fast path
             (bf16 + fast model), torchattacks.PGD fp32 on the same weights and objective; both
             success rates are judged with one fixed cosine threshold on the delivered uint8 images
  embedding  onnxruntime and the fast bf16 torch path vs torch eager fp32, with parity
  flops      forward + input-gradient backward: effective GFLOP/s vs GEMM rates measured in the run
  table1     (opt-in, long) end-to-end Table 1 on one fold: fp32 eager vs fast path vs fast + early stop
  gpu        Triton update bandwidth vs copy bandwidth; bf16 + CUDA graph step vs fp32 eager (CUDA only)

Pieces that other work adds (``advface_fast.precision``, ``create_model(..., fast=True)``, the attacks'
``precision=`` and ``early_stop=`` arguments, Table1Config fields) are detected at run time; a row
that needs a missing piece is reported as "pending: ..." instead of failing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as _dt
import json
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import __version__
from .precision import PRECISIONS

SECTIONS = ("kernels", "pgd", "embedding", "flops", "table1", "gpu")
DEFAULT_SECTIONS = ("kernels", "pgd", "embedding", "flops", "gpu")  # table1 is opt-in: it takes long

# Targets on the ratio column (ours / baseline for rates, baseline / ours for times).
TARGET_PGD_KERNEL = 4.0
TARGET_PGD_BF16 = 4.0
STRETCH_PGD_BF16 = 5.0
TARGET_ORT = 1.6
TARGET_TABLE1 = 4.0  # end-to-end Table 1 on one fold, fast path (early stop off) vs fp32 eager
TARGET_FLOP_FRACTION = 0.30
TARGET_TRITON_BANDWIDTH = 0.85

CW_LR = 0.01
MODEL_NAME = "dlib-resnet"


# ------------------------------------------------------------------------------------------------
# Configuration and result rows
# ------------------------------------------------------------------------------------------------
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
    batch_size: int | None = None  # pairs per attack batch (32; quick 4)
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
        defaults = dict(batch_size=4 if q else 32, pgd_steps=2 if q else 10, rounds=2 if q else 5, warmup=1,
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
class Row:
    """One line of the table. ``ratio`` is the speed-up of ours over the baseline (or, for the
    FLOP and bandwidth rows, the fraction of the reference rate); ``target`` applies to it."""

    section: str
    name: str
    ours: float | None = None
    baseline: float | None = None
    unit: str = ""
    higher_is_better: bool = True
    target: float | None = None
    status: str = "ok"  # "ok", "pending: why", "pending (no GPU)", "error: what"
    note: str = ""
    details: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.baseline is None or self.ours <= 0 or self.baseline <= 0:
            return None
        return self.ours / self.baseline if self.higher_is_better else self.baseline / self.ours

    @property
    def met(self) -> bool | None:
        ratio = self.ratio
        return None if self.target is None or ratio is None else ratio >= self.target

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ratio": self.ratio, "met": self.met}


def pending(section: str, name: str, why: str, **kw) -> Row:
    return Row(section, name, status=why if why.startswith("pending") else f"pending: {why}", **kw)


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    median_s: float  # median seconds per call over the rounds
    min_s: float
    samples: list  # seconds per call, one entry per round
    number: int  # calls per sample (more than 1 for sub-millisecond functions)


def time_side_by_side(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1,
                      min_sample_s: float = 0.0, sync: Callable[[], None] | None = None) -> dict[str, Timing]:
    """Time every function in ``fns`` in the same rounds, interleaved, after ``warmup`` calls each.

    Round r runs the functions in an order rotated by r, so none is always first after the others.
    A function faster than ``min_sample_s`` is called several times per sample. ``sync`` (e.g.
    torch.cuda.synchronize) runs before every clock read.
    """
    sync = sync or (lambda: None)
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync()
    number = dict.fromkeys(names, 1)
    # Calls per sample: as many as fit in min_sample_s (counted, so one slow call cannot decide it).
    for name in names if min_sample_s > 0 else ():
        calls, t0 = 0, time.perf_counter()
        while True:
            fns[name]()
            calls += 1
            sync()
            if time.perf_counter() - t0 >= min_sample_s:
                break
        number[name] = calls
    samples: dict[str, list] = {name: [] for name in names}
    for r in range(max(rounds, 1)):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn, n = fns[name], number[name]
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t0) / n)
    return {name: Timing(statistics.median(s), min(s), [round(v, 6) for v in s], number[name])
            for name, s in samples.items()}


# ------------------------------------------------------------------------------------------------
# The fast path (precision module, fast model, attack arguments): detected, never assumed
# ------------------------------------------------------------------------------------------------
def precision_module():
    """``advface_fast.precision`` or None while it does not exist."""
    try:
        from . import precision
    except ImportError:
        return None
    if not all(hasattr(precision, n) for n in ("cpu_features", "resolve_precision", "autocast")):
        return None
    return precision


def cpu_info() -> dict:
    """CPU description: ``precision.cpu_features()`` when available, else the basics."""
    mod = precision_module()
    if mod is not None:
        try:
            feats = mod.cpu_features()
            return dict(feats) if isinstance(feats, dict) else {"features": feats}
        except Exception as err:  # a description must never stop the benchmark
            return {"error": f"{type(err).__name__}: {err}"}
    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "note": "advface_fast.precision not available"}


def host_id() -> str:
    """platform.node() reduced to a safe file name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", platform.node()).strip("._-")
    return name or "unknown-host"


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
    """Models, data and the fast-path status shared by all sections (built lazily)."""

    def __init__(self, cfg: BenchConfig, log: Callable[[str], None] | None = None):
        self.cfg = cfg.resolved()
        self.log = log or (lambda msg: None)
        self.device = torch.device("cpu")
        self._model = None
        self._fast = None
        self._data = None
        self.precision_mod = precision_module()

    # -- models
    @property
    def model(self) -> nn.Module:
        """The plain fp32 eager model (the reference for every parity and success check)."""
        if self._model is None:
            from .models import create_model

            self._model = create_model(MODEL_NAME, device=self.device)
        return self._model

    def fast(self) -> tuple[nn.Module | None, str, str | None]:
        """(fast model, resolved precision, None) or (None, "", why it is pending)."""
        if self._fast is None:
            self._fast = self._build_fast()
        return self._fast

    def _build_fast(self):
        if self.precision_mod is None:
            return None, "", "fast path not available (advface_fast.precision missing)"
        try:
            precision = self.precision_mod.resolve_precision(self.cfg.precision, self.device)
        except Exception as err:
            return None, "", f"resolve_precision failed: {type(err).__name__}: {err}"
        from .models import create_model

        try:
            model = create_model(MODEL_NAME, device=self.device, fast=True)
        except (TypeError, ValueError) as err:
            return None, str(precision), f"fast path not available (create_model(..., fast=True): {err})"
        return model, str(precision), None

    def autocast(self, precision: str):
        """The precision module's autocast context; a no-op for fp32 without the module."""
        if self.precision_mod is None:
            if precision != "fp32":
                raise RuntimeError("autocast needs advface_fast.precision")
            return contextlib.nullcontext()
        return self.precision_mod.autocast(precision, self.device)

    # -- data
    def data(self) -> PairBatch:
        if self._data is None:
            self._data = load_pair_batch(self)
        return self._data


def _fold_pairs(pairs, n: int) -> np.ndarray:
    """The first n//2 matched and n - n//2 mismatched pairs (LFW folds list matched pairs first)."""
    same = np.flatnonzero(pairs.same)[: n // 2]
    diff = np.flatnonzero(~pairs.same)[: n - n // 2]
    return np.sort(np.concatenate([same, diff]))


@torch.no_grad()
def _embed(model: nn.Module, chips: np.ndarray, batch: int = 64) -> torch.Tensor:
    from .engine import embed_chips

    return torch.from_numpy(embed_chips(model, chips, batch_size=batch))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from .attacks import VerificationObjective

    return VerificationObjective("cosine").similarity(a, b)


def _fit_threshold(sim: torch.Tensor, same: np.ndarray) -> float:
    from .verify import fit_threshold

    return fit_threshold(sim.double().numpy(), same, metric="cosine")[0]


def load_pair_batch(ctx: BenchContext) -> PairBatch:
    """LFW fold 1 (the first batch_size pairs, half matched), or synthetic pairs."""
    cfg = ctx.cfg
    n = cfg.batch_size
    n_embed = max(cfg.embed_images, 1)
    why_synthetic = "requested" if cfg.synthetic else None
    if not cfg.synthetic:
        if cfg.lfw is None:
            why_synthetic = "no LFW path given"
        else:
            try:
                from .pipeline import prepare_pairs

                ctx.log(f"loading LFW fold 1 from {cfg.lfw} (aligns on a cold chip cache)")
                pairs = prepare_pairs(cfg.lfw, MODEL_NAME, folds=[1], progress=False)
            except Exception as err:
                why_synthetic = f"LFW unavailable: {type(err).__name__}: {err}"
    if why_synthetic is None:
        chips = pairs.chips.chips
        sel = _fold_pairs(pairs, n)
        queries = chips_tensor(chips[pairs.a[sel]])
        gallery = _embed(ctx.model, np.asarray(chips[pairs.b[sel]]))
        same = pairs.same[sel]
        if cfg.quick:
            sim = _cosine(_embed(ctx.model, np.asarray(chips[pairs.a[sel]])), gallery)
            thr, thr_src = _fit_threshold(sim, same), f"fitted on the {len(sel)} clean benchmark pairs"
        else:  # a threshold from the whole fold is a fairer judge than one from 32 pairs
            emb = _embed(ctx.model, np.asarray(chips))
            sim = _cosine(emb[pairs.a], emb[pairs.b])
            thr, thr_src = _fit_threshold(sim, pairs.same), f"fitted on all {len(pairs)} clean fold-1 pairs"
        return PairBatch(queries, gallery, torch.from_numpy(same), thr, np.asarray(chips[:n_embed]),
                         f"LFW fold 1, {int(same.sum())} matched + {int((~same).sum())} mismatched pairs", thr_src)
    ctx.log(f"synthetic pairs ({why_synthetic})")
    return synthetic_pair_batch(ctx.model, n, n_embed, cfg.seed, why_synthetic)


def chips_tensor(chips: np.ndarray) -> torch.Tensor:
    from .engine import chips_to_tensor

    return chips_to_tensor(np.asarray(chips)).contiguous()


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
    queries = chips_tensor(queries_u8)
    thr = _fit_threshold(_cosine(_embed(model, queries_u8), gallery), same)
    chips = synthetic_chips(n_embed, seed + 2)
    return PairBatch(queries, gallery, torch.from_numpy(same), thr, chips, f"synthetic ({why})",
                     f"fitted on the {n} clean synthetic pairs")


# ------------------------------------------------------------------------------------------------
# torchattacks, bent to verification
# ------------------------------------------------------------------------------------------------
class TwoLogitVerifier(nn.Module):
    """A face-embedding model as a 2-class "classifier" of one pair, for classification attacks.

    forward(x) = [m, -m] with m = s(x) - threshold, s the cosine similarity of x's embedding to the
    pair's gallery embedding. CE([m, -m], y) = softplus(-2m) for y = 0 and softplus(2m) for y = 1,
    so an untargeted attack that MAXIMISES CE lowers s for label 0 (matched pairs: dodging) and
    raises s for label 1 (mismatched pairs: impersonation), the same directions as our objective.
    Set the pairs of each batch with ``set_pairs`` before calling the attack.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.gallery = None
        self.thresholds = None

    def set_pairs(self, gallery: torch.Tensor, thresholds: torch.Tensor | float) -> None:
        self.gallery = gallery
        self.thresholds = torch.as_tensor(thresholds, dtype=torch.float32, device=gallery.device)

    @staticmethod
    def labels(is_same: torch.Tensor) -> torch.Tensor:
        return (~is_same.bool()).long()  # matched -> 0, mismatched -> 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        margin = _cosine(self.model(x), self.gallery) - self.thresholds
        return torch.stack([margin, -margin], dim=1)


def torchattacks_version() -> str | None:
    try:
        import torchattacks
    except Exception:
        return None
    return getattr(torchattacks, "__version__", "unknown")


# ------------------------------------------------------------------------------------------------
# Variants: the callables the sections (and the pytest-benchmark files) time
# ------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    label: str
    fn: Callable[[], Any] | None = None
    pending: str | None = None  # why it cannot run (yet)
    info: dict = field(default_factory=dict)


def torch_adam_step(x: torch.Tensor, grad: torch.Tensor, lr: float, lo: torch.Tensor,
                    hi: torch.Tensor) -> Callable[[], None]:
    """The baseline of ``cw_step``: torch.optim.Adam.step() on a copy of ``x`` with a fixed gradient, then clamp."""
    param = x.clone().requires_grad_(True)
    param.grad = grad.clone()
    adam = torch.optim.Adam([param], lr=lr)

    def step():
        adam.step()
        with torch.no_grad():
            param.clamp_(lo, hi)

    return step


def kernel_variants(ctx: BenchContext) -> dict[str, Variant]:
    """pgd_step fused vs the torchattacks chain; cw_step fused vs torch.optim.Adam.step() + clamp."""
    from .kernels import cw_step, linf_bounds, pgd_step, pgd_step_torchattacks

    shape = (ctx.cfg.kernel_batch, 3, 150, 150)
    gen = torch.Generator().manual_seed(ctx.cfg.seed)
    eps, alpha = ctx.cfg.eps / 255, ctx.cfg.eps / 4 / 255
    x0 = torch.rand(shape, generator=gen)
    lo, hi = linf_bounds(x0, eps)
    x_start = torch.clamp(x0 + (torch.rand(shape, generator=gen) * 2 - 1) * eps, 0, 1)
    grad = torch.randn(shape, generator=gen)
    state = {"fused": x_start.clone(), "chain": x_start.clone(), "x": x_start.clone(),
             "m": torch.zeros(shape), "v": torch.zeros(shape), "t": 0}

    def pgd_chain():
        state["chain"] = pgd_step_torchattacks(state["chain"], x0, grad, alpha, eps)

    def cw_fused():
        state["t"] += 1
        cw_step(state["x"], grad, state["m"], state["v"], state["t"], CW_LR, lo, hi)

    return {
        "pgd_fused": Variant("pgd_step fused", lambda: pgd_step(state["fused"], grad, lo, hi, alpha)),
        "pgd_chain": Variant("torchattacks chain", pgd_chain),
        "cw_fused": Variant("cw_step fused", cw_fused),
        "cw_adam": Variant("Adam.step + clamp", torch_adam_step(x_start, grad, CW_LR, lo, hi)),
    }


def pgd_variants(ctx: BenchContext, steps: int) -> dict[str, Variant]:
    """PGD-``steps`` on the context's pairs: ours fp32, ours fast path, torchattacks fp32.

    Each fn returns the delivered images (ours: on the uint8 grid; torchattacks: float, rounded
    by ``deliver_torchattacks`` before judging).
    """
    from .attacks import PGD

    data, cfg = ctx.data(), ctx.cfg
    alpha = cfg.eps / 4
    # early_stop off: the same number of steps as torchattacks does
    common = dict(eps=cfg.eps, alpha=alpha, steps=steps, seed=cfg.seed, early_stop=False)
    out = {}

    def ours(model, precision):
        attack = PGD(model, precision=precision, **common)
        return attack, (lambda: attack(data.queries, data.gallery, data.is_same))

    attack, fn = ours(ctx.model, "fp32")
    out["ours_fp32"] = Variant("ours fp32", fn, info={"attack": attack})
    fast_model, precision, why = ctx.fast()
    if why is None:
        attack, fn = ours(fast_model, precision)
        out["ours_fast"] = Variant(f"ours {precision} fast", fn, info={"attack": attack, "precision": precision})
    else:
        out["ours_fast"] = Variant("ours fast", pending=why)

    try:
        import torchattacks
    except Exception as err:
        out["torchattacks"] = Variant("torchattacks fp32", pending=f"torchattacks not importable ({err})")
        return out
    wrapper = TwoLogitVerifier(ctx.model)
    ta = torchattacks.PGD(wrapper, eps=cfg.eps / 255, alpha=alpha / 255, steps=steps, random_start=True)
    labels = TwoLogitVerifier.labels(data.is_same)

    def run_ta():
        torch.manual_seed(cfg.seed)  # torchattacks draws its random start from the global generator
        wrapper.set_pairs(data.gallery, data.threshold)
        return ta(data.queries, labels)

    out["torchattacks"] = Variant("torchattacks fp32", run_ta)
    return out


def deliver_torchattacks(x_adv: torch.Tensor, x0: torch.Tensor, eps: float) -> torch.Tensor:
    """Round torchattacks' float output to the uint8 grid inside the eps-box, as ours delivers."""
    from .attacks import round_to_uint8_grid

    return round_to_uint8_grid(x_adv.detach().float(), x0, eps)


@torch.no_grad()
def success_rate(ctx: BenchContext, x_adv: torch.Tensor) -> float:
    """Fraction of pairs whose fp32 decision (same iff cosine > threshold) is wrong on x_adv."""
    data = ctx.data()
    sim = _cosine(ctx.model(x_adv).float(), data.gallery)
    return float(((sim > data.threshold) != data.is_same).float().mean())


def embedding_variants(ctx: BenchContext) -> dict[str, Variant]:
    """torch eager fp32 (NCHW), onnxruntime, and the fast model under the fast precision."""
    from .engine import TorchEngine, chips_to_tensor, make_engine

    chips, bs = ctx.data().chips, ctx.cfg.embed_batch
    torch_engine = TorchEngine(ctx.model)
    out = {"torch_fp32": Variant("torch eager fp32", lambda: torch_engine.embed(chips, batch_size=bs))}
    try:
        ort = make_engine(ctx.model, kind="onnxruntime", num_threads=ctx.cfg.threads)
        out["onnxruntime"] = Variant("onnxruntime", lambda: ort.embed(chips, batch_size=bs),
                                     info={"engine": ort.describe()})
    except Exception as err:
        out["onnxruntime"] = Variant("onnxruntime", pending=f"onnxruntime unavailable ({type(err).__name__}: {err})")
    fast_model, precision, why = ctx.fast()
    if why is not None:
        out["fast"] = Variant("torch fast", pending=why)
    else:
        @torch.inference_mode()
        def embed_fast():
            embs = []
            for start in range(0, len(chips), bs):
                x = chips_to_tensor(chips[start : start + bs], ctx.device)
                with ctx.autocast(precision):
                    embs.append(fast_model(x).float())
            return torch.cat(embs).numpy()

        out["fast"] = Variant(f"torch {precision} fast", embed_fast, info={"precision": precision})
    return out


def _objective_grad(model: nn.Module, x: torch.Tensor, gallery: torch.Tensor, is_same: torch.Tensor,
                    autocast) -> torch.Tensor:
    """One forward + input-gradient backward of the attack objective, as an attack step runs it."""
    from .attacks import VerificationObjective

    objective = VerificationObjective("cosine")
    x = x.detach().requires_grad_(True)
    with autocast:
        emb = model(x)
    loss = objective.ascent_loss(objective.similarity(emb.float(), gallery), is_same).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def fwd_bwd_variants(ctx: BenchContext) -> dict[str, Variant]:
    """Forward + input-gradient backward on the attack batch: fp32 eager and the fast path."""
    data = ctx.data()
    out = {"fp32": Variant("fp32 eager", lambda: _objective_grad(ctx.model, data.queries, data.gallery,
                                                                     data.is_same, contextlib.nullcontext()))}
    fast_model, precision, why = ctx.fast()
    if why is not None:
        out["fast"] = Variant("fast", pending=why)
    else:
        out["fast"] = Variant(f"{precision} fast", lambda: _objective_grad(
            fast_model, data.queries, data.gallery, data.is_same, ctx.autocast(precision)),
            info={"precision": precision})
    return out


def count_fwd_bwd_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward + backward to the INPUT only, as counted by FlopCounterMode.

    The model is frozen, so the backward computes no weight gradients: convolution_backward runs
    (and is counted) for grad_input only. ``loss.backward()`` is used because FlopCounterMode
    rejects ``autograd.grad`` on a leaf input; it runs the same kernels.
    """
    from torch.utils.flop_counter import FlopCounterMode

    x = x.detach().clone().requires_grad_(True)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).float().pow(2).sum().backward()
    return int(counter.get_total_flops())


def gemm_variants(n: int, device: torch.device) -> dict[str, Variant]:
    gen = torch.Generator(device=device).manual_seed(0)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, generator=gen, device=device).to(dtype)
        b = torch.randn(n, n, generator=gen, device=device).to(dtype)
        out[name] = Variant(f"GEMM {n}^3 {name}", (lambda a=a, b=b: torch.matmul(a, b)))
    return out


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------
def _timed(ctx: BenchContext, variants: dict[str, Variant], min_sample_s: float = 0.0, sync=None) -> dict[str, Timing]:
    runnable = {k: v.fn for k, v in variants.items() if v.fn is not None}
    return time_side_by_side(runnable, ctx.cfg.rounds, ctx.cfg.warmup, min_sample_s, sync)


def section_kernels(ctx: BenchContext) -> list[Row]:
    v = kernel_variants(ctx)
    t = _timed(ctx, v, min_sample_s=0.005 if ctx.cfg.quick else 0.05)
    shape = f"{ctx.cfg.kernel_batch}x3x150x150"
    ms = {k: t[k].median_s * 1e3 for k in t}
    timing = {k: dataclasses.asdict(t[k]) for k in t}
    return [
        Row("kernels", f"pgd_step fused vs torchattacks chain ({shape})", ms["pgd_fused"], ms["pgd_chain"], "ms",
            higher_is_better=False, target=TARGET_PGD_KERNEL,
            details={k: timing[k] for k in ("pgd_fused", "pgd_chain")}),
        Row("kernels", f"cw_step fused vs Adam.step+clamp ({shape})", ms["cw_fused"], ms["cw_adam"], "ms",
            higher_is_better=False, details={k: timing[k] for k in ("cw_fused", "cw_adam")}),
    ]


def section_pgd(ctx: BenchContext) -> list[Row]:
    data, cfg = ctx.data(), ctx.cfg
    n = len(data.is_same)
    rows = []
    clean = success_rate(ctx, data.queries)
    for steps in sorted({1, cfg.pgd_steps}):
        v = pgd_variants(ctx, steps)
        results: dict[str, torch.Tensor] = {}

        def keep(key):
            fn = v[key].fn
            return lambda: results.__setitem__(key, fn())

        t = time_side_by_side({k: keep(k) for k in v if v[k].fn is not None}, cfg.rounds, cfg.warmup)
        rate = {k: n * steps / t[k].median_s for k in t}
        success = {}
        for key, x_adv in results.items():
            if key == "torchattacks":
                x_adv = deliver_torchattacks(x_adv, data.queries, cfg.eps)
            success[key] = success_rate(ctx, x_adv)
        details = {"pairs": n, "steps": steps, "eps": cfg.eps, "alpha": cfg.eps / 4, "threshold": data.threshold,
                   "clean_error_rate": clean, "success_rate": success,
                   "timing": {k: dataclasses.asdict(t[k]) for k in t}}
        for key in ("ours_fp32", "ours_fast"):
            stats = getattr(v[key].info.get("attack"), "last_stats", None)
            if stats:
                details[f"{key}_last_stats"] = dict(stats)
        title = "PGD 1 step" if steps == 1 else f"PGD-{steps}"
        base = rate.get("torchattacks")
        base_why = v["torchattacks"].pending
        for key, target in (("ours_fp32", None), ("ours_fast", TARGET_PGD_BF16)):
            name = f"{title}: {v[key].label} vs torchattacks fp32 (img-steps/s)"
            if v[key].pending:
                rows.append(pending("pgd", name, v[key].pending, target=target))
                continue
            note = f"success {_pct(success.get(key))} vs {_pct(success.get('torchattacks'))}"
            if key == "ours_fast":
                note += f" (stretch {STRETCH_PGD_BF16:g}x)"
            row = Row("pgd", name, rate[key], base, "img-steps/s", target=target, note=note, details=details)
            if base_why:
                row.status = f"pending: baseline {base_why}"
            rows.append(row)
    return rows


def section_embedding(ctx: BenchContext) -> list[Row]:
    v = embedding_variants(ctx)
    results: dict[str, np.ndarray] = {}

    def keep(key):
        fn = v[key].fn
        return lambda: results.__setitem__(key, np.asarray(fn(), dtype=np.float32))

    t = _timed(ctx, {k: Variant(v[k].label, keep(k)) for k in v if v[k].fn is not None})
    n = len(ctx.data().chips)
    rate = {k: n / t[k].median_s for k in t}
    ref = results["torch_fp32"].astype(np.float64)
    parity = {k: float(np.abs(e.astype(np.float64) - ref).max()) for k, e in results.items()}
    rows = []
    for key, target in (("onnxruntime", TARGET_ORT), ("fast", None)):
        name = f"embedding: {v[key].label} vs torch eager fp32 NCHW (img/s)"
        if v[key].pending:
            rows.append(pending("embedding", name, v[key].pending, target=target))
            continue
        rows.append(Row("embedding", name, rate[key], rate["torch_fp32"], "img/s", target=target,
                        note=f"parity max-abs {parity[key]:.2g}",
                        details={"images": n, "batch_size": ctx.cfg.embed_batch, "parity_max_abs": parity[key],
                                 **v[key].info, "timing": {k: dataclasses.asdict(t[k]) for k in (key, "torch_fp32")}}))
    return rows


def section_flops(ctx: BenchContext) -> list[Row]:
    cfg, data = ctx.cfg, ctx.data()
    flops = count_fwd_bwd_flops(ctx.model, data.queries)
    gemm_v = gemm_variants(cfg.gemm_size, ctx.device)
    step_v = fwd_bwd_variants(ctx)
    # GEMMs and model steps in the same interleaved rounds, so both see the same machine load.
    t = _timed(ctx, {**{f"gemm_{k}": v for k, v in gemm_v.items()}, **step_v},
               min_sample_s=0.02 if cfg.quick else 0.2)
    gemm_rate = {k: 2 * cfg.gemm_size**3 / t[f"gemm_{k}"].median_s / 1e9 for k in gemm_v}
    eff = {k: flops / t[k].median_s / 1e9 for k in step_v if k in t}
    common = {"fwd_bwd_gflop_per_batch": flops / 1e9, "batch": len(data.is_same),
              "gemm_gflops": gemm_rate, "gemm_size": cfg.gemm_size,
              "step_s": {k: t[k].median_s for k in eff}, "timing": {k: dataclasses.asdict(v) for k, v in t.items()}}
    rows = [Row("flops", f"GEMM {cfg.gemm_size}^3: bf16 vs fp32 (GFLOP/s)", gemm_rate["bf16"], gemm_rate["fp32"],
                "GFLOP/s", details={"timing": {k: common["timing"][f"gemm_{k}"] for k in gemm_v}})]
    name = "fwd+bwd effective GFLOP/s: {} vs bf16 GEMM (fraction)"
    if step_v["fast"].pending:
        rows.append(pending("flops", name.format("fast"), step_v["fast"].pending, target=TARGET_FLOP_FRACTION))
    else:
        rows.append(Row("flops", name.format(step_v["fast"].label), eff["fast"], gemm_rate["bf16"], "GFLOP/s",
                        target=TARGET_FLOP_FRACTION, details=common))
    rows.append(Row("flops", "fwd+bwd effective GFLOP/s: fp32 eager vs fp32 GEMM (fraction)", eff["fp32"],
                    gemm_rate["fp32"], "GFLOP/s", details=common))
    return rows


def table1_fields() -> set[str]:
    from .experiments.table1 import Table1Config

    return {f.name for f in dataclasses.fields(Table1Config)}


def section_table1(ctx: BenchContext) -> list[Row]:
    """End-to-end Table 1 on fold 1, each variant with its own empty attack cache."""
    from .experiments.table1 import Table1Config, run_table1

    cfg = ctx.cfg
    names = {"fast": "Table 1 fold 1: fast path vs fp32 eager (s)",
             "early": "Table 1 fold 1: fast path + early stop vs fp32 eager (s)"}
    have = table1_fields()
    missing = [f for f in ("precision", "early_stop") if f not in have]
    if missing:
        return [pending("table1", n, f"Table1Config lacks {', '.join(missing)}") for n in names.values()]
    if cfg.synthetic or cfg.lfw is None:
        return [pending("table1", n, "needs LFW (not synthetic)") for n in names.values()]
    _, precision, why = ctx.fast()
    if why is not None:
        return [pending("table1", n, why) for n in names.values()]

    from .pipeline import prepare_pairs

    ctx.log("table1: warming the chip cache so no variant pays for alignment")
    prepare_pairs(cfg.lfw, MODEL_NAME, progress=False)
    base = dict(model=MODEL_NAME, attacks=("fgsm", "pgd", "cw"), eps=(2, 4) if cfg.quick else (2, 4, 8),
                steps=(cfg.table1_steps,), folds=(1,), max_pairs=cfg.table1_pairs, noise_baseline=False,
                seed=cfg.seed)
    variants = {"fp32": dict(precision="fp32", early_stop=False),
                "fast": dict(precision=precision, early_stop=False),
                "early": dict(precision=precision, early_stop=True)}
    if "fast_model" in have:  # the folded channels-last copy: part of the fast path, not of the baseline
        for key, extra in variants.items():
            extra["fast_model"] = key != "fp32"
    seconds, reports = {}, {}
    for key, extra in variants.items():
        ctx.log(f"table1: {key} {extra}")
        with tempfile.TemporaryDirectory(prefix="advface-bench-table1-") as cache_dir:
            t0 = time.perf_counter()
            reports[key] = run_table1(cfg.lfw, Table1Config(**base, **extra), cache_dir=cache_dir, progress=False)
            seconds[key] = time.perf_counter() - t0
    def per_row(report, field):
        return {f"{r['attack']}@{r['eps']:g}": r.get(field) for r in report["rows"]}

    acc = {k: per_row(rep, "accuracy_mean") for k, rep in reports.items()}
    # Every variant's per-row seconds and image-steps, so a reader sees where the time went.
    per_variant = {k: {"total_s": seconds[k], "config": {**base, **variants[k]},
                       "attack_seconds": per_row(rep, "time_s"), "image_steps": per_row(rep, "image_steps"),
                       "image_steps_full": per_row(rep, "image_steps_full")} for k, rep in reports.items()}
    rows = []
    for key, target in (("fast", TARGET_TABLE1), ("early", None)):
        gap = max((abs(acc[key][r] - acc["fp32"][r]) for r in acc["fp32"] if r in acc[key]), default=float("nan"))
        rows.append(Row("table1", names[key], seconds[key], seconds["fp32"], "s", higher_is_better=False,
                        target=target, note=f"max |accuracy - fp32| {100 * gap:.1f} pts",
                        details={"config": {**base, **variants[key]}, "accuracy": acc[key],
                                 "accuracy_fp32": acc["fp32"], "attack_seconds": per_variant[key]["attack_seconds"],
                                 "pairs": reports[key]["n_pairs"], "variants": per_variant}))
    return rows


def section_gpu(ctx: BenchContext) -> list[Row]:
    names = ("Triton pgd_step bandwidth vs device copy (fraction)",
             "PGD step: bf16 + CUDA graph vs fp32 eager (img-steps/s)")
    if not torch.cuda.is_available():
        return [Row("gpu", n, status="pending (no GPU)") for n in names]
    rows = []
    try:
        rows.append(_gpu_bandwidth(ctx, names[0]))
    except Exception as err:
        rows.append(Row("gpu", names[0], status=f"error: {type(err).__name__}: {err}"))
    try:
        rows.append(_gpu_graph_step(ctx, names[1]))
    except Exception as err:
        rows.append(Row("gpu", names[1], status=f"error: {type(err).__name__}: {err}"))
    return rows


def _gpu_bandwidth(ctx: BenchContext, name: str) -> Row:
    from .kernels import linf_bounds, pgd_step, triton_usable

    dev = torch.device("cuda")
    if not triton_usable(dev):
        return pending("gpu", name, "triton not importable", target=TARGET_TRITON_BANDWIDTH)
    shape = (max(ctx.cfg.kernel_batch, 32) * 4, 3, 150, 150)  # big enough to hide launch latency
    gen = torch.Generator(device=dev).manual_seed(0)
    x0 = torch.rand(shape, device=dev, generator=gen)
    lo, hi = linf_bounds(x0, ctx.cfg.eps / 255)
    x, grad, dst = x0.clone(), torch.randn(shape, device=dev, generator=gen), torch.empty_like(x0)
    fns = {"triton": lambda: pgd_step(x, grad, lo, hi, 1 / 255, impl="triton"), "copy": lambda: dst.copy_(x0)}
    t = time_side_by_side(fns, ctx.cfg.rounds, ctx.cfg.warmup, min_sample_s=0.02, sync=torch.cuda.synchronize)
    nbytes = x0.numel() * x0.element_size()
    bw = {"triton": 5 * nbytes / t["triton"].median_s / 1e9, "copy": 2 * nbytes / t["copy"].median_s / 1e9}
    return Row("gpu", name, bw["triton"], bw["copy"], "GB/s", target=TARGET_TRITON_BANDWIDTH,
               note="update moves x, grad, lo, hi in and x out",
               details={"shape": list(shape), "device": torch.cuda.get_device_name(0)})


def _gpu_graph_step(ctx: BenchContext, name: str) -> Row:
    from .attacks import VerificationObjective
    from .kernels import linf_bounds, pgd_step

    fast_model, precision, why = ctx.fast()
    if why is not None:
        return pending("gpu", name, why)
    dev = torch.device("cuda")
    data = ctx.data()
    plain = copy.deepcopy(ctx.model).to(dev)  # copies: the CPU sections keep their models
    fast = copy.deepcopy(fast_model).to(dev)
    x0 = data.queries.to(dev)
    gallery, is_same = data.gallery.to(dev), data.is_same.to(dev)
    lo, hi = linf_bounds(x0, ctx.cfg.eps / 255)
    alpha = ctx.cfg.eps / 4 / 255
    objective = VerificationObjective("cosine")
    autocast = ctx.precision_mod.autocast

    def step(model, x, cast):
        xg = x.detach().requires_grad_(True)
        with cast:
            emb = model(xg)
        loss = objective.ascent_loss(objective.similarity(emb.float(), gallery), is_same).sum()
        (grad,) = torch.autograd.grad(loss, xg)
        pgd_step(x, torch.nan_to_num(grad, nan=0.0).contiguous(), lo, hi, alpha)

    x_eager, x_graph = x0.clone(), x0.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture requires
        for _ in range(3):
            step(fast, x_graph, autocast(precision, dev))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(fast, x_graph, autocast(precision, dev))
    fns = {"graph": graph.replay, "eager": lambda: step(plain, x_eager, contextlib.nullcontext())}
    t = time_side_by_side(fns, ctx.cfg.rounds, ctx.cfg.warmup, min_sample_s=0.02, sync=torch.cuda.synchronize)
    n = len(is_same)
    return Row("gpu", name.replace("bf16", precision), n / t["graph"].median_s, n / t["eager"].median_s,
               "img-steps/s", details={"device": torch.cuda.get_device_name(0), "pairs": n})


SECTION_FUNCS = {"kernels": section_kernels, "pgd": section_pgd, "embedding": section_embedding,
                 "flops": section_flops, "table1": section_table1, "gpu": section_gpu}


# ------------------------------------------------------------------------------------------------
# Entry point, report, table
# ------------------------------------------------------------------------------------------------
def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _versions() -> dict:
    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except Exception:
        ort = None
    return {"advface_fast": __version__, "torch": torch.__version__, "onnxruntime": ort,
            "torchattacks": torchattacks_version(), "numpy": np.__version__, "python": platform.python_version()}


def run_benchmarks(cfg: BenchConfig | None = None, *, out: str | os.PathLike | None = None,
                   command: str | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Run the configured sections side by side and return the report; write it as JSON to ``out``.

    A section that raises becomes an "error: ..." row; the others still run.
    """
    cfg = (cfg or BenchConfig()).resolved()
    sections = list(cfg.sections)
    if "table1" not in sections and cfg.table1:
        sections.append("table1")
    ctx = BenchContext(cfg, log)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    rows: list[Row] = []
    try:
        for section in SECTIONS:
            if section not in sections:
                continue
            ctx.log(f"[{section}]")
            t0 = time.perf_counter()
            try:
                new = SECTION_FUNCS[section](ctx)
            except Exception as err:
                new = [Row(section, section, status=f"error: {type(err).__name__}: {err}")]
            for row in new:
                row.details.setdefault("section_seconds", round(time.perf_counter() - t0, 2))
            rows.extend(new)
        _, fast_precision, fast_why = ctx.fast()
        data = ctx._data
    finally:
        torch.set_num_threads(previous_threads)
    report = {
        "host": host_id(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else _command_line(),
        "cpu": cpu_info(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": _versions(),
        "threads": cfg.threads,
        "precision": {"requested": cfg.precision, "fast_path": fast_precision or None, "fast_path_pending": fast_why},
        "data": None if data is None else {"source": data.source, "pairs": len(data.is_same),
                                           "threshold": data.threshold, "threshold_source": data.threshold_source},
        # The data is named by what it is (report["data"]), not by where it lives on this machine.
        "config": {**dataclasses.asdict(cfg), "lfw": None if cfg.lfw is None else "<LFW>"},
        "rows": [r.to_dict() for r in rows],
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        report["written_to"] = str(path)
    return report


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def format_table(report: dict) -> str:
    """The rows as a readable table: name, ours, baseline, ratio, target, met?, note."""
    head = ("name", "ours", "baseline", "ratio", "target", "met?", "note")
    lines = []
    for r in report["rows"]:
        unit = f" {r['unit']}" if r["unit"] else ""
        ours = _num(r["ours"]) + unit if r["ours"] is not None else "-"
        base = _num(r["baseline"]) + unit if r["baseline"] is not None else "-"
        ratio = "-" if r["ratio"] is None else (f"{r['ratio']:.2f}x" if r["unit"] not in ("GFLOP/s", "GB/s")
                                                or "fraction" not in r["name"] else f"{r['ratio']:.0%}")
        target = "-" if r["target"] is None else (f">={r['target']:.0%}" if "fraction" in r["name"]
                                                   else f">={r['target']:g}x")
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        note = r["note"] if r["status"] == "ok" else r["status"] + (f"; {r['note']}" if r["note"] else "")
        lines.append((r["name"], ours, base, ratio, target, met, note))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" if i in (0, 6) else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [f"advface-fast benchmarks on {report['host']} ({report['threads']} threads, "
           f"fast path: {report['precision']['fast_path'] or report['precision']['fast_path_pending']})"]
    if report.get("data"):
        d = report["data"]
        out.append(f"data: {d['source']}; cosine threshold {d['threshold']:.4f} ({d['threshold_source']})")
    out += [fmt.format(*head).rstrip(), "  ".join("-" * w for w in widths)]
    out += [fmt.format(*line).rstrip() for line in lines]
    out.append(f"({report['seconds']} s; ratio = speed-up of ours over the baseline, or the fraction of the "
               f"reference rate for 'fraction' rows)")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# Command line (shared by benchmarks/run_all.py and `advface bench`)
# ------------------------------------------------------------------------------------------------
def _section_list(text: str) -> tuple:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in SECTIONS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown sections {bad}; choose from {', '.join(SECTIONS)}")
    return parts


def add_arguments(parser: argparse.ArgumentParser, *, default_lfw: str | None = None,
                  default_out_dir: str | os.PathLike = "benchmarks/results") -> None:
    """The benchmark options (``advface bench`` and ``benchmarks/run_all.py``)."""
    parser.add_argument("--lfw", metavar="PATH", default=default_lfw,
                        help="LFW folder (fold 1 is used); without one, synthetic pairs (default: %(default)s)")
    parser.add_argument("--synthetic", action="store_true", help="random on-grid images instead of LFW")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds (a smoke run, not a measurement)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch / onnxruntime threads (default: all cores)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="precision of the fast path (default: %(default)s: bf16 where the CPU has it)")
    parser.add_argument("--only", type=_section_list, metavar="LIST", default=DEFAULT_SECTIONS,
                        help=f"sections to run, from {','.join(SECTIONS)} (default: {','.join(DEFAULT_SECTIONS)})")
    parser.add_argument("--table1", action="store_true",
                        help="also time Table 1 end to end on fold 1 (three variants; tens of minutes)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="pairs per attack batch (default 32, quick 4)")
    parser.add_argument("--steps", type=int, metavar="N", help="steps of the full PGD row (default 10, quick 2)")
    parser.add_argument("--rounds", type=int, metavar="N", help="timed rounds per comparison (default 5, quick 2)")
    parser.add_argument("--warmup", type=int, metavar="N", help="untimed calls before timing (default 1)")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help=f"JSON report (default: {default_out_dir}/<host>.json)")
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    parser.add_argument("--json", action="store_true", help="also print the JSON report")
    parser.set_defaults(bench_default_out_dir=str(default_out_dir))


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    lfw = args.lfw
    if lfw is None and not args.synthetic:
        from .data import resolve_lfw_path

        try:  # $ADVFACE_LFW or the default download location; synthetic pairs without one
            lfw = resolve_lfw_path()
        except Exception:
            lfw = None
    return BenchConfig(lfw=lfw, synthetic=args.synthetic, quick=args.quick, threads=args.threads,
                       precision=args.precision, sections=tuple(args.only), table1=args.table1,
                       batch_size=args.batch_size, pgd_steps=args.steps, rounds=args.rounds, warmup=args.warmup)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run, print the table, write the JSON. Exit status 1 when a row errored (not for unmet targets)."""
    out = None if args.no_write else (args.out or Path(args.bench_default_out_dir) / f"{host_id()}.json")
    report = run_benchmarks(config_from_args(args), out=out,
                            log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_table(report))
    if out is not None:
        print(f"wrote {out}")
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return 1 if any(r["status"].startswith("error") for r in report["rows"]) else 0


def main(argv=None, *, default_lfw: str | None = None, default_out_dir="benchmarks/results",
         prog: str = "advface bench") -> int:
    """Parse ``argv`` and run (``default_out_dir`` is relative to the working directory unless absolute)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, default_lfw=default_lfw, default_out_dir=default_out_dir)
    return cmd_bench(parser.parse_args(argv))


def _command_line() -> str:
    """The command as a user would retype it: program name without its folder, data path as <LFW>."""
    args = [os.path.basename(sys.argv[0])] + sys.argv[1:]
    for i, arg in enumerate(args[:-1]):
        if arg == "--lfw":
            args[i + 1] = "<LFW>"
    return shlex.join(args)

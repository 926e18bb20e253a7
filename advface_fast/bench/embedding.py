"""Embedding engines: onnxruntime and the fast bf16 torch path vs torch eager fp32, with parity."""

from __future__ import annotations

import numpy as np

from ..engine import TorchEngine, make_engine
from .context import BenchContext
from .harness import BenchRow, Variant, pending, time_variants, timing_dict

TARGET_ORT = 1.6  # onnxruntime images/s over torch eager fp32


def embedding_variants(ctx: BenchContext) -> dict[str, Variant]:
    """torch eager fp32 (the plain model, NCHW), onnxruntime, and the fast model at the fast precision."""
    chips, bs = ctx.data().chips, ctx.cfg.embed_batch
    plain = TorchEngine(ctx.model)
    out = {"torch_fp32": Variant("torch eager fp32", lambda: plain.embed(chips, batch_size=bs))}
    try:
        ort = make_engine(ctx.model, kind="onnxruntime", num_threads=ctx.cfg.threads)
        out["onnxruntime"] = Variant("onnxruntime", lambda: ort.embed(chips, batch_size=bs),
                                     info={"engine": ort.describe()})
    except Exception as err:  # onnxruntime is an extra ("cpu" or "gpu")
        out["onnxruntime"] = Variant("onnxruntime", pending=f"onnxruntime unavailable ({type(err).__name__}: {err})")
    fast_model, precision = ctx.fast()
    fast = TorchEngine(fast_model, precision=precision)
    out["fast"] = Variant(f"torch {precision} fast", lambda: fast.embed(chips, batch_size=bs),
                          info={"precision": precision})
    return out


def section_embedding(ctx: BenchContext) -> list[BenchRow]:
    v = embedding_variants(ctx)
    results: dict[str, np.ndarray] = {}
    t = time_variants(v, ctx.cfg.rounds, ctx.cfg.warmup, keep=results)
    n = len(ctx.data().chips)
    rate = {k: n / t[k].median_s for k in t}
    ref = np.asarray(results["torch_fp32"], dtype=np.float64)
    parity = {k: float(np.abs(np.asarray(e, dtype=np.float64) - ref).max()) for k, e in results.items()}
    rows = []
    for key, target in (("onnxruntime", TARGET_ORT), ("fast", None)):
        name = f"embedding: {v[key].label} vs torch eager fp32 NCHW (img/s)"
        if v[key].pending:
            rows.append(pending("embedding", name, v[key].pending, target=target))
            continue
        rows.append(BenchRow("embedding", name, rate[key], rate["torch_fp32"], "img/s", target=target,
                             note=f"parity max-abs {parity[key]:.2g}",
                             details={"images": n, "batch_size": ctx.cfg.embed_batch, "parity_max_abs": parity[key],
                                      **v[key].info, "timing": timing_dict(t, (key, "torch_fp32"))}))
    return rows

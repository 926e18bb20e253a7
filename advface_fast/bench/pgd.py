"""PGD on the benchmark pairs: ours fp32, ours on the fast path, torchattacks fp32.

One step and PGD-k, each attack on the same weights, objective, pairs and batch, early stop off
(so both sides do every step). Both success rates are judged with the plain fp32 model and one
fixed cosine threshold on the delivered uint8 images.
"""

from __future__ import annotations

import torch

from ..attacks import PGD
from .context import BenchContext, cosine
from .harness import BenchRow, Variant, pct, pending, time_variants, timing_dict
from .peer import deliver_torchattacks, torchattacks_pgd

TARGET_PGD_BF16 = 4.0  # ours (fast path) image-steps/s over torchattacks'
STRETCH_PGD_BF16 = 5.0


def pgd_variants(ctx: BenchContext, steps: int) -> dict[str, Variant]:
    """PGD-``steps`` on the context's pairs: ours fp32, ours fast path, torchattacks fp32.

    Each fn returns the delivered images (ours: on the uint8 grid; torchattacks: float, rounded
    by ``deliver_torchattacks`` before judging).
    """
    data, cfg = ctx.data(), ctx.cfg
    common = dict(eps=cfg.eps, alpha=cfg.eps / 4, steps=steps, seed=cfg.seed, early_stop=False)
    fast_model, precision = ctx.fast()
    out = {}
    for key, label, model, prec in (("ours_fp32", "ours fp32", ctx.model, "fp32"),
                                    ("ours_fast", f"ours {precision} fast", fast_model, precision)):
        attack = PGD(model, precision=prec, **common)
        out[key] = Variant(label, (lambda attack=attack: attack(data.queries, data.gallery, data.is_same)),
                           info={"attack": attack, "precision": prec})
    out["torchattacks"] = torchattacks_pgd(ctx, steps)
    return out


@torch.no_grad()
def success_rate(ctx: BenchContext, x_adv: torch.Tensor) -> float:
    """Fraction of pairs whose fp32 decision (same iff cosine > threshold) is wrong on x_adv."""
    data = ctx.data()
    sim = cosine(ctx.model(x_adv).float(), data.gallery)
    return float(((sim > data.threshold) != data.is_same).float().mean())


def section_pgd(ctx: BenchContext) -> list[BenchRow]:
    data, cfg = ctx.data(), ctx.cfg
    n = len(data.is_same)
    rows = []
    clean = success_rate(ctx, data.queries)
    for steps in sorted({1, cfg.pgd_steps}):
        v = pgd_variants(ctx, steps)
        results: dict[str, torch.Tensor] = {}
        t = time_variants(v, cfg.rounds, cfg.warmup, keep=results)
        rate = {k: n * steps / t[k].median_s for k in t}
        success = {}
        for key, x_adv in results.items():
            if key == "torchattacks":
                x_adv = deliver_torchattacks(x_adv, data.queries, cfg.eps)
            success[key] = success_rate(ctx, x_adv)
        details = {"pairs": n, "steps": steps, "eps": cfg.eps, "alpha": cfg.eps / 4, "threshold": data.threshold,
                   "clean_error_rate": clean, "success_rate": success, "timing": timing_dict(t)}
        for key in ("ours_fp32", "ours_fast"):
            if v[key].info["attack"].last_stats:
                details[f"{key}_last_stats"] = dict(v[key].info["attack"].last_stats)
        title = "PGD 1 step" if steps == 1 else f"PGD-{steps}"
        for key, target in (("ours_fp32", None), ("ours_fast", TARGET_PGD_BF16)):
            name = f"{title}: {v[key].label} vs torchattacks fp32 (img-steps/s)"
            if v["torchattacks"].pending:
                rows.append(pending("pgd", name, f"baseline {v['torchattacks'].pending}", ours=rate[key],
                                    unit="img-steps/s", target=target, details=details))
                continue
            note = f"success {pct(success.get(key))} vs {pct(success.get('torchattacks'))}"
            if key == "ours_fast":
                note += f" (stretch {STRETCH_PGD_BF16:g}x)"
            rows.append(BenchRow("pgd", name, rate[key], rate["torchattacks"], "img-steps/s", target=target,
                                 note=note, details=details))
    return rows

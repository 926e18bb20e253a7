"""What robustness costs: adversarial training vs attack-as-defense, on the same model and data.

Units. An **image-step** is one forward + backward pass of one image through the model (an
attack step: gradient to the input; a training update pass: gradients to the weights too,
measured to take longer, so the SECONDS are the honest common currency and image-steps the
hardware-free one). Training is a one-off cost; the defense is a running cost per query (D
image-steps: the defense re-attacks the query) plus a one-off cost per gallery image (cached).

Training: measured seconds and image-steps per training image per epoch (from ``train.json``),
the run's totals, and the extrapolation to CASIA-WebFace scale (494,414 images x ``epochs``, divided by K for free AT;
30 is assumed by default — face models are trained for tens of epochs on CASIA-WebFace, e.g.
CosFace / SphereFace-style schedules — state yours with ``--epochs-full``). This extrapolates
per-image cost measured in a fine-tune at this model's input size and this machine; it is not
a measurement of a from-scratch run.

Defense: image-steps and seconds per query and per gallery image from a ``defend.json``
(rows ``defense, defense_eps, defense_steps, query, accuracy, image_steps, seconds, n_pairs``;
each row's cost / n_pairs is the cost per query of that defense setting, the median over its
rows is used), or, without one, ``steps x (seconds per image-step measured on this machine)``,
labelled "estimated from the step rate". Break-even: the number of queries whose defense cost
equals the training cost (total, and the extra over clean training, which a deployed model pays
anyway).

Accuracy bought: clean, under static attack (the worst attack row) and adaptive (per-pair
worst case, when the defense report has adaptive rows). For adversarial training the white-box
attack on the trained model already is the adaptive attack.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import median

CASIA_WEBFACE_IMAGES = 494_414
DEFAULT_FULL_EPOCHS = 30


def load_training_runs(paths) -> list[dict]:
    """train.json reports (a run folder or the file itself)."""
    runs = []
    for p in paths:
        p = Path(p)
        f = p / "train.json" if p.is_dir() else p
        if not f.is_file():
            raise FileNotFoundError(f"no train.json at {p}")
        rep = json.loads(f.read_text())
        rep["_file"] = str(f)
        runs.append(rep)
    return runs


def training_row(rep: dict, *, full_images: int = CASIA_WEBFACE_IMAGES, full_epochs: int = DEFAULT_FULL_EPOCHS) -> dict:
    cfg, cost = rep["config"], rep.get("cost") or {}
    per = cost.get("per_image_epoch") or {}
    ev = rep.get("evaluation") or {}
    label = cfg["method"] if cfg["method"] in ("clean",) else f"{cfg['method']} eps={cfg['eps']:g} K={cfg['steps']}"
    if cfg["method"] == "fgsm-rs":
        label = f"fgsm-rs eps={cfg['eps']:g}"
    if rep.get("epochs_done", 0) == 0:
        label = "pretrained (no training)"
    # Free AT replays each batch K times, so Shafahi et al. divide the epochs by K to match a clean
    # run's budget; the full-scale extrapolation does the same.
    epochs_full = full_epochs / max(cfg["steps"], 1) if cfg["method"] == "free" else full_epochs
    full_items = full_images * epochs_full
    row = {"approach": "adversarial training", "setting": label, "method": cfg["method"], "eps": cfg["eps"],
           "steps": cfg["steps"], "epochs": rep.get("epochs_done"), "images": rep.get("n_images"),
           "seconds_total": cost.get("seconds", 0.0), "image_steps_total": cost.get("image_steps", 0),
           "seconds_per_image_epoch": per.get("seconds"), "image_steps_per_image_epoch": per.get("image_steps"),
           "full_scale_epochs": epochs_full,
           "full_scale_seconds": per["seconds"] * full_items if per else None,
           "full_scale_image_steps": per["image_steps"] * full_items if per else None,
           "clean_accuracy": ev.get("clean_accuracy"), "static_accuracy": ev.get("worst_attack_accuracy"),
           "adaptive_accuracy": ev.get("worst_attack_accuracy"), "eval_rows": ev.get("rows"),
           "n_pairs": ev.get("n_pairs"), "file": rep.get("_file")}
    return row


def defense_rows(report: dict | list, *, step_seconds: float | None = None) -> list[dict]:
    """One row per defense setting of a defend.json: cost per query / gallery image and accuracies."""
    rows = report["rows"] if isinstance(report, dict) else report
    groups: dict = {}
    for r in rows:
        for k in ("defense", "defense_steps", "query", "accuracy", "image_steps", "seconds", "n_pairs"):
            if k not in r:
                raise ValueError(f"defense report row lacks {k!r}: {r}")
        groups.setdefault((r["defense"], r.get("defense_eps"), r["defense_steps"]), []).append(r)
    out = []
    for (name, eps, steps), rs in groups.items():
        # defend.json's cost is per query, D on the query AND on its gallery image (its cost_units); the
        # gallery image is defended once and cached, so a query's running cost is the query's half.
        q_steps = median(r["image_steps"] for r in rs) / 2
        q_secs = median(r["seconds"] for r in rs) / 2
        clean = [r["accuracy"] for r in rs if r["query"] == "clean"]
        adaptive = [r["accuracy"] for r in rs if "adaptive" in str(r["query"])]
        static = [r["accuracy"] for r in rs if r["query"] != "clean" and "adaptive" not in str(r["query"])]
        out.append({"approach": "attack-as-defense", "setting": f"{name} eps={eps} D={steps}", "defense": name,
                    "defense_eps": eps, "defense_steps": steps, "source": "measured (defend.json)",
                    "image_steps_per_query": q_steps, "seconds_per_query": q_secs,
                    "image_steps_per_gallery_image": q_steps,
                    "seconds_per_gallery_image": q_secs,
                    "clean_accuracy": clean[0] if clean else None,
                    "static_accuracy": min(static) if static else None,
                    "adaptive_accuracy": min(adaptive) if adaptive else None})
    return out


def estimated_defense_rows(steps_list, step_seconds: float) -> list[dict]:
    """Defense cost without a defend.json: D steps x the measured seconds per image-step."""
    return [{"approach": "attack-as-defense", "setting": f"D={d}", "defense_steps": d,
             "source": "estimated from the step rate", "image_steps_per_query": d,
             "seconds_per_query": d * step_seconds, "image_steps_per_gallery_image": d,
             "seconds_per_gallery_image": d * step_seconds, "clean_accuracy": None, "static_accuracy": None,
             "adaptive_accuracy": None} for d in steps_list]


def attack_step_seconds(runs: list[dict]) -> float | None:
    """Seconds per attack image-step measured during the training runs (their attacks, same model)."""
    steps = sum((r.get("cost") or {}).get("attack_image_steps", 0) for r in runs)
    secs = sum((r.get("cost") or {}).get("attack_seconds", 0.0) for r in runs)
    return secs / steps if steps else None


def break_even(train_cost: float, per_query: float, gallery_cost: float = 0.0) -> float | None:
    """Queries at which the defense's cost (gallery once + per query) equals ``train_cost``."""
    if not per_query or per_query <= 0:
        return None
    return max(train_cost - gallery_cost, 0.0) / per_query


def cost_report(train_runs: list[dict], defense: list[dict], *, full_images: int = CASIA_WEBFACE_IMAGES,
                full_epochs: int = DEFAULT_FULL_EPOCHS, gallery_images: int = 0, step_seconds: float | None = None) -> dict:
    training = [training_row(r, full_images=full_images, full_epochs=full_epochs) for r in train_runs]
    clean = next((t for t in training if t["method"] == "clean" and t["epochs"]), None)
    comparisons = []
    for t in training:
        if not t["epochs"]:
            continue
        for d in defense:
            entry = {"training": t["setting"], "defense": d["setting"]}
            for scale, secs, steps in (("run", t["seconds_total"], t["image_steps_total"]),
                                       ("full", t["full_scale_seconds"], t["full_scale_image_steps"])):
                g_secs = gallery_images * (d["seconds_per_gallery_image"] or 0.0)
                g_steps = gallery_images * d["image_steps_per_gallery_image"]
                entry[f"break_even_queries_{scale}_seconds"] = break_even(secs, d["seconds_per_query"], g_secs)
                entry[f"break_even_queries_{scale}_image_steps"] = break_even(steps, d["image_steps_per_query"], g_steps)
                if clean is not None and t is not clean:
                    extra_s = secs - (clean["seconds_total"] if scale == "run" else clean["full_scale_seconds"])
                    entry[f"break_even_queries_{scale}_extra_over_clean_seconds"] = break_even(
                        extra_s, d["seconds_per_query"], g_secs)
            comparisons.append(entry)
    return {"assumptions": {"full_scale_images": full_images, "full_scale_epochs": full_epochs,
                            "full_scale_note": "per-image cost of the measured fine-tune x images x epochs "
                                               "(an extrapolation, not a from-scratch measurement)",
                            "gallery_images": gallery_images,
                            "seconds_per_attack_image_step": step_seconds,
                            "image_step": "one forward + backward pass of one image (attack step or update pass)"},
            "training": training, "defense": defense, "break_even": comparisons}


def plot_cost(report: dict, path, queries: int = 10_000) -> Path:
    """Robust accuracy vs compute (image-steps, log) for serving ``queries`` queries, one curve per approach."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    g = report["assumptions"]["gallery_images"]
    at = sorted((t["image_steps_total"] or 1, t["static_accuracy"],
                 t["setting"] + ("" if t["image_steps_total"] else " (0, drawn at 1)"))
                for t in report["training"] if t["static_accuracy"] is not None)
    if at:
        ax.plot([a[0] for a in at], [100 * a[1] for a in at], "o-", label="adversarial training (measured run)")
        for x, y, s in at:
            ax.annotate(s, (x, 100 * y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for key, style, name in (("static_accuracy", "s--", "attack-as-defense, static attack"),
                             ("adaptive_accuracy", "v:", "attack-as-defense, adaptive attack")):
        pts = sorted((d["image_steps_per_query"] * queries + g * d["image_steps_per_gallery_image"], d[key],
                      d["setting"]) for d in report["defense"] if d[key] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], style, label=name)
            for x, y, s in pts:
                ax.annotate(s, (x, 100 * y), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(f"compute spent (image-steps): training run, or defense over {queries:,} queries")
    ax.set_ylabel("accuracy under attack (%)")
    ax.set_title("Robust accuracy vs compute")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _fmt(x, digits=3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
        return str(x)
    if isinstance(x, float):
        return f"{x:,.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def cost_markdown(report: dict) -> str:
    a = report["assumptions"]
    lines = ["### Adversarial training (measured)", "",
             "| setting | epochs | images | s / image / epoch | image-steps / image / epoch | run: s | run: image-steps "
             f"| {a['full_scale_images']:,} img x {a['full_scale_epochs']} ep (free AT: ep / K): hours | clean % | worst attack % |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in report["training"]:
        hours = None if t["full_scale_seconds"] is None else t["full_scale_seconds"] / 3600
        lines.append(f"| {t['setting']} | {t['epochs']} | {t['images']} | {_fmt(t['seconds_per_image_epoch'])} | "
                     f"{_fmt(t['image_steps_per_image_epoch'])} | {_fmt(t['seconds_total'])} | "
                     f"{_fmt(t['image_steps_total'])} | {_fmt(hours)} | {_pct(t['clean_accuracy'])} | "
                     f"{_pct(t['static_accuracy'])} |")
    lines += ["", "### Attack-as-defense", "",
              "| setting | source | image-steps / query | s / query | s / gallery image | clean % | static % | adaptive % |",
              "|---|---|---|---|---|---|---|---|"]
    for d in report["defense"]:
        lines.append(f"| {d['setting']} | {d['source']} | {_fmt(d['image_steps_per_query'])} | "
                     f"{_fmt(d['seconds_per_query'])} | {_fmt(d['seconds_per_gallery_image'])} | "
                     f"{_pct(d['clean_accuracy'])} | {_pct(d['static_accuracy'])} | {_pct(d['adaptive_accuracy'])} |")
    lines += ["", f"### Break-even queries (defense cost = training cost; gallery of {a['gallery_images']} images "
                  "paid once)", "",
              "| training | defense | run (s) | run (image-steps) | full scale (s) | full scale, extra over clean (s) |",
              "|---|---|---|---|---|---|"]
    for c in report["break_even"]:
        lines.append(f"| {c['training']} | {c['defense']} | {_fmt(c['break_even_queries_run_seconds'])} | "
                     f"{_fmt(c['break_even_queries_run_image_steps'])} | {_fmt(c['break_even_queries_full_seconds'])} | "
                     f"{_fmt(c.get('break_even_queries_full_extra_over_clean_seconds'))} |")
    return "\n".join(lines) + "\n"


__all__ = ["CASIA_WEBFACE_IMAGES", "DEFAULT_FULL_EPOCHS", "attack_step_seconds", "break_even", "cost_markdown",
           "cost_report", "defense_rows", "estimated_defense_rows", "load_training_runs", "plot_cost", "training_row"]

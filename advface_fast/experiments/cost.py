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

Defense: image-steps and seconds per query and per gallery image from ``defend.json`` reports
(each row's cost is per query, D on the query and on its gallery image; the gallery image is
defended once, so a query costs the query's half; the median over a setting's rows is used), or,
without one, ``steps x (seconds per image-step measured on this machine)``, labelled "estimated
from the step rate". One-step FGSM D is one setting whatever step counts were requested. Several
reports merge per D setting (they must be on the same pairs); where two give a number for the
same setting the lower accuracy is kept (each is an upper bound on the true robust accuracy).
Break-even: the number of queries whose defense cost equals the training cost (total, and the
extra over clean training, which a deployed model pays anyway).

Accuracy bought, every attack at one budget ``eps`` (0-255 levels): clean; static (the strongest
attack measured at eps: for a trained model the lowest accuracy at eps over its evaluations, for
D the worst non-adaptive query row); adaptive (the per-pair worst case over every attack that
knows the pipeline, all pairs, from a report's ``adaptive[].worst_case``). For adversarial
training the white-box attack on the trained model already is the adaptive attack: same value.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import median

CASIA_WEBFACE_IMAGES = 494_414
DEFAULT_FULL_EPOCHS = 30
DEFAULT_EPS = 4.0
ONE_STEP = ("fgsm",)  # D attacks that run one step whatever step count was requested
D_NAMES = {"pgd": "PGD", "cw": "C&W", "fgsm": "FGSM"}
AT_NAMES = {"clean": "clean fine-tune", "pgd": "PGD-AT", "fgsm-rs": "FGSM-RS", "free": "free AT"}


def display_path(p) -> str:
    """A path fit for a results file: relative to the working directory, else its last two parts."""
    p = Path(p).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(Path(p.parent.name) / p.name)


def load_training_runs(paths) -> list[dict]:
    """train.json reports (a run folder or the file itself)."""
    runs = []
    for p in paths:
        p = Path(p)
        f = p / "train.json" if p.is_dir() else p
        if not f.is_file():
            raise FileNotFoundError(f"no train.json at {p}")
        rep = json.loads(f.read_text())
        rep["_file"] = display_path(f)
        runs.append(rep)
    return runs


def load_defense_reports(paths) -> list[dict]:
    """defend.json reports, each tagged with its (display) file name."""
    reports = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"no defense report at {p}")
        reports.append({**json.loads(p.read_text()), "_file": display_path(p)})
    return reports


def _same(a: float, b: float) -> bool:
    return abs(float(a) - float(b)) < 1e-9


def training_accuracy(rep: dict, eps: float) -> dict:
    """Clean and strongest-attack accuracy at ``eps`` of a trained model: over the run's evaluations
    (train.json ``evaluation`` and the ``--eval-only`` ones), the row at eps with the lowest accuracy,
    kept together with its evaluation's clean accuracy and pairs."""
    evals = [e for e in (rep.get("evaluation"), *rep.get("evaluations", [])) if e]
    best = None
    for ev in evals:
        at = {k: v for k, v in (ev.get("rows") or {}).items() if "@" in k and _same(k.rpartition("@")[2], eps)}
        if at:
            name = min(at, key=at.get)
            if best is None or at[name] < best[1]:
                best = (ev, at[name], name)
    ev, static, attack = best or ((evals[0] if evals else {}), None, None)
    return {"clean_accuracy": ev.get("clean_accuracy"), "static_accuracy": static, "static_attack": attack,
            "adaptive_accuracy": static, "eval_rows": ev.get("rows"), "n_pairs": ev.get("n_pairs"),
            "pairs": _training_pairs(ev)}


def _training_pairs(ev: dict) -> str | None:
    if not ev:
        return None
    folds = ", ".join(map(str, ev.get("held_out_folds") or []))
    return f"held-out folds {folds}: {ev.get('n_pairs')} pairs"


def training_row(rep: dict, *, full_images: int = CASIA_WEBFACE_IMAGES, full_epochs: int = DEFAULT_FULL_EPOCHS,
                 eps: float | None = None) -> dict:
    cfg, cost = rep["config"], rep.get("cost") or {}
    per = cost.get("per_image_epoch") or {}
    name = AT_NAMES.get(cfg["method"], cfg["method"])
    label = {"clean": name, "fgsm-rs": f"{name} eps={cfg['eps']:g}"}.get(cfg["method"],
                                                                         f"{name} eps={cfg['eps']:g} K={cfg['steps']}")
    if rep.get("epochs_done", 0) == 0:
        label = "pretrained (no training)"
    # Free AT replays each batch K times, so Shafahi et al. divide the epochs by K to match a clean
    # run's budget; the full-scale extrapolation does the same.
    epochs_full = full_epochs / max(cfg["steps"], 1) if cfg["method"] == "free" else full_epochs
    full_items = full_images * epochs_full
    acc = training_accuracy(rep, cfg["eps"] if eps is None else eps)
    return {"approach": "adversarial training", "setting": label, "short": label.split(" eps=")[0],
            "method": cfg["method"], "eps": cfg["eps"], "steps": cfg["steps"], "epochs": rep.get("epochs_done"),
            "images": rep.get("n_images"), "seconds_total": cost.get("seconds", 0.0),
            "image_steps_total": cost.get("image_steps", 0), "seconds_per_image_epoch": per.get("seconds"),
            "image_steps_per_image_epoch": per.get("image_steps"), "full_scale_epochs": epochs_full,
            "full_scale_seconds": per["seconds"] * full_items if per else None,
            "full_scale_image_steps": per["image_steps"] * full_items if per else None,
            **acc, "adaptive_note": "white-box attack on the trained model = the adaptive attack",
            "file": rep.get("_file")}


def adaptive_worst_cases(report: dict, eps: float | None = None) -> dict:
    """(defense, defense_eps, defense_steps) -> the per-pair worst case on ALL pairs at eps_a = eps
    (None: D's own eps) from a defend.json's adaptive evaluations; the lowest where several give one."""
    out: dict = {}
    for a in report.get("adaptive") or []:
        for w in a.get("worst_case") or []:
            budget = w["defense_eps"] if eps is None else eps
            if w.get("pairs") != "all pairs" or not _same(w["eps"], budget):
                continue
            key = (w["defense"], float(w["defense_eps"]), int(w["defense_steps"]))
            if key not in out or w["accuracy"] < out[key]["accuracy"]:
                out[key] = w
    return out


def _report_pairs(report: dict) -> str | None:
    if "n_pairs" not in report:
        return None
    folds = report.get("folds") or []
    return (f"fold{'s' if len(folds) > 1 else ''} {', '.join(map(str, folds))}: {report['n_pairs']} pairs"
            + (" (subset)" if report.get("subset") else ""))


def defense_rows(report: dict | list, *, eps: float | None = None) -> list[dict]:
    """One row per D setting (defense, eps_d, steps) of a defend.json: cost per query / gallery image
    and accuracies (clean, static at eps, adaptive per-pair worst case at eps; eps None: D's eps)."""
    full = report if isinstance(report, dict) else {}
    rows = report["rows"] if isinstance(report, dict) else report
    worst = adaptive_worst_cases(full, eps)
    groups: dict = {}
    for r in rows:
        for k in ("defense", "defense_steps", "query", "accuracy", "image_steps", "seconds", "n_pairs"):
            if k not in r:
                raise ValueError(f"defense report row lacks {k!r}: {r}")
        if r.get("kind") == "adaptive":
            continue
        steps = 1 if r["defense"] in ONE_STEP else int(r["defense_steps"])
        groups.setdefault((r["defense"], float(r.get("defense_eps") or 0.0), steps), []).append(r)
    out = []
    for (name, eps_d, steps), rs in groups.items():
        budget = eps_d if eps is None else eps
        # defend.json's cost is per query, D on the query AND on its gallery image (its cost_units); the
        # gallery image is defended once and cached, so a query's running cost is the query's half.
        q_steps = median(r["image_steps"] for r in rs) / 2
        q_secs = median(r["seconds"] for r in rs) / 2
        clean = [r["accuracy"] for r in rs if r["query"] == "clean"]
        static = [r for r in rs if r["query"] != "clean" and _same(r.get("eps", budget), budget)]
        s = min(static, key=lambda r: r["accuracy"]) if static else None
        w = worst.get((name, eps_d, steps))
        label = f"D={D_NAMES.get(name, name)}" + ("" if name in ONE_STEP else f"-{steps}") + f" eps={eps_d:g}"
        out.append({"approach": "attack-as-defense", "setting": label, "defense": name, "defense_eps": eps_d,
                    "defense_steps": steps, "requested_steps": sorted({r["defense_steps"] for r in rs}),
                    "attack_eps": budget, "source": "measured", "files": [full["_file"]] if "_file" in full else [],
                    "pairs": _report_pairs(full), "image_steps_per_query": q_steps, "seconds_per_query": q_secs,
                    "image_steps_per_gallery_image": q_steps, "seconds_per_gallery_image": q_secs,
                    "clean_accuracy": clean[0] if clean else None,
                    "static_accuracy": s["accuracy"] if s else None, "static_attack": s["query"] if s else None,
                    "adaptive_accuracy": w["accuracy"] if w else None,
                    "adaptive_attacks": len(w.get("over") or []) if w else None})
    return out


def merge_defense_rows(groups) -> list[dict]:
    """Rows of several reports, one per D setting: costs and clean accuracy from the first report that
    has the setting, the lowest static and adaptive accuracy of any (reports on the same pairs only)."""
    merged: dict = {}
    for row in (r for g in groups for r in g):
        key = (row["defense"], row["defense_eps"], row["defense_steps"])
        if key not in merged:
            merged[key] = dict(row, files=list(row["files"]))
            continue
        m = merged[key]
        if m["pairs"] != row["pairs"]:
            raise ValueError(f"{row['setting']} is in reports on different pairs ({m['pairs']} in {m['files']}, "
                             f"{row['pairs']} in {row['files']}); pass reports on the same pairs")
        for acc, extra in (("static_accuracy", "static_attack"), ("adaptive_accuracy", "adaptive_attacks")):
            if row[acc] is not None and (m[acc] is None or row[acc] < m[acc]):
                m[acc], m[extra] = row[acc], row[extra]
        m["files"] += [f for f in row["files"] if f not in m["files"]]
    return list(merged.values())


def estimated_defense_rows(steps_list, step_seconds: float) -> list[dict]:
    """Defense cost without a defend.json: D steps x the measured seconds per image-step."""
    return [{"approach": "attack-as-defense", "setting": f"D={d}", "defense": None, "defense_steps": d,
             "source": "estimated from the step rate", "files": [], "pairs": None, "image_steps_per_query": d,
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
                full_epochs: int = DEFAULT_FULL_EPOCHS, gallery_images: int = 0, step_seconds: float | None = None,
                eps: float = DEFAULT_EPS) -> dict:
    training = [training_row(r, full_images=full_images, full_epochs=full_epochs, eps=eps) for r in train_runs]
    clean = next((t for t in training if t["method"] == "clean" and t["epochs"]), None)
    comparisons = []
    for t in training:
        if not t["epochs"]:
            continue
        for d in defense:
            entry = {"training": t["setting"], "defense": d["setting"]}
            g_secs = gallery_images * (d["seconds_per_gallery_image"] or 0.0)
            g_steps = gallery_images * d["image_steps_per_gallery_image"]
            for scale, secs, steps in (("run", t["seconds_total"], t["image_steps_total"]),
                                       ("full", t["full_scale_seconds"], t["full_scale_image_steps"])):
                entry[f"break_even_queries_{scale}_seconds"] = break_even(secs, d["seconds_per_query"], g_secs)
                entry[f"break_even_queries_{scale}_image_steps"] = break_even(steps, d["image_steps_per_query"], g_steps)
                if clean is not None and t is not clean:
                    c_secs, c_steps = ((clean["seconds_total"], clean["image_steps_total"]) if scale == "run" else
                                       (clean["full_scale_seconds"], clean["full_scale_image_steps"]))
                    entry[f"break_even_queries_{scale}_extra_over_clean_seconds"] = break_even(
                        secs - c_secs, d["seconds_per_query"], g_secs)
                    entry[f"break_even_queries_{scale}_extra_over_clean_image_steps"] = break_even(
                        steps - c_steps, d["image_steps_per_query"], g_steps)
            comparisons.append(entry)
    return {"assumptions": {"full_scale_images": full_images, "full_scale_epochs": full_epochs,
                            "full_scale_note": "per-image cost of the measured fine-tune x images x epochs "
                                               "(an extrapolation, not a from-scratch measurement)",
                            "gallery_images": gallery_images, "attack_eps": eps,
                            "seconds_per_attack_image_step": step_seconds,
                            "image_step": "one forward + backward pass of one image (attack step or update pass)"},
            "training": training, "defense": defense, "break_even": comparisons}


def cost_from(runs: list[dict], defense_reports: list[dict], *, defense_steps=(10, 40), eps: float = DEFAULT_EPS,
              full_images: int = CASIA_WEBFACE_IMAGES, full_epochs: int = DEFAULT_FULL_EPOCHS,
              gallery_images: int = 0) -> dict:
    """The cost report of loaded training runs against defend.json reports (merged), or, with none, against
    D step counts estimated from the attack step time the training runs measured."""
    step_s = attack_step_seconds(runs)
    if defense_reports:
        defense = merge_defense_rows([defense_rows(r, eps=eps) for r in defense_reports])
    else:
        if step_s is None:
            raise ValueError("no attack steps were measured in these training runs; give --defense-report FILE "
                             "or include an adversarially trained run")
        defense = estimated_defense_rows(defense_steps, step_s)
    return cost_report(runs, defense, full_images=full_images, full_epochs=full_epochs,
                       gallery_images=gallery_images, step_seconds=step_s, eps=eps)


def write_cost(report: dict, out, queries: int = 10_000) -> str:
    """cost.json, cost.md and accuracy_vs_compute.png in ``out``; returns the markdown."""
    from ..fileio import write_json_atomic, write_text_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = cost_markdown(report)
    write_json_atomic(out / "cost.json", report, indent=2)
    write_text_atomic(out / "cost.md", md)
    plot_cost(report, out / "accuracy_vs_compute.png", queries=queries)
    return md


def _uniform(values):
    values = {v for v in values if v}
    return values.pop() if len(values) == 1 else None


def plot_series(report: dict, queries: int = 10_000) -> tuple[list[dict], list[dict]]:
    """The plot's curves: adversarial training (one family: each method's run) and one curve per D
    (its step counts), each point (compute in image-steps, worst-case robust accuracy %, adaptive
    known?, label); and the zero-compute rows (the untrained model), drawn as reference lines.
    The defense's y is its adaptive per-pair worst case where one was run, else its static number."""
    g = report["assumptions"]["gallery_images"]
    trained = sorted((t for t in report["training"] if t["adaptive_accuracy"] is not None and t["image_steps_total"]),
                     key=lambda t: (t["image_steps_total"], t["adaptive_accuracy"]))
    series = []
    if trained:
        pairs = _uniform(t["pairs"] for t in trained)
        series.append({"name": "adversarial training: one run per method" + (f" ({pairs})" if pairs else ""), "kind": "training",
                       "points": [(t["image_steps_total"], 100 * t["adaptive_accuracy"], True, t["short"])
                                  for t in trained]})
    by_d: dict = {}
    for d in report["defense"]:
        robust = d["adaptive_accuracy"] if d["adaptive_accuracy"] is not None else d["static_accuracy"]
        if robust is not None:
            by_d.setdefault((d["defense"], d.get("defense_eps")), []).append((d, robust))
    for (name, eps_d), rows in by_d.items():
        rows.sort(key=lambda dr: dr[0]["defense_steps"])
        steps = "one step" if name in ONE_STEP else " / ".join(str(d["defense_steps"]) for d, _ in rows) + " steps"
        pairs = _uniform(d["pairs"] for d, _ in rows)
        series.append({"name": f"attack-as-defense D={D_NAMES.get(name, name)} ε_d={eps_d:g}: {steps}"
                               + (f" ({pairs})" if pairs else ""), "kind": "defense",
                       "points": [(d["image_steps_per_query"] * queries + g * d["image_steps_per_gallery_image"],
                                   100 * r, d["adaptive_accuracy"] is not None, str(d["defense_steps"]))
                                  for d, r in rows]})
    baselines = [{"name": f"{t['setting']}: no training compute", "y": 100 * t["adaptive_accuracy"]}
                 for t in report["training"] if t["adaptive_accuracy"] is not None and not t["image_steps_total"]]
    return series, baselines


COLORS = ("tab:blue", "tab:red", "tab:purple", "tab:orange", "tab:green", "tab:brown", "tab:pink", "tab:olive")
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*")


def cost_figure(report: dict, queries: int = 10_000):
    """Robust accuracy vs compute (image-steps, log): one curve per approach; filled markers are
    worst cases under adaptive attack, hollow ones static-only numbers. Only the adversarially
    trained models are labelled on the plot (the D curves' step counts are in the legend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    series, baselines = plot_series(report, queries)
    fig = Figure(figsize=(10, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    handles = []
    for i, s in enumerate(series):
        c, m = COLORS[i % len(COLORS)], MARKERS[i % len(MARKERS)]
        for (x0, y0, k0, _), (x1, y1, k1, _) in zip(s["points"], s["points"][1:]):
            ax.plot([x0, x1], [y0, y1], "-" if k0 and k1 else "--", color=c, lw=1.2)
        for x, y, known, _ in s["points"]:
            ax.plot([x], [y], m, color=c, mfc=c if known else "white", ms=7)
        handles.append(Line2D([], [], color=c, marker=m, label=s["name"]))
    for b in baselines:
        ax.axhline(b["y"], color="grey", ls=":", lw=1)
        handles.append(Line2D([], [], color="grey", ls=":", label=b["name"]))
    handles.append(Line2D([], [], color="grey", marker="o", ls="none",
                          label="filled: worst case under adaptive attack\n(adversarial training: white-box on the model)"))
    if any(not p[2] for s in series for p in s["points"]):
        handles.append(Line2D([], [], color="grey", marker="o", mfc="white", ls="none",
                              label="hollow, dashed to: static attacks only (no adaptive\nrun; an upper bound on robust accuracy)"))
    ys = [p[1] for s in series for p in s["points"]] + [b["y"] for b in baselines]
    ax.set_ylim(-3, max(ys, default=0) + 10)
    ax.set_xscale("log")
    g = report["assumptions"]["gallery_images"]
    ax.set_xlabel(f"compute (image-steps, log): the training run, or the defense serving {queries:,} queries"
                  + (f" and {g:,} gallery images" if g else ""))
    ax.set_ylabel("worst-case robust accuracy (%)")
    ax.set_title(f"Robust accuracy vs compute (attacks at ε = {report['assumptions'].get('attack_eps', DEFAULT_EPS):g})")
    ax.grid(True, alpha=0.3)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    fig.canvas.draw()
    labels = [(x, y, text) for s in series if s["kind"] == "training" for x, y, _, text in s["points"]]
    _place_labels(ax, labels, [(x, y) for s in series for x, y, _, _ in s["points"]])
    return fig


def _place_labels(ax, labels, points) -> list:
    """Annotate each (x, y, text) at the first of a few offsets where it overlaps no marker and no
    label placed before it (checked on the rendered text boxes)."""
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    r = 7 * ax.figure.dpi / 72 / 2 + 1  # marker radius in pixels
    taken = [Bbox.from_bounds(px - r, py - r, 2 * r, 2 * r) for px, py in ax.transData.transform(points)] if points else []
    placed = []
    offsets = [(dx, dy) for dy in (5, -5, 15, -15, 25, -25) for dx in (5, -5)]
    for x, y, text in labels:
        for dx, dy in offsets:
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                              ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "top")
            box = ann.get_window_extent(renderer)
            if not any(box.overlaps(b) for b in taken):
                break
            ann.remove()
        else:  # crowded everywhere: the first offset, overlapping
            ann = ax.annotate(text, (x, y), xytext=offsets[0], textcoords="offset points", fontsize=7,
                              ha="left", va="bottom")
            box = ann.get_window_extent(renderer)
        taken.append(box)
        placed.append(ann)
    return placed


def plot_cost(report: dict, path, queries: int = 10_000) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cost_figure(report, queries).savefig(path)
    return path


def _fmt(x, digits=3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
        return str(x)
    if isinstance(x, float):
        return f"{x:,.{digits}g}" if abs(x) < 1e3 else f"{x:,.0f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def cost_markdown(report: dict) -> str:
    a = report["assumptions"]
    eps = a.get("attack_eps", DEFAULT_EPS)
    full = f"{a['full_scale_images']:,} img x {a['full_scale_epochs']} ep (free AT: ep / K)"
    lines = ["### Adversarial training: cost (measured)", "",
             "| setting | epochs | images | s / image / epoch | image-steps / image / epoch | run: s | run: image-steps "
             f"| {full}: hours | {full}: image-steps |", "|---|---|---|---|---|---|---|---|---|"]
    for t in report["training"]:
        hours = None if t["full_scale_seconds"] is None else t["full_scale_seconds"] / 3600
        lines.append(f"| {t['setting']} | {t['epochs']} | {t['images']} | {_fmt(t['seconds_per_image_epoch'])} | "
                     f"{_fmt(t['image_steps_per_image_epoch'])} | {_fmt(t['seconds_total'])} | "
                     f"{_fmt(t['image_steps_total'])} | {_fmt(hours)} | {_fmt(t['full_scale_image_steps'])} |")
    lines += ["", "### Attack-as-defense: cost", "",
              "| setting | source | image-steps / query | s / query | s / gallery image (once) |", "|---|---|---|---|---|"]
    for d in report["defense"]:
        lines.append(f"| {d['setting']} | {d['source']} | {_fmt(d['image_steps_per_query'])} | "
                     f"{_fmt(d['seconds_per_query'])} | {_fmt(d['seconds_per_gallery_image'])} |")
    files = sorted({f for d in report["defense"] for f in d.get("files", [])})
    if files:
        lines += ["", "Defense reports: " + ", ".join(f"`{f}`" for f in files) + "."]
    lines += ["", f"### Accuracy each buys (attacks at ε = {eps:g})", "",
              "| approach | setting | judged on | clean % | static % | adaptive (per-pair worst case) % |",
              "|---|---|---|---|---|---|"]
    for t in report["training"]:
        static = f"{_pct(t['static_accuracy'])} ({t['static_attack']})" if t["static_attack"] else "—"
        adaptive = _pct(t["adaptive_accuracy"]) + (" ¹" if t["adaptive_accuracy"] is not None else "")
        lines.append(f"| adversarial training | {t['setting']} | {t['pairs'] or '—'} | {_pct(t['clean_accuracy'])} | "
                     f"{static} | {adaptive} |")
    measured = [d for d in report["defense"] if d["source"] == "measured"]  # estimated rows measured no accuracy
    for d in measured:
        static = f"{_pct(d['static_accuracy'])} ({d.get('static_attack')})" if d.get("static_attack") else "—"
        adaptive = (f"{_pct(d['adaptive_accuracy'])} (over {d['adaptive_attacks']} attacks)"
                    if d["adaptive_accuracy"] is not None else "— ²")
        lines.append(f"| attack-as-defense | {d['setting']} | {d['pairs'] or '—'} | {_pct(d['clean_accuracy'])} | "
                     f"{static} | {adaptive} |")
    lines += ["", "¹ For adversarial training the white-box attack on the trained model is the adaptive attack "
                  "(the attacker knows the weights): static and adaptive are the same number, the strongest "
                  f"attack measured at ε = {eps:g} over the run's evaluations."]
    if any(d["adaptive_accuracy"] is None for d in measured):
        lines.append("² No adaptive evaluation of this D setting: only its static number is known, an upper bound "
                     "on its robust accuracy.")
    gallery = (f"plus a gallery of {a['gallery_images']:,} images defended once" if a["gallery_images"]
               else "queries only; each gallery image adds one query's cost, once")
    lines += ["", f"### Break-even queries (defense cost = training cost; {gallery})", "",
              "| training | defense | run (s) | run (image-steps) | full scale (s) | full scale (image-steps) "
              "| full scale, extra over clean (s) | full scale, extra over clean (image-steps) |",
              "|---|---|---|---|---|---|---|---|"]
    for c in report["break_even"]:
        lines.append(f"| {c['training']} | {c['defense']} | {_fmt(c['break_even_queries_run_seconds'])} | "
                     f"{_fmt(c['break_even_queries_run_image_steps'])} | {_fmt(c['break_even_queries_full_seconds'])} | "
                     f"{_fmt(c['break_even_queries_full_image_steps'])} | "
                     f"{_fmt(c.get('break_even_queries_full_extra_over_clean_seconds'))} | "
                     f"{_fmt(c.get('break_even_queries_full_extra_over_clean_image_steps'))} |")
    return "\n".join(lines) + "\n"


__all__ = ["CASIA_WEBFACE_IMAGES", "DEFAULT_EPS", "DEFAULT_FULL_EPOCHS", "adaptive_worst_cases", "attack_step_seconds",
           "break_even", "cost_from", "cost_markdown", "cost_report", "defense_rows", "display_path",
           "cost_figure", "estimated_defense_rows", "load_defense_reports", "load_training_runs", "merge_defense_rows",
           "plot_cost", "plot_series", "training_accuracy", "training_row", "write_cost"]

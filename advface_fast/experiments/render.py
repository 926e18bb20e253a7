"""Writers for experiment tables: JSON, Markdown, plots and example-image grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..fileio import write_json_atomic, write_text_atomic


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _saved(row: dict) -> str:
    full = row.get("image_steps_full") or 0
    return "—" if full <= 0 else f"{100 * (1 - row['image_steps'] / full):.0f}%"


def _params(row: dict) -> str:
    p = row["params"]
    keys = [k for k in ("steps", "alpha", "lr", "kappa", "restarts", "early_stop", "precision") if k in p]
    return ", ".join(f"{k}={p[k]:g}" if isinstance(p[k], (int, float)) else f"{k}={p[k]}" for k in keys)


def _precision(report: dict) -> str:
    p = report["precision"]
    return p if isinstance(p, str) else p["gradients"] + (" (fast model)" if p.get("fast_model") else "")


def table1_markdown(report: dict) -> str:
    """The table as Markdown (also what the CLI prints)."""
    n_folds = len(report["folds"])
    spread = (f"accuracy % as mean ± std over {n_folds} folds" if n_folds > 1
              else "accuracy % on one fold (no spread over folds)")
    transfer = report.get("transfer")
    lines = [
        (f"**Transfer**: queries crafted on {transfer['craft_model']} (white-box accuracy in the last column), "
         f"judged by {transfer['judge_model']} with its clean thresholds; chips: {transfer['chips']}; "
         f"{transfer['craft_model']} clean accuracy on these chips "
         f"{100 * transfer['craft_clean_all_folds']['accuracy_mean']:.1f}%.\n") if transfer else "",
        f"**{report['table']}** — {report['model']}, {report['n_pairs']} pairs of LFW fold(s) "
        f"{', '.join(map(str, report['folds']))}; thresholds fitted on clean data "
        f"({report['thresholds']['metric']}, other folds), never refit; ε in 0–255 levels (L∞, after uint8 rounding); "
        f"{spread}; gradients in {_precision(report)}, decisions in fp32. "
        "sim. shift: mean change of the similarity toward the attacker's goal (down for matched pairs, "
        "up for mismatched).",
        "",
        "| attack | ε | params | accuracy (all) | matched | mismatched | paper (CosFace) | sim. shift | time s | img-steps/s | steps saved |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if transfer:
        lines[-2] += " on craft model |"
        lines[-1] += "---|"
    if not transfer:
        lines.pop(0)
    for r in report["rows"]:
        # One fold has no spread to report; ± appears only with two folds or more.
        acc = f"{100 * r['accuracy_mean']:.1f}" + (f" ± {100 * r['accuracy_std']:.1f}" if r["n_folds"] > 1 else "")
        paper = "—" if r.get("paper_accuracy") is None else f"{r['paper_accuracy']:.1f}"
        rate = f"{r['image_steps_per_s']:.0f}" if r.get("image_steps_per_s") else "—"
        eps = "—" if r["attack"] == "clean" else f"{r['eps']:g}"
        lines.append(f"| {r['attack']} | {eps} | {_params(r)} | {acc} | {_pct(r['matched_accuracy'])} | "
                     f"{_pct(r['mismatched_accuracy'])} | {paper} | {r['mean_shift']:+.3f} | "
                     f"{r['time_s']:.1f} | {rate} | {_saved(r)} |"
                     + (f" {_pct(r.get('craft_accuracy'))} |" if transfer else ""))
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_eps(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    clean = next(r for r in report["rows"] if r["attack"] == "clean")
    groups: dict[str, list] = {}
    for r in report["rows"]:
        if r["attack"] != "clean":
            label = r["attack"] + (f"-{r['params']['steps']}" if r["attack"] in ("pgd", "cw") else "")
            groups.setdefault(label, []).append(r)
    for label, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["eps"])
        ax.errorbar([0] + [r["eps"] for r in rs], [100 * clean["accuracy_mean"]] + [100 * r["accuracy_mean"] for r in rs],
                    yerr=[100 * clean["accuracy_std"]] + [100 * r["accuracy_std"] for r in rs],
                    marker="o", capsize=3, label=label)
    ax.set_xlabel("ε (0–255 pixel levels, L∞)")
    ax.set_ylabel("verification accuracy after attack (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(f"{report['model']}: {report['n_pairs']} LFW pairs, fixed clean thresholds")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no attack rows (clean only): no legend
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def example_grid(clean: np.ndarray, attacked: dict, path: Path, eps: float) -> None:
    """Rows: example queries. Columns: clean, then per attack the attacked chip and its
    perturbation amplified to the full range (grey = 0, ±eps -> black/white)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacked = {k: v for k, v in attacked.items() if v is not None and len(v) == len(clean)}
    n_cols = 1 + 2 * len(attacked)
    fig, axes = plt.subplots(len(clean), n_cols, figsize=(1.6 * n_cols, 1.7 * len(clean)), dpi=100, squeeze=False)
    for i, chip in enumerate(clean):
        cells = [("clean", chip)]
        for name, adv in attacked.items():
            delta = adv[i].astype(np.int16) - chip.astype(np.int16)
            amplified = np.clip(127.5 + delta * (127.5 / max(eps, 1)), 0, 255).astype(np.uint8)
            cells += [(name, adv[i]), (f"δ ×{127.5 / max(eps, 1):.0f}", amplified)]
        for j, (title, img) in enumerate(cells):
            ax = axes[i, j]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=8)
    fig.suptitle(f"examples at ε = {eps:g}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_table1(report: dict, out: Path, clean_chips: np.ndarray, example_images: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "table1.json", report, indent=2)
    write_text_atomic(out / "table1.md", table1_markdown(report))
    plot_accuracy_vs_eps(report, out / "accuracy_vs_eps.png")
    if len(clean_chips) and example_images:
        example_grid(clean_chips, example_images, out / "examples.png", max(report["config"]["eps"]))

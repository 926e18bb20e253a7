"""Writers for Tables 2-4 and the adaptive evaluation: defend.json, defend.md, plots."""

from __future__ import annotations

from pathlib import Path

from ..fileio import write_json_atomic, write_text_atomic


def pct(x, std=None, n_folds=1) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.1f}" + (f" ± {100 * std:.1f}" if std is not None and n_folds > 1 else "")


def _spread(report: dict) -> str:
    n = len(report["folds"])
    return f"accuracy % as mean ± std over {n} folds" if n > 1 else "accuracy % on one fold (no spread over folds)"


def calibration_lines(report: dict) -> list[str]:
    lines = []
    for c in report["thresholds"]["defended"]:
        per = ", ".join(f"{k} steps: clean {100 * v['clean_accuracy']:.1f}% (AUC {v['clean_auc']:.3f})"
                        for k, v in c["per_step"].items())
        loud = "" if c["full_protocol"] else "**WARNING — calibration on a subset:** "
        lines.append(f"- D = {c['defense']} ε_d={c['defense_eps']:g}: {loud}thresholds {c['protocol']}; "
                     f"{c['n_calibration_pairs']} calibration pairs; defended clean k-fold accuracy {per}")
    return lines


def static_markdown(report: dict) -> str:
    out = []
    by_d: dict = {}
    for r in report["rows"]:
        by_d.setdefault((r["defense"], r["defense_eps"]), []).append(r)
    for (d, eps_d), rows in by_d.items():
        steps = sorted({r["defense_steps"] for r in rows})
        one_step = d == "fgsm"  # FGSM is one step whatever the requested counts: one column, not copies
        if one_step:
            steps = steps[:1]
        table = rows[0]["table"]
        out += [f"### Table {table}: D = {d.upper() if d != 'cw' else 'C&W'}, ε_d = {eps_d:g} "
                f"({rows[0]['objective']}); {report['n_pairs']} pairs",
                "",
                f"{report['chance']} {_spread(report)}; every row judged with the defended thresholds fitted on "
                "CLEAN defended pairs (never refit); 'undefended' = the same queries judged by the plain model; "
                "cost per query = D on the query and on its gallery image (image-steps, seconds).",
                "",
                "| query | ε | " + " | ".join("D (one step): all / matched / mismatched" if one_step else
                                               f"D {k} steps: all / matched / mismatched" for k in steps)
                + " | undefended | AUC (D max steps) | paper (CosFace, 40 it.) | D cost/query |",
                "|---|---|" + "---|" * len(steps) + "---|---|---|---|"]
        order = {"known": 0, "unknown": 1, "clean": 2}
        conds = sorted({(r["kind"], r["query"], r["eps"]) for r in rows}, key=lambda t: (order[t[0]], t[1], t[2]))
        for kind, q, eps in conds:
            cells, last = [], None
            for k in steps:
                r = next(x for x in rows if x["query"] == q and x["eps"] == eps and x["defense_steps"] == k)
                cells.append(f"{pct(r['accuracy'], r['accuracy_std'], r['n_folds'])} / {pct(r['matched_accuracy'])} / "
                             f"{pct(r['mismatched_accuracy'])}")
                last = r
            label = {"known": f"{q} (known attack)", "unknown": f"{q} (unknown attack)", "clean": "clean (the price)"}[kind]
            cost = f"{last['image_steps']} img-steps, {last['seconds']:.2f} s"
            auc = "—" if last["auc"] is None else f"{last['auc']:.3f}"
            out.append(f"| {label} | {'—' if q == 'clean' else f'{eps:g}'} | " + " | ".join(cells)
                       + f" | {pct(last['undefended_accuracy'])} | {auc} "
                       f"| {last['paper'] or '—'} | {cost} |")
        out.append("")
    return "\n".join(out)


def adaptive_markdown(report: dict) -> str:
    out = []
    for a in report.get("adaptive", []):
        out += [f"### Adaptive evaluation: D = {a['defense']} ε_d = {a['defense_eps']:g}, {a['defense_steps']} steps "
                f"({a['n_pairs']} pairs; sweeps and S > 1 on {a['n_sweep_pairs']})",
                "",
                f"{report['chance']} Every attacked query is judged by the full D with the defender's own seed "
                f"(the attacker's EOT seeds derive from seed {a['attacker_seed']}), fixed defended thresholds. "
                "matched = dodging, mismatched = impersonation.",
                "",
                "| attack | ε_a | params | pairs | accuracy | dodging (matched) | impersonation (mismatched) | attack img-steps/query |",
                "|---|---|---|---|---|---|---|---|"]
        for r in a["rows"]:
            params = ", ".join(f"{k}={r[k]}" for k in ("eot_samples", "copy_steps", "attack_steps", "kappa") if r.get(k) is not None)
            out.append(f"| {r['query']} | {r['eps']:g} | {params or '—'} | {r['n_pairs']} | "
                       f"{pct(r['accuracy'], r['accuracy_std'], r['n_folds'])} | {pct(r['matched_accuracy'])} | "
                       f"{pct(r['mismatched_accuracy'])} | {r['image_steps']} |")
        for w in a["worst_case"]:
            static = w.get("static_known_attack_accuracy")
            out.append(f"| **per-pair worst case** ({w['pairs']}) | {w['eps']:g} | over {len(w['over'])} attacks | "
                       f"{w['n_pairs']} | **{pct(w['accuracy'], w['accuracy_std'], w['n_folds'])}** "
                       f"(static known-attack: {pct(static)}) | {pct(w['matched_accuracy'])} | "
                       f"{pct(w['mismatched_accuracy'])} | — |")
        out += ["", "Checklist:"]
        for c in a["checks"]:
            out.append(f"- {'✅' if c['ok'] else '⚠️ **'}{c['message']}{'' if c['ok'] else '**'}")
        if a["warnings"]:
            out.append(f"- **{len(a['warnings'])} check(s) FAILED — see above; the worst case is what counts.**")
        out.append("")
    return "\n".join(out)


def defend_markdown(report: dict) -> str:
    head = [f"## {report['table']}",
            "",
            *([] if report.get("complete", True) else
              [f"**PARTIAL: {report['defense_configs_done']} defense configs done so far (the run continues).**", ""]),
            f"{report['model']}, {report['n_pairs']} pairs of LFW fold(s) {', '.join(map(str, report['folds']))}"
            + (" (a subset: --pairs)" if report["subset"] else "") + f"; {report['chance']}",
            f"Gradients in {report['precision']['gradients']}, decisions in fp32; ε in 0–255 levels (L∞, after uint8 rounding).",
            "",
            "Thresholds:"] + calibration_lines(report) + [""]
    w = report["work"]
    tail = [f"1-minute load average when written: {report.get('load_average_1min')} (the CPU is shared; seconds are "
            "pessimistic under load).",
            f"Work done by this run: D on {w['defense_images_computed']} images ({w['defense_image_steps']} image-steps, "
            f"{w['defense_seconds']} s); {w['attacked_pairs']} pairs attacked; total {report['time_s']} s.", ""]
    return "\n".join(head) + "\n" + static_markdown(report) + "\n" + adaptive_markdown(report) + "\n".join(tail)


LINESTYLE = {"pgd": "-", "cw": "--", "fgsm": ":"}  # one style per D, one colour / marker per query
COLOR = {"clean": "tab:green", "fgsm": "tab:orange", "pgd": "tab:red", "cw": "tab:purple"}
MARKER = {"clean": "o", "fgsm": "s", "pgd": "^", "cw": "D"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_steps(report: dict, path: Path) -> None:
    """Accuracy vs D's steps, one line per (D, ε_d, query); undefended as dotted lines."""
    plt = _plt()
    groups: dict = {}
    for r in report["rows"]:
        groups.setdefault((r["defense"], r["defense_eps"], r["query"], r["eps"]), []).append(r)
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    for (d, ed, q, e), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["defense_steps"])
        ax.errorbar([r["defense_steps"] for r in rs], [100 * r["accuracy"] for r in rs],
                    yerr=[100 * r["accuracy_std"] for r in rs], marker=MARKER.get(q, "o"), capsize=3,
                    ls=LINESTYLE.get(d, "-"), color=COLOR.get(q),
                    label=f"D={d} ε_d={ed:g}, query {q}" + (f" ε={e:g}" if q != "clean" else ""))
    ax.axhline(50, color="grey", ls="--", lw=1, label="chance (50%)")
    ax.set_xlabel("D's steps")
    ax.set_ylabel("defended accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(f"{report['model']}: {report['n_pairs']} pairs, fixed defended thresholds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _price(report: dict, defense: str, eps_d: float, steps: int) -> float | None:
    """Clean accuracy lost (points) by D (defense, eps_d, steps): undefended minus defended clean row."""
    clean = next((c for c in report["rows"] if c["query"] == "clean" and c["defense"] == defense
                  and c["defense_eps"] == eps_d and c["defense_steps"] == steps), None)
    return None if clean is None else 100 * (clean["undefended_accuracy"] - clean["accuracy"])


def plot_tradeoff(report: dict, path: Path) -> dict:
    """Price (clean accuracy lost) vs gain (attacked accuracy won) over ε_d, at D's largest steps; with
    an adaptive evaluation also the per-pair worst case (at the adaptive D's steps) — the real gain."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    top = {}
    for r in report["rows"]:
        key = (r["defense"], r["defense_eps"])
        top[key] = max(top.get(key, 0), r["defense_steps"])
    series: dict = {}
    for r in report["rows"]:
        if r["defense_steps"] != top[(r["defense"], r["defense_eps"])] or r["query"] == "clean":
            continue
        price = _price(report, r["defense"], r["defense_eps"], r["defense_steps"])
        gain = 100 * (r["accuracy"] - r["undefended_accuracy"])
        series.setdefault((r["defense"], r["query"], r["eps"]), []).append((r["defense_eps"], price, gain))
    worst: dict = {}  # the adaptive per-pair worst case: what D really buys against attackers who know it
    for a in report.get("adaptive", []):
        price = _price(report, a["defense"], a["defense_eps"], a["defense_steps"])
        for w in a["worst_case"]:
            undefended = [r["undefended_accuracy"] for r in report["rows"] if r["query"] != "clean"
                          and r["eps"] <= w["eps"] + 1e-9 and r["undefended_accuracy"] is not None]
            if w["pairs"] != "all pairs" or price is None or not undefended:
                continue
            gain = 100 * (w["accuracy"] - min(undefended))  # vs the undefended model's worst static row
            worst.setdefault((a["defense"], w["eps"]), []).append((a["defense_eps"], price, gain))
    curves = [(pts, dict(marker="o", label=f"D={d}, query {q} ε={e:g} (static)")) for (d, q, e), pts in series.items()]
    curves += [(pts, dict(marker="s", color="black", linewidth=2, label=f"D={d}: adaptive per-pair worst case, ε_a={e:g}"))
               for (d, e), pts in worst.items()]
    for pts, style in curves:
        pts.sort()
        ax.plot([p[1] for p in pts], [p[2] for p in pts], **style)
        for ed, x, y in pts:
            ax.annotate(f"ε_d={ed:g}", (x, y), fontsize=6)
    ax.set_xlabel("price: clean accuracy lost (points)")
    ax.set_ylabel("gain: accuracy under attack won (points)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {"static": series, "worst_case": worst}  # (ε_d, price, gain) points, as plotted


def plot_adaptive(report: dict, path: Path) -> bool:
    """Accuracy vs ε_a, attack steps and EOT samples (BPDA+EOT rows); False when nothing varies."""
    rows = [r for a in report.get("adaptive", []) for r in a["rows"] if r["query"] == "bpda-eot"]
    axes_spec = [(k, sorted({r[k] for r in rows})) for k in ("eps", "attack_steps", "eot_samples")]
    axes_spec = [(k, v) for k, v in axes_spec if len(v) > 1]
    if not axes_spec:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(axes_spec), figsize=(4.5 * len(axes_spec), 3.8), dpi=120, squeeze=False)
    for ax, (key, values) in zip(axes[0], axes_spec):
        groups: dict = {}
        for r in rows:
            other = tuple((k, r[k]) for k in ("defense", "eps", "attack_steps", "eot_samples", "copy_steps") if k != key)
            groups.setdefault(other, []).append(r)
        for other, rs in groups.items():
            if len(rs) < 2:
                continue
            rs.sort(key=lambda r: r[key])
            ax.plot([r[key] for r in rs], [100 * r["accuracy"] for r in rs], marker="o",
                    label=", ".join(f"{k}={v}" for k, v in other))
        ax.axhline(50, color="grey", ls="--", lw=1)
        ax.set_xlabel(key)
        ax.set_ylabel("defended accuracy under BPDA+EOT (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_defend(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "defend.json", report, indent=2)
    write_text_atomic(out / "defend.md", defend_markdown(report))
    plot_steps(report, out / "accuracy_vs_defense_steps.png")
    plot_tradeoff(report, out / "price_vs_gain.png")
    plot_adaptive(report, out / "adaptive_curves.png")


__all__ = ["adaptive_markdown", "defend_markdown", "static_markdown", "write_defend"]

"""The leaderboard's outputs: entries merged (refused when their pairs or threat model differ), ranked
by worst-case robust accuracy with the clean accuracy beside it, as LEADERBOARD.md, leaderboard.json
and one plot (clean accuracy vs worst-case robust accuracy, a point per entry, the undefended model
marked)."""

from __future__ import annotations

import json
from pathlib import Path

from ..fileio import write_json_atomic, write_text_atomic

CHANCE = "LFW pairs are balanced: 50% is chance."


def load_entries(paths) -> list[dict]:
    """Entries from JSON files or folders (a folder: its entries/*.json, or *.json)."""
    out = []
    for p in map(Path, paths):
        files = sorted((p / "entries").glob("*.json")) or sorted(p.glob("*.json")) if p.is_dir() else [p]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"no leaderboard entry at {f}")
            entry = json.loads(f.read_text())
            if entry.get("scheme", "").startswith("leaderboard-entry"):
                out.append(entry)
    if not out:
        raise FileNotFoundError(f"no leaderboard entries in {', '.join(map(str, paths))}")
    return out


def protocol_record(config: dict) -> dict:
    """The attack budgets and calibration a run judged its entries under, from its config (entries
    merge only when these agree). Both Square budgets are part of it: which one an entry got
    depends on its defense's cost, and is recorded in its ``cost``."""
    return {"attack_steps": config.get("attack_steps") or 40, "adaptive_steps": config["adaptive_steps"],
            "eot": config["eot"], "copy_steps": config["copy_steps"], "kappa": config["kappa"],
            "square_queries": config["square_queries"], "costly_square_queries": config["costly_square_queries"],
            "square_pairs": config["square_pairs"],
            "costly_square_pairs": config.get("costly_square_pairs"),  # before it existed: every pair
            "calibration_pairs": config["calibration_pairs"],
            "steps_cap": config["steps_cap"], "seed": config["seed"], "warm_start": config.get("warm_start", False),
            "best_iterate": config.get("best_iterate", False),
            "transfer_precision": config.get("transfer_precision", config.get("precision")),
            "fast_model": config.get("fast_model", False),
            # Square's scores from the fp32 fast copy (before the option existed: only with fast_model)
            "square_fast_copy": config.get("square_fast_copy", config.get("fast_model", False))}


def _merge_key(e: dict, what: str):
    return protocol_record(e["config"]) if what == "protocol" else e[what]


def merge_entries(entries: list[dict]) -> list[dict]:
    """One table from entries made on different machines or runs: refused (ValueError, naming the two
    entries) when their pairs, threat model or protocol (attack budgets, calibration) differ; the same
    (model, weights, defense) twice keeps the newer-listed one."""
    ref = entries[0]
    for e in entries[1:]:
        for what in ("pairs", "threat_model", "protocol"):
            a, b = _merge_key(e, what), _merge_key(ref, what)
            if a != b:
                diff = {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)} if isinstance(a, dict) else (a, b)
                raise ValueError(f"cannot merge: {_label(e)} and {_label(ref)} differ in {what.replace('_', ' ')} "
                                 f"({diff})")
    merged = {}
    for e in entries:
        merged[(e["model"], e["weights"], json.dumps(e["defense"]["config"], sort_keys=True))] = e
    return list(merged.values())


def _label(e: dict) -> str:
    return f"{e['model']} + {e['defense']['spec']}"


def ranked(entries: list[dict]) -> list[dict]:
    return sorted(entries, key=lambda e: (-e["worst_case"]["accuracy"], -e["clean"]["accuracy"]))


def strongest(e: dict) -> list[str]:
    """Every attack row at the entry's lowest single-row accuracy (ties listed, in row order)."""
    rows = {r: v["accuracy"] for r, v in e["attacks"].items() if v.get("kind") != "clean"}
    low = min(rows.values())
    return [r for r, a in rows.items() if a <= low + 1e-12]


def _subset_note(e: dict, row: str) -> str:
    """" (on N pairs)" for a row computed on fewer pairs than the entry's (Square on a subset), else ""."""
    n = e["attacks"][row].get("n_pairs")
    return f" (on {n} pairs)" if n is not None and n < e["pairs"]["n"] else ""


def _strongest_cell(e: dict) -> str:
    tied = strongest(e)
    return tied[0] + _subset_note(e, tied[0]) + (f" (+{len(tied) - 1} tied)" if len(tied) > 1 else "")


def attack_seconds(e: dict) -> float:
    """What the entry's attacks cost when they were computed: the sum over its rows of seconds per pair x
    pairs. Unlike the run's wall time it does not depend on what a cache already held (transfer and
    high-confidence queries are shared by a model's entries and counted in each)."""
    return sum((v.get("attack_seconds_per_pair") or 0.0) * v["n_pairs"] for v in e["attacks"].values())


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min" if s >= 60 else f"{s:.0f} s"


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def leaderboard_markdown(entries: list[dict]) -> str:
    rows = ranked(entries)
    tm = rows[0]["threat_model"]
    pairs = rows[0]["pairs"]
    subset = any(_subset_note(e, r) for e in rows for r in e["attacks"])
    subset_note = (" Where a cell says 'on N pairs', Square ran on the first N pairs (half matched) only: the "
                   "other pairs' worst case is over the white-box and transfer attacks." if subset else "")
    lines = [f"# Leaderboard: L-inf eps = {tm['eps']:g} (0-255), {pairs['n']} pairs of fold(s) "
             f"{','.join(map(str, pairs['folds']))}", "",
             f"Ranked by worst-case robust accuracy: per pair, right under every attack (transfer, high confidence, "
             f"BPDA + EOT, Square). Accuracy in %; {CHANCE} Dodging = matched pairs, impersonation = mismatched. "
             "'clean, calibration pairs': the defended clean accuracy, 10-fold, over every pair its thresholds were "
             "fitted on (the price, on more pairs). 'attack time': the attacks' compute for the entry as measured "
             "when each row was made (the sum of seconds per pair x pairs; rows shared by a model's entries count "
             "in each)."
             + subset_note, "",
             "| # | model | defense | clean | clean, calibration pairs | worst case | dodging | impersonation "
             "| strongest attack | passes / query | attack time | flags |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, e in enumerate(rows, 1):
        w = e["worst_case"]
        flags = "; ".join(f"**{f}**" if "MASKING" in f or "WEAKER" in f else f for f in e["flags"]) or "—"
        lines.append(f"| {i} | {e['model']} | {e['defense']['spec']} | {_pct(e['clean']['accuracy'])} | "
                     f"{_pct(e['clean'].get('all_folds_accuracy'))} | "
                     f"**{_pct(w['accuracy'])}**" + (f" ± {_pct(w['accuracy_std'])}" if w.get("n_folds", 1) > 1 else "")
                     + f" | {_pct(w['matched_accuracy'])} | "
                     f"{_pct(w['mismatched_accuracy'])} | {_strongest_cell(e)} | {e['cost']['defense_passes_per_query']:g} | "
                     f"{_duration(attack_seconds(e))} | {flags} |")
    lines += ["", "Per attack (accuracy %, all pairs unless noted):", ""]
    names = []
    for e in rows:
        names += [r for r in e["attacks"] if r not in names]
    lines.append("| model | defense | " + " | ".join(names) + " |")
    lines.append("|---|---|" + "---|" * len(names))
    for e in rows:
        cells = [_pct(e["attacks"][n]["accuracy"]) + _subset_note(e, n) if n in e["attacks"] else "" for n in names]
        lines.append(f"| {e['model']} | {e['defense']['spec']} | " + " | ".join(cells) + " |")
    checks = [(e, c) for e in rows for c in e["checks"]]
    lines += ["", "Checks:", ""] + [f"- {_label(e)}: {c['check']}: {c['message']}" for e, c in checks]
    commands = list(dict.fromkeys(e["config"].get("command") or "(library call)" for e in rows))
    lines += ["", f"Entries: {len(rows)}; " + ("command" if len(commands) == 1 else f"{len(commands)} commands")
              + ": " + "; ".join(f"`{c}`" for c in commands), ""]
    return "\n".join(lines)


def plot_leaderboard(entries: list[dict], path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.08, 0.11, 0.5, 0.8))
    legend = []
    for i, e in enumerate(ranked(entries), 1):  # points numbered by rank, the names listed beside the axes
        x, y = 100 * e["clean"]["accuracy"], 100 * e["worst_case"]["accuracy"]
        undefended = e["defense"]["name"] == "none" and "model_stage" not in e
        ax.scatter([x], [y], marker="*" if undefended else "o", s=140 if undefended else 50,
                   color="black" if undefended else None, zorder=3)
        ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(4, 3 + 7 * (i % 3)), fontsize=7)
        legend.append(f"{i}  {e['model']} + {e['defense']['spec']}" + ("  (undefended)" if undefended else "")
                      + f"\n    clean {x:.1f}, worst case {y:.1f}")
    fig.text(0.61, 0.91, "\n".join(legend), fontsize=6.5, va="top", family="monospace")
    ax.axhline(50, color="grey", lw=0.8, ls=":")
    ax.axvline(50, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("worst-case robust accuracy (%)")
    tm = entries[0]["threat_model"]
    ax.set_title(f"defenses at L-inf eps = {tm['eps']:g}: the price and what it buys", fontsize=10)
    ax.set_xlim(40, 101)
    ax.set_ylim(-2, 100)
    ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    return path


def write_leaderboard(entries: list[dict], out_dir) -> dict:
    """LEADERBOARD.md, leaderboard.json (the ranked summary) and leaderboard.png in ``out_dir``."""
    entries = merge_entries(entries)
    out = Path(out_dir)
    summary = [{"rank": i, "model": e["model"], "weights": e["weights"], "defense": e["defense"]["spec"],
                "clean_accuracy": e["clean"]["accuracy"], "worst_case_accuracy": e["worst_case"]["accuracy"],
                "dodging": e["worst_case"]["matched_accuracy"], "impersonation": e["worst_case"]["mismatched_accuracy"],
                "strongest_attacks": strongest(e), "attack_seconds": round(attack_seconds(e), 1),
                "wall_seconds": e.get("wall_seconds"), "flags": e["flags"]}
               for i, e in enumerate(ranked(entries), 1)]
    report = {"threat_model": entries[0]["threat_model"], "pairs": entries[0]["pairs"], "ranking": summary}
    write_json_atomic(out / "leaderboard.json", report)
    write_text_atomic(out / "LEADERBOARD.md", leaderboard_markdown(entries))
    plot_leaderboard(entries, out / "leaderboard.png")
    return {**report, "entries": entries}


__all__ = ["attack_seconds", "leaderboard_markdown", "load_entries", "merge_entries", "plot_leaderboard", "protocol_record", "ranked",
           "strongest", "write_leaderboard"]

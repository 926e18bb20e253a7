"""`advface paper`: Table 1, Tables 2-4 and the adaptive evaluation in one plan, one REPORT.md.

One plan reuses every shared artefact: the pairs and their aligned chips, the clean embeddings
and thresholds, Table 1's attacked queries (the query conditions of Tables 2-4 and the transfer
rows of the adaptive evaluation: same attack config, same cache entry), and D's embeddings of
every image (computed once per image and D config, whichever table or pair asks). Everything is
cached on disk per item, so an interrupted run resumes, and a run whose work is all cached does
no attack or defense work and finishes in seconds (``work`` in the report says what was done).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..attacks import DEFAULT_ATTACK_BATCH
from ..environment import environment
from ..fileio import write_json_atomic, write_text_atomic
from .defense_render import defend_markdown
from .defense_context import DefendConfig, cap, make_context
from .defense_tables import run_defend, work_record
from .render import table1_markdown
from .table1 import Table1Config, run_table1
from .transfer import run_transfer_matrix, transfer_markdown


@dataclass
class PaperConfig:
    model: str = "dlib-resnet"
    folds: tuple | None = (1,)
    max_pairs: int | None = None
    steps: int | None = None  # caps every iteration count (quick runs)
    eps: tuple = (2.0, 4.0, 8.0)  # Table 1's budgets
    defense_eps: tuple = (4.0,)
    attack_eps: float = 4.0  # the attacked queries of Tables 2-4 (and eps_a = eps_d of the adaptive rows)
    defenses: tuple = ("pgd", "cw", "fgsm")
    defense_steps: tuple = (10, 20, 40)
    attacks: tuple = ("fgsm", "pgd", "cw")
    precision: str = "auto"
    seed: int = 0
    batch_size: int = DEFAULT_ATTACK_BATCH
    calibration_pairs: int | None = None
    adaptive: bool = True
    adaptive_options: dict = field(default_factory=dict)
    on_bad: str = "error"
    no_face: str = "center"
    pairs_file: str | None = None
    transfer_models: tuple = ()  # the transfer matrix over these models and `model` (empty: no matrix)
    train_runs: tuple = ()  # finished advtrain run folders, weighed against this run's defense (empty: no cost section)


def run_paper(lfw, cfg: PaperConfig | None = None, *, out_dir, cache_dir=None, defended_dir=None, workers=None,
              progress: bool = True, net=None, pairs=None) -> dict:
    from .cost import cost_from, display_path, load_training_runs, write_cost

    cfg = cfg or PaperConfig()
    out = Path(out_dir)
    t0 = time.perf_counter()
    runs = load_training_runs(cfg.train_runs) if cfg.train_runs else None  # a bad folder fails before any work
    dcfg = DefendConfig(model=cfg.model, defenses=cfg.defenses, defense_eps=cfg.defense_eps,
                        defense_steps=cfg.defense_steps, attacks=cfg.attacks, eps=(cfg.attack_eps,), folds=cfg.folds,
                        max_pairs=cfg.max_pairs, seed=cfg.seed, batch_size=cfg.batch_size, precision=cfg.precision,
                        calibration_pairs=cfg.calibration_pairs, steps_cap=cfg.steps, adaptive=cfg.adaptive,
                        adaptive_options=cfg.adaptive_options, on_bad=cfg.on_bad, no_face=cfg.no_face,
                        pairs_file=cfg.pairs_file)
    ctx = make_context(lfw, dcfg, cache_dir=cache_dir, defended_dir=defended_dir, workers=workers, progress=progress,
                       net=net, pairs=pairs)
    # Table 1 on the same pairs, with the same attack configs as the query conditions of Tables 2-4.
    t1cfg = Table1Config(model=cfg.model, attacks=cfg.attacks, eps=tuple(cfg.eps), steps=(cap(40, dcfg),),
                         folds=cfg.folds, max_pairs=cfg.max_pairs, batch_size=cfg.batch_size, seed=cfg.seed,
                         precision=cfg.precision, on_bad=cfg.on_bad, no_face=cfg.no_face, pairs_file=cfg.pairs_file)
    t_table1 = time.perf_counter()
    table1 = run_table1(ctx.pairs.dataset, t1cfg, out_dir=out / "table1", cache_dir=cache_dir, workers=workers,
                        progress=progress, net=ctx.net, pairs=ctx.pairs, runner=ctx.runner)
    t_table1 = time.perf_counter() - t_table1
    t_def = time.perf_counter()
    defend = run_defend(None, dcfg, out_dir=out / "defend", progress=progress, ctx=ctx)
    t_def = time.perf_counter() - t_def
    grid = out / "examples_defended.png"
    example_grid(ctx, grid)
    t_transfer, transfer = time.perf_counter(), None
    if cfg.transfer_models:  # Table 1's attacks at the queries' eps, crafted on each model, judged by each
        models = tuple(dict.fromkeys((cfg.model, *cfg.transfer_models)))
        transfer = run_transfer_matrix(lfw, models, replace(t1cfg, eps=(cfg.attack_eps,)),
                                       out_dir=out / "transfer", cache_dir=cache_dir, workers=workers,
                                       progress=progress, shared={cfg.model: (ctx.pairs, ctx.net, ctx.runner)})
    t_transfer = time.perf_counter() - t_transfer
    cost = None
    if runs is not None:  # the training runs' cost and accuracy against this run's own defense results
        cost = cost_from(runs, [dict(defend, _file="defend/defend.json")], eps=cfg.attack_eps)
        write_cost(cost, out / "cost")
    work = work_record(ctx)  # the main model's runner counts the cells it judged; add the other judges'
    if transfer is not None:
        work["attacked_pairs"] += sum(n for judge, n in transfer["work"]["attacked_pairs"].items() if judge != cfg.model)
    config = {**asdict(cfg), "train_runs": [display_path(p) for p in cfg.train_runs]}
    report = {"config": config, "table1": table1, "defend": defend, "transfer": transfer, "cost": cost,
              "times_s": {"table1": round(t_table1, 1), "tables_2_4_and_adaptive": round(t_def, 1),
                          "transfer": round(t_transfer, 1), "total": round(time.perf_counter() - t0, 1)},
              "work": work, "reuse": reuse_record(table1, defend, ctx),
              "environment": environment()}
    write_json_atomic(out / "paper.json", report, indent=2)
    write_text_atomic(out / "REPORT.md", report_markdown(report))
    return report


def reuse_record(table1: dict, defend: dict, ctx) -> dict:
    """Image-steps of the artefacts this report rests on, with reuse, vs a naive run that
    recomputes every attack for every table and row and D for every pair, row and step count."""
    n_all = len(ctx.pairs)
    n_images = len(ctx.pairs.chips.ids)
    t1 = sum(r["image_steps"] for r in table1["rows"])
    attack_by_query = {(r["query"], r["eps"]): r["attack_image_steps"] * r["n_pairs"] for r in defend["rows"]}
    with_reuse, naive = float(t1), float(t1)
    per_d: dict = {}
    for r in defend["rows"]:
        key = (r["defense"], r["defense_eps"])
        per_d.setdefault(key, {"max": 0, "rows": []})
        per_d[key]["max"] = max(per_d[key]["max"], r["defense_steps"] if r["defense"] != "fgsm" else 1)
        per_d[key]["rows"].append(r)
    for (d, _), v in per_d.items():
        cal_images = n_images if ctx.cfg.calibration_pairs is None else 2 * len(ctx.pairs)  # upper bound on a subset
        attacked = {(r["query"], r["eps"]) for r in v["rows"] if r["query"] != "clean"}
        with_reuse += v["max"] * (cal_images + len(attacked) * len(ctx.sel))
        for r in v["rows"]:
            k = r["image_steps"] // 2
            naive += 2 * k * n_all  # calibration of this column alone, D per pair side
            naive += r["image_steps"] * r["n_pairs"] + attack_by_query.get((r["query"], r["eps"]), 0)
    adaptive = sum(r["image_steps"] * r["n_pairs"] for a in defend.get("adaptive", []) for r in a["rows"]
                   if r["query"] not in ("worst-case",) and not r["query"].startswith("transfer-"))
    transfer = sum(r["attack_image_steps"] * r["n_pairs"] for a in defend.get("adaptive", []) for r in a["rows"]
                   if r["query"].startswith("transfer-") for r in [r] if "attack_image_steps" in r)
    with_reuse += adaptive
    naive += adaptive + transfer
    return {"image_steps_with_reuse": int(with_reuse), "image_steps_naive": int(naive),
            "note": "with reuse: Table 1's attacks once, D once per unique image (its largest step count "
                    "records the others); naive: every row recomputes its attack, D per pair side and per step "
                    "count, and its own calibration"}


def example_grid(ctx, path: Path, n: int = 4) -> None:
    """Clean query, PGD-attacked query (Table 1's), and D(attacked) for a few pairs (display only:
    D here runs on these few images in its own batch)."""
    from ..defenses import AttackAsDefense
    from .defense_context import attacked_queries, query_attack
    from .render import example_grid as grid

    cfg = ctx.cfg
    if "pgd" not in cfg.attacks or path.exists():
        return
    pos = list(range(min(n, len(ctx.sel))))
    q = attacked_queries(ctx, query_attack(ctx, "pgd", cfg.eps[0]))
    clean = ctx.pairs.chips.chips[ctx.sel.query_rows[pos]]
    adv = q.images(ctx.pairs.chips.chips[ctx.sel.query_rows])[pos]
    images = {"pgd": adv}
    for name in cfg.defenses:
        d = AttackAsDefense(ctx.net, name, eps=cfg.defense_eps[0], steps=(cap(max(cfg.defense_steps), cfg),),
                            objective=cfg.objective, seed=cfg.seed, batch_size=len(pos))
        x = d.defend(adv, [f"example/{i}" for i in pos])[max(d.steps)]
        images[f"D={name}(pgd)"] = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    grid(clean, images, path, cfg.eps[0])


def report_markdown(report: dict) -> str:
    cfg, t1, d = report["config"], report["table1"], report["defend"]
    w, reuse, times = report["work"], report["reuse"], report["times_s"]
    lines = [
        "# advface-fast: the paper's tables, reproduced and judged under adaptive attacks",
        "",
        f"Model {cfg['model']}; LFW fold(s) {', '.join(map(str, d['folds']))}, {d['n_pairs']} pairs"
        + (" (a subset: --pairs)" if d["subset"] else "") + f"; iteration cap {cfg['steps'] or 'none'}; "
        f"gradients {d['precision']['gradients']}, decisions fp32; seed {cfg['seed']}. {d['chance']}",
        "",
        f"Times: Table 1 {times['table1']} s, Tables 2-4 + adaptive {times['tables_2_4_and_adaptive']} s, total "
        f"{times['total']} s. Work done by this run: D on {w['defense_images_computed']} images, "
        f"{w['attacked_pairs']} pairs attacked"
        + (" (everything came from the caches)." if not (w["defense_images_computed"] or w["attacked_pairs"])
           else " (the rest came from the caches)."),
        f"Image-steps the report rests on: {reuse['image_steps_with_reuse']:,} with reuse vs "
        f"{reuse['image_steps_naive']:,} for a naive run without reuse ({reuse['note']}).",
        "",
        "## Table 1 (attacks on the undefended model)",
        "",
        table1_markdown(t1),
        "![accuracy vs eps](table1/accuracy_vs_eps.png) ![examples](table1/examples.png)",
        "",
        defend_markdown(d),
        "![accuracy vs D steps](defend/accuracy_vs_defense_steps.png) ![price vs gain](defend/price_vs_gain.png)"
        " ![adaptive curves](defend/adaptive_curves.png)",
        "",
        "Example grid (clean query, PGD-attacked query, the defense's re-attack of it): ![examples](examples_defended.png)",
        "",
        *transfer_section(report.get("transfer"), times.get("transfer")),
        *cost_section(report.get("cost")),
        "## Parameters",
        "",
        "```",
        *[f"{k}: {v}" for k, v in cfg.items()],
        "```",
    ]
    return "\n".join(lines) + "\n"


def transfer_section(matrix: dict | None, seconds) -> list[str]:
    if matrix is None:
        return ["## Transfer", "", "Not run (no --transfer-models).", ""]
    return ["## Transfer between models (crafted on one, judged by another)", "",
            f"Time {seconds} s; each cell's Table 1 files are under transfer/<craft>_on_<judge>/.", "",
            transfer_markdown(matrix), ""]


def cost_section(cost: dict | None) -> list[str]:
    """Adversarial training vs this run's defense: cost, break-even, accuracy bought, the plot."""
    from .cost import cost_markdown

    title = "## Adversarial training and cost"
    if cost is None:
        return [title, "", "Not run (no --train-runs). Train and judge models with `advface advtrain` first, then add "
                "their folders: `advface paper ... --train-runs runs/clean runs/fgsm-rs runs/pgd`, or weigh them "
                "against this report's defense afterwards: `advface cost --train runs/clean runs/fgsm-rs runs/pgd "
                "--defense-report <out>/defend/defend.json --out <out>/cost`.", ""]
    runs = ", ".join(f"`{t['file']}`" for t in cost["training"])
    return [title, "", f"The adversarially trained models ({runs}) are judged on their own held-out folds; the "
            "defense's numbers are this report's (its pairs, its adaptive worst case). Files: cost/cost.json, "
            "cost/cost.md.", "", cost_markdown(cost), "![accuracy vs compute](cost/accuracy_vs_compute.png)", ""]


__all__ = ["PaperConfig", "cost_section", "report_markdown", "run_paper"]

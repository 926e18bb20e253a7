"""Transfer matrix: queries crafted on model A, judged by model B with B's clean thresholds.

Every cell is one Table 1 run (``run_table1`` with ``craft_model=A, model=B``; the diagonal is the
white-box run) on the same pairs and attack settings, so a cell's attacked queries come from the
same per-pair cache as any other Table 1 run of that config. Transfer cells work on the judge's
chips; the crafting model sees them resized to its own input (see ``runner.ResizedInput``).

    matrix = run_transfer_matrix(lfw, ("dlib-resnet", "sface"), Table1Config(attacks=("pgd",), eps=(4,)),
                                 out_dir="runs/transfer")
    matrix["accuracy_after_attack"]["pgd-40 eps=4"]["dlib-resnet->sface"]   # judged by sface

Models whose weights are not on this machine (facenet, cosface-sphere20 without user weights) are
listed under ``unavailable`` with the reason, never silently dropped.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..data.policy import InputPolicy
from ..fileio import write_json_atomic, write_text_atomic
from ..models import create_model, get_model_spec, list_models
from ..pair_chips import prepare_pairs
from .runner import Runner
from .table1 import Table1Config, run_table1

NOTE = "rows: crafting model; columns: judging model (its clean 10-fold thresholds); diagonal = white-box"


def available_models(names=None) -> tuple[dict, dict[str, str]]:
    """The models (default: every registered one) that can be built here, built, and why the others cannot."""
    built, unavailable = {}, {}
    for name in names or list_models():
        try:
            built[name] = create_model(name)
        except Exception as err:  # missing weights or peer library: say why, in one line
            unavailable[name] = str(err).splitlines()[0] if str(err) else type(err).__name__
    return built, unavailable


def resolve_transfer_models(value: str, model: str) -> tuple:
    """``--transfer-models``: "all" (every registered model), "none", or a comma list; minus ``model``.
    An unknown name fails here, before any work, with the list of known ones."""
    if value == "none":
        return ()
    names = list_models() if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    for name in names:
        get_model_spec(name)
    return tuple(n for n in names if n != model)


def cell_key(row: dict) -> str:
    return f"{row['attack']}" + (f"-{row['params']['steps']}" if "steps" in row["params"] else "") + f" eps={row['eps']:g}"


def matrix_from_reports(reports: dict, unavailable: dict | None = None, eps=None) -> dict:
    """``reports[(craft, judge)]`` = a Table 1 report -> the matrix (accuracies as fractions).
    ``eps``: keep only rows at these budgets (None: all)."""
    models = sorted({m for pair in reports for m in pair})
    cells: dict = {}
    clean: dict = {}
    for (craft, judge), report in reports.items():
        for r in report["rows"]:
            if r["attack"] == "clean":
                clean[judge] = r["accuracy_mean"]
                continue
            if r["attack"] == "noise" or (eps is not None and r["eps"] not in eps):
                continue
            cells.setdefault(cell_key(r), {})[f"{craft}->{judge}"] = {
                "accuracy": r["accuracy_mean"], "accuracy_std": r["accuracy_std"],
                "matched_accuracy": r["matched_accuracy"], "mismatched_accuracy": r["mismatched_accuracy"]}
    first = next(iter(reports.values()))
    return {"models": models, "n_pairs": first["n_pairs"], "folds": first["folds"], "clean_accuracy": clean,
            "accuracy_after_attack": cells, "unavailable": dict(unavailable or {}), "note": NOTE}


def transfer_markdown(matrix: dict) -> str:
    models = matrix["models"]
    lines = [f"Transfer matrix: accuracy (%) of the judging model (columns) on queries crafted on the crafting "
             f"model (rows), {matrix['n_pairs']} pairs of LFW fold(s) {matrix['folds']}; diagonal = white-box; "
             "50% is chance on these balanced pairs. Clean: "
             + ", ".join(f"{m} {100 * a:.1f}%" for m, a in sorted(matrix["clean_accuracy"].items())), ""]
    for key, values in matrix["accuracy_after_attack"].items():
        lines += [f"**{key}**", "", "| crafted on \\ judged by | " + " | ".join(models) + " |",
                  "|---|" + "---|" * len(models)]
        for craft in models:
            cells = [values.get(f"{craft}->{judge}") for judge in models]
            lines.append(f"| {craft} | " + " | ".join("—" if c is None else f"{100 * c['accuracy']:.1f}"
                                                       for c in cells) + " |")
        lines.append("")
    for name, why in matrix.get("unavailable", {}).items():
        lines.append(f"Not in the matrix: {name} ({why}).")
    return "\n".join(lines).rstrip() + "\n"


def write_matrix(matrix: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "transfer.json", matrix, indent=2)
    write_text_atomic(out / "transfer.md", transfer_markdown(matrix))


def run_transfer_matrix(lfw, models, cfg: Table1Config, *, out_dir, cache_dir=None, workers=None, progress=True,
                        shared: dict | None = None) -> dict:
    """Every (craft, judge) cell over ``models`` with the attack rows of ``cfg`` (its ``model`` and
    ``craft_model`` are set per cell). ``shared[model] = (pairs, net, runner)``: a larger plan's
    chips, model and attack store for that judge (``advface paper`` passes its own). Each cell's
    Table 1 files go to ``out_dir/<craft>_on_<judge>/``; the matrix to ``out_dir/transfer.{json,md}``.
    Returns the matrix with ``work``: pairs attacked by this call per judge (0 when all was cached)."""
    nets, unavailable = available_models(models)
    models = list(nets)
    out = Path(out_dir)
    shared = dict(shared or {})
    reports, attacked = {}, {}
    cfg = replace(cfg, noise_baseline=False)
    for judge in models:
        if judge in shared:
            pairs, net, runner = shared[judge]
        else:
            pairs = prepare_pairs(lfw, judge, policy=InputPolicy(cfg.on_bad, cfg.no_face), pairs_file=cfg.pairs_file,
                                  workers=workers, progress=progress)
            net = nets[judge]
            runner = Runner(pairs, metric=cfg.metric, seed=cfg.seed, model=judge, cache_dir=cache_dir,
                            batch_size=cfg.batch_size, progress=progress)
        before = runner.work["attacked_pairs"]
        for craft in models:
            cell_cfg = replace(cfg, model=judge, craft_model=None if craft == judge else craft)
            reports[(craft, judge)] = run_table1(None, cell_cfg, out_dir=out / f"{craft}_on_{judge}",
                                                 cache_dir=cache_dir, workers=workers, progress=progress,
                                                 pairs=pairs, net=net, runner=runner)
        attacked[judge] = runner.work["attacked_pairs"] - before
    if not reports:
        raise ValueError(f"no model of {list(unavailable)} can be built here: " + "; ".join(unavailable.values()))
    matrix = matrix_from_reports(reports, unavailable)
    matrix["work"] = {"attacked_pairs": attacked}
    write_matrix(matrix, out)
    return matrix


def matrix_from_folder(folder) -> dict:
    """The matrix of a folder of ``<craft>_on_<judge>/table1.json`` runs (``advface attack`` outputs)."""
    root = Path(folder)
    reports = {}
    for path in sorted(root.glob("*_on_*/table1.json")):
        craft, judge = path.parent.name.split("_on_")
        reports[(craft, judge)] = json.loads(path.read_text())
    if not reports:
        raise FileNotFoundError(f"no <craft>_on_<judge>/table1.json under {folder}")
    return matrix_from_reports(reports)


__all__ = ["available_models", "matrix_from_folder", "matrix_from_reports", "resolve_transfer_models",
           "run_transfer_matrix", "transfer_markdown", "write_matrix"]

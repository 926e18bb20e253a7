"""The leaderboard: every defense under one adaptive protocol, with a black-box check.

An entry is (model, defense with its parameters). Its protocol, fixed before any number is seen:

1. **Calibration.** The defended verifier's per-fold thresholds are fitted on CLEAN defended pairs
   (every pair of the dataset, or a balanced ``calibration_pairs`` subset) and never refit; the
   ``none`` entry is the plain model with Table 1's thresholds. Clean accuracy and AUC are the price.
2. **Transfer.** Table 1's queries (FGSM, PGD, C&W on the undefended model at ``eps``, from the
   runner's store: the very queries Table 1 judged) fed to the defended pipeline.
3. **High confidence.** PGD on the undefended model pushed ``kappa`` past its threshold.
4. **BPDA + EOT.** PGD through :class:`~advface_fast.defenses.DefendedModel`: the defense in the
   forward pass, its surrogate (identity by default) in the backward pass, the average over
   ``eot`` fresh draws of a randomised defense. Also at half the steps, and for a randomised
   defense with one draw: the checks compare them. With ``warm_start``, once more begun at the
   queries of the strongest transfer attack (instead of a random start). These rows deliver each pair's
   highest-loss iterate, the start included, by the attacker's own EOT estimate (``best_iterate``),
   and an iterative defense runs in the attacker at its own step count (``copy_steps=None``): a
   reduced copy was much weaker (docs/leaderboard.md). Then the defense's own
   adaptive attacks (``Defense.adaptive_models``, e.g. the counter-attack's gate-aware attacker),
   PGD with ``kappa``.
5. **Square** (score-based black box, L-inf on the uint8 grid) on the defended similarity margin,
   dodging and impersonation, the defense's randomness redrawn at every query; ``square_queries``
   for defenses costing about one forward pass on every pair (or the first ``square_pairs``),
   ``costly_square_queries`` on the first ``costly_square_pairs`` for costlier ones; the model's scores
   from its fp32 fast copy (``square_fast_copy``), the final queries judged by the plain model.

Robust accuracy is the per-pair worst case over every attack (2-5), dodging (matched pairs) and
impersonation (mismatched) shown apart. Checks, stored and printed with the entry: the black-box
attack must not beat the best white-box attack begun from its own start (not the warm-started row,
which inherits transfer's successes) by more than 0.2 points (else: **gradient masking**); more
steps or EOT samples never help the defender; an adaptive attack weaker than transfer is flagged.
An entry whose worst case beats the undefended model's is to be investigated with stronger attacks
before it is reported — and then reported as measured.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..attacks import DEFAULT_ATTACK_BATCH, make_attack
from ..defenses import DefendedModel, adaptive_attack, check_defense, create_defense, parse_defense
from ..environment import environment
from ..fileio import sha256_file, write_json_atomic
from ..models.identity import weights_id
from ..models import get_model_spec
from .defended import DefendedStore
from .defense_context import (Context, DefendConfig, attacked_queries, auc_or_none, calibrate_defense, correct,
                              fit_defense, make_context, query_attack, summarise)
from .adaptive import subset
from .leaderboard_rows import RowLedger, diagnostic_fields, diagnostics_in
from .leaderboard_render import protocol_record, strongest, write_leaderboard
from .runner import Selection

SCHEME = "leaderboard-entry-v1"
DEFAULT_DEFENSES = ("none", "attack-as-defense:attack=pgd,eps=4,steps=10", "jpeg:quality=75", "bit-depth:bits=4",
                    "median:size=3", "gaussian-smoothing:sigma=8,samples=8", "counter-attack:eps=4,steps=2")
MASKING_POINTS = 0.2  # the black-box attack may beat the best white-box one by at most this (accuracy points)


def defense_families(text: str) -> tuple[str, ...]:
    """``--defenses``: "all" (every family at its protocol parameters, DEFAULT_DEFENSES) or a comma list of
    family names, each at those parameters (a registered family not among them: its own defaults).
    Parameters go through ``--defense NAME:param=value,...``, whose commas this list cannot hold."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return DEFAULT_DEFENSES
    defaults = {parse_defense(spec)[0]: spec for spec in DEFAULT_DEFENSES}
    specs = []
    for name in names:
        if name == "all" or any(c in name for c in ":="):
            raise ValueError(f"--defenses takes 'all' or family names ({', '.join(defaults)}), got {name!r}; "
                             "give parameters with --defense NAME:param=value,...")
        specs.append(defaults.get(name) or check_defense(name))
    if not specs:
        raise ValueError("--defenses: no family named")
    return tuple(specs)


def parse_model(spec: str) -> tuple[str, str | None]:
    """``"dlib-resnet"`` -> ("dlib-resnet", None); ``"dlib-resnet@runs/pgd/weights.safetensors"`` -> the
    registry model with those weights (a model-stage entry: an ``advface advtrain`` checkpoint)."""
    name, at, weights = spec.partition("@")
    if at and not weights.strip():
        raise ValueError(f"--models {spec}: give the weights file after '@' (NAME@PATH.safetensors)")
    return name.strip(), (weights.strip() or None)


def model_stage(spec: str, folds) -> dict | None:
    """What a model-stage entry's weights are, from the ``train.json`` beside them (an ``advface
    advtrain`` run): method, eps, steps, epochs, the held-out folds. Refuses (ValueError) to attack
    folds whose identities the model may have been trained on."""
    name, weights = parse_model(spec)
    if weights is None:
        return None
    path = Path(weights)
    if not path.is_file():
        raise ValueError(f"--models {spec}: no weights file {weights}")
    record = {"file": path.name, "run": path.parent.name}
    train = path.parent / "train.json"
    if not train.is_file():
        return {**record, "stage": path.stem, "held_out_folds": None,
                "note": "no train.json beside the weights: the training split is unknown"}
    doc = json.loads(train.read_text())
    c, held = doc.get("config", {}), sorted(doc.get("split", {}).get("test_folds") or [])
    if folds is None or not held or not set(folds) <= set(held):
        raise ValueError(f"--models {spec}: the model was trained outside folds {held or 'unknown'} only; attack "
                         f"those held-out folds (--folds {','.join(map(str, held)) or 'N'}), not {folds or 'all'}")
    stage = f"{c.get('method', '?')}-AT eps={c.get('eps', '?'):g}" if c.get("method") not in (None, "clean") \
        else f"{c.get('method', 'fine-tuned')}"
    return {**record, "stage": stage, "held_out_folds": held,
            "training": {k: c.get(k) for k in ("method", "eps", "steps", "epochs", "seed")}}


def model_label(spec: str, stage: dict | None) -> str:
    name, _ = parse_model(spec)
    return name if stage is None else f"{name} [{stage['stage']}]"


def defense_slug(spec: str) -> str:
    name, params = parse_defense(spec)
    tail = "-".join(f"{k}{'_'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in sorted(params.items()))
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{name}{'-' + tail if tail else ''}")


@dataclass
class LeaderboardConfig:
    models: tuple = ("dlib-resnet",)
    defenses: tuple = DEFAULT_DEFENSES
    folds: tuple | None = (1,)
    max_pairs: int | None = None
    eps: float = 4.0  # the attacker's L-inf budget, 0-255 levels
    attacks: tuple = ("fgsm", "pgd", "cw")  # transfer: Table 1's queries
    attack_steps: int | None = None  # PGD / C&W steps of the transfer attacks (None: Table 1's 40)
    adaptive_steps: int = 20  # BPDA + EOT PGD steps (a half-steps row runs too)
    eot: int = 4  # EOT draws for a randomised defense (deterministic ones: 1)
    copy_steps: int | None = None  # an iterative defense's copy in the attacker (attack-as-defense's K; None: its own)
    warm_start: bool = True  # also BPDA + EOT begun at the strongest transfer attack's queries
    best_iterate: bool = True  # BPDA + EOT rows deliver each pair's highest-loss iterate (PGD(best_iterate=))
    kappa: float = 0.1  # high confidence: past the undefended threshold, cosine units
    square_queries: int = 5000
    costly_square_queries: int = 1000  # for defenses costing more than 2 forward passes per image
    square_pairs: int | None = None  # Square on the first N pairs of the selection (None: all)
    costly_square_pairs: int | None = 100  # and for the costlier defenses on the first N of those (None: all)
    calibration_pairs: int | None = None
    seed: int = 0
    precision: str = "auto"  # gradients of the adaptive attacks and of an attack-as-defense D
    transfer_precision: str = "fp32"  # the transfer queries': Table 1's ('advface attack') default, so they ARE its queries
    fast_model: bool = False  # the undefended model's attacks and Square's queries through its fast copy
    square_fast_copy: bool = True  # Square's queries through the model's fp32 fast copy, where it has one
    batch_size: int = DEFAULT_ATTACK_BATCH
    defense_batch_size: int = 32
    metric: str = "cosine"
    steps_cap: int | None = None  # caps every iteration count (quick runs)
    on_bad: str = "error"
    no_face: str = "center"
    pairs_file: str | None = None
    command: str = ""  # the command line that made it (recorded)

    def defend_config(self, model: str) -> DefendConfig:
        """The shared defense context's config: Table 1's attack settings, so its queries are reused."""
        model, weights = parse_model(model)
        return DefendConfig(model=model, weights=weights, defenses=(), attacks=tuple(self.attacks), eps=(float(self.eps),),
                            attack_steps=self.attack_steps, folds=self.folds, max_pairs=self.max_pairs,
                            metric=self.metric, seed=self.seed, batch_size=self.batch_size,
                            defense_batch_size=self.defense_batch_size, precision=self.precision,
                            fast_model=self.fast_model, calibration_pairs=self.calibration_pairs, steps_cap=self.steps_cap,
                            on_bad=self.on_bad, no_face=self.no_face, pairs_file=self.pairs_file)


def square_oracle(ctx: Context, cfg: LeaderboardConfig):
    """The model whose scores Square's queries read, and its name for the entry: the fast copy the undefended
    model is attacked through (``fast_model``), else with ``square_fast_copy`` the model's fp32 fast copy where
    its family has one (built once per context), else the plain model (None)."""
    if ctx.attacked_net is not ctx.net:
        return ctx.attacked_net, "fast copy (fp32)"
    make_fast = get_model_spec(ctx.cfg.model).make_fast
    if not cfg.square_fast_copy or make_fast is None:
        return None, "plain model"
    if ctx.square_copy is None:
        ctx.square_copy = make_fast(ctx.net)
    return ctx.square_copy, "fast copy (fp32)"


def square_pair_count(cfg: LeaderboardConfig, costly: bool) -> int | None:
    """How many pairs (the first, half matched) Square attacks in an entry: ``square_pairs``, and for a
    defense costing more than two passes per image at most ``costly_square_pairs`` (None: all)."""
    counts = [n for n in (cfg.square_pairs, cfg.costly_square_pairs if costly else None) if n is not None]
    return min(counts) if counts else None


def _cap(n: int, cfg: LeaderboardConfig) -> int:
    return n if cfg.steps_cap is None else max(1, min(n, cfg.steps_cap))


def run_entry(ctx: Context, spec: str, cfg: LeaderboardConfig, *, defended_dir=None, stage: dict | None = None,
              rows_dir=None) -> dict:
    """One leaderboard entry: the protocol of the module docstring for ``spec`` on ``ctx``'s pairs
    (``stage``: the model-stage record of a model with its own weights, :func:`model_stage`;
    ``rows_dir``: the row ledger, :mod:`.leaderboard_rows`, None: none)."""
    t0 = time.perf_counter()
    name, params = parse_defense(spec)
    reserved = sorted(set(params) & {"seed", "batch_size", "precision"})
    if reserved:
        raise ValueError(f"--defense {spec}: {', '.join(reserved)} come from the run (--seed, --precision), not the spec")
    runner, sel, net = ctx.runner, ctx.sel, ctx.net
    defense = create_defense(name, net, seed=cfg.seed, batch_size=cfg.defense_batch_size,
                             **({"precision": cfg.precision} if name == "attack-as-defense" else {}), **params)
    fitted = fit_defense(ctx, defense)  # e.g. the counter-attack's gate, on clean images outside the attacked folds
    if name == "none":
        cal, store = ctx.plain, None  # Table 1's verifier and thresholds, exactly
    else:
        store = DefendedStore(defense, root=defended_dir, align=runner.align_key,
                              progress=ctx.progress and f"{name} ({ctx.cfg.model})")
        ctx.stores.append(store)
        variant = defense.variants[-1]
        cal = calibrate_defense(ctx, store)[variant]
    seed = cfg.seed + 1000  # the attacker's seeds are never the defender's
    embedder = None if defense.attack_model is defense.model else defense.attack_model
    rows, ok = {}, {}  # row name -> summary; row name -> (positions in sel, per-pair correct)
    all_pos = np.arange(len(sel))
    model_name = model_label(ctx.cfg.model, stage)
    defense_config = defense.variant_config(defense.variants[-1]) if name != "none" else defense.config()
    ledger = RowLedger(rows_dir, {
        "model": model_name, "weights": weights_id(net), "data": runner.pairs.dataset.fingerprint,
        "align": runner.align_key, "defense": spec, "defense_config": defense_config,
        "thresholds": {str(k): round(float(v), 6) for k, v in cal.thresholds.items()},
        "protocol": _comparable(asdict(cfg))}, progress=bool(ctx.progress))
    chips = ctx.pairs.chips

    def outcome(queries, s: Selection) -> dict:
        """One piece of a row: the defended verifier's decisions on ``queries`` (None: clean) of ``s``."""
        sim = runner.similarity(cal, s, runner.query_embeddings(cal, s, queries))
        found = {"similarity": sim, "correct": correct(ctx, cal, sim, s)}
        if queries is not None:
            n = max(len(s), 1)
            found.update(seconds=np.full(len(s), queries.seconds / n), image_steps=np.full(len(s), queries.image_steps / n))
        clean = chips.chips[s.query_rows]  # the defense's own record of what it did to these queries
        ids = [chips.ids[r] for r in s.query_rows] if queries is None else [f"{pid}@{queries.key}" for pid in s.pair_ids]
        return {**found, **diagnostic_fields(defense.diagnostic_values(
            clean if queries is None else queries.images(clean), ids))}

    def add(row: str, kind: str, attacked, s: Selection = sel, pos: np.ndarray = all_pos, key: dict | None = None,
            **extra):
        """A row: ``attacked(sub_selection)`` -> its attacked queries (None: the clean row), per pair
        from the ledger where it has them (``key``: the attack's config, part of the row's ledger key),
        computed and recorded one attack batch of pairs at a time (so an interrupted row keeps its finished
        batches). Decisions are taken again from the similarities under this run's thresholds, so a row
        read back is judged as a fresh one."""
        got = outcome(None, s) if attacked is None else \
            ledger.outcome(row, s, lambda p: outcome(attacked(p), p), runner.batch_size, key=key)
        c, diag = correct(ctx, cal, got["similarity"], s), diagnostics_in(got)
        ok[row] = (pos, c)
        rows[row] = {"kind": kind, **summarise(c, s), "auc": auc_or_none(got["similarity"], s.same), **extra,
                     "attack_image_steps_per_pair": None if attacked is None else round(float(got["image_steps"].mean()), 1),
                     "attack_seconds_per_pair": None if attacked is None else round(float(got["seconds"].mean()), 4),
                     **({"defense_diagnostics": defense.summarise_diagnostics(diag)} if diag else {})}

    add("clean", "clean", None)
    eps = float(cfg.eps)
    transfer = {}  # row -> Table 1's attack
    for name_ in cfg.attacks:  # 2. transfer: Table 1's queries
        attack = transfer[f"transfer-{name_}"] = query_attack(ctx, name_, eps, precision=cfg.transfer_precision)
        add(f"transfer-{name_}", "transfer", lambda p, a=attack: attacked_queries(ctx, a, sel=p),
            key={"attack": attack.config()})
    hc = make_attack("pgd", ctx.attacked_net, metric=cfg.metric, eps=eps, seed=seed, precision=cfg.precision,
                     steps=_cap(cfg.attack_steps or 40, cfg), kappa=cfg.kappa)
    add(f"high-confidence (kappa={cfg.kappa:g})", "high-confidence", lambda p: attacked_queries(ctx, hc, sel=p),
        key={"attack": hc.config()})
    # 4. BPDA + EOT through the defense (for `none` this is the white-box attack itself).
    samples = cfg.eot if defense.randomized else 1
    copy = cfg.copy_steps if defense.iterative else None
    full = _cap(cfg.adaptive_steps, cfg)
    bpda, full_attack = {}, None
    best = "" if cfg.best_iterate else ", last iterate"
    for steps, s_ in {(full, samples), (_cap(max(cfg.adaptive_steps // 2, 1), cfg), samples), (full, 1)}:
        attack = adaptive_attack("pgd", defense, eps=eps, samples=s_, copy_steps=copy, seed=seed,
                                 precision=cfg.precision, embedder=embedder, steps=steps,
                                 **({"best_iterate": True} if cfg.best_iterate else {}))
        row = f"bpda-eot (steps={steps}, eot={s_}{best})"
        bpda[row] = (steps, s_)
        add(row, "white-box", lambda p, a=attack: attacked_queries(ctx, a, target=cal, sel=p, extra_key={"adaptive": "bpda-eot"}),
            key={"attack": attack.config()}, attack_steps=steps, eot_samples=s_)
        if (steps, s_) == (full, samples):
            full_attack = attack
    # 4a. Warm start: the full BPDA + EOT attack begun where the strongest transfer attack (the lowest defended
    # accuracy; ties in --attacks order) ended, so the adaptive attacker keeps what transfer already achieved and
    # refines it through the defense (a cold-start BPDA can be weaker than transfer, e.g. through an
    # attack-as-defense D).
    if cfg.warm_start and transfer:
        origin = min(transfer, key=lambda r: rows[r]["accuracy"])
        add(f"bpda-eot from {origin} (steps={full}, eot={samples}{best})", "white-box",
            lambda p: attacked_queries(ctx, full_attack, target=cal, sel=p, extra_key={"adaptive": "bpda-eot"},
                                       start=attacked_queries(ctx, transfer[origin], sel=p)),
            key={"attack": full_attack.config(), "start": {"attack": transfer[origin].config()}},
            attack_steps=full, eot_samples=samples, start=origin)
    # 4b. The defense's own adaptive attacks (e.g. the counter-attack's gate-aware attacker): PGD at the full steps
    # with the high-confidence margin kappa, so that once a pair is kappa past its threshold the step follows the
    # defense's own term (the gate) instead of pushing the similarity further.
    for label, model in defense.adaptive_models(samples=samples, embedder=embedder).items():
        attack = make_attack("pgd", model, metric=cfg.metric, eps=eps, seed=seed, precision=cfg.precision,
                             steps=full, kappa=cfg.kappa)
        add(f"{label} (steps={full}, eot={samples})", "white-box",
            lambda p, a=attack, lb=label: attacked_queries(ctx, a, target=cal, sel=p, extra_key={"adaptive": lb}),
            key={"attack": attack.config()}, attack_steps=full, eot_samples=samples)
    # 5. Square on the defended margin, fresh draws of the defense at every query.
    costly = defense.cost_per_image() > 2
    budget = cfg.costly_square_queries if costly else cfg.square_queries
    if cfg.steps_cap is not None:  # quick runs
        budget = max(1, min(budget, 10 * cfg.steps_cap))
    sq_sel, sq_pos = subset(sel, square_pair_count(cfg, costly))  # the first N/2 matched and N/2 mismatched pairs
    # The deployed pipeline, not the attacker's proxy: the full defense (no reduced copy), the model in fp32, and
    # for a defense that averages draws (gaussian-smoothing) as many draws per query (scores averaged). The
    # model's scores come from its fp32 fast copy (square_fast_copy, the protocol; or with fast_model), the plain
    # model's function up to summation order, through which Square's forward-only queries run 1.4x faster;
    # its final queries are judged by the plain model like every row's.
    embedder_sq, oracle = square_oracle(ctx, cfg)
    deployed = DefendedModel(defense, samples=int(getattr(defense, "samples", 1)), embedder=embedder_sq)
    square = make_attack("square", deployed, metric=cfg.metric, eps=eps, n_queries=budget, seed=seed, precision="fp32",
                         progress=ctx.progress and f"square queries ({name})")
    add(f"square (queries={budget})", "black-box",
        lambda p: attacked_queries(ctx, square, target=cal, sel=p, extra_key={"adaptive": "square"}), sq_sel, sq_pos,
        key={"attack": square.config()}, queries=budget, scores_from=oracle, confirm=square.confirm)
    attacks = [r for r in rows if r != "clean"]
    worst, worst_sq = _worst(ok, attacks, all_pos), _worst(ok, attacks, sq_pos)
    checks = _checks(rows, ok, bpda, sq_pos, reference=name == "none")
    cost = defense.cost_per_image()
    return {
        "scheme": SCHEME, "model": model_name,
        "weights": weights_id(net), **({"model_stage": stage} if stage is not None else {}),
        "defense": {"spec": spec, "name": defense.name, "params": {k: list(v) if isinstance(v, tuple) else v
                                                                    for k, v in params.items()},
                    "config": defense_config,
                    "paper": defense.paper, "randomized": defense.randomized, "bpda": defense.surrogate_name,
                    **({"fit": fitted} if fitted is not None else {})},
        "threat_model": threat_model(cfg),
        "pairs": pairs_record(sel),
        "clean": {**{k: rows["clean"][k] for k in ("accuracy", "accuracy_std", "matched_accuracy",
                                                  "mismatched_accuracy", "auc")},
                  "all_folds_accuracy": float(cal.clean.accuracy_mean), "all_folds_auc": float(cal.clean.auc)},
        "static": {r: rows[r]["accuracy"] for r in rows if rows[r]["kind"] == "transfer"},
        "attacks": rows,
        "worst_case": {**summarise(worst, sel), "over": attacks,
                       "strongest": strongest({"attacks": rows}),  # as the table names them
                       "square_subset": {**summarise(worst_sq, sq_sel)} if len(sq_pos) < len(sel) else None},
        "checks": checks, "flags": [c["message"] for c in checks if not c["ok"]],
        "rows_read_back": ledger.read_back,  # from the row ledger: made by an earlier run (their seconds as measured then)
        "protocol": protocol_record(asdict(cfg)),
        "cost": {"defense_passes_per_query": cost, "attack_budget": {"bpda_steps": _cap(cfg.adaptive_steps, cfg),
                                                                     "eot": samples, "square_queries": budget,
                                                                     "square_pairs": len(sq_sel)}},
        "config": asdict(cfg), "environment": environment(), "wall_seconds": round(time.perf_counter() - t0, 1),
    }


def threat_model(cfg: LeaderboardConfig) -> dict:
    return {"norm": "Linf", "eps": float(cfg.eps), "units": "0-255 levels, holds after uint8 rounding",
            "perturbs": "the query only; the gallery image is defended and fixed", "metric": cfg.metric,
            "thresholds": "clean defended pairs, 10-fold, never refit"}


def pairs_record(sel: Selection) -> dict:
    digest = hashlib.sha256("\n".join(sel.pair_ids).encode()).hexdigest()[:16]
    return {"n": int(len(sel)), "matched": int(sel.same.sum()), "folds": sorted(int(f) for f in np.unique(sel.folds)),
            "ids_sha256": digest}


def _acc(ok: dict, row: str, pos: np.ndarray) -> float:
    p, c = ok[row]
    return float(c[np.searchsorted(p, pos)].mean())


def _worst(ok: dict, rows: list[str], pos: np.ndarray) -> np.ndarray:
    """Per pair of ``pos``: still right under every row that covers it."""
    robust = np.ones(len(pos), dtype=bool)
    for r in rows:
        p, c = ok[r]
        covered = np.isin(pos, p)
        robust[covered] &= c[np.searchsorted(p, pos[covered])]
    return robust


def _checks(rows: dict, ok: dict, bpda: dict, sq_pos: np.ndarray, reference: bool = False) -> list[dict]:
    """The entry's checks; ``reference``: the undefended entry, whose transfer rows are white-box PGD-40 / C&W-40
    themselves (the adaptive-vs-transfer check would compare two white-box attacks of other lengths)."""
    out = []

    def check(name: str, good: bool, message: str, **extra):
        out.append({"check": name, "ok": bool(good), "message": ("ok: " if good else "") + message, **extra})

    square = next(r for r in rows if rows[r]["kind"] == "black-box")
    # gradient attacks through the defense from their own starts: a warm-started row inherits what transfer already
    # broke, which would hide masked gradients from this comparison
    white = [r for r in rows if rows[r]["kind"] == "white-box" and "start" not in rows[r]]
    best_white = min(white, key=lambda r: _acc(ok, r, sq_pos))
    a_sq, a_wb = _acc(ok, square, sq_pos), _acc(ok, best_white, sq_pos)
    masked = a_sq < a_wb - MASKING_POINTS / 100
    check("the black-box attack does not beat the white-box ones", not masked,
          (f"**GRADIENT MASKING**: {square} {100 * a_sq:.1f}% < {best_white} {100 * a_wb:.1f}% "
           f"(by more than {MASKING_POINTS} points)" if masked else
           f"{square} {100 * a_sq:.1f}% vs best white-box {best_white} {100 * a_wb:.1f}%") + f" on {len(sq_pos)} pairs",
          accuracy=[a_wb, a_sq])
    all_pos = ok["clean"][0]
    for a in bpda:
        for b in bpda:
            (sa, ea), (sb, eb) = bpda[a], bpda[b]
            if (sa < sb and ea == eb) or (ea < eb and sa == sb):
                acc_a, acc_b = _acc(ok, a, all_pos), _acc(ok, b, all_pos)
                what = "steps" if sa < sb else "EOT samples"
                good = acc_b <= acc_a + 1e-12
                check(f"more {what} never help the defender", good,
                      ("" if good else "VIOLATED: ") + f"{a} {100 * acc_a:.1f}% -> {b} {100 * acc_b:.1f}%",
                      accuracy=[acc_a, acc_b])
    best_t = min((r for r in rows if rows[r]["kind"] == "transfer"), key=lambda r: rows[r]["accuracy"], default=None)
    strongest = max(bpda, key=lambda r: bpda[r])
    if best_t is not None and not reference:
        acc_t, acc_r = _acc(ok, best_t, all_pos), _acc(ok, strongest, all_pos)
        good = acc_r <= acc_t + 1e-12
        check("the adaptive attack is at least as strong as transfer", good,
              ("" if good else "ADAPTIVE WEAKER THAN TRANSFER (a bug, masked gradients or a weak configuration; "
               "the worst case counts): ") + f"{best_t} {100 * acc_t:.1f}% vs {strongest} {100 * acc_r:.1f}%",
              accuracy=[acc_t, acc_r])
    return out


def _stale(entry: dict) -> str | None:
    """Why an entry an earlier version wrote under the same config must be recomputed (None: it need not).
    Square against a randomised defense once stopped a pair at its first flipped draw; its rows now record
    the search (``confirm``), and an entry without that record is recomputed (its other rows come back from
    the ledger)."""
    if entry.get("defense", {}).get("randomized") and any(
            "confirm" not in r for r in entry.get("attacks", {}).values() if r.get("kind") == "black-box"):
        return "its Square stopped pairs at their first flipped draw (before the randomised search)"
    return None


def _comparable(config: dict) -> dict:
    """A run config as JSON sees it (tuples are lists), without what does not change an entry's numbers.
    A pairs file counts by its content (SHA-256), not by where it lies, while it can be read; a
    recorded path that is gone stays a path (and matches nothing but itself)."""
    out = json.loads(json.dumps(config))
    for key in ("command", "models", "defenses"):
        out.pop(key, None)
    pairs = out.get("pairs_file")
    if pairs and Path(pairs).is_file():
        out["pairs_file"] = "sha256:" + sha256_file(pairs)
    return out


def entry_path(out_dir, model: str, spec: str) -> Path:
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)
    return Path(out_dir) / "entries" / f"{slug}__{defense_slug(spec)}.json"


def run_leaderboard(lfw, cfg: LeaderboardConfig, out_dir, *, cache_dir=None, defended_dir=None, workers=None,
                    progress: bool = True) -> dict:
    """Every (model, defense) entry of ``cfg`` (an entry already written with the same config is
    read back, not recomputed: the run resumes), then LEADERBOARD.md, leaderboard.json and the plot."""
    for spec in cfg.defenses:  # a bad spec fails now, not after the first entries
        check_defense(spec)
    out = Path(out_dir)
    entries = []
    stages = {model: model_stage(model, cfg.folds) for model in cfg.models}  # a bad weights spec fails now
    total = len(cfg.models) * len(cfg.defenses)
    for model in cfg.models:
        ctx, label = None, model_label(model, stages[model])
        for spec in cfg.defenses:
            path = entry_path(out, label, spec)
            if path.is_file():
                old = json.loads(path.read_text())
                stale = _stale(old)
                if stale:
                    _say(progress, f"entry {label} + {spec}: {path.name} is recomputed: {stale}")
                elif old.get("scheme") == SCHEME and old["defense"]["spec"] == spec and \
                        _comparable(old.get("config", {})) == _comparable(asdict(cfg)):
                    entries.append(old)  # done with this very protocol: resumed, not recomputed
                    _say(progress, f"entry {len(entries)}/{total} {label} + {spec}: read back from {path.name}")
                    continue
            _say(progress, f"entry {len(entries) + 1}/{total} {label} + {spec}: computing")
            if ctx is None:
                ctx = make_context(lfw, cfg.defend_config(model), cache_dir=cache_dir, defended_dir=defended_dir,
                                   workers=workers, progress=progress)
            entry = run_entry(ctx, spec, cfg, defended_dir=defended_dir, stage=stages[model], rows_dir=out / "rows")
            write_json_atomic(path, entry)
            entries.append(entry)
            w = entry["worst_case"]
            _say(progress, f"entry {len(entries)}/{total} {label} + {spec}: worst case {100 * w['accuracy']:.1f}% "
                           f"(clean {100 * entry['clean']['accuracy']:.1f}%), {entry['wall_seconds']:,.0f} s"
                           + (f"; flags: {'; '.join(entry['flags'])}" if entry["flags"] else ""))
    return write_leaderboard(entries, out)


def _say(progress: bool, line: str) -> None:
    """One line per entry on stderr (between progress bars), when progress is shown."""
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(f"[leaderboard] {line}", file=sys.stderr)


__all__ = ["DEFAULT_DEFENSES", "LeaderboardConfig", "defense_families", "defense_slug", "model_stage", "parse_defense", "parse_model",
           "run_entry", "run_leaderboard", "square_oracle", "square_pair_count"]

"""The one experiment runner: select pairs -> thresholds per verifier -> rows -> records.

Every table of the project is a declaration on this runner:

* a **verifier** maps aligned chips (uint8 N x H x W x 3) and their ids to float32 embeddings
  (:class:`ModelVerifier` is the plain model; a defense at a step count is another one). It is
  calibrated once: its clean embeddings of every pair image and the LFW k-fold thresholds fitted
  on CLEAN pairs (:func:`advface_fast.metrics.evaluate_embeddings`), then fixed, never refit;
* a **selection** of pairs (folds, optionally the first N balanced), each with a stable pair id;
* a **query condition**: clean, or queries crafted by an attack against a model (matched pairs:
  dodging, mismatched: impersonation; the gallery keeps its clean image). Attacked queries are
  cached per pair id in the on-disk :mod:`advface_fast.store`, keyed by model weights identity,
  data, alignment, metric, per-fold thresholds, attack config and run seed; each pair's attack
  randomness comes from ``derive_seed(run seed, pair id)``. An interrupted run resumes, and
  selections that share pairs share cached results;
* a **row** = (query condition, verifier): similarity of the verifier's query and gallery
  embeddings, judged with the verifier's fixed thresholds (:meth:`Runner.judge`).

**Transfer rows** (queries crafted on model A, judged by model B with B's clean thresholds). A
perturbation lives on one chip: A's chip (its aligner, its size) and B's chip are different
warps of the photo, so a perturbation made on A's chip cannot be added to B's chip as it is
(re-warping it through the photo would resample, i.e. blur, it). The runner therefore works on
ONE chip geometry, the judge's: the pairs are aligned for B, and A sees B's chips through
:class:`ResizedInput` (a differentiable bilinear, antialiased resize of B's chip to A's input size
in front of A). A is calibrated on those chips (its own clean k-fold thresholds and gallery
embeddings there, recorded so that A's clean accuracy on B's geometry is visible), the attack is
the ordinary white-box attack on A through the resize, and the attacked uint8 chip - the very
image B sees - is then judged by B against B's clean gallery embeddings and thresholds. The cost
of this choice: A works on a chip it was not trained on (e.g. dlib-resnet on an MTCNN ArcFace
chip resized to 150), which can lower A's clean accuracy and so the strength of its attacks;
every transfer report carries A's clean accuracy on these chips and A's own (white-box)
accuracy after each attack beside B's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from ..align import make_align_config
from ..attacks import VerificationObjective
from ..cache import default_cache_root
from ..engine import chips_to_tensor, embed_chips
from ..models import get_model_spec
from ..models.identity import weights_id
from ..pair_chips import PairChips
from ..precision import model_device
from ..seeds import derive_seed
from ..store import Store
from ..metrics import VerificationResult, accuracy_with_thresholds, evaluate_embeddings

ROWS_SCHEME = "attack-rows-v2"  # per pair id; v1 (whole-file npz keyed by position) is pruned
EMBEDDINGS_SCHEME = "clean-embeddings-v1"  # the plain model's embedding per chip content id


class Verifier(Protocol):
    """Anything that embeds chips: ``embed(chips uint8 N x H x W x 3, ids) -> float32 N x D``."""

    def embed(self, chips: np.ndarray, ids: list[str]) -> np.ndarray: ...

    def config(self) -> dict: ...


class ResizedInput(torch.nn.Module):
    """``model`` behind a bilinear (antialiased) resize from ``size`` chips to the model's input
    size: lets a model craft (or judge) on another model's chip geometry. Differentiable."""

    def __init__(self, model: torch.nn.Module, size: tuple[int, int]):
        super().__init__()
        self.model = model
        self.size = tuple(int(v) for v in size)
        spec = getattr(model, "spec", None)
        own = spec.input_size if spec is not None else getattr(model, "input_size")
        self.model_size = tuple(int(v) for v in own)
        self.input_size = self.size
        self.name = f"{spec.name if spec is not None else type(model).__name__}@{self.size[0]}x{self.size[1]}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[2:]) != self.model_size:
            images = torch.nn.functional.interpolate(images, size=self.model_size, mode="bilinear",
                                                     align_corners=False, antialias=True)
        return self.model(images)


class ModelVerifier:
    """The plain model in fp32: the undefended verifier."""

    def __init__(self, model: torch.nn.Module, name: str | None = None, batch_size: int = 64,
                 progress: bool | str = False):
        self.model, self.batch_size, self.progress = model, batch_size, progress
        spec = getattr(model, "spec", None)
        self.name = name or (spec.name if spec is not None else type(model).__name__)

    def embed(self, chips: np.ndarray, ids: list[str]) -> np.ndarray:
        return embed_chips(self.model, chips, batch_size=self.batch_size, progress=self.progress)

    def config(self) -> dict:
        return {"kind": "model", "model": self.name, "weights": weights_id(self.model)}


@dataclass
class Selection:
    """The pairs a table is computed on (positions in the dataset's pair list and their data)."""

    index: np.ndarray
    same: np.ndarray
    folds: np.ndarray
    pair_ids: list[str]  # "<query id>|<gallery id>": seeds and cache items are keyed by it
    query_rows: np.ndarray  # chip rows
    gallery_rows: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    def take(self, positions) -> "Selection":
        """The pairs at ``positions`` (in that order)."""
        pos = np.asarray(positions, dtype=np.int64)
        return Selection(index=self.index[pos], same=self.same[pos], folds=self.folds[pos],
                         pair_ids=[self.pair_ids[i] for i in pos], query_rows=self.query_rows[pos],
                         gallery_rows=self.gallery_rows[pos])


@dataclass
class Calibration:
    """A verifier fitted on clean pairs: its embedding of every chip and its per-fold thresholds."""

    verifier: object
    embeddings: np.ndarray  # float32, one row per chip row of PairChips.chips
    clean: VerificationResult  # k-fold result on clean pairs (all folds of the dataset)
    metric: str

    @property
    def thresholds(self) -> dict[int, float]:
        """Per-fold thresholds in the metric's native units (fitted on the other folds)."""
        return self.clean.threshold_map()

    def similarity_thresholds(self, folds: np.ndarray) -> np.ndarray:
        """Each pair's threshold in the similarity convention (L2: negated distance)."""
        t = np.array([self.thresholds[int(f)] for f in folds])
        return t if self.metric == "cosine" else -t


@dataclass
class AttackedQueries:
    """Queries of a selection after an attack: perturbation, fp32 embedding by the decision model,
    and what the attack cost for these pairs (each batch's cost shared equally by its pairs)."""

    delta: np.ndarray  # int16 N x H x W x 3: attacked chip - clean chip
    embeddings: np.ndarray  # float32 N x D, by the decision model (the model the attack targeted, fp32)
    decision: dict  # the decision model's verifier config
    seconds: float = 0.0
    image_steps: int = 0
    image_steps_full: int = 0
    key: str = ""
    stats: dict = field(default_factory=dict)

    def images(self, clean: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """The attacked uint8 chips, given the clean query chips of the selection (or of its
        positions ``rows``)."""
        delta = self.delta if rows is None else self.delta[rows]
        return (clean.astype(np.int16) + delta).astype(np.uint8)  # delta: int8 or int16


class Runner:
    """Pairs of one dataset, aligned for one model, and the experiments run on them."""

    def __init__(self, pairs: PairChips, *, metric: str = "cosine", seed: int = 0, model: str = "dlib-resnet",
                 cache_dir: str | Path | None = None, batch_size: int = 32, progress: bool = True):
        self.pairs, self.metric, self.seed, self.model = pairs, metric, seed, model
        self.batch_size, self.progress = batch_size, progress
        self.objective = VerificationObjective(metric)
        self.store = Store(Path(cache_dir) if cache_dir else default_cache_root() / "attacks", kind=ROWS_SCHEME)
        self.align_key = make_align_config(get_model_spec(model).alignment).key()
        self.work = {"attack_batches": 0, "attacked_pairs": 0}  # attack work actually done (not cached)

    # -- 1. selection ---------------------------------------------------------------------------

    def select(self, folds=None, max_pairs: int | None = None) -> Selection:
        """The pairs of ``folds`` (1-based; None: all), optionally the first ``max_pairs``, half
        matched and half mismatched."""
        pairs = self.pairs
        idx = np.arange(len(pairs))
        if folds is not None:
            idx = idx[np.isin(pairs.folds, list(folds))]
        if max_pairs is not None and max_pairs < len(idx):
            same = idx[pairs.same[idx]][: (max_pairs + 1) // 2]
            diff = idx[~pairs.same[idx]][: max_pairs // 2]
            idx = np.sort(np.concatenate([same, diff]))
        if len(idx) == 0:
            raise ValueError(f"no pairs selected (folds={folds}, max_pairs={max_pairs})")
        dataset_pairs = pairs.dataset.pairs
        return Selection(index=idx, same=pairs.same[idx], folds=pairs.folds[idx],
                         pair_ids=[f"{dataset_pairs[i].a}|{dataset_pairs[i].b}" for i in idx],
                         query_rows=pairs.query[idx], gallery_rows=pairs.gallery[idx])

    # -- 2. thresholds ----------------------------------------------------------------------------

    def calibrate(self, verifier: Verifier) -> Calibration:
        """The verifier's embedding of every chip and its k-fold thresholds on clean pairs."""
        chips = self.pairs.chips
        if isinstance(verifier, ModelVerifier):  # clean embeddings: once per chip, on disk
            emb = self.clean_embeddings(verifier)
        else:
            emb = np.asarray(verifier.embed(chips.chips, list(chips.ids)), dtype=np.float32)
        clean = evaluate_embeddings(emb[self.pairs.query], emb[self.pairs.gallery], self.pairs.same, self.pairs.folds,
                                    metric=self.metric)
        return Calibration(verifier=verifier, embeddings=emb, clean=clean, metric=self.metric)

    def clean_embeddings(self, verifier: ModelVerifier, chunk: int = 512) -> np.ndarray:
        """The plain model's fp32 embedding of every chip, from the on-disk store (entry keyed by
        the model's weights, alignment and batch size; items by chip content id); only missing
        chips are embedded, chunk by chunk (an interrupted run keeps every finished chunk)."""
        chips = self.pairs.chips
        entry = Store(self.store.root.parent / "embeddings", kind=EMBEDDINGS_SCHEME).entry(
            {"scheme": EMBEDDINGS_SCHEME, **verifier.config(), "align": self.align_key,
             "batch_size": verifier.batch_size})
        have = set(entry.read().ids)
        todo = [i for i, cid in enumerate(chips.ids) if cid not in have]
        for start in range(0, len(todo), chunk):
            rows = np.array(todo[start : start + chunk])
            ids = [chips.ids[r] for r in rows]
            entry.append(ids, {"embedding": np.asarray(verifier.embed(chips.chips[rows], ids), dtype=np.float32)})
        if todo:
            entry.compact()
        return entry.read().take(list(chips.ids), "embedding")

    # -- 3. query conditions ----------------------------------------------------------------------

    def attack_queries(self, attack, target: Calibration, sel: Selection, decision_model: torch.nn.Module,
                       extra_key: dict | None = None, decision_name: str | None = None,
                       start: AttackedQueries | None = None) -> AttackedQueries:
        """Attack the query of every selected pair against ``target``'s thresholds and clean
        gallery embeddings (cached per pair id; only missing pairs are computed).

        ``start``: queries of the same selection (e.g. a transfer attack's) that the attack begins
        from (a warm start, ``Attack(start=)``); their store key enters this attack's key.

        ``attack`` perturbs through its own model (e.g. a fast copy); the delivered uint8-grid
        queries are embedded by ``decision_model`` in fp32. ``decision_name``: the decision model's
        name when it is not the runner's model (transfer: the crafting model, see the module docstring).
        """
        decision = ModelVerifier(decision_model, decision_name or self.model).config()
        config = dict(scheme=ROWS_SCHEME, model=self.model, weights=decision["weights"],
                      data=self.pairs.dataset.fingerprint, align=self.align_key, metric=self.metric, seed=self.seed,
                      thresholds={str(k): round(float(v), 12) for k, v in target.thresholds.items()},
                      attack=attack.config(), **(extra_key or {}))
        if start is not None:
            if len(start.delta) != len(sel):
                raise ValueError(f"start queries cover {len(start.delta)} pairs, the selection {len(sel)}")
            config["start"] = start.key
        entry = self.store.entry(config)
        done = set(entry.read().ids)
        todo = [i for i, pid in enumerate(sel.pair_ids) if pid not in done]
        chips = self.pairs.chips.chips
        device = model_device(decision_model)
        gallery = torch.from_numpy(target.embeddings[sel.gallery_rows])
        thr_sim = target.similarity_thresholds(sel.folds)
        bar = tqdm(total=len(todo), desc=_describe(attack), unit="pair", leave=False,
                   disable=not self.progress or not todo)
        for at in range(0, len(todo), self.batch_size):
            batch = np.array(todo[at : at + self.batch_size])
            t0 = time.perf_counter()
            clean = chips[sel.query_rows[batch]]
            queries = chips_to_tensor(clean, device)
            first = None if start is None else chips_to_tensor(start.images(clean, batch), device)
            x_adv = attack(queries, gallery[batch], torch.from_numpy(sel.same[batch]),
                           torch.from_numpy(thr_sim[batch]).float(),
                           sample_seeds=[derive_seed(self.seed, sel.pair_ids[i]) for i in batch], start=first)
            with torch.no_grad():  # decisions in fp32 on the delivered (uint8-grid) images
                emb = decision_model(x_adv).float()
                sim = self.objective.similarity(emb, gallery[batch].to(device))
            adv = _to_uint8(x_adv)
            seconds = time.perf_counter() - t0
            n = len(batch)
            cost = {"seconds": seconds, "image_steps": int(attack.last_stats["image_steps"]),
                    "image_steps_full": int(attack.last_stats["image_steps_full"])}
            self.work["attack_batches"] += 1
            self.work["attacked_pairs"] += n
            # int8 where the perturbation fits (every L-inf attack up to eps 127): half the bytes to
            # write and compress; batches written uncompressed, compressed once when the row compacts
            delta = adv.astype(np.int16) - clean.astype(np.int16)
            entry.append([sel.pair_ids[i] for i in batch],
                         {"delta": delta.astype(np.int8) if np.abs(delta).max(initial=0) <= 127 else delta,
                          "embedding": emb.cpu().numpy().astype(np.float32),
                          "sim": sim.cpu().double().numpy(),
                          # the batch's cost, shared equally by its pairs (so any selection sums its own)
                          **{f"cost_{k}": np.full(n, v / n, dtype=np.float64) for k, v in cost.items()}},
                         stats=cost)
            bar.update(len(batch))
        bar.close()
        entry.compact()  # also after an interrupted run whose batches were all written: one compressed chunk
        items = entry.read()

        def cost(name: str) -> float:
            return float(items.take(sel.pair_ids, f"cost_{name}").sum())

        return AttackedQueries(delta=items.take(sel.pair_ids, "delta"), embeddings=items.take(sel.pair_ids, "embedding"),
                               decision=decision, seconds=cost("seconds"), image_steps=round(cost("image_steps")),
                               image_steps_full=round(cost("image_steps_full")), key=entry.key, stats=items.stats)

    # -- 4. rows ----------------------------------------------------------------------------------

    def query_embeddings(self, cal: Calibration, sel: Selection, queries: AttackedQueries | None) -> np.ndarray:
        """The verifier's embeddings of the selection's queries under a condition (None: clean)."""
        if queries is None:
            return cal.embeddings[sel.query_rows]
        if hasattr(cal.verifier, "config") and cal.verifier.config() == queries.decision:
            return queries.embeddings  # already embedded by this very verifier when the attack ran
        images = queries.images(self.pairs.chips.chips[sel.query_rows])
        ids = [f"{pid}@{queries.key}" for pid in sel.pair_ids]
        return np.asarray(cal.verifier.embed(images, ids), dtype=np.float32)

    def similarity(self, cal: Calibration, sel: Selection, query_emb: np.ndarray) -> np.ndarray:
        """float64 similarities (higher = same) of query embeddings to the verifier's gallery ones."""
        gallery = torch.from_numpy(np.ascontiguousarray(cal.embeddings[sel.gallery_rows]))
        return self.objective.similarity(torch.from_numpy(np.ascontiguousarray(query_emb)), gallery).numpy().astype(np.float64)

    def judge(self, cal: Calibration, sel: Selection, sim: np.ndarray):
        """Accuracy of similarities ``sim`` under the verifier's fixed clean thresholds."""
        native = sim if self.metric == "cosine" else -sim
        return accuracy_with_thresholds(native, sel.same, sel.folds, cal.thresholds, metric=self.metric)


def _describe(attack) -> str:
    cfg = attack.config()
    return f"{cfg.get('name', type(attack).__name__)} eps={cfg.get('eps', 0):g}"


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """N x 3 x H x W floats in [0, 1] -> N x H x W x 3 uint8."""
    return (x.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


__all__ = ["AttackedQueries", "Calibration", "ModelVerifier", "ROWS_SCHEME", "ResizedInput", "Runner", "Selection",
           "Verifier"]

"""One gallery worker: the model, the defender D and the aligner, turning a shard of image refs
into shard bytes (:func:`advface_fast.jobs.shard_store.encode_shard`).

``GalleryConfig`` is the job's picklable description (what a torchrun rank or a Ray task needs to
rebuild the worker); ``store_config()`` is what the store records and checks on every rerun.

Bad input follows the input policy every command shares (``--on-bad``, ``--no-face``;
:mod:`advface_fast.data.policy`), recorded in the store's config. A bad file (missing, 0-byte,
truncated or undecodable, unsupported format, not RGB, a chip of the wrong size with ``--aligned``)
gets a ``bad`` row with the reason (on_bad "skip") or stops the job with an error naming it ("error";
"convert" converts grayscale / palette / CMYK / alpha images to RGB, alpha onto white, and stops on
the rest). An image where no detector finds a face gets a ``no_face`` row (no_face "skip"), is
embedded on the fixed centre box ("center") or stops the job ("error"). Conversions and centre boxes
are said in the ok row's error column.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from ..data.errors import DataError, bad_input_error
from ..data.images import conversion_note, decode_image, probe_image
from ..data.policy import InputPolicy
from ..precision import resolve_precision
from .shard_store import encode_shard
from .sources import ImageRef, is_image_name

STORE_FORMAT = 1


@dataclass(frozen=True)
class GalleryConfig:
    """What a gallery job computes (everything but where the images are and where the store is)."""

    model: str = "dlib-resnet"
    defense: str = "pgd"
    eps: float = 4.0
    steps: int = 40
    objective: str = "away-from-self"
    seed: int = 0
    aligned: bool = False
    shard_size: int = 256
    batch_size: int = 32
    precision: str = "auto"  # D's gradients: auto = bf16 where the hardware has it (resolved by the worker)
    save_chips: bool = False
    on_bad: str = "error"  # input rules (data.policy.InputPolicy): error | skip | convert
    no_face: str = "center"  # error | skip | center

    def __post_init__(self):
        InputPolicy(on_bad=self.on_bad, no_face=self.no_face)  # a clear error for an unknown choice

    @property
    def policy(self) -> InputPolicy:
        return InputPolicy(on_bad=self.on_bad, no_face=self.no_face)

    def to_dict(self) -> dict:
        return asdict(self)


class ShardWorker:
    """Builds the model (``model_factory`` or the registry) and D once; computes shards."""

    def __init__(self, config: GalleryConfig, device: str | torch.device | None = None,
                 model_factory: Callable[[], torch.nn.Module] | None = None):
        from ..defenses import DEFENSE_ATTACKS, defense_from_spec, make_defense
        from ..models import create_model
        from ..models.identity import weights_id

        self.device = torch.device(device or "cpu")
        # "auto" is resolved here, so the store records the precision D really ran in (and a rerun on
        # a machine where auto means something else is refused as a changed config, not mixed in).
        self.config = c = replace(config, precision=resolve_precision(config.precision, self.device))
        self.model = (model_factory() if model_factory else create_model(c.model)).to(self.device).eval()
        self.model.requires_grad_(False)
        spec = getattr(self.model, "spec", None)
        if spec is None and model_factory is None:
            from ..models import get_model_spec

            spec = get_model_spec(c.model)
        if spec is None:
            raise ValueError("the model needs a .spec (a ModelSpec: its input size and aligner)")
        self.input_size = tuple(spec.input_size)
        if c.defense in DEFENSE_ATTACKS:
            # D exactly as `advface defend` builds (and calibrates) it: bf16 through the model's fast copy.
            self.defense = make_defense(self.model, c.defense, c.eps, (c.steps,), spec=spec, objective=c.objective,
                                        seed=c.seed, precision=c.precision, batch_size=c.batch_size)
            self.generic, self.variant = False, c.steps
        else:  # any registered defense (or package.module:factory) by its spec, e.g. "jpeg:quality=75"
            self.defense = defense_from_spec(c.defense, self.model, seed=c.seed, batch_size=c.batch_size)
            if self.defense.needs_fit():
                raise ValueError(f"--defense {c.defense}: this defense fits a parameter on clean images; give it in "
                                 "the spec (e.g. counter-attack:tau=0.02, the value a leaderboard entry records)")
            self.generic, self.variant = True, self.defense.variants[-1]
        if c.aligned:
            self.align_key, self._make_aligner = "aligned chips (--aligned)", None
        else:  # the model's aligner as every command uses it: a faceless image gets the centre box (path "center")
            from ..align import make_align_config

            align = make_align_config(spec.alignment)
            self.align_key, self._make_aligner = align.key(), align.make_aligner
        self._local = threading.local()
        self.weights_sha256 = weights_id(self.model)

    def store_config(self) -> dict:
        """What every row of the store depends on; a rerun must present the same (ids_sha256 and
        n_images are added by the job)."""
        c = self.config
        return {"format": STORE_FORMAT, "model": c.model, "weights_sha256": self.weights_sha256,
                "defense": self.defense.variant_config(self.variant), "seed": c.seed,
                "alignment": {"aligned": c.aligned, "aligner": self.align_key}, "shard_size": c.shard_size,
                "save_chips": c.save_chips, "input": c.policy.to_dict(), "options": c.to_dict()}

    # -- decoding (runs in background threads) ----------------------------------------------------

    def load(self, ref: ImageRef) -> tuple[np.ndarray | None, str, str | None]:
        """(chip or None, status, error) of one image, by the input policy: a bad file is a ``bad`` row
        or a DataError naming it, a faceless image a ``no_face`` row, a centre-box chip or a DataError."""
        try:
            image, note = self._decode(ref)
            if self._make_aligner is None:  # a chip of another size was refused by _decode
                return image, "ok", note
            aligner = getattr(self._local, "aligner", None)
            if aligner is None:
                aligner = self._local.aligner = self._make_aligner()
            try:
                chip, path = aligner.align(image)
            except Exception as err:  # noqa: BLE001 - bad input must not pass as a crash
                raise DataError(f"alignment failed ({type(err).__name__}: {err})") from None
        except DataError as err:
            return self._bad(ref, err.reason)
        if path != "center":
            return chip, "ok", note
        if self.config.no_face == "skip":
            return None, "no_face", "no face detected"
        if self.config.no_face == "error":
            raise DataError("no face detected; use --no-face skip to give it a no_face row, or --no-face center "
                            "to embed its centre box", file=ref.path)
        return chip, "ok", "; ".join(filter(None, [note, "no face detected: the centre box is embedded"]))

    def check(self, ref: ImageRef) -> None:
        """The cheap part of load (name, header and tail; no decoding or alignment): a DataError now
        for a file load would refuse (on_bad "error" / "convert"), so the job can stop before any work."""
        try:
            if not is_image_name(ref.path):
                raise DataError(_unsupported(ref.path))
            probe_image(ref.path, name=ref.path, convert=self.config.on_bad == "convert", size=self._chip_size)
        except DataError as err:
            self._bad(ref, err.reason)

    def _decode(self, ref: ImageRef) -> tuple[np.ndarray, str | None]:
        """(uint8 RGB image, what conversion was made or None); a DataError for a file it cannot use."""
        if not is_image_name(ref.path):
            raise DataError(_unsupported(ref.path))
        # decode_image turns every failure (a decoder's exception, a decompression bomb, a chip of the
        # wrong size with --aligned) into a DataError naming the file
        d = decode_image(ref.path, name=ref.path, convert=self.config.on_bad == "convert", size=self._chip_size)
        return d.array, (None if d.mode == "RGB" else f"converted {conversion_note(d.mode, d.alpha)}")

    # what the one-line error for a bad image suggests (advface match says its own: it has no --on-bad)
    bad_remedy = "use --on-bad skip to give it a bad row and go on"
    suggest_convert = True

    @property
    def _chip_size(self) -> tuple[int, int] | None:
        """(height, width) every image must have with --aligned (checked from the header), else None."""
        return self.input_size if self._make_aligner is None else None

    def _bad(self, ref: ImageRef, reason: str) -> tuple[None, str, str]:
        """A ``bad`` row (on_bad "skip"), else the one-line error naming the file."""
        if self.config.on_bad == "skip":
            return None, "bad", reason
        raise bad_input_error([DataError(reason, file=ref.path)], self.bad_remedy,
                              convert_hint=self.suggest_convert and self.config.on_bad != "convert")

    # -- the model side --------------------------------------------------------------------------

    def compute(self, k: int, refs: list[ImageRef], loaded: list, config_sha: str) -> tuple[bytes, dict]:
        """Shard ``k`` from its decoded images: (shard bytes, stats)."""
        t0 = time.perf_counter()
        rows, chips, ids = [], [], []
        for ref, (chip, status, error) in zip(refs, loaded):
            if status == "ok":
                rows.append([ref.id, len(chips), "ok", error])
                chips.append(chip)
                ids.append(ref.id)
            else:
                rows.append([ref.id, None, status, error])
        image_steps = 0
        if chips:
            x = torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float().div_(255.0).to(self.device)
            emb, defended, image_steps = self.defended(x, ids, images=self.config.save_chips)
            out_chips = (torch.round(defended * 255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
                         if self.config.save_chips else None)
        else:
            emb, out_chips = np.zeros((0, 0), np.float32), None
            if self.config.save_chips:
                out_chips = np.zeros((0, 0, 0, 3), np.uint8)
        data = encode_shard(k, config_sha, rows, emb, out_chips)
        return data, {"images": len(refs), "ok": len(chips), "image_steps": image_steps,
                      "useful_image_steps": len(chips) * self.useful_steps_per_image(),
                      "seconds": time.perf_counter() - t0}

    def defended(self, x: torch.Tensor, ids: list[str], images: bool = False):
        """(fp32 embeddings N x D numpy, the defended images or None, image-steps spent). Attack-as-defense:
        D's images embedded by the plain model; any other defense: its own ``embed`` (e.g. averaged draws),
        and with ``images`` one draw of its transform (what ``--save-chips`` keeps)."""
        if not self.generic:
            defended = self.defense.defend(x, ids)[self.config.steps]
            return self.embed(defended).numpy(), defended, self.defense.last_stats["image_steps"]
        d = self.defense
        emb = d.embed(x, ids)[self.variant].numpy().astype(np.float32)
        steps = d.last_stats["image_steps"]
        return emb, (d.transform(x, d.seeds(ids)).detach() if images else None), steps

    def useful_steps_per_image(self) -> float:
        if self.generic:
            return self.defense.cost_per_image()
        return self.defense.image_steps_per_image(self.config.steps)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 embeddings of defended images, every batch padded to ``batch_size`` (a row never
        depends on its batch mates or the batch size torch saw)."""
        from ..attacks.base import eval_mode
        from ..defenses.base import pad_batch

        b = self.config.batch_size
        out = []
        with torch.no_grad(), eval_mode(self.model):
            for start in range(0, x.shape[0], b):
                chunk = x[start : start + b]
                out.append(self.model(pad_batch(chunk, b)).float()[: chunk.shape[0]].cpu())
        return torch.cat(out)


def _unsupported(path: str) -> str:
    return f"unsupported format ({path.rsplit('.', 1)[-1] if '.' in path else 'no suffix'})"


__all__ = ["GalleryConfig", "ShardWorker"]

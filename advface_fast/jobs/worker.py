"""One gallery worker: the model, the defender D and the aligner, turning a shard of image refs
into shard bytes (:func:`advface_fast.jobs.shard_store.encode_shard`).

``GalleryConfig`` is the job's picklable description (what a torchrun rank or a Ray task needs to
rebuild the worker); ``store_config()`` is what the store records and checks on every rerun.

Bad input never stops a shard: every image gets a row. Statuses: ``ok`` (embedded), ``bad``
(missing, 0-byte, truncated or undecodable file, unsupported format, a chip of the wrong size with
``--aligned``), ``no_face`` (no detector found a face; the centre box is never used for a gallery).
Grayscale, palette, CMYK or alpha images are converted to RGB (alpha onto white) and embedded; their
row says so in its error column.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from ..data.errors import DataError
from ..data.images import read_image
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

    def to_dict(self) -> dict:
        return asdict(self)


def _aligner_of(spec):
    """(key, factory) of the model's aligner without the centre-box fallback: a gallery image
    without a face gets a ``no_face`` row instead of an embedding of a guessed box."""
    align = dict(spec.alignment)
    if align.get("aligner", "dlib") == "mtcnn":
        from ..align.mtcnn import MtcnnAligner, MtcnnConfig

        cfg = MtcnnConfig(**{k: v for k, v in align.items() if k != "aligner"})
        return cfg.key(), lambda: MtcnnAligner(cfg)
    if align.get("aligner", "dlib") != "dlib":
        raise ValueError(f"model {spec.name}: aligner {align['aligner']!r} is not supported by gallery jobs; "
                         "align the images yourself and pass --aligned")
    from ..align import AlignConfig, DlibAligner

    cfg = AlignConfig(**{k: v for k, v in align.items() if k != "aligner"}, detector_chain=("hog", "cnn"))
    return cfg.key(), lambda: DlibAligner(cfg)


class ShardWorker:
    """Builds the model (``model_factory`` or the registry) and D once; computes shards."""

    def __init__(self, config: GalleryConfig, device: str | torch.device | None = None,
                 model_factory: Callable[[], torch.nn.Module] | None = None):
        from ..defenses import make_defense
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
        # D exactly as `advface defend` builds (and calibrates) it: bf16 through the model's fast copy.
        self.defense = make_defense(self.model, c.defense, c.eps, (c.steps,), spec=spec, objective=c.objective,
                                    seed=c.seed, precision=c.precision, batch_size=c.batch_size)
        if c.aligned:
            self.align_key, self._make_aligner = "aligned chips (--aligned)", None
        else:
            self.align_key, self._make_aligner = _aligner_of(spec)
        self._local = threading.local()
        self.weights_sha256 = weights_id(self.model)

    def store_config(self) -> dict:
        """What every row of the store depends on; a rerun must present the same (ids_sha256 and
        n_images are added by the job)."""
        c = self.config
        return {"format": STORE_FORMAT, "model": c.model, "weights_sha256": self.weights_sha256,
                "defense": self.defense.step_config(c.steps), "seed": c.seed,
                "alignment": {"aligned": c.aligned, "aligner": self.align_key}, "shard_size": c.shard_size,
                "save_chips": c.save_chips, "options": c.to_dict()}

    # -- decoding (runs in background threads) ----------------------------------------------------

    def load(self, ref: ImageRef) -> tuple[np.ndarray | None, str, str | None]:
        """(chip or None, status, error) of one image; never raises for bad input."""
        if not is_image_name(ref.path):
            return None, "bad", f"unsupported format ({ref.path.rsplit('.', 1)[-1] if '.' in ref.path else 'no suffix'})"
        try:
            image, mode = read_image(ref.path, convert=True)
        except DataError as err:
            return None, "bad", err.reason
        except Exception as err:  # noqa: BLE001 - bad input must never stop the job
            return None, "bad", f"cannot decode ({type(err).__name__}: {err})"
        if self._make_aligner is None:
            if image.shape[:2] != self.input_size:
                h, w = self.input_size
                return None, "bad", f"chip is {image.shape[0]}x{image.shape[1]}, expected {h}x{w} (--aligned)"
            return image, "ok", self._note(mode)
        aligner = getattr(self._local, "aligner", None)
        if aligner is None:
            aligner = self._local.aligner = self._make_aligner()
        from ..align import NoFaceError

        try:
            chip, _ = aligner.align(image)
        except NoFaceError:
            return None, "no_face", "no face detected"
        except Exception as err:  # noqa: BLE001
            return None, "bad", f"alignment failed ({type(err).__name__}: {err})"
        return chip, "ok", self._note(mode)

    @staticmethod
    def _note(mode: str) -> str | None:
        """An ok row's error column says when the image was converted to RGB (grayscale, CMYK, ...)."""
        return None if mode == "RGB" else f"converted from mode {mode} to RGB"

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
            defended = self.defense.defend(x, ids)[self.config.steps]
            image_steps = self.defense.last_stats["image_steps"]
            emb = self.embed(defended).numpy()
            out_chips = (torch.round(defended * 255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
                         if self.config.save_chips else None)
        else:
            emb, out_chips = np.zeros((0, 0), np.float32), None
            if self.config.save_chips:
                out_chips = np.zeros((0, 0, 0, 3), np.uint8)
        data = encode_shard(k, config_sha, rows, emb, out_chips)
        return data, {"images": len(refs), "ok": len(chips), "image_steps": image_steps,
                      "useful_image_steps": len(chips) * self.defense.image_steps_per_image(self.config.steps),
                      "seconds": time.perf_counter() - t0}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 embeddings of defended images, every batch padded to ``batch_size`` (a row never
        depends on its batch mates or the batch size torch saw)."""
        from ..attacks.base import eval_mode

        b = self.config.batch_size
        out = []
        with torch.no_grad(), eval_mode(self.model):
            for start in range(0, x.shape[0], b):
                chunk = x[start : start + b]
                n = chunk.shape[0]
                if n < b:
                    chunk = torch.cat([chunk, chunk[-1:].expand(b - n, *chunk.shape[1:])])
                out.append(self.model(chunk).float()[:n].cpu())
        return torch.cat(out)


__all__ = ["GalleryConfig", "ShardWorker"]

"""The training loop: batches in a seeded order, one method step per batch, checkpoints, logs.

Determinism. The image order of epoch e is a permutation drawn from
``derive_seed(seed, "order:<e>")`` and image i's attack randomness in epoch e from
``derive_seed(seed, "<image id>:<e>")``: nothing depends on how many steps ran before in this
process, so a run resumed from a checkpoint (weights, optimiser state, RNG state, epoch / batch
position, the unfinished epoch's running sums) continues exactly as the uninterrupted run
(tested bit for bit on a tiny model).

Outputs in ``out_dir``: ``checkpoint.safetensors`` (the latest; see :mod:`.checkpoint`),
``log.jsonl`` (one line per finished epoch: loss, clean and robust training accuracy, images,
seconds, image-steps), ``weights.safetensors`` (the model's weights only, loadable with
``create_model(name, weights=PATH)``) and ``train.json`` (config, split, cost, history).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..engine import chips_to_tensor
from ..fileio import atomic_write, write_json_atomic, write_text_atomic
from ..precision import model_device, resolve_precision
from ..seeds import derive_seed
from .checkpoint import load_checkpoint, save_checkpoint
from .head import CosFaceHead
from .methods import StepResult, make_method

CHECKPOINT = "checkpoint.safetensors"
WEIGHTS = "weights.safetensors"


class CheckpointExists(FileExistsError, ValueError):
    """train(resume=False) into a folder that holds a checkpoint. A ValueError too, so a command line
    shows it as its one-line error (``advface advtrain`` itself always resumes: see run.run_advtrain)."""


@dataclass(frozen=True)
class TrainConfig:
    method: str = "pgd"  # clean | pgd | fgsm-rs | free
    eps: float = 4.0  # L-inf budget, 0-255 units
    steps: int = 5  # PGD steps (free AT: replays per batch); fgsm-rs uses 1
    alpha: float | None = None  # step size, 0-255 units (None: 2.5 eps / K for PGD, 1.25 eps for FGSM-RS)
    epochs: int = 1
    batch_size: int = 32
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-5  # AdamW; 1e-4 wrecked the pretrained dlib-resnet within one epoch (clean train acc 35% -> 10%)
    weight_decay: float = 5e-4
    momentum: float = 0.9  # sgd only
    scale: float = 30.0  # CosFace s
    margin: float = 0.35  # CosFace m
    head_lr: float | None = None  # the head's learning rate (None: 10 x lr)
    seed: int = 0
    precision: str = "auto"  # attack gradients: fp32 | bf16 | auto; the update is always fp32


def make_optimizer(cfg: TrainConfig, model, head) -> torch.optim.Optimizer:
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr},
              {"params": list(head.parameters()), "lr": cfg.head_lr if cfg.head_lr is not None else 10 * cfg.lr}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use adamw or sgd")


def make_head(cfg: TrainConfig, model, chips: np.ndarray, labels: np.ndarray, batch_size: int = 64) -> CosFaceHead:
    """The CosFace head, its class weights started at the model's mean class embeddings (fp32)."""
    n_classes = int(labels.max()) + 1
    device = model_device(model)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        emb = torch.cat([model(chips_to_tensor(chips[i:i + batch_size], device)).float()
                         for i in range(0, len(chips), batch_size)])
    model.train(was_training)
    head = CosFaceHead(emb.shape[1], n_classes, scale=cfg.scale, margin=cfg.margin).to(device)
    head.init_from_embeddings(emb, torch.as_tensor(labels, device=device))
    return head


def save_weights(model, path, meta: dict | None = None) -> Path:
    """The model's weights as safetensors (atomic), for ``create_model(name, weights=path)``."""
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata={"advface": json.dumps(meta or {})})
    return Path(path)


class _EpochSums:
    keys = ("loss_sum", "n", "clean_correct", "robust_correct", "attack_image_steps", "update_passes",
            "attack_seconds", "update_seconds", "monitor_seconds", "batches")

    def __init__(self, d: dict | None = None):
        d = d or {}
        for k in self.keys:
            setattr(self, k, d.get(k, 0))
        self.robust_seen = d.get("robust_seen", False)

    def add(self, r: StepResult) -> None:
        self.loss_sum += r.loss * r.n
        self.n += r.n
        self.clean_correct += r.clean_correct
        if r.robust_correct is not None:
            self.robust_correct += r.robust_correct
            self.robust_seen = True
        self.attack_image_steps += r.attack_image_steps
        self.update_passes += r.update_passes
        self.attack_seconds += r.attack_seconds
        self.update_seconds += r.update_seconds
        self.monitor_seconds += r.monitor_seconds
        self.batches += 1

    def to_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in self.keys}, "robust_seen": self.robust_seen}

    def record(self, epoch: int) -> dict:
        n = max(self.n, 1)
        train_seconds = self.attack_seconds + self.update_seconds
        return {"epoch": epoch + 1, "loss": self.loss_sum / n, "clean_accuracy": self.clean_correct / n,
                "robust_accuracy": self.robust_correct / n if self.robust_seen else None,
                "images": self.n, "attack_image_steps": self.attack_image_steps,
                "update_passes": self.update_passes, "attack_seconds": round(self.attack_seconds, 3),
                "update_seconds": round(self.update_seconds, 3), "train_seconds": round(train_seconds, 3),
                "monitor_seconds": round(self.monitor_seconds, 3),
                "images_per_s": round(self.n / train_seconds, 2) if train_seconds > 0 else None}


def train(model: torch.nn.Module, chips: np.ndarray, labels, image_ids, cfg: TrainConfig, out_dir, *,
          head: CosFaceHead | None = None, resume: bool = False, progress: bool = True,
          checkpoint_every: int = 0, stop_after: int | None = None, extra: dict | None = None) -> dict:
    """Fine-tune ``model`` (its parameters must require grad) on aligned ``chips`` (uint8
    N x H x W x 3) with class ``labels`` and stable ``image_ids``; returns the train.json report.

    checkpoint_every: also checkpoint every this many batches (0: at the end of each epoch only).
    stop_after: stop (after checkpointing) once this many batches ran in total — an interruption,
    for tests and for splitting a run; ``resume=True`` continues from ``out_dir``'s checkpoint (the
    same settings, else a ValueError naming them), ``resume=False`` refuses a folder that holds one
    (CheckpointExists).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels, dtype=np.int64)
    image_ids = list(image_ids)
    if not (len(chips) == len(labels) == len(image_ids)):
        raise ValueError(f"{len(chips)} chips, {len(labels)} labels, {len(image_ids)} ids")
    if len(chips) == 0:
        raise ValueError("no training images")
    device = model_device(model)
    precision = resolve_precision(cfg.precision, device)
    config = {**asdict(cfg), "precision_resolved": precision}
    ckpt_path = out / CHECKPOINT
    if head is None:
        head = make_head(cfg, model, chips, labels)
    optimizer = make_optimizer(cfg, model, head)
    method = make_method(cfg.method, model, head, eps=cfg.eps, steps=cfg.steps, alpha=cfg.alpha, precision=precision)
    epoch, batch, global_step, sums, history = 0, 0, 0, _EpochSums(), []
    if resume and ckpt_path.exists():
        method_state, doc = load_checkpoint(ckpt_path, model=model, head=head, optimizer=optimizer)
        if doc["config"] != config:
            changed = sorted(k for k in config if doc["config"].get(k) != config[k])
            raise ValueError(f"{ckpt_path} was made with other settings ({', '.join(changed)}); "
                             "rerun with the same settings or use a new --out")
        method.load_state(method_state)
        epoch, batch, global_step = doc["epoch"], doc["batch"], doc["global_step"]
        sums, history = _EpochSums(doc["sums"]), doc["history"]
    elif ckpt_path.exists():
        raise CheckpointExists(f"{ckpt_path} exists: pass resume=True to continue it, or use a new out_dir")

    n = len(chips)
    n_batches = (n + cfg.batch_size - 1) // cfg.batch_size
    total = cfg.epochs * n
    done_images = min(epoch * n + batch * cfg.batch_size, total)
    bar = tqdm(total=total, initial=done_images, desc=f"advtrain {cfg.method}", unit="img", disable=not progress)

    def checkpoint():
        meta = {"config": config, "epoch": epoch, "batch": batch, "global_step": global_step,
                "sums": sums.to_dict(), "history": history}
        save_checkpoint(ckpt_path, model=model, head=head, optimizer=optimizer, method_state=method.state(), meta=meta)

    stopped = False
    model.train()
    while epoch < cfg.epochs and not stopped:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(cfg.seed, f"order:{epoch}")))
        while batch < n_batches:
            idx = order[batch * cfg.batch_size:(batch + 1) * cfg.batch_size].numpy()
            x = chips_to_tensor(chips[idx], device)
            y = torch.as_tensor(labels[idx], device=device)
            seeds = [derive_seed(cfg.seed, f"{image_ids[i]}:{epoch}") for i in idx]
            result = method.step(x, y, seeds, optimizer)
            sums.add(result)
            batch += 1
            global_step += 1
            bar.update(len(idx))
            bar.set_postfix(loss=f"{result.loss:.3f}", epoch=epoch + 1)
            if stop_after is not None and global_step >= stop_after:
                stopped = True
                break
            if checkpoint_every and global_step % checkpoint_every == 0 and batch < n_batches:
                checkpoint()
        if batch >= n_batches:
            history.append(sums.record(epoch))
            write_text_atomic(out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in history))
            epoch, batch, sums = epoch + 1, 0, _EpochSums()
        checkpoint()
    bar.close()
    model.eval()
    report = {"config": config, "finished": epoch >= cfg.epochs, "epochs_done": epoch, "global_step": global_step,
              "n_images": n, "n_identities": int(labels.max()) + 1, "history": history,
              "cost": training_cost(history), **(extra or {})}
    if report["finished"]:
        save_weights(model, out / WEIGHTS, {"train_config": config})
        report["weights"] = WEIGHTS
    write_json_atomic(out / "train.json", report)
    return report


def training_cost(history: list[dict]) -> dict:
    """Measured cost of the finished epochs: totals and per training image per epoch."""
    images = sum(r["images"] for r in history)
    if not images:
        return {}
    att = sum(r["attack_image_steps"] for r in history)
    upd = sum(r["update_passes"] for r in history)
    sec = sum(r["train_seconds"] for r in history)
    return {"epochs": len(history), "image_epochs": images, "attack_image_steps": att, "update_passes": upd,
            "image_steps": att + upd, "seconds": round(sec, 3),
            "attack_seconds": round(sum(r["attack_seconds"] for r in history), 3),
            "update_seconds": round(sum(r["update_seconds"] for r in history), 3),
            "per_image_epoch": {"image_steps": (att + upd) / images, "attack_image_steps": att / images,
                                "update_passes": upd / images, "seconds": sec / images}}


__all__ = ["CHECKPOINT", "CheckpointExists", "TrainConfig", "WEIGHTS", "make_head", "make_optimizer", "save_weights",
           "train", "training_cost"]

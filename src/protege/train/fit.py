"""The fit loop: seeded shuffling, AdamW/SGD with a cosine schedule, per-epoch validation,
atomic checkpoints, exact resume, metrics.jsonl and a progress bar. Runs on Hugging Face
Accelerate, so the same code runs in one process here and in several processes / machines.
"""
from __future__ import annotations

import json
import logging
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator

from ..data import Split
from ..files import write_atomic
from ..data.base import augment_images
from ..knowledge import predict_logits
from ..logs import progress
from ..models import load_weights, save_weights
from ..recipe import TrainConfig
from .checkpoint import load_checkpoint, previous, save_checkpoint
from ..files import finite_json
from .guard import check_loss, check_weights

log = logging.getLogger(__name__)
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


@dataclass
class FitResult:
    best_epoch: int  # 1-based epoch whose validation accuracy was highest (weights restored from it)
    best_val_accuracy: float
    epochs_run: int
    history: list[dict] = field(default_factory=list)


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)))


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[torch.Tensor]:
    """This process's batches of example indices for one epoch: same permutation on every process."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    per_rank = math.ceil(n / world)
    perm = torch.cat([perm, perm[: per_rank * world - n]])[rank::world]
    return list(perm.split(batch_size))


def _accuracy(model: torch.nn.Module, split: Split, device: torch.device) -> float:
    logits = predict_logits(model, split.x, device=device)
    return float((logits.argmax(-1) == split.y).float().mean())


def _append_metrics(path: Path, stage: str, start_epoch: int, row: dict | None = None) -> None:
    """Drop lines of ``stage`` from epochs a resume will redo, then append ``row``."""
    keep = []
    for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []:
        try:
            entry = json.loads(ln)
            redone = entry.get("stage") == stage and entry["epoch"] > start_epoch
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning(f"metrics: dropping a damaged line of {path}: {ln[:60]!r}")
            continue
        if not redone:
            keep.append(json.dumps(finite_json(entry), allow_nan=False))  # old NaN tokens become null
    if row is not None:
        keep.append(json.dumps(finite_json(row), allow_nan=False))
    write_atomic(path, "".join(ln + "\n" for ln in keep), "then continue with --resume")


def fit(model: torch.nn.Module, loss_fn: LossFn, train: Split, val: Split, cfg: TrainConfig, *, seed: int,
        ckpt_dir: Path, metrics_path: Path, stage: str, accelerator: Accelerator, augment: bool = False,
        resume: bool = False, validate: Optional[Callable[[torch.nn.Module, torch.device], dict]] = None,
        lr_field: str = "train.lr") -> FitResult:
    """Train ``model`` in place; on return it holds the validation-selected weights.

    A NaN or infinite loss, or weights that became non-finite, stop training at once (``Diverged``, naming
    ``lr_field``) before anything non-finite is saved: the last checkpoint stays the last finite epoch.

    ``validate(model, device)`` returns the epoch's validation metrics with a ``score`` (higher is better) that
    selects the epoch; by default the score is validation accuracy.
    """
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    last, best = ckpt_dir / "last.safetensors", ckpt_dir / "best.safetensors"
    world, rank = accelerator.num_processes, accelerator.process_index
    steps_per_epoch = math.ceil(math.ceil(len(train) / world) / cfg.batch_size)
    opt = _optimizer(model, cfg)
    sched = _scheduler(opt, cfg, cfg.epochs * steps_per_epoch)
    loop = {"epoch": 0, "best_val": float("-inf"), "best_epoch": 0, "history": []}
    if resume and (last.is_file() or previous(last).is_file()):  # a damaged or lost last falls back to the one before
        loop = load_checkpoint(last, model, opt, sched)
    else:
        # A stage's randomness (dropout, augmentation) must not depend on what ran before it in this
        # process, or a run resumed at a stage boundary would differ from an uninterrupted one.
        torch.manual_seed(seed * 1_000_003 + zlib.crc32(stage.encode()))
        if accelerator.is_main_process:
            _append_metrics(metrics_path, stage, 0)
            best.unlink(missing_ok=True)  # an earlier run's best epoch must not come back if no epoch of this one scores
    wrapped, opt = accelerator.prepare(model, opt)
    device = accelerator.device
    for epoch in range(loop["epoch"], cfg.epochs):
        t0 = time.perf_counter()
        wrapped.train()
        sums: dict[str, float] = {}
        batches = _epoch_batches(len(train), cfg.batch_size, seed, epoch, rank, world)
        shown_loss: dict[str, str] = {}
        bar = progress(batches, f"{stage} {epoch + 1}/{cfg.epochs}", logger=log, enabled=accelerator.is_main_process, postfix=shown_loss)
        guard = dict(stage=stage, epochs=cfg.epochs, lr_field=lr_field, lr=cfg.lr,
                     kept=f"the last finite checkpoint (epoch {loop['epoch']}) is kept in {last}" if loop["epoch"] else "nothing of this stage was saved")
        for step, idx in enumerate(bar, 1):
            x, y = train.x[idx], train.y[idx]
            if augment:
                x = augment_images(x)
            losses = loss_fn(wrapped, x.to(device), y.to(device), idx)
            check_loss(float(losses["loss"].detach()), epoch=epoch + 1, step=step, **guard)
            opt.zero_grad(set_to_none=True)
            accelerator.backward(losses["loss"])
            opt.step()
            sched.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            shown_loss["loss"] = f"{float(losses['loss'].detach()):.4f}"
        if validate is None:
            val_acc = _accuracy(accelerator.unwrap_model(wrapped), val, device)
            shown = {"val_accuracy": val_acc}
        else:
            shown = validate(accelerator.unwrap_model(wrapped), device)
            val_acc = shown.pop("score")
        check_weights(accelerator.unwrap_model(wrapped), epoch=epoch + 1, **guard)
        row = {"stage": stage, "epoch": epoch + 1, **{k: v / len(batches) for k, v in sums.items()},
               **shown, "lr": sched.get_last_lr()[0], "epoch_time_s": time.perf_counter() - t0, "processes": world}
        loop["epoch"] = epoch + 1
        loop["history"].append(row)
        if val_acc > loop["best_val"]:
            loop["best_val"], loop["best_epoch"] = val_acc, epoch + 1
            if accelerator.is_main_process:
                save_weights(accelerator.unwrap_model(wrapped), best)
        if accelerator.is_main_process:  # metrics first: a resume drops rows of epochs it redoes
            _append_metrics(metrics_path, stage, epoch, row)
            save_checkpoint(last, accelerator.unwrap_model(wrapped), opt.optimizer if hasattr(opt, "optimizer") else opt, sched, loop)
            val_text = "  ".join(f"{k.replace('_accuracy', '_acc')} {v:.4f}" for k, v in shown.items())
            log.info(f"{stage} epoch {epoch + 1}/{cfg.epochs}  loss {row['loss']:.4f}  {val_text}  ({row['epoch_time_s']:.1f}s)")
        accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(wrapped)
    if best.is_file():
        load_weights(model, best)
    return FitResult(loop["best_epoch"], loop["best_val"], loop["epoch"], loop["history"])

"""The one fit loop of protege (teacher, student, born-again generations, pruning recovery, quantization-aware
training, causal LMs): seeded shuffling, AdamW/SGD with a cosine schedule, per-epoch validation, atomic checkpoints,
exact resume, metrics.jsonl and progress. Runs on Hugging Face Accelerate, so the same code runs in one process here
and in several processes / machines. What a special training changes (QAT) goes in ``Hooks``.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

import torch
from accelerate import Accelerator
from pydantic import Field, field_validator

from ..config import _Strict
from ..data import Split
from ..data.base import augment_images
from ..data.views import Views
from ..data.stream import batches as read_batches
from ..files import finite_json, write_atomic
from ..knowledge import predict_logits
from ..logs import progress
from ..models import load_weights, save_weights
from .checkpoint import load_checkpoint, previous, save_checkpoint
from .guard import check_loss, check_weights

log = logging.getLogger(__name__)
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


class TrainConfig(_Strict):
    """How one model is optimised."""

    epochs: int = Field(10, ge=1, le=100_000)
    batch_size: int = Field(128, ge=1, le=1_000_000)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0, le=100)  # float32 overflows in the optimizer far above this
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["cosine", "constant"] = "cosine"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    augment: bool = False  # images: random crop (pad 2) + horizontal flip; for a student it means live teacher passes
    # (unless distill.teacher_views caches the teacher on fixed augmented views)
    log_with: list[Literal["tensorboard", "mlflow", "trackio", "wandb", "aim", "comet_ml", "clearml", "dvclive", "swanlab"]] = \
        Field(default_factory=list)  # the recipe's `train` only: trackers (through Accelerate) every epoch's metrics also go to

    @field_validator("log_with", mode="before")
    @classmethod
    def _one_or_more(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


EpochEnd = Callable[[str, int, float], None]  # (stage, epoch, validation score): may raise to stop training
_EPOCH_END: contextvars.ContextVar[Optional[EpochEnd]] = contextvars.ContextVar("protege_epoch_end", default=None)


@contextlib.contextmanager
def watch_epochs(callback: EpochEnd) -> Iterator[None]:
    """Call ``callback(stage, epoch, score)`` after every validated epoch of every fit() inside the block, once its
    checkpoint is saved (tuning reports each epoch to Optuna, whose pruner may stop the trial by raising)."""
    token = _EPOCH_END.set(callback)
    try:
        yield
    finally:
        _EPOCH_END.reset(token)


@dataclass
class Hooks:
    """What a special training changes in the loop (the defaults: plain training). Quantization-aware training
    (compress/qat.py) puts an exported graph in training mode its own way, freezes observers and BatchNorm and
    lowers the learning rate for its last epoch, keeps pruned weights at zero after each step, and keeps the last
    epoch (validating would move its observers)."""

    train_mode: Callable[[torch.nn.Module], Any] = torch.nn.Module.train
    epoch_start: Optional[Callable[[int, Any, Any], None]] = None  # (epoch, optimizer, scheduler), after train_mode
    after_step: Optional[Callable[[], None]] = None
    select_best: bool = True  # False: no validation, the last epoch's weights are kept
    shuffle_stride: int = 100_003  # epoch e's batch order: a permutation seeded with seed * stride + e


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


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int,
                   stride: int = 100_003) -> list[torch.Tensor]:
    """This process's batches of example indices for one epoch: same permutation on every process."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * stride + epoch))
    per_rank = math.ceil(n / world)
    perm = torch.cat([perm, perm[: per_rank * world - n]])[rank::world]
    return list(perm.split(batch_size))


def _accuracy(model: torch.nn.Module, split: Split, device: torch.device) -> float:
    logits = predict_logits(model, split.x, device=device, pad_id=split.pad_id)
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
        ckpt_dir: Path, metrics_path: Optional[Path], stage: str, accelerator: Accelerator, augment: "bool | Views" = False,
        resume: bool = False, validate: Optional[Callable[[torch.nn.Module, torch.device], dict]] = None,
        lr_field: str = "train.lr", hooks: Optional[Hooks] = None) -> FitResult:
    """Train ``model`` in place; on return it holds the validation-selected weights (``hooks.select_best``).

    A NaN or infinite loss, or weights that became non-finite, stop training at once (``Diverged``, naming
    ``lr_field``) before anything non-finite is saved: the last checkpoint stays the last finite epoch.

    ``validate(model, device)`` returns the epoch's validation metrics with a ``score`` (higher is better) that
    selects the epoch; by default the score is validation accuracy. ``metrics_path`` None: no metrics file.
    """
    hooks = hooks or Hooks()
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    last, best = ckpt_dir / "last.safetensors", ckpt_dir / "best.safetensors"
    world = accelerator.num_processes
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
            if metrics_path is not None:
                _append_metrics(metrics_path, stage, 0)
            best.unlink(missing_ok=True)  # an earlier run's best epoch must not come back if no epoch of this one scores
    wrapped, opt = accelerator.prepare(model, opt)
    for epoch in range(loop["epoch"], cfg.epochs):
        t0 = time.perf_counter()
        guard = dict(stage=stage, epochs=cfg.epochs, lr_field=lr_field, lr=cfg.lr,
                     kept=f"the last finite checkpoint (epoch {loop['epoch']}) is kept in {last}" if loop["epoch"] else "nothing of this stage was saved")
        sums, steps = _epoch(wrapped, loss_fn, train, cfg, seed, epoch, opt, sched, accelerator, augment, hooks, guard)
        model = accelerator.unwrap_model(wrapped)
        shown, score = _validation(model, val, validate, accelerator.device) if hooks.select_best else ({}, None)
        check_weights(model, epoch=epoch + 1, **guard)
        row = {"stage": stage, "epoch": epoch + 1, **{k: v / steps for k, v in sums.items()},
               **shown, "lr": sched.get_last_lr()[0], "epoch_time_s": time.perf_counter() - t0, "processes": world}
        loop["epoch"] = epoch + 1
        loop["history"].append(row)
        if score is not None and score > loop["best_val"]:
            loop["best_val"], loop["best_epoch"] = score, epoch + 1
            if accelerator.is_main_process:
                save_weights(model, best)
        if accelerator.is_main_process:  # metrics first: a resume drops rows of epochs it redoes
            if metrics_path is not None:
                _append_metrics(metrics_path, stage, epoch, row)
            save_checkpoint(last, model, opt.optimizer if hasattr(opt, "optimizer") else opt, sched, loop)
            val_text = "  ".join(f"{k.replace('_accuracy', '_acc')} {v:.4f}" for k, v in shown.items())
            log.info(f"{stage} epoch {epoch + 1}/{cfg.epochs}  loss {row['loss']:.4f}  {val_text}  ({row['epoch_time_s']:.1f}s)")
        if accelerator.trackers:  # the run's trackers (train.log_with): each value under "<stage>/<name>", step = epoch
            accelerator.log({f"{stage}/{k}": v for k, v in row.items() if k not in ("stage", "epoch", "processes")
                             and isinstance(v, (int, float)) and math.isfinite(v)}, step=epoch + 1)
        accelerator.wait_for_everyone()
        watcher = _EPOCH_END.get()
        if watcher is not None and score is not None:
            watcher(stage, epoch + 1, score)
    model = accelerator.unwrap_model(wrapped)
    if best.is_file():
        load_weights(model, best)
    if not hooks.select_best:
        return FitResult(loop["epoch"], float("nan"), loop["epoch"], loop["history"])
    return FitResult(loop["best_epoch"], loop["best_val"], loop["epoch"], loop["history"])


def _epoch(model: torch.nn.Module, loss_fn: LossFn, train: Split, cfg: TrainConfig, seed: int, epoch: int, opt, sched,
           accelerator: Accelerator, augment: "bool | Views", hooks: Hooks, guard: dict) -> tuple[dict[str, float], int]:
    """One epoch of steps over this process's batches; the sums of the named losses and the number of steps."""
    hooks.train_mode(model)
    if hooks.epoch_start is not None:
        hooks.epoch_start(epoch, opt, sched)
    sums: dict[str, float] = {}
    shown_loss: dict[str, str] = {}
    batches = _epoch_batches(len(train), cfg.batch_size, seed, epoch, accelerator.process_index, accelerator.num_processes,
                             hooks.shuffle_stride)
    bar = progress(read_batches(train.x, train.y, batches, train.pad_id), f"{guard['stage']} {epoch + 1}/{cfg.epochs}", logger=log,
                   enabled=accelerator.is_main_process, postfix=shown_loss)
    for step, (x, y, idx) in enumerate(bar, 1):
        if isinstance(augment, Views):  # fixed views: the cached teacher answered for exactly this image
            view = epoch % augment.k
            x, idx = augment.apply(x, idx, view), augment.rows(idx, view)
        elif augment:
            x = augment_images(x)
        losses = loss_fn(model, x.to(accelerator.device), y.to(accelerator.device), idx)
        check_loss(float(losses["loss"].detach()), epoch=epoch + 1, step=step, **guard)
        opt.zero_grad(set_to_none=True)
        accelerator.backward(losses["loss"])
        opt.step()
        sched.step()
        if hooks.after_step is not None:
            hooks.after_step()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        shown_loss["loss"] = f"{float(losses['loss'].detach()):.4f}"
    return sums, len(batches)


def _validation(model: torch.nn.Module, val: Split, validate, device) -> tuple[dict, float]:
    """The epoch's validation metrics to show, and its score (default: validation accuracy)."""
    if validate is None:
        acc = _accuracy(model, val, device)
        return {"val_accuracy": acc}, acc
    shown = validate(model, device)
    return shown, shown.pop("score")
